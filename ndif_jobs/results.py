"""The result store: one folder per cache key, tensors in safetensors, the rest in a manifest.

    results/<key[:2]>/<key>/
        tensors.safetensors   every tensor of the result (no pickle on disk, ever)
        manifest.json         the result's structure, scalars and strings, each file's sha256,
                              and a sha256 of everything else in the manifest

A result is written into a temporary folder beside its final place, fsynced, and renamed into
place, so a crash leaves either the whole result or none of it. The safetensors file is written
by us: the header, then each tensor's own memory straight to the file (no second in-memory copy
of the result; strided or accelerator tensors go through two small reused staging buffers),
hashed with sha256 on a second thread while the first writes and then waits in the one fsync.

Reading memory-maps the tensor file: tensors share the page cache rather than being copied.
Re-hashing a large file on every read would cost more than the read itself (sha256 runs at
about 1-2 GB/s on one core), so the manifest also records the file's stat as written: size,
inode, mtime and ctime. A file whose stat still matches is trusted; any other is re-hashed
before use, and `verify` always re-hashes. ctime cannot be set from user space, so a file
rewritten in place with its mtime put back is caught; the stamp is recorded only once the
file-time clock has moved past the file's times, so a change in the same clock tick is caught
too. The stat is taken from the very file descriptor that is then hashed or mapped. What a stat
cannot see (bits flipped by the disk itself) only `verify` finds.

The values kept in the manifest itself (scalars, strings, the structure, the stamps) are covered
by `manifest_sha256`, checked on every read: a manifest is a few KiB, hashed in well under a
millisecond. See docs/store.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, BinaryIO

from . import crashpoints
from .errors import ResultCorrupt, ResultMissing, StoreError

if TYPE_CHECKING:
    import torch

TENSOR_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
#: Format 1 manifests (no `manifest_sha256`) are still read: their tensors are checked, their
#: other values cannot be (`StoredResult.sealed` is False, and `verify` lists them).
READABLE_FORMATS = (1, 2)
CHECKSUM_FIELD = "manifest_sha256"
_CHUNK = 16 << 20
_KEY = re.compile(r"[0-9a-f]{8,}")

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


def to_jsonable(value: Any) -> Any:
    """A result as plain JSON values: tensors as nested lists, NaN as null (for --json and export)."""
    if _is_tensor(value):
        return value.float().tolist() if "bfloat16" in str(value.dtype) else value.tolist()
    if isinstance(value, Mapping):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


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

# A contiguous CPU tensor is written from its own memory in pieces of _CHUNK bytes. Any other
# tensor (strided, expanded, or on an accelerator) is copied a few rows at a time into one of
# _COPIES_IN_FLIGHT staging buffers of _COPY_CHUNK bytes, reused for the whole file: a buffer
# comes back once its piece is hashed. Extra memory while storing stays a few MiB, whatever the
# size of the result. (Fresh copies per piece would not do: freed and re-allocated, they grow
# the heap by tens of MiB.)
_COPY_CHUNK = 4 << 20
_COPIES_IN_FLIGHT = 2

Piece = tuple[memoryview, Any]  # the bytes, and the staging buffer they live in (None: the tensor's own)


class _Staging:
    """The staging buffers. Only the writer takes them; the hasher gives them back."""

    def __init__(self) -> None:
        self._free: SimpleQueue[Any] = SimpleQueue()
        self._made = 0

    def take(self) -> "torch.Tensor":
        if self._made < _COPIES_IN_FLIGHT and self._free.empty():
            import torch

            self._made += 1
            return torch.empty(_COPY_CHUNK, dtype=torch.uint8)
        return self._free.get()

    def give(self, buffer: "torch.Tensor") -> None:
        self._free.put(buffer)


def _as_bytes(t: "torch.Tensor") -> memoryview:
    """A contiguous CPU tensor's memory as bytes, without a copy."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _tensor_pieces(tensor: Any, staging: _Staging) -> Iterator[Piece]:
    """The tensor's bytes in row-major order, in pieces."""
    t = tensor.detach()
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and t.is_contiguous():
        view = _as_bytes(t)
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK], None
        return
    yield from _copied_pieces(t, staging)


def _copied_pieces(t: "torch.Tensor", staging: _Staging) -> Iterator[Piece]:
    nbytes = t.numel() * t.element_size()
    if t.numel() == 0:
        return
    if t.dim() == 0 or nbytes <= _COPY_CHUNK:
        yield _staged(t, staging)
        return
    row = nbytes // t.shape[0]
    if row > _COPY_CHUNK:  # one row is already too big: go a dimension down
        for i in range(t.shape[0]):
            yield from _copied_pieces(t[i], staging)
        return
    step = _COPY_CHUNK // row
    for i in range(0, t.shape[0], step):
        yield _staged(t[i : i + step], staging)


