"""`Notifier`: one method per event, each message sent off the worker's thread.

A notification service that is down (connection refused, 500, no answer) must never stop or
slow the worker: every event method only formats a message and puts it on a bounded queue
(a full queue drops the message and says so in the log, once); a sender thread per target delivers
them through apprise, each target with connect and read timeouts (`NDIF_JOBS_NOTIFY_TIMEOUT_S`).
A delivery that fails is logged (the URL in apprise's privacy form) and not retried: the next
event is news enough.

Jobs failed for good are batched: the first failure after a quiet minute goes out at once, the
ones after it are gathered and sent together when the minute since the last such message ends
(`NDIF_JOBS_NOTIFY_BATCH_S`), naming the jobs and the first error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import clip_error
from ..logging import get_logger, scrub
from ..units import duration_text
from .secrets import register_url_secrets, shown

log = get_logger("ndif_jobs.notify")

#: Most messages waiting to be sent; more are dropped (the worker never waits on notifications).
QUEUE_SIZE = 100
#: Seconds apprise waits at least between two messages to one target (its own default for email is 5.5).
MIN_GAP_S = 0.5
#: Jobs named one by one in a failed-jobs message; the rest are counted.
MAX_NAMED_JOBS = 10


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    kind: str


@dataclass
class _Failures:
    """Jobs failed for good, not yet told."""

    jobs: list[tuple[str, str]] = field(default_factory=list)
    first_error: str = ""
    last_sent: float = float("-inf")


def _counts_text(counts: dict[str, int]) -> str:
    shown_counts = [f"{n} {state}" for state, n in counts.items() if n]
    return ", ".join(shown_counts) if shown_counts else "no jobs"


class _Target:
    """One notification URL: its own bounded queue and sender thread, so that a slow or hanging
    service holds up only its own messages."""

    def __init__(self, where: str, apprise_obj: Any, queue_size: int) -> None:
        self.where, self.apprise = where, apprise_obj
        self.queue: queue.Queue[Message | None] = queue.Queue(maxsize=queue_size)
        self.sent: list[Message] = []
        self.undelivered = 0
        self.dropped = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="notifier")
        self.thread.start()

    def put(self, message: Message) -> None:
        try:
            self.queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("notifications are not going out as fast as they come: dropping some", target=self.where,
                            title=message.title)

    def _run(self) -> None:
        while True:
            message = self.queue.get()
            if message is None or self.closed.is_set():
                return
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        try:
            ok = bool(self.apprise.notify(title=message.title, body=message.body))
            error = "" if ok else "the service refused it or did not answer"
        except Exception as exc:  # noqa: BLE001 - a notifier's failure is never the worker's
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok:
            self.sent.append(message)
        else:
            self.undelivered += 1
            log.warning("notification not delivered", target=self.where, title=message.title, error=scrub(error))


class Notifier:
    """Sends notifications to `urls` (apprise URLs), each from a thread of its own."""

    def __init__(self, urls: list[str], *, batch_s: float = 60.0, timeout_s: float = 10.0,
                 queue_size: int = QUEUE_SIZE) -> None:
        import apprise

        for url in urls:
            register_url_secrets(url)
        # apprise logs through the standard library; its lines could name a target's host and
        # path, and nothing there passes our redaction: our own lines say what failed.
        logging.getLogger("apprise").setLevel(logging.CRITICAL)
        self.batch_s = batch_s
        self.targets: list[_Target] = []
        for url in urls:
            target = apprise.Apprise()
            if not target.add(_with_timeouts(url, timeout_s)):
                from ..errors import BadInput

                raise BadInput(f"NDIF_JOBS_NOTIFY: {shown(url)} is not a notification URL apprise reads"
                               " (see https://github.com/caronc/apprise/wiki)")
            for plugin in target:
                # apprise waits 5.5 s between two emails from one target; failures are batched here.
                plugin.request_rate_per_sec = min(plugin.request_rate_per_sec, MIN_GAP_S)
            self.targets.append(_Target(shown(url), target, queue_size))
        self._failures = _Failures()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._batcher = threading.Thread(target=self._batch_loop, daemon=True, name="notifier-batch")
        self._batcher.start()

    @property
    def sent(self) -> list[Message]:
        """Messages delivered, per target in turn."""
        return [m for t in self.targets for m in t.sent]

    # -- the events ------------------------------------------------------------------------

    def drained(self, scope: str, counts: dict[str, int], seconds: float) -> None:
        """A queue, sweep or tag has no job left to run (`scope`: "the queue", "sweep NAME", "tag NAME")."""
        self._put(Message(f"ndif-jobs: {scope} drained",
                          f"{scope} drained in {duration_text(seconds)}: {_counts_text(counts)}.", "drained"))

    def failed(self, job_id: str, experiment: str, error: str) -> None:
        """A job failed for good: told with the others of its batch period."""
        with self._lock:
            if not self._failures.jobs:
                self._failures.first_error = clip_error(scrub(error))
            self._failures.jobs.append((job_id, experiment))
        self._flush_failures(force=False)

    def stalled(self, queued: int, idle_s: float) -> None:
        """Jobs wait, and none has finished for `idle_s`."""
        self._put(Message("ndif-jobs: the queue is stalled",
                          f"{queued} job(s) queued, and none has finished for {duration_text(idle_s)}: is a worker"
                          " running that can take them? (ndif-jobs workers, ndif-jobs status)", "stall"))

    def unreachable(self, backend: str, seconds: float, error: str) -> None:
        """A backend (NDIF) has been unreachable for `seconds`."""
        self._put(Message(f"ndif-jobs: {backend} unreachable",
                          f"{backend} has been unreachable for {duration_text(seconds)}; its jobs wait in the queue, no"
                          f" attempt spent. Last error: {clip_error(scrub(error))}", "unreachable"))

    def worker_stopped(self, worker: str, error: str) -> None:
        """A worker stopped with an error."""
        self._put(Message("ndif-jobs: a worker stopped with an error",
                          f"worker {worker} stopped: {clip_error(scrub(error))}. Its unstarted jobs went back to the"
                          " queue; start a worker again (ndif-jobs worker --detach).", "worker_error"))

    # -- sending -----------------------------------------------------------------------------

    def _put(self, message: Message) -> None:
        for target in self.targets:
            target.put(message)

    def _flush_failures(self, force: bool) -> None:
        with self._lock:
            f = self._failures
            if not f.jobs or (not force and time.monotonic() - f.last_sent < self.batch_s):
                return
            jobs, first_error = f.jobs, f.first_error
            f.jobs, f.first_error, f.last_sent = [], "", time.monotonic()
        named = ", ".join(f"{job} ({experiment})" for job, experiment in jobs[:MAX_NAMED_JOBS])
        more = f" and {len(jobs) - MAX_NAMED_JOBS} more" if len(jobs) > MAX_NAMED_JOBS else ""
        self._put(Message(f"ndif-jobs: {len(jobs)} job(s) failed for good",
                          f"failed for good: {named}{more}. First error: {first_error}. See them: ndif-jobs list"
                          " --state failed; run them again: ndif-jobs retry", "failed"))

    def _batch_loop(self) -> None:
        while not self._closing.wait(min(1.0, max(self.batch_s / 4, 0.05))):
            self._flush_failures(force=False)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is pending (failures batched so far too) for at most `timeout_s`; drop the rest."""
        self._closing.set()
        self._flush_failures(force=True)
        deadline = time.monotonic() + timeout_s
        for target in self.targets:
            try:
                target.queue.put(None, timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Full:
                pass
        for target in self.targets:
            target.thread.join(max(deadline - time.monotonic(), 0.0))
            target.closed.set()


def _with_timeouts(url: str, timeout_s: float) -> str:
    """`url` with apprise's connect and read timeouts (`cto`, `rto`) unless it sets them."""
    if "cto=" in url or "rto=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}cto={timeout_s:g}&rto={timeout_s:g}"
