"""The single writer: group commit with durable acknowledgements.

Every request hands its rows to one thread. That thread takes everything queued, makes it
durable in one write, and only then resolves the requests' futures. So a 2xx is never sent
before the data is on disk, and the cost of the sync is shared by all requests that arrived
meanwhile.

A group of plain events (no dead letters, statements or import tables) is made durable by the
acknowledgement log (kilde.store.ack_log) and inserted into DuckDB afterwards by the applier
thread, many groups in one commit. Anything else waits until the applier has inserted every
group before it, then commits in one DuckDB transaction (DuckDB fdatasyncs its write-ahead log
on commit). Reads wait for the applier too (`Store.read_barrier`), so whatever was answered
is what a read sees.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kilde.config import dedupe_ids
from kilde.errors import KildeError
from kilde.store.ack_log import AckLog, encode, group_table, log_dir, rows_in
from kilde.store.database import Store
from kilde.store.schema import DEAD_LETTER_SCHEMA, EVENT_SCHEMA
from kilde.thread_names import NamedThread

log = logging.getLogger("kilde.store")


class StoreUnavailableError(KildeError):
    """The writer is overloaded or stopped; the client should retry later."""


@dataclass
class WriteBatch:
    """Rows from one request (or one import chunk), written atomically together."""

    events: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    # Extra statements run in the same transaction, e.g. marking replayed dead letters.
    statements: list[tuple[str, list[Any]]] = field(default_factory=list)
    # The privacy screen's epoch when the pipeline screened these rows (kilde.privacy); the
    # writer's `screen` looks at them again if people were erased since.
    screened_at: int | None = None
    # Events rows as one Arrow table of EVENT_SCHEMA (the columnar import path), appended as
    # they are; deduplicated by (source, message_id) like `events`.
    arrow_events: pa.Table | None = None
    # With a SELECT here (over the relation `arrow_events`, with its parameters), the table holds
    # other columns (`source` and `message_id` among them) and the SELECT gives the events rows;
    # it runs inside the INSERT, so the rows are built by DuckDB as they are written.
    arrow_select: tuple[str, list[Any]] | None = None
    # The writer's `write_seq` when the caller found none of `arrow_events`' ids stored (in
    # the memory of recent ids and, past its capacity, in the store) and no id twice. If
    # nothing has been committed since, the writer need not look again.
    checked_at_seq: int | None = None
    # `recent_codes` of the rows of `arrow_events`, when the caller has made them already.
    arrow_codes: np.ndarray | None = None


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0


def recent_key(source: str, message_id: str) -> str:
    """The key of (source, messageId) in `RecentIds`."""
    return source + "\x1f" + message_id


def recent_codes(sources: Any, ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The codes (`codes_of`) of `recent_key` of each row of two Arrow columns (or one source
    for all); the keys are joined in C and made Python strings a slice at a time, so an
    import's 122,880 keys (about 10 MB as strings) are never all held at once."""
    keys = pc.binary_join_element_wise(sources, ids, "\x1f")
    codes = np.empty(len(keys), np.int64)
    for start in range(0, len(keys), 8192):
        part = keys.slice(start, 8192).to_pylist()
        codes[start : start + len(part)] = codes_of(part)
    return codes


def all_distinct(codes: np.ndarray) -> bool:
    """No code twice (sorted and compared: a quarter of np.unique's time)."""
    ordered = np.sort(codes)
    return not bool((ordered[1:] == ordered[:-1]).any())


def codes_of(keys: list[str]) -> np.ndarray:
    """How `RecentIds` remembers each key: its 64-bit hash."""
    return np.fromiter(map(hash, keys), np.int64, len(keys))


