"""Notifications: what a worker tells you happened overnight, through apprise.

`NDIF_JOBS_NOTIFY` names one or more notification URLs (apprise's: `ntfy://topic`,
`slack://...`, `discord://...`, `mailto://user:pass@host`, `json://host/path`, and many more;
several separated by spaces or commas). Without it nothing here runs.

* `settings.py`: the notification settings (`NDIF_JOBS_NOTIFY`, `NDIF_JOBS_STALL_S`, ...).
* `notifier.py`: `Notifier`, one method per event; messages go out from a thread of their
  own through a bounded queue with timeouts, so a notification service that is down never
  stops the worker, and failures are batched to at most one message a minute.
* `secrets.py`: the secret parts of notification URLs, registered with the log redaction.
* `watch.py`: `LoopNotices`, what the worker loop calls once per pass: it finds the events in
  the queue (drained queue, sweep or tag; jobs failed for good; a stall; NDIF unreachable).
"""

from __future__ import annotations

from .notifier import Notifier
from .watch import LoopNotices

__all__ = ["LoopNotices", "Notifier"]
