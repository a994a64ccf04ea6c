"""Choosing the result store from the settings, and what a worker and `status` need to know of it.

`NDIF_JOBS_STORE_URL` (`s3://bucket/prefix`) puts results on an object store that every machine
of a shared queue reads; unset, they stay in `<home>/results` as always. `NDIF_JOBS_CACHE_MAX`
bounds this machine's copies of object-store results (default 20 GiB), and
`NDIF_JOBS_STORE_LOCAL_OK=1` lets a worker on a shared queue keep results local. Each is read
from the `Settings` field of that name where settings has one, else from the environment.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import BadInput, StoreError
from .backend import StoreBackend

DEFAULT_CACHE_MAX = "20GiB"


def store_url(settings: Any) -> str | None:
    return getattr(settings, "store_url", None) or os.environ.get("NDIF_JOBS_STORE_URL") or None


def cache_max(settings: Any) -> int:
    from .housekeeping import parse_size

    value = getattr(settings, "cache_max", None) or os.environ.get("NDIF_JOBS_CACHE_MAX") or DEFAULT_CACHE_MAX
    return value if isinstance(value, int) else parse_size(str(value))


def open_store(settings: Any) -> StoreBackend:
    """The store these settings name: an object store (with its cache here), or the local folder."""
    from ..read_settings import ensure_private_dir

    url = store_url(settings)
    if url is None:
        from .store import ResultStore

        return ResultStore(ensure_private_dir(settings.results_dir))
    from .cache import ResultCache
    from .remote import ObjectResultStore

    cache_root = ensure_private_dir(settings.home / "cache" / "results")
    return ObjectResultStore(url, ResultCache(cache_root, cache_max(settings)), offline=bool(settings.offline))


def queue_is_shared(settings: Any) -> bool:
    """Whether other machines may reach this queue: any database but a SQLite file."""
    url = getattr(settings, "database_url", None)
    return bool(url) and not str(url).startswith("sqlite")


def require_shared(settings: Any) -> None:
    """Refuse a worker that would store results only this machine can read while other machines
    share its queue (they would see `completed` and find nothing). `NDIF_JOBS_STORE_LOCAL_OK=1`
    says that is intended (one machine on a PostgreSQL queue, or a shared folder as the home)."""
    if not queue_is_shared(settings) or store_url(settings) is not None:
        return
    if getattr(settings, "store_local_ok", False) or _env_true("NDIF_JOBS_STORE_LOCAL_OK"):
        return
    raise BadInput("the queue is shared but results would stay on this machine: set "
                   "NDIF_JOBS_STORE_URL=s3://BUCKET/PREFIX so every machine can read them, "
                   "or NDIF_JOBS_STORE_LOCAL_OK=1 if that is intended")


def where(store: StoreBackend, key: str | None) -> str:
    """Where a job's result lives, for `status` and `show`: a path, or an s3:// address with
    "(cached here)" when this machine holds a copy. Never raises (a display helper)."""
    if key is None:
        return "-"
    try:
        return store.location(key)
    except StoreError as exc:
        return f"? ({exc})"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