class RecentIds:
    """A bounded memory of (source, messageId) pairs already stored, for deduplication.

    Each pair is remembered by the 64-bit hash of its `recent_key` string (its code,
    `codes_of`), not the string. Two different pairs share a hash with a chance of 1 in 2**64
    per pair remembered (keyed SipHash, seeded anew at each start); at the default window that
    makes one new event in about 3 * 10**13 taken for a retry.

    Kept as generations, oldest first. The youngest is a set the ids of single events and
    small batches go into. Older ones share one sorted array of 8 bytes per id (beside the
    number of its generation, 4 bytes), where a set took about 100: half a million ids take
    about 6 MB instead of about 50. A big batch's ids become one generation in one call, and
    the oldest generation is forgotten whole once the newer ones hold `capacity` ids, so
    neither remembering nor forgetting an import's ids walks them one by one in Python. It
    remembers at least the last `capacity` ids, and at most one generation more. `seen_codes`
    answers for many codes with one search of the array.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Single ids and small batches fill the youngest set up to this size.
        self._generation_size = max(capacity // 8, 1)
        self._young: set[int] = set()
        self._old = np.empty(0, np.int64)  # sorted
        self._old_generation = np.empty(0, np.int32)  # the generation of each of `_old`
        self._old_sizes: deque[list[int]] = deque()  # [generation, ids], oldest first
        self._generations_made = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: str) -> bool:
        return bool(self.seen_codes(codes_of([key]))[0])

    def seen(self, keys: list[str]) -> list[bool]:
        """For each of `keys`, whether it is remembered."""
        return self.seen_codes(codes_of(keys)).tolist()  # type: ignore[no-any-return]

    def seen_codes(self, codes: np.ndarray) -> np.ndarray:
        """For each code, whether it is remembered (an array of bools)."""
        n = len(codes)
        young = self._young
        old = self._old
        if n <= 8:  # a request's few events: a search per code costs less than the arrays
            answers = []
            for code in codes.tolist():
                hit = code in young
                if not hit and len(old):
                    at = int(old.searchsorted(code))
                    hit = at < len(old) and int(old[at]) == code
                answers.append(hit)
            return np.array(answers, bool)
        hits = np.zeros(n, bool)
        if young:
            listed = codes.tolist()
            if not young.isdisjoint(listed):
                hits |= np.fromiter((c in young for c in listed), bool, n)
        if len(old):
            # Searching for the codes in order walks the array once.
            order = np.argsort(codes)
            ordered = codes[order]
            places = np.minimum(np.searchsorted(old, ordered), len(old) - 1)
            hits[order] |= old[places] == ordered
        return hits

    def add(self, key: str) -> None:
        """Remember `key`, not remembered yet."""
        self.add_codes(codes_of([key]))

    def add_all(self, keys: list[str]) -> None:
        """Remember each of `keys`, none of them remembered yet and no two alike."""
        self.add_codes(codes_of(keys))

    def add_codes(self, codes: np.ndarray) -> None:
        """Remember each code, none of them remembered yet and no two alike."""
        n = len(codes)
        if len(self._young) + n <= self._generation_size:
            self._young.update(codes.tolist())
        else:
            self._seal(np.fromiter(self._young, np.int64, len(self._young)))
            if n >= self._generation_size:
                self._young = set()
                self._seal(codes.copy())
            else:
                self._young = set(codes.tolist())
        self._size += n
        self._forget()

    def discard(self, key: str) -> None:
        self.discard_codes(codes_of([key]))

    def discard_codes(self, codes: np.ndarray) -> None:
        """Forget each code (a write that failed: its ids were not stored after all)."""
        listed = codes.tolist()
        held = len(self._young)
        self._young.difference_update(listed)
        self._size -= held - len(self._young)
        gone = np.isin(self._old, codes)
        if gone.any():
            for generation in self._old_generation[gone].tolist():
                for entry in self._old_sizes:
                    if entry[0] == generation:
                        entry[1] -= 1
            self._size -= int(gone.sum())
            self._old = self._old[~gone]
            self._old_generation = self._old_generation[~gone]

    def _seal(self, codes: np.ndarray) -> None:
        """Codes that become a generation of the sorted array."""
        if not len(codes):
            return
        codes.sort()
        generation = self._generations_made
        self._generations_made += 1
        at = np.searchsorted(self._old, codes)
        self._old = np.insert(self._old, at, codes)
        self._old_generation = np.insert(self._old_generation, at, np.int32(generation))
        self._old_sizes.append([generation, len(codes)])

    def _forget(self) -> None:
        sizes = self._old_sizes
        while sizes and self._size - sizes[0][1] >= self.capacity:
            generation, count = sizes.popleft()
            self._size -= count
            kept = self._old_generation != generation
            self._old = self._old[kept]
            self._old_generation = self._old_generation[kept]


@dataclass
class WriterTally:
    """What the writer has done since the server started (`GET /api/stats`, `kilde stats`).

    The totals tell where an acknowledgement's time goes: a batch waits in the queue while
    the commit before its own runs, then its own commit runs, and then the request it came
    from waits for the event loop to take it up again."""

    commits: int = 0  # transactions committed
    batches: int = 0  # batches in them (one per request, import block or internal write)
    events: int = 0  # event rows stored by them
    commit_seconds: float = 0.0  # time the writer spent committing
    queue_seconds: float = 0.0  # summed over batches: queued until their commit began
    resumed: int = 0  # requests that went on after their commit (async callers)
    resume_seconds: float = 0.0  # summed over them: their commit's end until they went on
    logged: int = 0  # of the commits, those made durable by the acknowledgement log
    applies: int = 0  # DuckDB commits of logged groups by the applier
    applied_events: int = 0  # events in them
    apply_seconds: float = 0.0  # time the applier spent in them

    def as_dict(self) -> dict[str, int | float]:
        return dict(self.__dict__)


@dataclass
class _Item:
    """One queued batch and whom to tell when it is on disk."""

    batch: WriteBatch
    rows: int
    # Exactly one of these: a thread waits on `future`; a coroutine awaits `waiter` on `loop`.
    future: concurrent.futures.Future[WriteResult] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future[WriteResult] | None = None
    # Not a batch but work to run alone on the writer thread (see Writer.exclusive).
    task: Callable[[], Any] | None = None
    task_future: concurrent.futures.Future[Any] | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    committed_at: float = 0.0


@dataclass
class _Taken:
    """A group's rows after screening and deduplication (`Writer._take`)."""

    results: list[WriteResult]
    events: list[dict[str, Any]]
    dead: list[dict[str, Any]]
    statements: list[tuple[str, list[Any]]]
    added: list[np.ndarray]  # codes of ids remembered for it, forgotten if the write fails
    arrow: list[pa.Table]
    selects: list[tuple[pa.Table, tuple[str, list[Any]]]]