def _staged(t: "torch.Tensor", staging: _Staging) -> Piece:
    buffer = staging.take()
    n = t.numel() * t.element_size()
    buffer[:n].view(t.dtype).view(t.shape).copy_(t)
    return memoryview(buffer[:n].numpy()), buffer


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
    """sha256 on a second thread, fed the same pieces the writer writes.

    hashlib and os.write both release the GIL, so on two cores the hash and the copy into the
    page cache run side by side, and the hash goes on while the main thread waits in fsync. The
    queue holds views of the caller's tensors (no copies) and so needs no bound; pieces in a
    staging buffer are bounded by the buffers, each given back once its piece is hashed.
    """

    def __init__(self, staging: _Staging) -> None:
        self._digest = hashlib.sha256()
        self._staging = staging
        self._queue: SimpleQueue[Piece | None] = SimpleQueue()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ndif-jobs-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            chunk, buffer = item
            try:
                if not self._stop:
                    self._digest.update(chunk)
            except BaseException as exc:  # pragma: no cover - hashlib does not fail on bytes
                self._error, self._stop = exc, True
            finally:
                if buffer is not None:
                    self._staging.give(buffer)

    def update(self, piece: Piece) -> None:
        self._queue.put(piece)

    def close(self, abort: bool = False) -> None:
        self._stop = self._stop or abort
        self._queue.put(None)
        self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()


def _write_all(fd: int, chunk: memoryview) -> None:
    written = os.write(fd, chunk)
    while written < len(chunk):  # a short write: keep going from where it stopped
        written += os.write(fd, chunk[written:])


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Write a valid safetensors file straight from the tensors' memory; returns (sha256, bytes).

    The file is fsynced before this returns.
    """
    digest, total, _ = _write_safetensors(path, tensors, metadata)
    return digest, total


def write_safetensors_fd(
    fd: int, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, name: str = "safetensors file"
) -> tuple[str, int]:
    """`write_safetensors` into a file the caller opened (empty, at offset 0): `export` writes into
    a temporary file it created itself and must not reopen by name."""
    digest, total, _ = _write_safetensors_to(fd, name, tensors, metadata)
    return digest, total


def _write_safetensors(
    path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> tuple[str, int, os.stat_result]:
    with open(path, "wb", buffering=0) as f:
        return _write_safetensors_to(f.fileno(), str(path), tensors, metadata)


def _write_safetensors_to(
    fd: int, name: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> tuple[str, int, os.stat_result]:
    head, order = _header(tensors, metadata or {})
    total = len(head) + sum(nbytes for _, nbytes in order)
    staging = _Staging()
    hasher = _Hasher(staging)
    try:
        hasher.update((memoryview(head), None))
        _write_all(fd, memoryview(head))
        for tensor_name, _nbytes in order:
            for piece in _tensor_pieces(tensors[tensor_name], staging):
                hasher.update(piece)  # hashed on the other thread while it is written here
                _write_all(fd, piece[0])
        if os.fstat(fd).st_size != total:
            raise StoreError(f"{name}: wrote {os.fstat(fd).st_size} bytes, expected {total}")
        os.fsync(fd)  # the disk works while the hasher finishes
        digest = hasher.hexdigest()
        st = os.fstat(fd)
    finally:
        hasher.close(abort=True)
    return digest, total, st


def _sha256_fd(fd: int, size: int) -> str:
    """sha256 of an open file's first `size` bytes, read through a mapping (no copy into Python)."""
    digest = hashlib.sha256()
    if size > 0:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                for start in range(0, size, _CHUNK):
                    digest.update(view[start : start + _CHUNK])
            finally:
                view.release()
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb", buffering=0) as f:
        return _sha256_fd(f.fileno(), os.fstat(f.fileno()).st_size)


def read_safetensors(path: Path) -> dict[str, "torch.Tensor"]:
    """Memory-map a safetensors file: tensors share the page cache (copy-on-write, no copy)."""
    with open(path, "rb") as f:
        return _map_safetensors(f, path)


