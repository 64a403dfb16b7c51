"""What the privacy operations work with, taken from the running app."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kilde.identity.identifiers import Normaliser
from kilde.plan.models import Plan
from kilde.privacy.enforcement import CollectionScreen
from kilde.privacy.subjects import Hasher, Subject, parse_request, resolve
from kilde.signing import TokenSigner, app_signer
from kilde.store.database import Store
from kilde.store.writer import Writer

_LOCK = threading.RLock()
log = logging.getLogger("kilde.privacy")


@dataclass
class Privacy:
    """The store, its writer, the pipeline's privacy screen, the plan and the data directory.

    `lock` serialises the operations that read or rewrite a person as a whole (erasure,
    export, retention), so an export never sees a half-erased person and an erasure never
    swaps the file under an export.
    """

    store: Store
    writer: Writer
    screen: CollectionScreen
    plan_of: Callable[[], Plan]
    data_dir: Path
    identity: Any | None  # kilde.identity.engine.IdentityEngine, when the server runs one
    signer_of: Callable[[], TokenSigner]
    pipeline: Any  # kilde.pipeline.Pipeline (typed loosely: it imports this package)
    lock: threading.RLock = _LOCK

    @classmethod
    def of(cls, state: Any) -> Privacy:
        pipeline = state.pipeline
        return cls(
            store=state.store,
            writer=state.writer,
            screen=pipeline.privacy,
            plan_of=lambda: pipeline.plan,  # type: ignore[no-any-return]
            data_dir=state.settings.data_dir,
            identity=getattr(state, "identity", None),
            signer_of=lambda: app_signer(state),
            pipeline=pipeline,
            lock=_lock_of(state),
        )

    @property
    def plan(self) -> Plan:
        return self.plan_of()

    @property
    def hasher(self) -> Hasher:
        return self.screen.suppression.hasher

    def normaliser(self) -> Normaliser:
        return Normaliser(self.plan.identity)

    def catch_up(self, seconds: float = 10.0) -> None:
        """Let identity resolution read what is stored, so the person is known in full."""
        engine = self.identity
        if engine is None:
            return
        try:
            engine.wait_idle(seconds)
        except Exception as exc:  # go on with what identity knows; the value sweeps find more
            log.error("identity catch-up failed: %s", type(exc).__name__)

    def subject(self, body: dict[str, Any]) -> Subject:
        """The person a request body names (SubjectError when it names nobody or several)."""
        given, profile_id = parse_request(body, self.normaliser())
        subject = resolve(self.store, given, profile_id)
        if not subject.known and self.identity is not None:
            self.catch_up()  # stored a moment ago, not yet read by identity resolution
            subject = resolve(self.store, given, profile_id)
        return subject

    def subject_hash(self, subject: Subject) -> str:
        """How privacy tables remember who a request was about."""
        if subject.given:
            return self.hasher.ident(subject.given[0])
        return self.hasher.of("profile_id", subject.profile_ids[0] if subject.profile_ids else "")


def _lock_of(state: Any) -> threading.RLock:
    lock = getattr(state, "privacy_lock", None)
    if lock is None:
        lock = state.privacy_lock = threading.RLock()
    assert isinstance(lock, type(_LOCK))
    return lock
