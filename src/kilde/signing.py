"""Signed, expiring, URL-safe tokens, and stable pseudonyms, for links Kilde hands out.

Email open pixels, click and unsubscribe links (and later hosted forms and survey links) carry
a token that Kilde signed with HMAC-SHA256. A token is `base64url(JSON payload).signature`; the
payload is short (ids and an expiry `x` in Unix seconds), never personal data in clear. Every use
has its own `purpose`, from which a separate key is derived, so a token made for one use (an
open pixel) is worthless for another (an unsubscribe link).

The secret comes from `KILDE_SECRET_KEY` (at least 32 characters; set the same value on every
collector behind a load balancer) or is generated once into `<data_dir>/secret.key` with
permissions 0600. `KILDE_OLD_SECRET_KEYS` (comma-separated) keeps tokens signed with earlier
keys valid after a rotation.

Signing itself is itsdangerous (Pallets), with SHA-256 and HMAC key derivation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from itsdangerous import BadSignature, URLSafeSerializer
from itsdangerous.encoding import base64_decode, base64_encode

from kilde.errors import ConfigError, KildeError

log = logging.getLogger("kilde.signing")

SECRET_ENV = "KILDE_SECRET_KEY"
OLD_SECRETS_ENV = "KILDE_OLD_SECRET_KEYS"
KEY_FILE = "secret.key"
MIN_KEY_LENGTH = 32
MAX_TOKEN_LENGTH = 2048
# itsdangerous marks a zlib-compressed payload (chosen when it is shorter) with a leading dot.
_TOKEN_SHAPE = re.compile(r"^\.?[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$")

TokenProblem = Literal["malformed", "tampered", "expired", "oversized"]


class TokenError(KildeError):
    """A token that is not one Kilde signed for this use, or that has expired."""

    def __init__(self, code: TokenProblem, message: str, *, fix: str) -> None:
        super().__init__(message, fix=fix)
        self.code = code


def _check_key(key: str, where: str) -> bytes:
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{where} is shorter than {MIN_KEY_LENGTH} characters",
            fix='make one with `python -c "import secrets; print(secrets.token_urlsafe(48))"`',
        )
    return key.encode()


def _key_file(data_dir: Path) -> bytes:
    """Read <data_dir>/secret.key, creating it (0600, atomically) when it does not exist."""
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temp = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_urlsafe(48) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails if another process created the key meanwhile
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("tightened the permissions of %s to 0600", path)
    text = path.read_text().strip()
    return _check_key(text, str(path))


def load_secret_keys(data_dir: Path) -> list[bytes]:
    """The keys to verify with, oldest first; the last one signs."""
    env = os.environ
    current = env.get(SECRET_ENV, "").strip()
    keys = [
        _check_key(old.strip(), OLD_SECRETS_ENV)
        for old in env.get(OLD_SECRETS_ENV, "").split(",")
        if old.strip()
    ]
    keys.append(_check_key(current, SECRET_ENV) if current else _key_file(data_dir))
    return keys


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


class TokenSigner:
    """Makes and checks tokens; see the module docstring."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigError("no secret key", fix=f"set {SECRET_ENV}")
        self._keys = list(keys)
        self._serializers: dict[str, URLSafeSerializer] = {}

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> TokenSigner:
        return cls(load_secret_keys(data_dir))

    def _serializer(self, purpose: str) -> URLSafeSerializer:
        serializer = self._serializers.get(purpose)
        if serializer is None:
            serializer = URLSafeSerializer(
                self._keys,
                salt=f"kilde.{purpose}",
                signer_kwargs={"digest_method": hashlib.sha256, "key_derivation": "hmac"},
            )
            self._serializers[purpose] = serializer
        return serializer

    def sign(self, purpose: str, data: Mapping[str, Any], *, expires_at: datetime) -> str:
        """A token for `purpose` holding `data` (short keys, no personal data) until expiry."""
        if "x" in data:
            raise ValueError("'x' is reserved for the expiry")
        payload = {**data, "x": int(expires_at.timestamp())}
        token = self._serializer(purpose).dumps(payload)
        return token if isinstance(token, str) else token.decode()

    def verify(self, purpose: str, token: str, *, now: float | None = None) -> dict[str, Any]:
        """The data of a valid token, or TokenError saying why it is refused."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenError(
                "oversized",
                f"the token is longer than {MAX_TOKEN_LENGTH} characters",
                fix="use the link exactly as Kilde rendered it",
            )
        if not _TOKEN_SHAPE.match(token):
            raise TokenError(
                "malformed",
                "the token is not in the shape Kilde makes",
                fix="use the link exactly as Kilde rendered it",
            )
        try:
            payload = self._serializer(purpose).loads(token)
            # base64 ignores the spare low bits of the last character, so several spellings
            # decode to one signature; only the one Kilde wrote is the token.
            signature = token.rsplit(".", 1)[1]
            if base64_encode(base64_decode(signature)).decode() != signature:
                raise BadSignature("the signature is not spelled the way Kilde writes it")
        except BadSignature:
            raise TokenError(
                "tampered",
                "the token's signature does not match: it was changed, made for another use, "
                "or signed with another key",
                fix="use the link exactly as Kilde rendered it; after rotating "
                f"{SECRET_ENV}, keep the old key in {OLD_SECRETS_ENV}",
            ) from None
        expiry = payload.get("x") if isinstance(payload, dict) else None
        if not isinstance(expiry, int):
            raise TokenError(
                "malformed",
                "the token carries no expiry",
                fix="use the link exactly as Kilde rendered it",
            )
        if (time.time() if now is None else now) >= expiry:
            raise TokenError(
                "expired",
                "the token has expired",
                fix="render the campaign again for a later expiry (--expires-days)",
            )
        return {k: v for k, v in payload.items() if k != "x"}

    def pseudonym(self, namespace: str, value: str, *, length: int = 16) -> str:
        """A stable id for `value` that cannot be turned back into it without the key."""
        key = hmac.new(self._keys[-1], f"kilde.pseudonym.{namespace}".encode(), "sha256").digest()
        digest = hmac.new(key, value.encode(), hashlib.sha256).digest()
        return _b32(digest)[:length]


def url_digest(url: str) -> str:
    """A short fingerprint of a URL, signed into click tokens to pin the redirect target."""
    return base64.urlsafe_b64encode(hashlib.sha256(url.encode()).digest()[:9]).decode()


def app_signer(state: Any) -> TokenSigner:
    """The signer of a running app (kept on `app.state.token_signer`), made on first use."""
    signer = getattr(state, "token_signer", None)
    if signer is None:
        signer = state.token_signer = TokenSigner.for_data_dir(state.settings.data_dir)
    assert isinstance(signer, TokenSigner)
    return signer