class _Applier:
    """The thread that inserts logged groups into DuckDB, all that piled up in one commit."""

    RETRY_SECONDS = 1.0
    # It waits for this many rows, or `apply_after` seconds, unless a reader or the writer
    # waits for it: DuckDB's cost per commit is mostly fixed (bench/ingest.py: 23 ms for 358
    # events, 51 ms for 3,094), so fewer, larger commits leave more of the CPU to the rest.
    APPLY_ROWS = 5000
    # When DuckDB falls this far behind, the writer waits for it before answering more.
    MAX_PENDING_ROWS = 50_000

    def __init__(self, store: Store, tally: WriterTally, apply_after: float) -> None:
        self.tally = tally
        self.apply_after = apply_after
        self.con = store.cursor()
        self.applied_seq = 0  # every group up to this write_seq is in DuckDB
        self._pending: list[tuple[int, bytes]] = []  # (write_seq, payload) of logged groups
        self._pending_rows = 0
        self._waiting = 0  # threads in wait_for or drain
        self._busy = False
        self._stop = False
        self._changed = threading.Condition()
        self.thread = NamedThread(target=self._run, name="kilde-applier", daemon=True)
        self.thread.start()

    def hand(self, seq: int, payload: bytes, rows: int) -> None:
        with self._changed:
            while self._pending_rows >= self.MAX_PENDING_ROWS:
                self._changed.wait()
            self._pending.append((seq, payload))
            self._pending_rows += rows
            if self._pending_rows >= self.APPLY_ROWS or self._waiting:
                self._changed.notify_all()

    def wait_for(self, seq: int) -> None:
        """Return once every group up to write_seq `seq` is in DuckDB."""
        if self.applied_seq < seq:
            self._wait_until(lambda: self.applied_seq >= seq)

    def drain(self) -> None:
        """Return once every group handed over is in DuckDB and the applier is idle."""
        self._wait_until(lambda: not self._pending and not self._busy)

    def _wait_until(self, done: Callable[[], bool]) -> None:
        # A waiter makes the applier insert at once rather than wait for more rows.
        with self._changed:
            self._waiting += 1
            self._changed.notify_all()
            self._changed.wait_for(done)
            self._waiting -= 1

    def stop(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._changed:
                due: float | None = None
                while True:
                    if self._pending and (
                        self._stop or self._waiting or self._pending_rows >= self.APPLY_ROWS
                    ):
                        break
                    if self._stop:
                        return
                    left = None
                    if self._pending:
                        due = due or time.monotonic() + self.apply_after
                        left = due - time.monotonic()
                        if left <= 0:
                            break
                    self._changed.wait(left)
                groups, self._pending = self._pending, []
                self._pending_rows = 0
                self._busy = True
            began = time.perf_counter()
            try:
                self._insert(groups)
            except Exception as exc:
                # The groups are acknowledged and stay in the log; try again (and at start).
                log.error("inserting logged events failed: %s", type(exc).__name__)
                with self._changed:
                    self._pending[:0] = groups
                    self._pending_rows += sum(rows_in(payload) for _, payload in groups)
                    self._busy = False
                    self._changed.notify_all()
                if self._stop:
                    return  # the log keeps them for the next start
                time.sleep(self.RETRY_SECONDS)
                continue
            tally = self.tally
            tally.applies += 1
            tally.applied_events += sum(rows_in(payload) for _, payload in groups)
            tally.apply_seconds += time.perf_counter() - began
            with self._changed:
                self.applied_seq = groups[-1][0]
                self._busy = False
                self._changed.notify_all()

    def _insert(self, groups: list[tuple[int, bytes]]) -> None:
        logged = group_table(groups)  # noqa: F841 - read by DuckDB below
        # one statement, so it commits by itself (see Writer._commit on GIL waits)
        self.con.execute("INSERT INTO events BY NAME SELECT * FROM logged")


_Outcome = tuple["asyncio.Future[WriteResult]", WriteResult | None, BaseException | None]

# A batch with more events (an import's chunk) is committed to DuckDB directly, as before
# the log: it fills a commit by itself, and through the log it would be written twice.
LOG_MAX_ROWS = 2_500

# The writer thread releases the GIL inside DuckDB and to wake the event loop; each time it
# must win the GIL back from the busy event-loop thread, which only yields it every switch
# interval (5 ms by default). A shorter interval keeps acknowledgements from waiting on that.
SWITCH_INTERVAL = 0.001

T = TypeVar("T")


class Writer:
    """Owns all writes to the store; see the module docstring."""

    # Whether groups of plain events go through the acknowledgement log and the applier.
    logs_events = True

    def __init__(
        self,
        store: Store,
        *,
        dedupe_capacity: int | None = None,
        max_queued_rows: int = 200_000,
        apply_after: float = 0.25,
    ) -> None:
        # KILDE_DEDUPE_IDS unless the caller says otherwise
        dedupe_capacity = dedupe_capacity or dedupe_ids()
        self.store = store
        self.max_queued_rows = max_queued_rows
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._queued_rows = 0
        self._count_lock = threading.Lock()
        self.recent = RecentIds(dedupe_capacity)
        self.tally = WriterTally()
        self._seed_recent(dedupe_capacity)
        # Called on the writer thread with each batch just before it is committed; the privacy
        # module drops rows of people erased after the batch was screened (kilde.privacy).
        self.screen: Callable[[WriteBatch], None] | None = None
        # Whether `screen` must see a batch's Arrow rows (as dicts in `events`); when unset,
        # Arrow rows are always handed to `screen` that way.
        self.screen_rows: Callable[[WriteBatch], bool] | None = None
        self._con = store.cursor()
        # the transaction number the next commit stamps on its events (see migration 15)
        self._write_seq = int(store.scalar("SELECT coalesce(max(write_seq), 0) FROM events") or 0)
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._log: AckLog | None = None
        self._applier: _Applier | None = None
        self._logged_seq = self._write_seq  # the last group handed to the applier
        if self.logs_events:
            self._log = AckLog(log_dir(store.path.parent))
            self._applier = _Applier(store, self.tally, apply_after)
            self._applier.applied_seq = self._write_seq
            store.read_barrier = self._read_barrier
        self._thread = NamedThread(target=self._run, name="kilde-writer", daemon=True)
        self._thread.start()

    @property
    def write_seq(self) -> int:
        """The number of the last commit (see `WriteBatch.checked_at_seq`)."""
        return self._write_seq

    def _seed_recent(self, limit: int) -> None:
        # In commit order: a replayed dead letter keeps the receipt time of its first try.
        rows = self.store.query(
            "SELECT source, message_id FROM events "
            "ORDER BY write_seq DESC NULLS LAST, received_at DESC LIMIT ?",
            [limit],
        )
        keys = dict.fromkeys(recent_key(r["source"], r["message_id"]) for r in reversed(rows))
        if keys:
            self.recent.add_all(list(keys))

    # -- submitting ---------------------------------------------------------------------------

    def _reserve(self, batch: WriteBatch) -> int:
        rows = len(batch.events) + len(batch.dead_letters)
        if batch.arrow_events is not None:
            rows += batch.arrow_events.num_rows
        with self._count_lock:
            if self._queued_rows + rows > self.max_queued_rows:
                raise StoreUnavailableError(
                    "the store is busy writing earlier data", fix="retry in a second"
                )
            self._queued_rows += rows
        return rows

    def submit(self, batch: WriteBatch) -> concurrent.futures.Future[WriteResult]:
        """Queue a batch; the future resolves once it is committed (or failed)."""
        future: concurrent.futures.Future[WriteResult] = concurrent.futures.Future()
        self._queue.put(_Item(batch, self._reserve(batch), future=future))
        return future

    async def write(self, batch: WriteBatch) -> WriteResult:
        """Write a batch durably; returns after the commit that contains it."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WriteResult] = loop.create_future()
        item = _Item(batch, self._reserve(batch), loop=loop, waiter=waiter)
        self._queue.put(item)
        result = await waiter
        # only the event loop writes these two, so the writer thread never races them
        self.tally.resumed += 1
        self.tally.resume_seconds += time.perf_counter() - item.committed_at
        return result

    def write_sync(self, batch: WriteBatch) -> WriteResult:
        return self.submit(batch).result()

    def exclusive(self, task: Callable[[], T]) -> T:
        """Run `task` on the writer thread between two commits, so that no write runs meanwhile.

        Batches queued before it are committed first; those queued after wait until it is done.
        The writer's own connection is closed while the task runs and taken anew afterwards,
        so the task may swap the store's file (compaction after an erasure).
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Item(WriteBatch(), 0, task=task, task_future=future))
        result: T = future.result()
        return result

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._applier is not None and self._log is not None:
            self._applier.stop()
            if self._applier.applied_seq >= self._logged_seq:
                self._log.clear()  # all in DuckDB; what is not stays for the next start
            self._log.close()
            self._applier.con.close()
            self.store.read_barrier = None
        self._con.close()

    def _read_barrier(self) -> None:
        """Called by `Store.cursor`: wait until what was acknowledged is in DuckDB."""
        applier = self._applier
        if applier is None or applier.applied_seq >= self._logged_seq:
            return
        if threading.current_thread() in (self._thread, applier.thread):
            return  # they order their own reads
        applier.wait_for(self._logged_seq)

    def _drain(self) -> None:
        """Before anything but a logged group: every group logged so far is in DuckDB."""
        if self._applier is not None and self._log is not None:
            self._applier.drain()
            # Nothing logged stays replayable once events can be deleted or changed after it.
            self._log.clear()

    def _loggable(self, item: _Item) -> bool:
        batch = item.batch
        return (
            self._applier is not None
            and item.task is None
            and 0 < len(batch.events) <= LOG_MAX_ROWS
            and not batch.dead_letters
            and not batch.statements
            and batch.arrow_events is None
            and batch.arrow_select is None
        )

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            stop = False
            while True:  # take everything that queued up while the last commit ran
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            # Runs of logged groups and of other batches, in the order they came.
            group: list[_Item] = []
            logged = False
            for item in items:
                loggable = self._loggable(item)
                if group and (item.task is not None or loggable != logged):
                    self._write_group(group, logged)
                    group = []
                if item.task is not None:
                    self._drain()
                    self._run_task(item)
                    continue
                logged = loggable
                group.append(item)
            if group:
                self._write_group(group, logged)
            if stop:
                return

    def _write_group(self, items: list[_Item], logged: bool) -> None:
        if not logged:
            self._drain()
        self._commit_group(items, logged)

    def _run_task(self, item: _Item) -> None:
        assert item.task is not None and item.task_future is not None
        self._con.close()
        if self._applier is not None:  # drained: it waits for the next group
            self._applier.con.close()
        try:
            result = item.task()
        except BaseException as exc:  # handed to the caller, who waits for it
            item.task_future.set_exception(exc)
        else:
            item.task_future.set_result(result)
        finally:
            self._con = self.store.cursor()
            if self._applier is not None:
                self._applier.con = self.store.cursor()

    def _commit_group(self, items: list[_Item], logged: bool) -> None:
        began = time.perf_counter()
        try:
            results = self._log_commit(items) if logged else self._commit(items)
        except Exception as exc:
            if len(items) == 1:
                # The message may quote stored values, so only the type is logged.
                log.error("write failed: %s", type(exc).__name__)
                self._finish(items, None, StoreUnavailableError("the write failed", fix="retry"))
                return
            # Isolate the batch that broke the group so the others still commit.
            for item in items:
                self._commit_group([item], logged)
            return
        ended = time.perf_counter()
        tally = self.tally
        tally.commits += 1
        tally.logged += logged
        tally.batches += len(items)
        tally.events += sum(result.stored for result in results)
        tally.commit_seconds += ended - began
        for item in items:
            tally.queue_seconds += began - item.queued_at
            item.committed_at = ended
        self._finish(items, results, None)

    def _finish(
        self, items: list[_Item], results: list[WriteResult] | None, error: Exception | None
    ) -> None:
        with self._count_lock:
            self._queued_rows -= sum(item.rows for item in items)
        if results is None:
            error = error or StoreUnavailableError("the write failed", fix="retry")
        # One wake-up per event loop for the whole group, not one per request.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for index, item in enumerate(items):
            result = results[index] if results is not None else None
            if item.future is not None:
                if error is not None:
                    item.future.set_exception(error)
                else:
                    item.future.set_result(result)  # type: ignore[arg-type]
            elif item.loop is not None and item.waiter is not None:
                by_loop.setdefault(item.loop, []).append((item.waiter, result, error))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve, outcomes)

    def _take(self, items: list[_Item]) -> _Taken:
        """Screen and deduplicate the items' rows; what is new is remembered as stored."""
        results: list[WriteResult] = []
        events: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        statements: list[tuple[str, list[Any]]] = []
        added: list[np.ndarray] = []
        arrow: list[pa.Table] = []
        selects: list[tuple[pa.Table, tuple[str, list[Any]]]] = []
        for item in items:
            batch = item.batch
            if (
                batch.arrow_events is not None
                and self.screen is not None
                and (self.screen_rows is None or self.screen_rows(batch))
            ):
                batch.events = batch.events + self._arrow_rows(batch)
                batch.arrow_events = None
            if self.screen is not None:
                self.screen(batch)
        row_codes = [
            codes_of([recent_key(row["source"], row["message_id"]) for row in item.batch.events])
            for item in items
        ]
        # The memory of ids is asked once for the rows of the whole group (each question
        # searches the whole array), and again only after an import table changed it.
        known: Iterator[bool] | None = None
        taken_rows: set[int] = set()  # codes of rows remembered by this group
        for index, (item, codes) in enumerate(zip(items, row_codes, strict=True)):
            batch = item.batch
            result = WriteResult(dead_lettered=len(batch.dead_letters))
            if batch.arrow_events is not None and batch.arrow_events.num_rows:
                known = None
                table = batch.arrow_events
                arrow_codes = batch.arrow_codes
                if arrow_codes is None or len(arrow_codes) != table.num_rows:
                    arrow_codes = recent_codes(table.column("source"), table.column("message_id"))
                recent = self.recent
                unchanged = batch.checked_at_seq == self._write_seq and not added
                if unchanged or (
                    not recent.seen_codes(arrow_codes).any() and all_distinct(arrow_codes)
                ):
                    # The usual case of a big import: no id seen before, none twice.
                    recent.add_codes(arrow_codes)
                    added.append(arrow_codes)
                    keep = [True] * len(arrow_codes)
                else:
                    answers = recent.seen_codes(arrow_codes).tolist()
                    keep = self._remember_new(arrow_codes, answers, set(), added)
                    result.duplicates += keep.count(False)
                kept = table if all(keep) else table.filter(pa.array(keep, pa.bool_()))
                result.stored += kept.num_rows
                if kept.num_rows and batch.arrow_select is not None:
                    selects.append((kept, batch.arrow_select))
                elif kept.num_rows:
                    arrow.append(kept)
            if len(codes):
                if known is None:
                    rest = np.concatenate(row_codes[index:])
                    known = iter(self.recent.seen_codes(rest).tolist())
                answers = [next(known) for _ in range(len(codes))]
                keep = self._remember_new(codes, answers, taken_rows, added)
                events.extend(row for row, new in zip(batch.events, keep, strict=True) if new)
                result.stored += keep.count(True)
                result.duplicates += keep.count(False)
            dead.extend(batch.dead_letters)
            statements.extend(batch.statements)
            results.append(result)
        return _Taken(results, events, dead, statements, added, arrow, selects)

    def _remember_new(
        self, codes: np.ndarray, known: list[bool], taken: set[int], added: list[np.ndarray]
    ) -> list[bool]:
        """For each code, whether it is new: not `known` to the memory of ids, not in `taken`
        (nor earlier in `codes`). The new ones are remembered, added to `taken` and `added`."""
        fresh: list[int] = []
        keep = []
        for code, was_known in zip(codes.tolist(), known, strict=True):
            new = not was_known and code not in taken
            if new:
                taken.add(code)
                fresh.append(code)
            keep.append(new)
        if fresh:
            fresh_codes = np.array(fresh, np.int64)
            self.recent.add_codes(fresh_codes)
            added.append(fresh_codes)
        return keep

    def _forget(self, added: list[np.ndarray]) -> None:
        for codes in added:
            self.recent.discard_codes(codes)

    def _log_commit(self, items: list[_Item]) -> list[WriteResult]:
        """Plain events: into the acknowledgement log now, into DuckDB by the applier."""
        assert self._log is not None and self._applier is not None
        taken = self._take(items)
        if not taken.events:
            return taken.results
        seq = self._write_seq + 1
        payload = encode(taken.events)
        try:
            self._log.append(seq, payload)
        except Exception:
            self._forget(taken.added)
            raise
        self._write_seq = self._logged_seq = seq
        self._applier.hand(seq, payload, len(taken.events))
        self._log.forget_through(self._applier.applied_seq)
        return taken.results

    def _commit(self, items: list[_Item]) -> list[WriteResult]:
        taken = self._take(items)
        events, dead, statements = taken.events, taken.dead, taken.statements
        arrow, selects = taken.arrow, taken.selects
        con = self._con
        seq = self._write_seq + 1
        # Each execute() releases the GIL and must win it back from the event loop thread,
        # which can take a switch interval; so the whole group is one call when it can be.
        inserts: list[str] = []
        try:
            if events:
                event_table = _table(events, EVENT_SCHEMA)  # noqa: F841 - read by DuckDB below
                inserts.append(
                    f"INSERT INTO events BY NAME SELECT *, {seq} AS write_seq FROM event_table"
                )
            if arrow:
                arrow_table = pa.concat_tables(arrow)  # noqa: F841 - read by DuckDB below
                inserts.append(
                    f"INSERT INTO events BY NAME SELECT *, {seq} AS write_seq FROM arrow_table"
                )
            if dead:
                dead_table = _table(dead, DEAD_LETTER_SCHEMA)  # noqa: F841
                inserts.append("INSERT INTO dead_letters BY NAME SELECT * FROM dead_table")
            if statements or selects:
                con.execute("; ".join(["BEGIN TRANSACTION", *inserts]))
                for arrow_events, (select, select_params) in selects:  # noqa: B007
                    con.execute(
                        f"INSERT INTO events BY NAME SELECT *, {seq} AS write_seq FROM ({select})",
                        select_params,
                    )
                for sql, params in statements:
                    con.execute(sql, params)
                con.execute("COMMIT")
            elif len(inserts) == 1:
                # One INSERT commits by itself: BEGIN and COMMIT as statements of their own
                # would each win the GIL back a few times more (see the comment above).
                con.execute(inserts[0])
            else:
                con.execute("; ".join(["BEGIN TRANSACTION", *inserts, "COMMIT"]))
        except Exception:
            with contextlib.suppress(Exception):  # the transaction may already be gone
                con.execute("ROLLBACK")
            self._forget(taken.added)
            raise
        self._write_seq = seq
        return taken.results

    def _arrow_rows(self, batch: WriteBatch) -> list[dict[str, Any]]:
        """A batch's Arrow rows as events-table dicts (for the privacy screen)."""
        arrow_events = batch.arrow_events  # read by DuckDB in the SELECT
        if arrow_events is None:
            return []
        table: pa.Table = arrow_events
        if batch.arrow_select is not None:
            select, params = batch.arrow_select
            table = self._con.execute(select, params).to_arrow_table()
        rows: list[dict[str, Any]] = table.to_pylist()
        return rows


def _resolve(outcomes: list[_Outcome]) -> None:
    """Runs on the event loop: hand each waiting request its result."""
    for waiter, result, error in outcomes:
        if waiter.done():  # the request was cancelled meanwhile
            continue
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(result)  # type: ignore[arg-type]


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
