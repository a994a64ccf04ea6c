"""The result store, in layers: each depends only on those above it.

* `codec`: a result as a JSON structure plus named tensors; the manifest and its checksum.
* `safetensors_io`: the tensor file, written straight from memory and read by memory-mapping.
* `store`: `ResultStore`, one folder per cache key: put, get, check, and the paths.
* `housekeeping`: verify, gc and export over the store and the queue (imported by itself: it
  needs the database layer, which the store does not).
"""

from .codec import is_sealed, to_jsonable
from .store import MANIFEST_FILE, TENSOR_FILE, ResultStore, StoredInfo, StoredResult

__all__ = ["MANIFEST_FILE", "TENSOR_FILE", "ResultStore", "StoredInfo", "StoredResult", "is_sealed", "to_jsonable"]
