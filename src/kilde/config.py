"""Settings from command-line options and `KILDE_*` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8321


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    plan_path: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    admin_token: str | None = None  # KILDE_ADMIN_TOKEN: set the token up front instead
    trust_proxy: bool = False  # take the client address from X-Forwarded-For
    form_rate_limit: int = 20  # form posts per client address and form in 10 minutes; 0: off

    @classmethod
    def from_env(
        cls,
        *,
        data_dir: Path | None = None,
        plan_path: Path | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> Settings:
        env = os.environ
        return cls(
            data_dir=data_dir or Path(env.get("KILDE_DATA", "kilde-data")),
            plan_path=plan_path or Path(env.get("KILDE_PLAN", "kilde.yaml")),
            host=host or env.get("KILDE_HOST", "127.0.0.1"),
            port=port or int(env.get("KILDE_PORT", DEFAULT_PORT)),
            admin_token=env.get("KILDE_ADMIN_TOKEN") or None,
            trust_proxy=env.get("KILDE_TRUST_PROXY", "").lower() in ("1", "true", "yes"),
            form_rate_limit=int(env.get("KILDE_FORM_RATE_LIMIT", "20")),
        )
