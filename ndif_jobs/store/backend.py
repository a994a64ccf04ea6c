"""What the worker, the service and housekeeping need from the place results live.

`StoreBackend` names every operation, in the spirit of huey's `BaseStorage`: two
implementations stand behind it, `ResultStore` (a folder on this machine, the default) and
`ObjectResultStore` (an S3-compatible object store shared by a lab's machines, read through a
local cache). Callers hold a `StoreBackend` and never ask which one it is.

The guarantees are the interface's, not one implementation's: a result appears whole or not at
all (its data files first, the manifest last as the commit); the first result stored for a key
is the one that stays; every read checks the manifest's checksum, and the data files' checksums
before they are first used; `take_out` makes a result vanish at once for every reader and
`put_back` undoes it unless a new result was stored meanwhile (`gc` relies on both).
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import NdifJobsError, StoreError

if TYPE_CHECKING:
    from .safetensors_io import Arrays
    from .store import StoredInfo, StoredResult


_QUEUE_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class StoreQueue:
    """A queue that keeps results in a store: its id (`Queue.identity`), how people know it
    (its database and host), and when it first stored or served a result there."""

    id: str
    label: str
    since: float

    def encode(self) -> bytes:
        return json.dumps({"label": self.label, "since": self.since}).encode()

    @classmethod
    def new(cls, queue_id: str, label: str) -> StoreQueue:
        if not _QUEUE_ID.match(queue_id):
            raise StoreError(f"bad queue id {queue_id!r}")
        return cls(queue_id, label, time.time())

    @classmethod
    def decode(cls, queue_id: str, body: bytes) -> StoreQueue:
        """A record as stored; an unreadable one still names its queue (it is never ignored)."""
        try:
            doc = json.loads(body)
            return cls(queue_id, str(doc["label"]), float(doc["since"]))
        except (ValueError, KeyError, TypeError):
            return cls(queue_id, "(unreadable record)", 0.0)

    @staticmethod
    def is_id(name: str) -> bool:
        return bool(_QUEUE_ID.match(name))


class StoreBackend(ABC):
    """Results keyed by cache key. Safe for several processes (and, if `shared`, machines) at once."""

    #: Whether other machines read the same results (a worker on a shared queue needs this).
    shared: bool = False

    @abstractmethod
    def location(self, key: str | None = None) -> str:
        """Where the store (or one result of it) lives, for people: a path or an s3:// address."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a whole (committed) result is stored under `key`."""

    @abstractmethod
    def put(self, key: str, result: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> int:
        """Store `result` under `key` atomically unless a whole one is there; returns its bytes."""

    @abstractmethod
    def manifest(self, key: str) -> dict[str, Any]:
        """The result's manifest, its checksum checked. Raises `ResultMissing` / `ResultCorrupt`."""

    @abstractmethod
    def check(self, key: str, full: bool = True) -> dict[str, Any]:
        """The manifest after checking every data file (`full`: re-hash it, whatever it costs)."""

    @abstractmethod
    def get(self, key: str, verify: bool = False, arrays: Arrays = "torch") -> StoredResult:
        """The result with memory-mapped tensors (`arrays`: torch tensors or numpy arrays).
        Raises `ResultMissing` / `ResultCorrupt`."""

    @abstractmethod
    def iter_stored(self) -> Iterator[StoredInfo]:
        """Every whole result, with its size and the time it was stored."""

    @abstractmethod
    def take_out(self, key: str) -> Any | None:
        """Make a result vanish for every reader at once, keeping its data; a handle for
        `put_back` / `purge`, or None if there was none."""

    @abstractmethod
    def put_back(self, handle: Any, key: str) -> bool:
        """Undo `take_out`; False if a new result was stored under `key` meanwhile."""

    @abstractmethod
    def purge(self, handle: Any) -> int:
        """Delete what `take_out` set aside; returns the bytes freed."""

    @abstractmethod
    def clean_temp(self, older_than_s: float = 3600) -> int:
        """Remove what killed writes and removals left behind; returns how many."""

    @abstractmethod
    def record_queue(self, queue: StoreQueue) -> None:
        """Name a queue that keeps results here, unless it is named already (its first record stays)."""

    @abstractmethod
    def forget_queue(self, queue_id: str) -> None:
        """Remove a queue's record (a queue that is gone: `gc --forget-queue`)."""

    @abstractmethod
    def queues(self) -> list[StoreQueue]:
        """Every queue named here. `gc` removes results only while its own queue is the one:
        it cannot see which results another queue's jobs point at."""

    def manifests(self, keys: Iterable[str]) -> dict[str, dict[str, Any] | NdifJobsError]:
        """Each key's manifest, or the error reading it (`collect` reads many at once; a store
        behind a network reads them in parallel)."""
        out: dict[str, dict[str, Any] | NdifJobsError] = {}
        for key in keys:
            try:
                out[key] = self.manifest(key)
            except NdifJobsError as exc:
                out[key] = exc
        return out

    def prefetch(self, keys: Iterable[str]) -> dict[str, NdifJobsError]:
        """Bring these results close before they are read one by one (a store behind a network
        fetches them in parallel into its cache); returns the error of each that could not be.
        A store on this machine has them close already."""
        return {}

    def remove(self, key: str) -> int:
        """Remove a result; returns the bytes freed."""
        handle = self.take_out(key)
        return self.purge(handle) if handle is not None else 0
