"""The insights engine: keeps every profile's insight traits and every segment fresh.

Runs in a background thread of the server on the plan's `segments.refresh` schedule, and on
demand (`kilde insights refresh`, `kilde segment refresh`). Each run first computes the profile
insights (RFM, CLV, churn, preferences) into `profile_insights`, then refreshes the segments,
which read them. All writes go through the Writer.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from kilde.errors import KildeError
from kilde.insights.data import backend_of
from kilde.insights.scores import compute
from kilde.insights.segments import membership
from kilde.pipeline import Pipeline
from kilde.store.database import Store
from kilde.store.writer import WriteBatch, Writer
from kilde.thread_names import NamedThread

log = logging.getLogger("kilde.insights")

MIN_INTERVAL = 5.0


class InsightsEngine:
    def __init__(
        self,
        store: Store,
        writer: Writer,
        pipeline: Callable[[], Pipeline],
        work_dir: Path,
        before_run: Callable[[], Any] | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.pipeline = pipeline
        self.work_dir = work_dir
        self.before_run = before_run  # e.g. bring the profiles up to date first
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_run: datetime | None = None
        self.last_error: str | None = None

    def _scratch(self) -> Path:
        path = self.work_dir / "insights-work" / uuid.uuid4().hex
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- profile insights -----------------------------------------------------------------------

    def catch_up(self) -> None:
        """Bring the profiles up to date with the stored events first."""
        if self.before_run is not None:
            self.before_run()

    def refresh_profiles(self, now: datetime | None = None) -> dict[str, Any]:
        """Recompute RFM, CLV, churn and preferences of every profile."""
        with self.lock:
            self.catch_up()
            started = time.perf_counter()
            now = now or datetime.now(UTC)
            scratch = self._scratch()
            try:
                out = scratch / "insights.parquet"
                with self.store.analytics_memory():
                    info = compute(backend_of(self.store), now, out)
                info["seconds"] = round(time.perf_counter() - started, 3)
                self.writer.write_sync(
                    WriteBatch(
                        statements=[
                            ("DELETE FROM profile_insights", []),
                            (
                                "INSERT INTO profile_insights BY NAME "
                                "SELECT * FROM read_parquet(?)",
                                [str(out)],
                            ),
                            (
                                "INSERT OR REPLACE INTO insight_state VALUES (?, ?, ?)",
                                ["models", orjson.dumps(info).decode(), now],
                            ),
                        ]
                    )
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return info

    def models(self) -> dict[str, Any] | None:
        value = self.store.scalar("SELECT value FROM insight_state WHERE key = 'models'")
        return orjson.loads(value) if value else None

    # -- segments -------------------------------------------------------------------------------

    def refresh_segments(
        self, segment_ids: list[str] | None = None, now: datetime | None = None
    ) -> list[dict[str, Any]]:
        with self.lock:
            self.catch_up()
            pipeline = self.pipeline()
            found = membership.definitions(self.store, pipeline.plan)
            if segment_ids:
                chosen = [membership.get(self.store, pipeline.plan, s) for s in segment_ids]
            else:
                chosen = list(found.values())
            results = []
            scratch = self._scratch()
            try:
                with self.store.analytics_memory():
                    for segment in chosen:
                        try:
                            run = membership.refresh(
                                self.store, self.writer, pipeline, segment, scratch, now
                            )
                            results.append(run.as_dict())
                        except KildeError as exc:
                            if segment_ids:  # asked for by name: say what is wrong
                                raise
                            results.append({"segment_id": segment.id, "error": exc.message})
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return results

    def refresh_all(self) -> dict[str, Any]:
        with self.lock:
            models = self.refresh_profiles()
            segments = self.refresh_segments()
            self.last_run = datetime.now(UTC)
            return {"models": models, "segments": segments}

    # -- background thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = NamedThread(
            target=self._run, name="kilde-insights", daemon=True, background=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def interval(self) -> float:
        return max(MIN_INTERVAL, self.pipeline().plan.segments.refresh_seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.interval()):
            try:
                self.refresh_all()
                self.last_error = None
            except Exception as exc:  # keep running; the error shows in the status
                log.error("insights refresh failed: %s", type(exc).__name__)
                log.debug("insights refresh failed", exc_info=True)
                self.last_error = type(exc).__name__
