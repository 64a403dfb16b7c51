"""Enrich: user agent to browser, OS and device; IP to country; then the IP policy.

The country is looked up on the full address before the policy truncates or drops it, so the
store never needs the full address.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any

from geoip2fast import GeoIP2Fast
from ua_parser import parse as parse_user_agent

from kilde.plan.models import IpPolicy

_BOT_FAMILIES = {"Spider", "Bot"}
_TABLETS = ("iPad", "Tablet", "Kindle", "Nexus 7", "Nexus 9", "SM-T")


@lru_cache(maxsize=8192)
def user_agent_facts(ua: str) -> tuple[str | None, str | None, str | None, str | None, str]:
    """(browser, browser version, OS, OS version, device class) for a user-agent string."""
    parsed = parse_user_agent(ua)
    browser = parsed.user_agent
    os = parsed.os
    device = parsed.device
    family = device.family if device else "Other"
    if family in _BOT_FAMILIES or (browser and "bot" in browser.family.lower()):
        kind = "bot"
    elif any(t in (family or "") for t in _TABLETS) or any(t in ua for t in _TABLETS):
        kind = "tablet"
    elif (os and os.family in ("iOS", "Android")) or "Mobile" in ua:
        kind = "mobile"
    else:
        kind = "desktop"
    return (
        browser.family if browser else None,
        browser.major if browser else None,
        os.family if os else None,
        os.major if os else None,
        kind,
    )


def protect_ip(ip: str | None, policy: IpPolicy) -> str | None:
    """Apply the plan's IP policy: IPv4 keeps /24, IPv6 keeps /48 when truncating."""
    if ip is None or policy == "drop":
        return None
    return _protect_ip(ip, policy)


# Events come in sessions, so the same addresses recur; parsing one costs several µs.
@lru_cache(maxsize=65536)
def _protect_ip(ip: str, policy: IpPolicy) -> str | None:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if policy == "full":
        return str(address)
    if address.version == 4:
        return str(ipaddress.IPv4Address(int(address) & _V4_KEEP))
    return str(ipaddress.IPv6Address(int(address) & _V6_KEEP))


_V4_KEEP = ~((1 << 8) - 1) & ((1 << 32) - 1)  # the first 24 bits
_V6_KEEP = ~((1 << 80) - 1) & ((1 << 128) - 1)  # the first 48 bits


class Enricher:
    def __init__(self, ip_policy: IpPolicy) -> None:
        self.ip_policy = ip_policy
        self._geo = GeoIP2Fast(verbose=False)
        self._country = lru_cache(maxsize=65536)(self._lookup_country)

    def country(self, ip: str | None) -> str | None:
        if not ip:
            return None
        return self._country(ip)

    def _lookup_country(self, ip: str) -> str | None:
        try:
            code = self._geo.lookup(ip).country_code
        except Exception:
            return None
        return code if code and len(code) == 2 and code != "--" else None

    def enrich(self, row: dict[str, Any], ip: str | None, user_agent: str | None) -> None:
        """Fill the enrichment columns of `row` in place and strip the raw IP from its context."""
        context = row["context"]
        ip = context.pop("ip", None) or ip
        ua = context.get("userAgent") or user_agent
        if isinstance(ip, str):
            row["country"] = self.country(ip)
            row["ip"] = protect_ip(ip, self.ip_policy)
            if row["ip"]:
                context["ip"] = row["ip"]
        else:
            row["country"] = None
            row["ip"] = None
        if isinstance(ua, str) and ua:
            (
                row["browser"],
                row["browser_version"],
                row["os"],
                row["os_version"],
                row["device"],
            ) = user_agent_facts(ua[:1024])
        else:
            row["browser"] = row["browser_version"] = row["os"] = row["os_version"] = None
            row["device"] = None
