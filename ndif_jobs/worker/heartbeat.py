"""Lease renewal while a bundle runs: no other worker takes jobs whose worker is still at them."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..logging import get_logger

if TYPE_CHECKING:
    from ..service import Service

log = get_logger("ndif_jobs.worker")


class Heartbeat:
    """Renews the leases of the jobs a bundle holds, every third of a lease, until the block ends."""

    def __init__(self, service: Service, worker: str, job_ids: list[str]) -> None:
        self.service, self.worker, self.job_ids = service, worker, job_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease-heartbeat")

    def _run(self) -> None:
        lease = self.service.settings.lease_s
        while not self._stop.wait(max(lease / 3, 0.05)):
            try:
                self.service.queue.renew_leases(self.worker, self.job_ids, lease)
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried next beat
                log.warning("lease renewal failed", error=str(exc))

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def add(self, job_ids: list[str]) -> None:
        """Renew these too from now on (jobs that joined the bundle)."""
        self.job_ids = [*self.job_ids, *job_ids]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