def _map_safetensors(f: BinaryIO, path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ResultCorrupt(f"{path}: not a safetensors file (too short)")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8 or n > 100_000_000:
        raise ResultCorrupt(f"{path}: not a safetensors file (bad header length)")
    try:
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError
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
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            expected = math.prod(shape) * dtype.itemsize
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ResultCorrupt(f"{path}: bad header entry for {name!r}") from None
        if start < 0 or end - start != expected or min(shape, default=0) < 0:
            raise ResultCorrupt(f"{path}: bad header entry for {name!r}")
        if start == end:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        if mapped is None or data_start + end > size:
            raise ResultCorrupt(f"{path}: tensor {name!r} runs past the end of the file")
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=data_start + start)
        out[name] = flat.view(dtype).reshape(shape)
    return out


# -- the store ---------------------------------------------------------------------------


def _stamp(st: os.stat_result) -> dict[str, int]:
    """What a later stat must show for the file to be trusted without re-hashing it.

    ctime cannot be set from user space (utime, touch -r and rsync -t all reset it to now), so a
    file rewritten in place with its size and mtime put back still shows a new ctime.
    """
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


_LINUX = sys.platform.startswith("linux")
_CLOCK_REALTIME_COARSE = 5  # Linux: the clock the kernel stamps file times from
# A later change gets a timestamp past the recorded one only once the clock the file system
# stamps from has moved past it, by more than its granularity.
_FS_SLACK_NS = 1_000_000 if _LINUX else 50_000_000


def _fs_now_ns() -> int:
    return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) if _LINUX else time.time_ns()


