"""Everything a website talks to: /k.js and its settings, the cookie, beacons, consent records.

One router, so the app includes it with one line. It must come before the Segment API's
`POST /v1/{kind}` route, which would otherwise answer `POST /v1/cookie`.
"""

from __future__ import annotations

from fastapi import APIRouter

from kilde.collect import beacon, consent, cookie, tracker

router = APIRouter()
router.include_router(tracker.router)
router.include_router(cookie.router)
router.include_router(beacon.router)
router.include_router(consent.router)

# Paths browsers call from other origins (the company's website).
CROSS_ORIGIN_PATHS = (tracker.SCRIPT_PATH,)
CREDENTIALED_PATHS = ("/v1/cookie",)
