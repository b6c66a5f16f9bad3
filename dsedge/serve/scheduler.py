"""One worker thread runs every engine call; requests wait in a bounded FIFO queue.

onnxruntime sessions (and the cache buffers a generation owns) are used from this thread only. Up to
``parallel`` generations are active at once; the rest wait in arrival order. With a ``batch`` (the server
gives one when ``parallel`` > 1: ``Backend.new_batch``) the active generations are rows of one batched
decode: a newly admitted one is prefilled on its own, one chunk (``--prefill-chunk`` tokens) per loop, so
the active rows' decode steps run between its chunks; then every loop runs one forward pass over all active
rows (``runtime.batch.DecodeBatch.step``) and each row's token goes through that row's own text logic
(sampler, stop strings, EOS, max_tokens). Generations without a batch row (and every generation when
``parallel`` is 1) advance round-robin, one ``steps`` item each.

Results go back to the asyncio side through each job's ``asyncio.Queue`` (``loop.call_soon_threadsafe``);
a job cancelled by its client (disconnect) is closed at the worker's next look at it, freeing its slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsedge.errors import DsedgeError
from dsedge.serve.backend import Generation
from dsedge.serve.wire import WireError

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` waiting requests already."""


@dataclass(frozen=True)
class Event:
    kind: str  # "start" (payload: Generation) | "pieces" (list[Piece]) | "done" (Outcome or a value) | "error"
    payload: Any = None


class Job:
    """A request's work: ``start()`` (run on the worker) returns a Generation to step, or any other value,
    which is the whole result. Events arrive on ``events`` in the event loop that created the job."""

    def __init__(self, start: Callable[[], Any], loop: asyncio.AbstractEventLoop):
        self.start, self.loop = start, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.generation: Generation | None = None
        self.last_step: float | None = None  # when the previous step finished (per-token latency)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client left (or the server stops): drop the job wherever it is."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancel()


class Scheduler:
    """FIFO admission into ``parallel`` slots; round-robin steps; bounded queue. ``metrics`` gets observations."""

    def __init__(self, *, parallel: int = 1, max_queue: int = DEFAULT_MAX_QUEUE, metrics=None, batch=None):
        if parallel < 1 or max_queue < 1:
            raise ValueError("parallel and max_queue must be ≥ 1")
        self.parallel, self.max_queue, self.metrics, self.batch = parallel, max_queue, metrics, batch
        self._rows: dict[Any, Job] = {}  # each batched job's runtime.batch.BatchRow -> the job
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsedge-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises QueueFull when ``max_queue`` requests are waiting."""
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            self._waiting.append(job)
            self._wake.notify()

    # --- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = self._admissions()
            for job in admitted:
                self._begin(job)
            self._step_all()
        for job in [*self._active, *self._waiting]:
            self._finish(job, "error", WireError(503, "the server is shutting down"))

    def _admissions(self) -> list[Job]:
        """Waiting jobs that fit the free slots, oldest first (the caller holds the lock)."""
        admitted = []
        while self._waiting and len(self._active) + len(admitted) < self.parallel:
            job = self._waiting.popleft()
            if not job.cancelled:
                admitted.append(job)
        return admitted

    def _begin(self, job: Job) -> None:
        """Run ``job.start`` (prompt, retrieval); a Generation takes a slot, any other value is the result."""
        try:
            started = job.start()
        except Exception as exc:  # noqa: BLE001 — every failure goes back to its client
            job.post("error", _as_wire_error(exc))
            return
        if not isinstance(started, Generation):
            job.post("done", started)
            return
        job.generation = started
        self._active.append(job)
        job.post("start", started)

    def _step_all(self) -> None:
        """One step of every active generation: a new batch row's prefill, the others round-robin in
        admission order, then one forward pass for all batch rows."""
        for job in list(self._active):
            if job.cancelled:
                self._finish(job, None)
            elif not self._batched(job):
                self._step(job)
            elif job.generation.row.batch is None:
                self._join(job)
        if self._rows:
            self._step_batch()

    def _batched(self, job: Job) -> bool:
        return self.batch is not None and job.generation.row is not None

    def _join(self, job: Job) -> None:
        """One chunk of a batched generation's prefill (run on its own); once its first token is sampled it
        steps with the batch. The loop runs the batch's decode step between two chunks: a long prompt does
        not pause the active streams for its whole prefill."""
        row = job.generation.row
        try:
            pieces = row.join(self.batch)
            if pieces is None:  # chunks remain
                return
            self._rows[row.row] = job
            self._deliver(job, pieces)
        except Exception as exc:  # noqa: BLE001 — a failed prefill ends that generation only
            self._finish(job, "error", _as_wire_error(exc))

    def _step_batch(self) -> None:
        try:
            events = self.batch.step()
        except Exception as exc:  # noqa: BLE001 — a failed batch step ends every row in it
            for job in list(self._rows.values()):
                self._finish(job, "error", _as_wire_error(exc))
            return
        for batch_row, event in events:
            job = self._rows[batch_row]
            try:
                self._deliver(job, job.generation.row.token(event))
            except Exception as exc:  # noqa: BLE001 — a row whose text fails ends alone
                self._finish(job, "error", _as_wire_error(exc))

    def _deliver(self, job: Job, pieces: list) -> None:
        """A batched row's step: its pieces, and when its text has ended, the rest and its outcome."""
        self._observe_step(job)
        row = job.generation.row
        if row.done:
            tail, outcome = row.finish()
            pieces = [*pieces, *tail]
        if pieces:
            job.post("pieces", pieces)
        if row.done:
            job.generation.outcome = outcome
            self._finish(job, "done", outcome)

    def _step(self, job: Job) -> None:
        generation = job.generation
        try:
            pieces = next(generation.steps)
        except StopIteration:
            self._finish(job, "done", generation.outcome)
            return
        except Exception as exc:  # noqa: BLE001 — a failed step ends that generation only
            self._finish(job, "error", _as_wire_error(exc))
            return
        self._observe_step(job)
        if pieces:
            job.post("pieces", pieces)

    def _observe_step(self, job: Job) -> None:
        now = time.perf_counter()
        if self.metrics is not None:
            if job.last_step is None:
                self.metrics.observe_ttft(now - job.submitted)
            else:
                self.metrics.observe_token_latency(now - job.last_step)
        job.last_step = now

    def _finish(self, job: Job, kind: str | None, payload: Any = None) -> None:
        if job in self._active:
            self._active.remove(job)
        row = job.generation.row if job.generation is not None else None
        if row is not None and row.row is not None:
            self._rows.pop(row.row, None)
        if job.generation is not None and kind != "done":
            job.generation.close()
        if kind is not None:
            job.post(kind, payload)


def _as_wire_error(exc: Exception) -> WireError:
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, DsedgeError) and exc.exit_code == 3:  # the request's fault (a UserError)
        return WireError(400, exc.what)
    log.exception("generation failed")
    return WireError(500, f"internal error: {type(exc).__name__}: {exc}")
