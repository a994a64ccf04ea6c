"""The result codec: how a result's values and its manifest are written down, and read back.

A result is a mapping of names to tensors, numbers, strings, and lists and dicts of them.
`flatten` splits it into a JSON structure (`{"$tensor": name}` where a tensor was,
`{"$float": "inf"}` for a non-finite float) and a `{name: tensor}` dict; `unflatten` joins them
again. The structure lives in the manifest, which `manifest_digest` seals: a sha256 of its
canonical JSON, checked on every read. `to_jsonable` is the plain-JSON view for `--json` and
`export -f json`. This module touches no file; the format is described in docs/store.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from ..errors import ResultCorrupt, StoreError

FORMAT_VERSION = 2
#: Format 1 manifests (no `manifest_sha256`) are read too: their tensors are checked, their
#: other values cannot be (`StoredResult.sealed` is False, and `verify` lists them).
READABLE_FORMATS = (1, 2)
CHECKSUM_FIELD = "manifest_sha256"


def is_tensor(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "shape")


def is_numpy_array(value: Any) -> bool:
    """A numpy array (a result read with `arrays="numpy"`), recognised without importing numpy."""
    return type(value).__module__ == "numpy" and hasattr(value, "tolist") and hasattr(value, "shape")


def widened(tensor: Any) -> Any:
    """A torch tensor as numpy and JSON can take it: bfloat16 and float8, which numpy has no type
    for, widened to float32 (exactly: float32 holds every one of their values)."""
    dtype = str(tensor.dtype)
    return tensor.float() if "bfloat16" in dtype or "float8" in dtype else tensor


# -- the values ----------------------------------------------------------------------------------


def flatten(result: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Split a result into a JSON-able structure and a {name: tensor} dict it refers to."""
    tensors: dict[str, Any] = {}

    def walk(value: Any, path: str) -> Any:
        if is_tensor(value):
            name, n = path, 1
            while name in tensors:  # {"a.b": x, "a": {"b": y}} must not share a name
                n += 1
                name = f"{path}~{n}"
            tensors[name] = value
            return {"$tensor": name}
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    k = str(k)
                out[k] = walk(v, f"{path}.{k}" if path else k)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, (bool, int, str)) or value is None:
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
            return walk(value.item(), path)
        where = path or "top level"
        raise StoreError(f"result value at {where!r} has type {type(value).__name__}, which cannot be stored")

    return walk(dict(result), ""), tensors


def unflatten(structure: Any, tensors: Mapping[str, Any]) -> Any:
    """The result `flatten` split, with `tensors` put back where the structure names them."""
    if isinstance(structure, dict):
        if set(structure) == {"$tensor"}:
            return tensors[structure["$tensor"]]
        if set(structure) == {"$float"}:
            return float(structure["$float"])
        return {k: unflatten(v, tensors) for k, v in structure.items()}
    if isinstance(structure, list):
        return [unflatten(v, tensors) for v in structure]
    return structure


def to_jsonable(value: Any) -> Any:
    """A result as plain JSON values: tensors as nested lists, and NaN, inf and -inf as null.

    JSON has no number for the non-finite floats; null is what JavaScript's `JSON.stringify`
    writes for them too. The other export formats (npz, safetensors, pt) keep them exactly.
    """
    if is_tensor(value):
        t = widened(value)
        items = t.tolist()
        if t.is_floating_point() and not bool(t.isfinite().all()):
            return _finite_or_null(items)
        return items
    if is_numpy_array(value):
        items = value.tolist()
        return _finite_or_null(items) if value.dtype.kind == "f" else items
    if isinstance(value, Mapping):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite_or_null(items: Any) -> Any:
    if isinstance(items, list):
        return [_finite_or_null(v) for v in items]
    return items if math.isfinite(items) else None


# -- the manifest --------------------------------------------------------------------------------


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces, ASCII) of every field but the checksum.

    Computed over the parsed manifest, so any edit to a value, a stamp or a file's checksum
    changes it, however the file is re-indented. Python's float repr round-trips, so a float
    reads back to the very text it was hashed as.
    """
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def new_manifest(key: str, info: Mapping[str, Any], files: Mapping[str, Any], structure: Any,
                 tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The sealed manifest of a result: `files` as `{name: {"sha256", "bytes", "stat"}}`."""
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "key": key,
        "created_at": time.time(),
        "info": dict(info),
        "files": dict(files),
        "tensors": {
            name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for name, t in sorted(tensors.items())
        },
        "values": structure,
    }
    manifest[CHECKSUM_FIELD] = manifest_digest(manifest)
    return manifest


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, allow_nan=False).encode()


def decode_manifest(raw: bytes, key: str) -> dict[str, Any]:
    """The manifest of result `key`, checked against its checksum. Raises `ResultCorrupt`."""
    try:
        manifest = json.loads(raw.decode())
    except ValueError:  # bad JSON, or bytes that are not UTF-8
        raise ResultCorrupt(f"result {key[:12]}: manifest.json is not valid JSON") from None
    if (
        not isinstance(manifest, dict)
        or type(manifest.get("format")) is not int
        or manifest["format"] not in READABLE_FORMATS
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ResultCorrupt(f"result {key[:12]}: manifest.json is not an ndif-jobs manifest")
    # A format 1 manifest never had a checksum: one that has is a sealed manifest relabelled.
    if (manifest["format"] == 1 and CHECKSUM_FIELD in manifest) or (
        manifest["format"] != 1 and manifest.get(CHECKSUM_FIELD) != manifest_digest(manifest)
    ):
        raise ResultCorrupt(f"result {key[:12]}: manifest.json does not match its checksum (a value was changed)")
    return manifest


def is_sealed(manifest: Mapping[str, Any]) -> bool:
    """Format 2 and later: `decode_manifest` has checked `manifest_sha256` on reading it."""
    return manifest.get("format") != 1
