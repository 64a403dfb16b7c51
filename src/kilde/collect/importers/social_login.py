"""Social login: the OpenID Connect claims an app received become an identity and traits.

The identity is `provider:sub` (for example `google:1098...`), kept in `context.externalIds`
as Segment does, and the user id when the app sends none of its own. Claims become traits only
where the plan declares the trait, so a provider that sends more than the plan wants does not
get it stored. `context.provenance.provider` says which provider vouched for the traits.
"""

from __future__ import annotations

import re
from typing import Any

from kilde.collect.importers import values
from kilde.collect.importers.base import (
    Converted,
    ImportFailed,
    Record,
    Row,
    content_key,
    message_id,
)
from kilde.collect.importers.convert import Context, RowProblem, text_cell, when
from kilde.plan.models import Plan

# OIDC standard claim -> Kilde trait
CLAIM_TRAITS = {
    "email": "email",
    "email_verified": "email_verified",
    "name": "name",
    "given_name": "first_name",
    "family_name": "last_name",
    "locale": "locale",
    "picture": "picture",
}
_PROVIDER = re.compile(r"^[a-z0-9][a-z0-9._\-]{0,63}$")


class ClaimsProblem(ValueError):
    def __init__(self, field: str, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.fix = fix


def provider_name(raw: str) -> str:
    """'Google', 'https://accounts.google.com' -> 'google'."""
    name = raw.strip().lower()
    name = re.sub(r"^https?://", "", name).split("/")[0]
    for prefix in ("accounts.", "login.", "www.", "appleid.", "auth."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if "." in name:
        name = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if not _PROVIDER.match(name):
        raise ClaimsProblem("provider", "is not a provider name", "send e.g. google or apple")
    return name


def claims_message(
    *,
    plan: Plan,
    source: str,
    provider: str,
    claims: dict[str, Any],
    user_id: str | None = None,
    anonymous_id: str | None = None,
    timestamp: str | None = None,
    extra_context: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """(identify message, claims left out because the plan does not declare their trait)."""
    sub = claims.get("sub")
    if isinstance(sub, int) and not isinstance(sub, bool):
        sub = str(sub)
    if not isinstance(sub, str) or not sub.strip() or len(sub) > 255:
        raise ClaimsProblem(
            "sub", "the sub claim is missing or not a string", "send the ID token's sub claim"
        )
    provider = provider_name(provider)
    external_id = f"{provider}:{sub.strip()}"
    declared = {t.name: t for t in plan.traits if t.scope == "user"}
    traits: dict[str, Any] = {}
    left_out: list[str] = []
    for claim, value in claims.items():
        if claim == "sub" or value is None or value == "":
            continue
        trait = CLAIM_TRAITS.get(claim, claim)
        spec = declared.get(trait)
        if spec is None:
            left_out.append(claim)
            continue
        try:
            traits[trait] = values.typed(value, spec.type)
        except values.ValueProblem as problem:
            raise ClaimsProblem(claim, problem.reason, problem.fix) from None
    if "email" in traits and claims.get("email_verified") in (False, "false", "False"):
        # An unverified address from a provider proves nothing; keep it out of the profile.
        traits.pop("email")
        left_out.append("email")
    # Segment's convention, read by identity resolution as the identifier `provider:sub`.
    context: dict[str, Any] = {
        **(extra_context or {}),
        "externalIds": [
            {"id": sub.strip(), "type": provider, "collection": "users", "encoding": "none"}
        ],
    }
    provenance = dict(context.get("provenance") or {})
    provenance.update({"tier": "first_party", "provider": provider})
    context["provenance"] = provenance
    ids: dict[str, Any] = {"userId": user_id or external_id}
    if anonymous_id:
        ids["anonymousId"] = anonymous_id
    key = f"{external_id}\x1f{user_id or ''}\x1f{content_key(traits)}"
    message: dict[str, Any] = {
        "type": "identify",
        "messageId": message_id(source, "social_login", key),
        **ids,
        "traits": traits,
        "context": context,
    }
    if timestamp:
        message["timestamp"] = timestamp
    return message, sorted(left_out)


class SocialLoginConverter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        missing = [f for f in ("provider", "sub") if f not in ctx.resolved.fields]
        if missing:
            raise ImportFailed(
                "the file has no " + " and no ".join(missing) + " column",
                fix="social login files need the provider and the sub claim of each login",
            )

    def _message(self, row: Row) -> dict[str, Any]:
        ctx = self.ctx
        claims: dict[str, Any] = {}
        for claim in ("sub", *CLAIM_TRAITS):
            column = ctx.resolved.fields.get(claim)
            if column is not None and not values.is_blank(row.values.get(column)):
                claims[claim] = row.values[column]
        provider = text_cell(row, ctx, "provider") or ""
        try:
            message, _ = claims_message(
                plan=ctx.plan,
                source=ctx.source,
                provider=provider,
                claims=claims,
                user_id=text_cell(row, ctx, "user_id"),
                anonymous_id=text_cell(row, ctx, "anonymous_id"),
                timestamp=when(row, ctx, required=False),
                extra_context=ctx.context_for(row.line),
            )
        except ClaimsProblem as problem:
            column = ctx.resolved.fields.get(problem.field)
            raise RowProblem(column, "invalid_claim", problem.reason, problem.fix) from None
        return message

    def feed(self, rows: list[Row]) -> Converted:
        out = Converted()
        for row in rows:
            try:
                out.records.append(Record(row.line, self._message(row)))
            except RowProblem as problem:
                out.errors.append(problem.at(row.line))
        return out

    def finish(self) -> Converted:
        return Converted()
