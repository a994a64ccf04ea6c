"""The result store, in layers: each depends only on those above it.

* `codec`: a result as a JSON structure plus named tensors; the manifest and its checksum.
* `safetensors_io`: the tensor file, written straight from memory and read by memory-mapping.
* `backend`: `StoreBackend`, every operation callers need from where results live.
* `store`: `ResultStore`, one folder per cache key on this machine: put, get, check, the paths.
* `cache`: `ResultCache`, this machine's bounded copies of results kept elsewhere.
* `s3` and `remote`: `ObjectResultStore`, results on an S3-compatible object store shared by a
  lab's machines, read through the cache.
* `config`: `open_store(settings)` picks one; `require_shared` and `where` for the worker and
  `status` / `show`.
* `housekeeping`: verify, gc and export over the store and the queue, and `commands`: `pull`
  (each imported by itself: they need the database layer or the CLI, which the store does not).
"""

from .backend import StoreBackend
from .codec import is_sealed, to_jsonable
from .store import MANIFEST_FILE, TENSOR_FILE, ResultStore, StoredInfo, StoredResult

__all__ = ["MANIFEST_FILE", "TENSOR_FILE", "ResultStore", "StoreBackend", "StoredInfo", "StoredResult", "is_sealed",
           "to_jsonable"]
