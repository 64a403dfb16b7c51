"""The server-set anonymous-id cookie: `POST /v1/cookie`.

Safari caps cookies written by scripts to 7 days; a cookie set by an HTTP response of the
website's own (sub)domain lasts as long as it says. When Kilde runs on such a subdomain, k.js
asks this endpoint to set or refresh `kilde_aid` as an HTTP cookie (1 year, SameSite=Lax,
Secure on https, Domain from the plan's `web.cookie_domain`).

The body is JSON sent as text/plain (no preflight): `{"writeKey", "anonymousId"}` to set or
refresh, `{"writeKey", "forget": true}` to delete the cookie when consent is withdrawn. The
cookie the browser already holds wins over the body, because it is the one that lasted.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from kilde.collect.tracker import gpc_header, web_source
from kilde.web.errors import HttpProblem, JsonResponse

COOKIE = "kilde_aid"
MAX_AGE = 365 * 24 * 3600
MAX_BODY = 2048
_ID = re.compile(r"^[A-Za-z0-9_\-]{8,64}$")

router = APIRouter()


def valid_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _ID.match(value) else None


def is_https(request: Request) -> bool:
    if request.app.state.settings.trust_proxy:
        forwarded = request.headers.get("x-forwarded-proto", "")
        if forwarded:
            return forwarded.split(",")[0].strip().lower() == "https"
    return request.url.scheme == "https"


async def _json_body(request: Request) -> dict[str, Any]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HttpProblem(
                413,
                "payload_too_large",
                f"the body is larger than {MAX_BODY} bytes",
                'send only {"writeKey": ..., "anonymousId": ...}',
            )
    try:
        payload = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise HttpProblem(
            400,
            "invalid_body",
            "the body must be a JSON object",
            'send {"writeKey": ..., "anonymousId": ...} as text/plain or application/json',
        )
    return payload


@router.post("/v1/cookie")
async def set_cookie(request: Request) -> Response:
    payload = await _json_body(request)
    key = payload.get("writeKey")
    web_source(request, key if isinstance(key, str) else None)
    plan = request.app.state.pipeline.plan
    if not plan.web.server_cookie:
        raise HttpProblem(
            404,
            "server_cookie_off",
            "the collection plan turns the server-set cookie off (web.server_cookie: false)",
            "set web.server_cookie: true in the plan to use it",
        )
    response: Response
    attributes: dict[str, Any] = {
        "key": COOKIE,
        "path": "/",
        "domain": plan.web.cookie_domain,
        "secure": is_https(request),
        "httponly": False,  # k.js reads it, so it needs no round trip on each page
        "samesite": "lax",
    }
    if payload.get("forget") is True:
        response = JsonResponse({"success": True, "forgotten": True})
        response.delete_cookie(**attributes)
    else:
        anonymous_id = (
            valid_id(request.cookies.get(COOKIE))
            or valid_id(payload.get("anonymousId"))
            or str(uuid.uuid4())
        )
        response = JsonResponse(
            {"success": True, "anonymousId": anonymous_id, "gpc": gpc_header(request)}
        )
        response.set_cookie(value=anonymous_id, max_age=MAX_AGE, **attributes)
    response.headers["Cache-Control"] = "no-store"
    return response