def _settled_stamp(st: os.stat_result, wait_s: float = 0.25) -> dict[str, int] | None:
    """The stat stamp to record, or None where a later change might leave it unchanged.

    File times come from a clock that ticks every few ms, so a change in the same tick as the
    last write would keep mtime and ctime as they are (git's "racy clean" problem). Waiting for
    the clock to pass them (a few ms at most, and only for files written within the last tick)
    rules that out. File systems with whole-second times, or a clock behind the file's times (a
    remote server's), get no stamp: their results are re-hashed on every load instead.
    """
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    if st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0:
        return None
    deadline = time.monotonic() + wait_s
    while _fs_now_ns() <= newest + _FS_SLACK_NS:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)
    return _stamp(st)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces, ASCII) of every field but the checksum.

    Computed over the parsed manifest, so any edit to a value, a stamp or a file's checksum
    changes it, however the file is re-indented. Python's float repr round-trips, so a float
    reads back to the very text it was hashed as.
    """
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def is_key(name: str) -> bool:
    """Whether a folder name under `results/<prefix>/` can be a result key."""
    return _KEY.fullmatch(name) is not None


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

    @property
    def sealed(self) -> bool:
        """Whether every value is covered by a checksum (False for a format 1 manifest)."""
        return is_sealed(self.manifest)


def is_sealed(manifest: Mapping[str, Any]) -> bool:
    """Format 2 and later: `ResultStore.manifest` has checked `manifest_sha256` on reading it."""
    return manifest.get("format") != 1


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
        if not is_key(key):
            raise StoreError(f"bad result key {key!r}")
        return self.root / key[:2] / key

    def exists(self, key: str) -> bool:
        return (self.path_for(key) / MANIFEST_FILE).exists()

    def put(self, key: str, result: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> int:
        """Store `result` under `key` atomically; returns its size in bytes.

        If a whole result is already there (a duplicate completion), it is kept and the new
        one discarded: the first stored result of a key is the one that stays. A damaged one is
        moved aside to `.corrupt-*` and replaced; a format 1 one (values not covered by a
        checksum) is replaced, so that running its job again seals it.
        """
        final = self.path_for(key)
        if (final / MANIFEST_FILE).exists():
            try:
                if is_sealed(self.check(key, full=True)):
                    return self._size(final)
                aside = f".trash-{key[:16]}-{uuid.uuid4().hex[:8]}"
            except ResultCorrupt:
                aside = f".corrupt-{key[:16]}-{uuid.uuid4().hex[:8]}"  # kept for inspection
            try:
                os.rename(final, self.root / aside)
            except OSError as exc:
                raise StoreError(f"cannot replace result {key[:12]}: {exc.strerror or exc}") from None
            if aside.startswith(".trash-"):
                shutil.rmtree(self.root / aside, ignore_errors=True)
        structure, tensors = flatten(result)
        new_prefix = not final.parent.exists()
        try:
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot store result {key[:12]}: {exc.strerror or exc}") from None
        tmp = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True, mode=0o700)
            digest, nbytes, st = _write_safetensors(tmp / TENSOR_FILE, tensors)
            crashpoints.reached("storing")
            manifest = {
                "format": FORMAT_VERSION,
                "key": key,
                "created_at": time.time(),
                "info": dict(info or {}),
                "files": {TENSOR_FILE: {"sha256": digest, "bytes": nbytes, "stat": _settled_stamp(st)}},
                "tensors": {
                    name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for name, t in sorted(tensors.items())
                },
                "values": structure,
            }
            manifest[CHECKSUM_FIELD] = manifest_digest(manifest)
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
            if new_prefix:
                _fsync_dir(self.root)
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

    def check(self, key: str, full: bool = True) -> dict[str, Any]:
        """The manifest, after checking each file's sha256 (or only its stat if `full` is off)."""
        manifest = self.manifest(key)
        for name, entry in manifest["files"].items():
            with self._open(key, name) as f:
                self._check_open(key, name, entry, f, full)
        return manifest

    def _open(self, key: str, name: str) -> BinaryIO:
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
            raise ResultCorrupt(f"result {key[:12]}: manifest.json names a bad file {name!r}")
        try:
            return open(self.path_for(key) / name, "rb")
        except FileNotFoundError:
            raise ResultCorrupt(f"result {key[:12]}: {name} is missing") from None

    def _check_open(self, key: str, name: str, entry: Any, f: BinaryIO, full: bool) -> None:
        """Check an open file, so that what is checked is what the caller then reads."""
        if not isinstance(entry, dict):
            raise ResultCorrupt(f"result {key[:12]}: manifest.json has a bad entry for {name}")
        st = os.fstat(f.fileno())
        stamp = entry.get("stat")
        if not full and stamp is not None and stamp == _stamp(st):
            return
        if st.st_size != entry.get("bytes") or _sha256_fd(f.fileno(), st.st_size) != entry.get("sha256"):
            raise ResultCorrupt(f"result {key[:12]}: {name} does not match its checksum")

    def get(self, key: str, verify: bool = False) -> StoredResult:
        """A stored result with memory-mapped tensors. Raises `ResultMissing` / `ResultCorrupt`.

        The tensor file is opened once: its stat (or, with `verify` or a changed stat, its
        sha256) is checked on the very file that is then mapped.
        """
        manifest = self.manifest(key)
        files = manifest["files"]
        if TENSOR_FILE not in files:
            raise ResultCorrupt(f"result {key[:12]}: manifest.json has no checksum for {TENSOR_FILE}")
        for name, entry in files.items():
            if name != TENSOR_FILE:
                with self._open(key, name) as f:
                    self._check_open(key, name, entry, f, verify)
        folder = self.path_for(key)
        with self._open(key, TENSOR_FILE) as f:
            self._check_open(key, TENSOR_FILE, files[TENSOR_FILE], f, verify)
            tensors = _map_safetensors(f, folder / TENSOR_FILE)
        missing = set(manifest.get("tensors", {})) - set(tensors)
        if missing:
            raise ResultCorrupt(f"result {key[:12]}: tensors missing from the file: {', '.join(sorted(missing))}")
        return StoredResult(key=key, path=folder, manifest=manifest, tensors=tensors)

    def iter_stored(self) -> Iterator[StoredInfo]:
        """Every result folder. Anything else under the store (a backup copy, a note, a folder
        that is not named for a key) is no result and is left alone."""
        if not self.root.exists():
            return
        for prefix in sorted(self.root.iterdir()):
            if not prefix.is_dir() or prefix.name.startswith("."):
                continue
            for folder in sorted(prefix.iterdir()):
                if not folder.is_dir() or folder.is_symlink() or not is_key(folder.name) or folder.name[:2] != prefix.name:
                    continue
                try:
                    size = self._size(folder)
                    created = (folder / MANIFEST_FILE).stat().st_mtime
                except OSError:
                    size, created = 0, 0.0
                yield StoredInfo(key=folder.name, path=folder, bytes=size, created_at=created)

    def remove(self, key: str) -> int:
        """Remove a result; returns the bytes freed. Raises `OSError` if it cannot be moved out."""
        trash = self.take_out(key)
        return self.purge(trash) if trash is not None else 0

    def take_out(self, key: str) -> Path | None:
        """Move a result out of its place into a `.trash-*` folder (atomic: a reader sees the whole
        result or none); None if it is not there. `put_back` undoes it, `purge` deletes it."""
        folder = self.path_for(key)
        trash = self.root / f".trash-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return None
        return trash

    def put_back(self, trash: Path, key: str) -> bool:
        """Return a taken-out result to its place; False if a new one was stored there meanwhile."""
        try:
            os.rename(trash, self.path_for(key))
        except OSError:
            return False
        return True

    def purge(self, trash: Path) -> int:
        """Delete a taken-out result; returns its size. What cannot be deleted stays a `.trash-*`
        folder, which `clean_temp` tries again."""
        size = self._size(trash)
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
