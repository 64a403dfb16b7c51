"""The browser tracker: `/k.js` (versioned, cacheable, gzipped), its settings, the snippet.

k.js is written in this project (tracker/k.js, no dependencies). It asks
`/v1/settings?writeKey=...` which purposes need consent before it stores or sends anything;
that answer is derived from the collection plan by `tracker_settings`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from kilde import __version__
from kilde.plan.models import Plan, Source
from kilde.web.errors import HttpProblem, JsonResponse

router = APIRouter()

SCRIPT_PATH = "/k.js"
LONG_CACHE = "public, max-age=31536000, immutable"
SHORT_CACHE = "public, max-age=3600"


@dataclass(frozen=True)
class Script:
    text: bytes
    gzipped: bytes
    version: str  # the package version and a hash of the script
    etag: str


@lru_cache(maxsize=1)
def script() -> Script:
    source = (resources.files("kilde.collect.tracker") / "k.js").read_text(encoding="utf-8")
    digest = hashlib.sha256(source.encode()).hexdigest()[:10]
    version = f"{__version__}-{digest}"
    text = source.replace("__KILDE_VERSION__", version).encode()
    return Script(text, gzip.compress(text, 9, mtime=0), version, f'"k-{version}"')


def snippet(collector_url: str, write_key: str, *, auto_page: bool = True) -> str:
    """The HTML to paste into every page, just before </head>."""
    url = collector_url.rstrip("/")
    options = "" if auto_page else ";q.o={autoPage:false}"
    args = ",".join(json.dumps(v) for v in (url, write_key))
    return (
        "<!-- Kilde: website tracking (docs/website-tracking.md) -->\n"
        "<script>\n"
        "(function(w,d,h,k){var q=w.kilde=w.kilde||[];if(q.live)return;"
        f"q.h=h;q.k=k{options};\n"
        '["page","track","identify","alias","reset","consent","ready"].forEach(function(m){'
        "q[m]=q[m]||function(){q.push([m,[].slice.call(arguments)])}});\n"
        'var s=d.createElement("script");s.async=true;'
        f's.src=h+"{SCRIPT_PATH}?v={script().version}";d.head.appendChild(s)'
        f"}})(window,document,{args});\n"
        "</script>"
    )


def page_purposes(plan: Plan) -> list[str]:
    """The purposes page views serve: the plan's unnamed page event, else any page event."""
    pages = [e for e in plan.events if e.type == "page"]
    spec = next((e for e in pages if e.name is None), pages[0] if pages else None)
    return list(spec.purposes) if spec else []


def cookie_purposes(plan: Plan) -> list[str]:
    """The purposes the anonymous-id cookie serves."""
    if plan.web.cookie_purpose:
        return [plan.web.cookie_purpose]
    return page_purposes(plan)


def tracker_settings(plan: Plan) -> dict[str, Any]:
    """What k.js needs to know: which purposes need consent, and which events serve which."""
    events: dict[str, list[str]] = {"page": page_purposes(plan)}
    for spec in plan.events:
        if spec.type == "track" and spec.name:
            events[f"track:{spec.name}"] = list(spec.purposes)
    return {
        "version": script().version,
        "purposes": {
            p.id: {"consent": p.legal_basis == "consent", "sale": p.sale_or_sharing}
            for p in plan.purposes
        },
        "cookie": cookie_purposes(plan),
        "events": events,
        "cookieless": plan.web.cookieless_page_count,
        "serverCookie": plan.web.server_cookie,
    }


def gpc_header(request: Request) -> bool:
    """The Global Privacy Control request header (Sec-GPC: 1)."""
    return request.headers.get("sec-gpc", "").strip() == "1"


def web_source(request: Request, key: str | None) -> Source:
    """The source a write key from a browser belongs to (without echoing the key)."""
    source: Source | None = request.app.state.keys.active.get(key) if key else None
    if source is None:
        raise HttpProblem(
            401,
            "unknown_write_key" if key else "missing_write_key",
            "the write key does not belong to any source in the collection plan"
            if key
            else "no write key was sent",
            "use the snippet from `kilde snippet --source NAME`",
        )
    return source


@router.get(SCRIPT_PATH, include_in_schema=False)
def serve_script(request: Request, v: str | None = None) -> Response:
    current = script()
    # The versioned address the snippet uses never changes content: cache it for a year.
    cache = LONG_CACHE if v == current.version else SHORT_CACHE
    headers = {
        "Cache-Control": cache,
        "ETag": current.etag,
        "Vary": "Accept-Encoding",
        "X-Kilde-Version": current.version,
    }
    if current.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = current.text
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        body = current.gzipped
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type="text/javascript; charset=utf-8", headers=headers)


@router.get("/v1/settings", include_in_schema=False)
def settings(request: Request, writeKey: str | None = None) -> Response:
    """k.js's settings for one source; carries no identifier, sets no cookie."""
    web_source(request, writeKey)
    body = {**tracker_settings(request.app.state.pipeline.plan), "gpc": gpc_header(request)}
    return JsonResponse(body, headers={"Cache-Control": "private, max-age=60", "Vary": "Sec-GPC"})
