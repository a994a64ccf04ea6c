"""The result store: one folder per cache key, tensors in safetensors, the rest in a manifest.

    results/<key[:2]>/<key>/
        tensors.safetensors   every tensor of the result (no pickle on disk, ever)
        manifest.json         the result's structure, scalars and strings, and each file's sha256

A result is written into a temporary folder beside its final place, fsynced, and renamed into
place, so a crash leaves either the whole result or none of it. The safetensors file is written
by us: the header, then each tensor's own memory straight to the file (no second in-memory copy
of the result), hashed on a second thread while the first writes.

Reading checks the tensor file against its sha256 and memory-maps it: tensors share the page
cache rather than being copied. Re-hashing a large file on every read would cost more than the
read itself, so the manifest also records the file's size, inode and modification time as
written; a file whose stat still matches is trusted, any other is re-hashed before use, and
`verify` always re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from queue import Queue as ThreadQueue
from typing import TYPE_CHECKING, Any

from .errors import ResultCorrupt, ResultMissing, StoreError

if TYPE_CHECKING:
    import torch

TENSOR_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 16 << 20

# safetensors dtype names, from torch's.
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


# -- flattening a result into tensors + a JSON structure -------------------------------


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "shape")


def flatten(result: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Split a result into a JSON-able structure and a {name: tensor} dict it refers to."""
    tensors: dict[str, Any] = {}

    def walk(value: Any, path: str) -> Any:
        if _is_tensor(value):
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
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
            return walk(value.item(), path)
        raise StoreError(f"result value at {path or 'top level'!r} has type {type(value).__name__}, which cannot be stored")

    return walk(dict(result), ""), tensors


