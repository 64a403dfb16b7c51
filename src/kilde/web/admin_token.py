"""The admin bearer token: generated on first start, stored only as a hash, printed once."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TOKEN_FILE = "admin-token.sha256"


def _hash(token: str) -> str:
    # The token is 256 random bits, so a plain SHA-256 is as strong as a slow password hash.
    return hashlib.sha256(token.encode()).hexdigest()


def _write(data_dir: Path, token: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / TOKEN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(_hash(token) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def new_token() -> str:
    return "kat_" + secrets.token_urlsafe(32)


def ensure_admin_token(data_dir: Path, preset: str | None) -> str | None:
    """Make sure a token exists. Return a newly generated token (to print once), else None."""
    if preset:
        _write(data_dir, preset)
        return None
    if (data_dir / TOKEN_FILE).exists():
        return None
    token = new_token()
    _write(data_dir, token)
    return token


def rotate_admin_token(data_dir: Path) -> str:
    token = new_token()
    _write(data_dir, token)
    return token


class TokenCheck:
    """Verifies bearer tokens; rereads the hash when `kilde admin token` rotates it."""

    def __init__(self, data_dir: Path, extra: str | None = None) -> None:
        self.path = data_dir / TOKEN_FILE
        self._mtime = -1.0
        self._hash = ""
        self._extra = _hash(extra) if extra else None

    def valid(self, token: str) -> bool:
        digest = _hash(token)
        if self._extra and hmac.compare_digest(digest, self._extra):
            return True
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime != self._mtime:
            self._hash = self.path.read_text().strip()
            self._mtime = mtime
        return bool(self._hash) and hmac.compare_digest(digest, self._hash)
