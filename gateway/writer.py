"""The quarantine writer: batched, asynchronous, and spooling to disk while the database is away.

A replica calls :meth:`QuarantineWriter.submit` on the request path; that only puts the
sample on an in-memory queue. A background thread drains the queue in batches (up to
``batch_size``, or whatever arrived within ``max_delay``) and writes each batch in one
transaction. If the database cannot take a batch, the batch goes to the :class:`Spool`:
one new file per batch, written to a temporary name, fsynced and renamed, so a segment is
whole or absent. While spooled segments exist the thread retries every ``retry_every``
seconds and replays them oldest first; each replay records the segment's id in the same
transaction as its samples (``spool_segment``), so a crash between commit and unlink
never replays a segment twice. The spool directory outlives the replica.

Everything is bounded, and the thread outlives every error: the queue holds at most
``max_queue`` samples (more are dropped and counted: a flood must not exhaust the
replica's memory), the spool at most ``max_spool_bytes`` on disk, and a batch that fits in
neither the database nor the spool (a full disk) is held in memory and retried. Any
unexpected error is logged, counted (``on_error``) and retried with a growing back-off.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.quarantine import NewSample, StoreInputError, add_samples, replay_segment

log = logging.getLogger(__name__)


def _encode(sample: NewSample) -> str:
    d: dict[str, Any] = asdict(sample)
    d["png"] = base64.b64encode(sample.png).decode()
    d["received_at"] = sample.received_at.isoformat()
    return json.dumps(d, separators=(",", ":"))


def _decode(line: str) -> NewSample:
    d = json.loads(line)
    d["png"] = base64.b64decode(d["png"])
    d["received_at"] = datetime.fromisoformat(d["received_at"])
    return NewSample(**d)


SPOOL_CHUNK = 32  # samples per spool segment: a large batch fills the cap closely


class SpoolFull(OSError):
    """The spool is at its configured size cap."""


class Spool:
    """Append-only segment files of samples waiting for the database."""

    SUFFIX = ".jsonl"

    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def append(self, samples: Sequence[NewSample]) -> Path:
        """Write one new segment atomically (temp file, fsync, rename); ``SpoolFull`` when
        it would pass the cap, and any ``OSError`` (a full disk) leaves no partial file."""
        lines = "".join(_encode(sample) + "\n" for sample in samples)
        if self.max_bytes is not None and self.size() + len(lines) > self.max_bytes:
            raise SpoolFull(
                f"the spool in {self.directory} is at its cap of {self.max_bytes} bytes"
            )
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}-n{len(samples)}{self.SUFFIX}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        try:
            with tmp.open("w") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.rename(final)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
        return final

    def segments(self) -> list[Path]:
        return sorted(
            p for p in self.directory.glob(f"*{self.SUFFIX}") if not p.name.startswith(".")
        )

    @staticmethod
    def read(segment: Path) -> list[NewSample]:
        return [_decode(line) for line in segment.read_text().splitlines() if line.strip()]

    def size(self) -> int:
        """Bytes of the segments waiting on disk."""
        total = 0
        for p in self.segments():
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # replayed meanwhile
                continue
        return total

    def depth(self) -> int:
        """Samples waiting on disk (each segment's name carries its count)."""
        return sum(int(p.stem.rsplit("-n", 1)[1]) for p in self.segments())

    def set_aside(self, segment: Path, reason: str) -> Path:
        """Move a segment the database refuses for its content out of the replay path."""
        target = self.directory / "rejected" / segment.name
        target.parent.mkdir(exist_ok=True)
        segment.rename(target)
        target.with_suffix(".reason").write_text(reason + "\n")
        return target


class QuarantineWriter:
    """Batches suspect samples into the store off the request path; see the module docstring."""

    def __init__(
        self,
        *,
        sessions: Callable[[], sessionmaker[Session]],
        spool_dir: Path,
        batch_size: int = 256,
        max_delay: float = 0.2,
        retry_every: float = 2.0,
        max_queue: int = 10_000,
        max_spool_bytes: int | None = None,
        on_spool: Callable[[int, int], None] = lambda samples, nbytes: None,
        on_drop: Callable[[int], None] = lambda n: None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._make_sessions = sessions
        self._sessions: sessionmaker[Session] | None = None
        self.spool = Spool(spool_dir, max_spool_bytes)
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.retry_every = retry_every
        self._on_spool, self._on_drop, self._on_error = on_spool, on_drop, on_error
        self._queue: queue.Queue[NewSample] = queue.Queue(maxsize=max_queue)
        self._held: list[NewSample] = []  # taken from the queue, in neither store nor spool
        self.max_held = max_queue
        self._stop = threading.Event()
        self._down_since: float | None = None
        self._last_try = 0.0
        self.written = 0
        self.spooled = 0
        self.dropped = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="quarantine-writer", daemon=True)

    # -- the request path ------------------------------------------------------------
    def submit(self, sample: NewSample) -> None:
        """Queue ``sample``; never blocks. A full queue drops it, counted and logged."""
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            self._drop(1, "the writer's queue is full")

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        self._on_drop(n)
        if self.dropped == n or self.dropped % 1000 < n:  # the first, then one in a thousand
            log.error("dropped %d quarantine samples (%s); %d so far", n, reason, self.dropped)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> QuarantineWriter:
        self._on_spool(self.spool.depth(), self.spool.size())
        self._thread.start()
        return self

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted sample is in the database or the spool."""
        end = time.monotonic() + timeout
        while (self._queue.unfinished_tasks or self._held) and time.monotonic() < end:
            time.sleep(0.01)
        return not (self._queue.unfinished_tasks or self._held)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)

    @property
    def database_up(self) -> bool:
        return self._down_since is None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the background thread ---------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                self._step()
                backoff = 0.0
            except Exception:
                self.errors += 1
                self._on_error()
                backoff = min(max(2 * backoff, self.retry_every), 30.0)
                log.exception("the quarantine writer failed; retrying in %.0f s", backoff)
                self._stop.wait(backoff)

    def _step(self) -> None:
        """One turn: replay the spool when due, then write the held and the next batch."""
        batch = self._next_batch()
        held, self._held = self._held, []
        pending = held + batch
        try:
            if self.spool.segments() and time.monotonic() - self._last_try >= self.retry_every:
                self._replay()
            if pending:
                self._write(pending)
        except Exception:
            self._hold(pending, "an unexpected error")  # never lost to a bug of ours
            raise
        finally:
            for _ in batch:
                self._queue.task_done()

    def _next_batch(self) -> list[NewSample]:
        try:
            first = self._queue.get(timeout=self.max_delay)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_delay
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _db(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._sessions = self._make_sessions()
        return self._sessions

    def _write(self, batch: list[NewSample]) -> None:
        if self._down_since is not None and time.monotonic() - self._last_try < self.retry_every:
            self._to_spool(batch, "database still unavailable")
            return
        self._last_try = time.monotonic()
        try:
            with transaction(self._db()) as session:
                add_samples(session=session, samples=batch)
        except (SQLAlchemyError, OSError) as exc:
            self._mark_down(exc)
            self._to_spool(batch, str(exc).splitlines()[0])
        except StoreInputError as exc:
            # Our own samples should never be refused; keep them on disk, never drop them.
            log.error(
                "the store refused a batch of %d samples (%s); kept in the spool", len(batch), exc
            )
            self.spool.set_aside(self.spool.append(batch), str(exc))
        else:
            self._mark_up()
            self.written += len(batch)

    def _replay(self) -> None:
        self._last_try = time.monotonic()
        for segment in self.spool.segments():
            try:
                samples = self.spool.read(segment)
                with transaction(self._db()) as session:
                    fresh = replay_segment(
                        session=session, segment_id=segment.name, samples=samples
                    )
            except (SQLAlchemyError, OSError) as exc:
                self._mark_down(exc)
                return
            except (StoreInputError, ValueError, KeyError, TypeError) as exc:
                log.error("spool segment %s cannot be replayed (%s); set aside", segment.name, exc)
                self.spool.set_aside(segment, str(exc))
                continue
            segment.unlink()
            self._mark_up()
            if fresh:
                self.written += len(samples)
                log.warning("replayed %d spooled samples from %s", len(samples), segment.name)
        self._on_spool(self.spool.depth(), self.spool.size())

    def _to_spool(self, batch: list[NewSample], reason: str) -> None:
        """Spool ``batch`` in segments of at most ``SPOOL_CHUNK`` samples; what the cap or a
        full disk refuses is held in memory, so one large batch cannot block the rest."""
        for start in range(0, len(batch), SPOOL_CHUNK):
            chunk = batch[start : start + SPOOL_CHUNK]
            try:
                path = self.spool.append(chunk)
            except OSError as exc:  # the cap, or a full disk: keep them in memory, bounded
                rest = batch[start:]
                self._hold(rest, f"neither the database nor the spool: {exc}")
                log.warning("cannot spool %d samples (%s); held in memory", len(rest), exc)
                break
            self.spooled += len(chunk)
            log.warning(
                "database unavailable (%s): spooled %d samples to %s", reason, len(chunk), path
            )
        self._on_spool(self.spool.depth(), self.spool.size())

    def _hold(self, samples: list[NewSample], reason: str) -> None:
        """Keep ``samples`` in memory for the next turn, up to ``max_held``; drop the rest."""
        room = max(self.max_held - len(self._held), 0)
        self._held.extend(samples[:room])
        if len(samples) > room:
            self._drop(len(samples) - room, reason)

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            log.warning("quarantine database unavailable: %s", str(exc).splitlines()[0])
            self._down_since = time.monotonic()

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "quarantine database is back after %.1fs", time.monotonic() - self._down_since
            )
            self._down_since = None