def unflatten(structure: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(structure, dict):
        if set(structure) == {"$tensor"}:
            return tensors[structure["$tensor"]]
        if set(structure) == {"$float"}:
            return float(structure["$float"])
        return {k: unflatten(v, tensors) for k, v in structure.items()}
    if isinstance(structure, list):
        return [unflatten(v, tensors) for v in structure]
    return structure


# -- the safetensors file ----------------------------------------------------------------


def _tensor_bytes(tensor: Any) -> memoryview:
    """The tensor's own memory as bytes, without a copy when it is already contiguous on CPU."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _header(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[bytes, list[tuple[str, int]]]:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    order = []
    for name in sorted(tensors):
        t = tensors[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _ST_DTYPES:
            raise StoreError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        order.append((name, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


class _Hasher:
    """sha256 on a second thread: hashlib releases the GIL, so hashing overlaps the writes."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self._queue: ThreadQueue[memoryview | None] = ThreadQueue(maxsize=4)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.digest.update(chunk)

    def update(self, chunk: memoryview) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self.digest.hexdigest()


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Write a valid safetensors file straight from the tensors' memory; returns (sha256, bytes)."""
    head, order = _header(tensors, metadata or {})
    hasher = _Hasher()
    total = 0
    try:
        with open(path, "wb", buffering=0) as f:
            f.write(head)
            hasher.update(memoryview(head))
            total += len(head)
            for name, nbytes in order:
                view = _tensor_bytes(tensors[name])
                for start in range(0, nbytes, _CHUNK):
                    chunk = view[start : start + _CHUNK]
                    written = f.write(chunk)
                    while written < len(chunk):  # a short write: keep going from where it stopped
                        written += f.write(chunk[written:])
                    hasher.update(chunk)
                total += nbytes
            os.fsync(f.fileno())
    finally:
        digest = hasher.hexdigest()
    return digest, total


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors(path: Path) -> dict[str, "torch.Tensor"]:
    """Memory-map a safetensors file: tensors share the page cache (copy-on-write, no copy)."""
    import torch

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ResultCorrupt(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise ResultCorrupt(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ResultCorrupt(f"{path}: not a safetensors file (bad header)") from None
        data_start = 8 + n
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = getattr(torch, _TORCH_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ResultCorrupt(f"{path}: bad header entry for {name!r}") from None
        if start == end:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        if mapped is None or data_start + end > size:
            raise ResultCorrupt(f"{path}: tensor {name!r} runs past the end of the file")
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=data_start + start)
        out[name] = flat.view(dtype).reshape(shape)
    return out


# -- the store ---------------------------------------------------------------------------


def _stat_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class StoredResult:
    key: str
    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, Any]

    @property
    def values(self) -> dict[str, Any]:
        return unflatten(self.manifest["values"], self.tensors)


@dataclass(frozen=True)
class StoredInfo:
    key: str
    path: Path
    bytes: int
    created_at: float


class ResultStore:
    """Results on disk, keyed by cache key. Safe for several processes at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise StoreError(f"bad result key {key!r}")
        return self.root / key[:2] / key

    def exists(self, key: str) -> bool:
        return (self.path_for(key) / MANIFEST_FILE).exists()

    def put(self, key: str, result: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> int:
        """Store `result` under `key` atomically; returns its size in bytes.

        If a whole result is already there (a duplicate completion), it is kept and the new
        one discarded: the first stored result of a key is the one that stays.
        """
        final = self.path_for(key)
        if (final / MANIFEST_FILE).exists():
            try:
                self.check(key, full=True)
                return self._size(final)
            except ResultCorrupt:
                # A damaged copy is moved aside (kept for inspection), and the new one stored.
                os.rename(final, self.root / f".corrupt-{key[:16]}-{uuid.uuid4().hex[:8]}")
        structure, tensors = flatten(result)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True, mode=0o700)
            digest, nbytes = write_safetensors(tmp / TENSOR_FILE, tensors)
            manifest = {
                "format": FORMAT_VERSION,
                "key": key,
                "created_at": time.time(),
                "info": dict(info or {}),
                "files": {TENSOR_FILE: {"sha256": digest, "bytes": nbytes, "stat": _stat_stamp(tmp / TENSOR_FILE)}},
                "tensors": {
                    name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for name, t in sorted(tensors.items())
                },
                "values": structure,
            }
            body = json.dumps(manifest, indent=1, allow_nan=False).encode()
            with open(tmp / MANIFEST_FILE, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if (final / MANIFEST_FILE).exists():  # another process stored the same key first
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self._size(final)
                raise
            _fsync_dir(final.parent)
            return nbytes + len(body)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot store result {key[:12]}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _size(self, folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    def manifest(self, key: str) -> dict[str, Any]:
        folder = self.path_for(key)
        path = folder / MANIFEST_FILE
        if not path.exists():
            raise ResultMissing(f"no stored result for key {key[:12]} (removed by gc, or never stored)")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise ResultCorrupt(f"result {key[:12]}: manifest.json is not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "files" not in manifest:
            raise ResultCorrupt(f"result {key[:12]}: manifest.json is not an ndif-jobs manifest")
        return manifest

    def check(self, key: str, full: bool = True) -> dict[str, Any]:
        """The manifest, after checking each file's sha256 (or only its stat if `full` is off)."""
        manifest = self.manifest(key)
        folder = self.path_for(key)
        for name, entry in manifest["files"].items():
            path = folder / name
            if not path.exists():
                raise ResultCorrupt(f"result {key[:12]}: {name} is missing")
            if not full and entry.get("stat") == _stat_stamp(path):
                continue
            if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
                raise ResultCorrupt(f"result {key[:12]}: {name} does not match its checksum")
        return manifest

    def get(self, key: str, verify: bool = False) -> StoredResult:
        """A stored result with memory-mapped tensors. Raises `ResultMissing` / `ResultCorrupt`."""
        manifest = self.check(key, full=verify)
        folder = self.path_for(key)
        tensors = read_safetensors(folder / TENSOR_FILE)
        missing = set(manifest.get("tensors", {})) - set(tensors)
        if missing:
            raise ResultCorrupt(f"result {key[:12]}: tensors missing from the file: {', '.join(sorted(missing))}")
        return StoredResult(key=key, path=folder, manifest=manifest, tensors=tensors)

    def iter_stored(self) -> Iterator[StoredInfo]:
        if not self.root.exists():
            return
        for prefix in sorted(self.root.iterdir()):
            if not prefix.is_dir() or prefix.name.startswith("."):
                continue
            for folder in sorted(prefix.iterdir()):
                if not folder.is_dir():
                    continue
                try:
                    size = self._size(folder)
                    created = (folder / MANIFEST_FILE).stat().st_mtime
                except OSError:
                    size, created = 0, 0.0
                yield StoredInfo(key=folder.name, path=folder, bytes=size, created_at=created)

    def remove(self, key: str) -> int:
        folder = self.path_for(key)
        if not folder.exists():
            return 0
        size = self._size(folder)
        trash = self.root / f".trash-{key[:16]}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)  # atomic: readers see the whole result or none
        shutil.rmtree(trash, ignore_errors=True)
        return size

    def total_bytes(self) -> int:
        return sum(info.bytes for info in self.iter_stored())

    def clean_temp(self, older_than_s: float = 3600) -> int:
        """Remove temporary folders left by a crash mid-write."""
        removed = 0
        if not self.root.exists():
            return 0
        cutoff = time.time() - older_than_s
        for entry in self.root.iterdir():
            if entry.name.startswith((".tmp-", ".trash-")) and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
