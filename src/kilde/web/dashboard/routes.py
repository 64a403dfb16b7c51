"""The dashboard's router: pages at `/`, its static files, and its few admin API routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from starlette.responses import Response

from kilde.web.admin_api import require_admin
from kilde.web.dashboard import (
    auth,
    insights,
    live,
    login,
    overview,
    privacy,
    profiles,
    quality,
    segments,
)
from kilde.web.dashboard.base import STATIC_FILES, _static_bytes

router = APIRouter()


@router.get("/static/{name:path}", include_in_schema=False)
def static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(404)
    return Response(
        _static_bytes(name),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


router.include_router(auth.router, dependencies=[Depends(require_admin)])
router.include_router(overview.api, dependencies=[Depends(require_admin)])
router.include_router(login.router)
router.include_router(overview.router)
router.include_router(live.router)
router.include_router(profiles.router)
router.include_router(quality.router)
router.include_router(segments.router)
router.include_router(insights.router)
router.include_router(privacy.router)
