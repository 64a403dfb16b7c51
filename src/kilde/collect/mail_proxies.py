"""Telling machine fetches of a tracking pixel or link from people: heuristics, not proof.

Mail privacy proxies and image prefetchers load a mail's images whether or not anybody reads
it (Apple Mail Privacy Protection fetches them when the mail arrives), or load them on the
reader's behalf without saying who or where (Gmail's and Yahoo's image proxies), and corporate
security scanners follow every link of a mail before it is delivered. Such hits are recorded
with `machine_open: true` (or `machine_click: true`) and the rule that matched, and reports count
them apart from human ones.

The rules, in the order they are tried (the first match wins):

- `head_request`: a HEAD request; scanners check a URL without fetching it.
- `prefetch_header`: `Purpose`, `Sec-Purpose`, `X-Purpose` or `X-Moz` says prefetch or preview.
- `no_user_agent`: no User-Agent header at all.
- `gmail_proxy`: `GoogleImageProxy` / `ggpht.com` in the user agent (Gmail's image proxy).
- `yahoo_proxy`: `YahooMailProxy` / `YahooCacheSystem` in the user agent.
- `apple_mpp`: the bare user agent `Mozilla/5.0` that Apple's privacy proxy sends, or a request
  from Apple's own network 17.0.0.0/8.
- `microsoft_prefetch`: Outlook.com / Exchange Online prefetchers and Office link checks
  (`Edge/12.246` on `Chrome/42`, `Microsoft Office Existence Discovery`, `ms-office`,
  `BingPreview`, `Microsoft-WebDAV`).
- `security_scanner`: mail security gateways (Barracuda, Mimecast, Proofpoint, IronPort, ...).
- `bot`: crawlers, HTTP libraries and headless browsers (`bot`, `spider`, `curl/`, `python-`,
  `HeadlessChrome`, ...), or what ua-parser classifies as a spider.

Limits worth knowing: Apple's proxy also leaves through content-delivery networks whose
addresses are not Apple's, so some Apple prefetches with a full Apple Mail user agent look human;
Gmail's proxy fetches the pixel when the reader opens the mail, so a `gmail_proxy` open usually
*is* a person reading, with device and place hidden (it is still counted as a machine open, since
nothing about the device or place is known and Gmail caches the image after the first fetch).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from kilde.pipeline.enrich import user_agent_facts

APPLE_NETWORKS = (ipaddress.ip_network("17.0.0.0/8"),)
PREFETCH_HEADERS = ("purpose", "sec-purpose", "x-purpose", "x-moz")

# (rule, lower-case substrings of the user agent); order matters.
UA_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gmail_proxy", ("googleimageproxy", "ggpht.com")),
    ("yahoo_proxy", ("yahoomailproxy", "yahoocachesystem")),
    (
        "microsoft_prefetch",
        (
            "edge/12.246",
            "microsoft office existence discovery",
            "ms-office",
            "bingpreview",
            "microsoft-webdav",
            "microsoft office protocol discovery",
        ),
    ),
    (
        "security_scanner",
        (
            "barracuda",
            "mimecast",
            "proofpoint",
            "ironport",
            "forcepoint",
            "sophos",
            "symantec",
            "trend micro",
            "fortiguard",
            "safelinks",
            "appriver",
            "zscaler",
        ),
    ),
    (
        "bot",
        (
            "bot",
            "spider",
            "crawler",
            "slurp",
            "curl/",
            "wget/",
            "python-",
            "go-http-client",
            "java/",
            "okhttp",
            "libwww",
            "headlesschrome",
            "phantomjs",
            "facebookexternalhit",
            "preview",
        ),
    ),
)


@dataclass(frozen=True)
class Verdict:
    machine: bool
    rule: str | None = None


HUMAN = Verdict(False)


def _from_apple(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in APPLE_NETWORKS)


def classify(
    *,
    method: str,
    user_agent: str | None,
    ip: str | None,
    headers: Mapping[str, str],
) -> Verdict:
    """Whether a hit on a pixel or link looks like a machine, and by which rule."""
    if method.upper() == "HEAD":
        return Verdict(True, "head_request")
    for name in PREFETCH_HEADERS:
        value = headers.get(name, "").lower()
        if "prefetch" in value or "preview" in value:
            return Verdict(True, "prefetch_header")
    ua = (user_agent or "").strip()
    if not ua:
        return Verdict(True, "no_user_agent")
    lowered = ua[:1024].lower()
    for rule, needles in UA_RULES[:2]:
        if any(needle in lowered for needle in needles):
            return Verdict(True, rule)
    if ua == "Mozilla/5.0" or _from_apple(ip):
        return Verdict(True, "apple_mpp")
    for rule, needles in UA_RULES[2:]:
        if any(needle in lowered for needle in needles):
            return Verdict(True, rule)
    if user_agent_facts(ua[:1024])[4] == "bot":
        return Verdict(True, "bot")
    return HUMAN
