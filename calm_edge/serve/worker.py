"""The server's `Engine` in a thread of its own, fed by the HTTP handlers through an inbox.

The engine steps whenever it has work; between two steps it takes what the handlers sent (new
requests, cancellations), ends the requests whose time is up, and hands each request's new text
to its handler's asyncio queue. ONNX Runtime releases the GIL while a graph runs, so the event
loop keeps answering HTTP while the batch computes.

Events a handler receives, in order: ("text", piece, tokens) for each step that gave the request
tokens (the piece may be "" while a UTF-8 character is incomplete), then exactly one of
("end", finish_reason) or ("error", status, body).
"""
import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.text_generation import TextTracker
from calm_edge.serve.protocol import error_body, finish_reason


class QueueFull(Exception):
    def __init__(self, retry_after):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    """One request's life in the server."""

    id: str
    prompt_ids: list
    params: object  # GeneratorParams
    tracker: TextTracker
    loop: asyncio.AbstractEventLoop
    timeout: float = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0
    first_at: float = None
    last_at: float = None
    finished: bool = False

    @property
    def text(self):
        return self.tracker.text

    def send(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _put_all(deliveries):
    for job, event in deliveries:
        job.events.put_nowait(event)


class EngineWorker:
    """Runs `engine` in a thread; `submit` and `cancel` are called from the event loop."""

    def __init__(self, engine, metrics, max_queue=256):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.inbox = queue.Queue()
        self.jobs = {}  # id -> Job, owned by the worker thread
        self.lock = threading.Lock()
        self.pending = 0  # submitted and not yet given a row (or ended): the queue that max_queue bounds
        self.stopping = False
        self.stop_deadline = None  # after it, every request still running is ended (503)
        self._batch = []  # (job, event) of the step being delivered
        self.thread = threading.Thread(target=self._run, name="calm-edge-engine", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, job):
        with self.lock:
            if self.stopping:
                raise ShuttingDown()
            if self.pending >= self.max_queue:
                raise QueueFull(self._retry_after())
            self.pending += 1
        self.inbox.put(("add", job))

    def cancel(self, job_id):
        self.inbox.put(("cancel", job_id))

    def begin_stop(self, timeout):
        """Refuse new requests from now on; the running ones get `timeout` seconds to finish, then end (503)."""
        with self.lock:
            self.stopping = True
            deadline = time.monotonic() + timeout
            self.stop_deadline = deadline if self.stop_deadline is None else min(self.stop_deadline, deadline)
        self.inbox.put(("wake", None))

    def stop(self, timeout):
        """`begin_stop(timeout)`, wait for the requests to end, and end the thread."""
        self.begin_stop(timeout)
        while self.thread.is_alive() and (self.jobs or not self.inbox.empty()):
            time.sleep(0.05)
        self.inbox.put(("stop", None))
        self.thread.join(timeout=max(5.0, timeout))

    def _retry_after(self):
        done = self.metrics.duration.collect()[0].samples
        count = next((s.value for s in done if s.name.endswith("_count")), 0)
        total = next((s.value for s in done if s.name.endswith("_sum")), 0)
        mean = total / count if count else 1.0
        return max(1, math.ceil(mean * self.pending / self.engine.max_batch))

    # ----- the worker thread --------------------------------------------------------------------

    def _run(self):
        while True:
            if not self._take_inbox(block=not self.engine.has_work):
                break
            self._expire()
            if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
                self._end_all()
            if self.engine.has_work:
                outputs = self.engine.step()
                self.metrics.steps.inc()
                now, self._batch = time.perf_counter(), []
                for output in outputs:
                    self._deliver(output, now)
                self._flush()
            self.metrics.batch(self.engine.running, self.pending)
        self._end_all()

    def _end_all(self):
        for job in list(self.jobs.values()):
            self.engine.cancel(job.id)
            self._fail(job, 503, error_body("the server shut down before the request finished; send it again",
                                            kind="server_error"))

    def _take_inbox(self, block):
        """Apply the handlers' messages; returns False on stop."""
        try:
            messages = [self.inbox.get(timeout=0.25)] if block else []
        except queue.Empty:
            return True
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for kind, payload in messages:
            if kind == "stop":
                return False
            if kind == "add":
                self._add(payload)
            elif kind == "cancel" and payload in self.jobs:
                self.engine.cancel(payload)
                self._end(self.jobs[payload], None)
        return True

    def _add(self, job):
        try:
            self.engine.add_request(job.prompt_ids, job.params, request_id=job.id)
        except CalmEdgeError as e:  # the handler checked the request; this is a last line of defence
            self._unpend(job)
            job.finished = True
            job.send("error", 400, error_body(str(e)))
            return
        self.jobs[job.id] = job
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _unpend(self, job):
        if job.first_at is None:
            with self.lock:
                self.pending -= 1

    def _deliver(self, output, now):
        job = self.jobs.get(output.request_id)
        if job is None:
            return
        if output.new_ids:
            if job.first_at is None:
                self._unpend(job)
                job.first_at = now
                self.metrics.ttft.observe(now - job.arrived)
            else:
                self.metrics.per_token.observe((now - job.last_at) / len(output.new_ids))
            job.last_at = now
            job.completion_tokens += len(output.new_ids)
            self.metrics.completion_tokens.inc(len(output.new_ids))
            self._batch.append((job, ("text", job.tracker.add(output.new_ids), len(output.new_ids))))
            if job.tracker.stopped:
                self.engine.cancel(job.id)
                self._end(job, "stop")
                return
        if output.finished and output.stop_reason != "cancelled":
            self._end(job, finish_reason(output.stop_reason))

    def _flush(self):
        """Hand a step's text to the handlers in one wake-up of the event loop, not one per request."""
        if self._batch:
            self._batch[0][0].loop.call_soon_threadsafe(_put_all, self._batch)
        self._batch = []

    def _expire(self):
        now = time.perf_counter()
        for job in list(self.jobs.values()):
            if job.timeout is not None and now - job.arrived > job.timeout:
                self.engine.cancel(job.id)
                self._fail(job, 504, error_body(f"the request took longer than the server's --request-timeout of "
                                                f"{job.timeout:g} s; ask for fewer max_tokens", kind="timeout"))

    def _end(self, job, reason):
        """The request is over: `reason` is its finish_reason, None when its client left."""
        self._unpend(job)
        job.finished = True
        self.jobs.pop(job.id, None)
        self.metrics.duration.observe(time.perf_counter() - job.arrived)
        if reason is not None:
            rest = job.tracker.finish()  # text held back: an unfinished UTF-8 character or stop sequence
            if rest:
                self._batch.append((job, ("text", rest, 0)))
            self._flush()  # the text of this step first
            job.send("end", reason)

    def _fail(self, job, status, body):
        self._end(job, None)
        job.send("error", status, body)
