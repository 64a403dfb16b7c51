"""Settings from command-line options and `KILDE_*` environment variables."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8321
# DuckDB's memory limit for the store (KILDE_DUCKDB_MEMORY_LIMIT, DuckDB's size syntax such as
# "512MB" or "2GB"). Without one DuckDB takes 80 % of the machine's memory for its buffers;
# with one it spills big operations to disk (a .tmp directory beside the store file). Most of
# what it holds is a cache of blocks of the store file (a big import fills it with the blocks
# it wrote), so the limit is small, and heavy analytics get more while they run
# (KILDE_DUCKDB_ANALYTICS_MEMORY_LIMIT, `Store.analytics_memory`): the profile insights of a
# few hundred thousand people need more than 128 MB.
DEFAULT_DUCKDB_MEMORY_LIMIT = "128MB"
DEFAULT_DUCKDB_ANALYTICS_MEMORY_LIMIT = "384MB"


# How much write-ahead log DuckDB gathers before it checkpoints into the store file
# (KILDE_DUCKDB_CHECKPOINT). DuckDB's 16 MB means a checkpoint after nearly every big import
# chunk, each recompressing the table's last row group: 128 MB halves the cost of a bulk write.
DEFAULT_DUCKDB_CHECKPOINT = "128MB"


def duckdb_checkpoint_threshold() -> str:
    return os.environ.get("KILDE_DUCKDB_CHECKPOINT") or DEFAULT_DUCKDB_CHECKPOINT


def positive_whole_number(name: str, fallback: str, log: logging.Logger) -> int | None:
    """Environment variable `name` as a positive whole number; None when it is not set, and
    when it is something else, with a warning that says `fallback` is used instead."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    log.warning("%s must be a positive whole number; using %s", name, fallback)
    return None


def duckdb_threads() -> int | None:
    """The store's DuckDB threads (KILDE_DUCKDB_THREADS); None: DuckDB's default, one per core.

    On a small machine one thread leaves a core to the collector's event loop: on 2 cores it
    took 15 % more events/s under a batched load with identity resolution on, and made a
    rebuild about a third slower and a big import about an eighth slower
    (docs/throughput-and-durability.md)."""
    return positive_whole_number(
        "KILDE_DUCKDB_THREADS", "DuckDB's default", logging.getLogger("kilde.config")
    )


# How many recent (source, messageId) pairs the Writer remembers to acknowledge a retry as a
# duplicate instead of storing it again (KILDE_DEDUPE_IDS). A retry of an older message is
# stored again: at 5,000 events/s the default covers about 100 seconds. A restart reloads the
# newest pairs from the store. Each pair takes about 200 bytes.
DEFAULT_DEDUPE_IDS = 500_000


def dedupe_ids() -> int:
    """The Writer's memory of recent message ids for deduplication (KILDE_DEDUPE_IDS)."""
    found = positive_whole_number(
        "KILDE_DEDUPE_IDS", f"{DEFAULT_DEDUPE_IDS:,}", logging.getLogger("kilde.config")
    )
    return found or DEFAULT_DEDUPE_IDS


def duckdb_memory_limit() -> str:
    """The store's DuckDB memory limit from the environment, or the default."""
    return os.environ.get("KILDE_DUCKDB_MEMORY_LIMIT") or DEFAULT_DUCKDB_MEMORY_LIMIT


def duckdb_analytics_memory_limit() -> str:
    """DuckDB's memory limit while heavy analytics run, from the environment, or the default
    (with a warning when the variable is not a size)."""
    raw = os.environ.get("KILDE_DUCKDB_ANALYTICS_MEMORY_LIMIT", "").strip()
    if raw and size_bytes(raw) is None:
        logging.getLogger("kilde.config").warning(
            "KILDE_DUCKDB_ANALYTICS_MEMORY_LIMIT must be a size such as 384MB or 1GB; using %s",
            DEFAULT_DUCKDB_ANALYTICS_MEMORY_LIMIT,
        )
        return DEFAULT_DUCKDB_ANALYTICS_MEMORY_LIMIT
    return raw or DEFAULT_DUCKDB_ANALYTICS_MEMORY_LIMIT


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(text: str) -> float | None:
    """Bytes of a size in DuckDB's syntax ("384MB", "2 GiB"); None when it is not one."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _UNITS:
        return None
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    plan_path: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    admin_token: str | None = None  # KILDE_ADMIN_TOKEN: set the token up front instead
    trust_proxy: bool = False  # take the client address from X-Forwarded-For
    form_rate_limit: int = 20  # form posts per client address and form in 10 minutes; 0: off
    duckdb_memory_limit: str = DEFAULT_DUCKDB_MEMORY_LIMIT  # KILDE_DUCKDB_MEMORY_LIMIT

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
            duckdb_memory_limit=duckdb_memory_limit(),
        )
