"""The safetensors file: written straight from the tensors' memory, read by memory-mapping.

The writer puts down the header, then each tensor's own memory in pieces (no second in-memory
copy of the result; strided or accelerator tensors go through two small reused staging
buffers), hashing the same pieces with sha256 on a second thread, and fsyncs the file. The
reader maps the file copy-on-write, so tensors share the page cache. The files are plain
safetensors, readable by `safetensors.torch.load_file` (format in docs/store.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple

from ..errors import ResultCorrupt, StoreError

if TYPE_CHECKING:
    import torch

_CHUNK = 16 << 20

# safetensors dtype names, from torch's.
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
# Bytes per element of each safetensors dtype.
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}

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

    def take(self) -> torch.Tensor:
        if self._made < _COPIES_IN_FLIGHT and self._free.empty():
            import torch

            self._made += 1
            return torch.empty(_COPY_CHUNK, dtype=torch.uint8)
        return self._free.get()

    def give(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes, without a copy."""
    import torch

    return t.reshape(-1).view(torch.uint8).numpy().data


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


def _copied_pieces(t: torch.Tensor, staging: _Staging) -> Iterator[Piece]:
    nbytes = t.numel() * t.element_size()
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


def _staged(t: torch.Tensor, staging: _Staging) -> Piece:
    buffer = staging.take()
    n = t.numel() * t.element_size()
    buffer[:n].view(t.dtype).view(t.shape).copy_(t)
    return buffer[:n].numpy().data, buffer


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


class SafetensorsStream:
    """The bytes `write_safetensors` writes, as a stream read straight from the tensors' memory
    and hashed as they pass: an upload can go from memory while the local copy is written. It
    cannot seek, so a reader (boto3's transfer manager) takes it in order, part by part."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        head, order = _header(tensors, {})
        self.size = len(head) + sum(nbytes for _, nbytes in order)
        self._digest = hashlib.sha256()
        self._staging = _Staging()
        self._pieces = self._all_pieces(head, [tensors[name] for name, _ in order])
        self._current: Piece | None = None
        self._offset = 0
        self.sent = 0

    def _all_pieces(self, head: bytes, tensors: list[Any]) -> Iterator[Piece]:
        yield memoryview(head), None
        for tensor in tensors:
            yield from _tensor_pieces(tensor, self._staging)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, amount: int = -1) -> bytes:
        parts: list[bytes | memoryview] = []
        got = 0
        while amount < 0 or got < amount:
            if self._current is None:
                self._current, self._offset = next(self._pieces, None), 0
                if self._current is None:
                    break
            view, buffer = self._current
            want = len(view) - self._offset if amount < 0 else min(amount - got, len(view) - self._offset)
            part = view[self._offset : self._offset + want]
            # A staging buffer is reused once given back: its bytes are copied out first.
            parts.append(part if buffer is None else bytes(part))
            got += want
            self._offset += want
            if self._offset == len(view):
                if buffer is not None:
                    self._staging.give(buffer)
                self._current = None
        out = b"".join(parts)
        self._digest.update(out)
        self.sent += len(out)
        return out

    def hexdigest(self) -> str:
        """sha256 of the whole stream; raises `StoreError` unless all of it was read."""
        if self.sent != self.size:
            raise StoreError(f"the upload read {self.sent} of {self.size} bytes of the tensor file")
        return self._digest.hexdigest()


class Written(NamedTuple):
    """A file `write_safetensors` wrote: its sha256, its size, and its stat once fsynced."""

    sha256: str
    bytes: int
    stat: os.stat_result


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Written:
    """Write a valid safetensors file straight from the tensors' memory; fsynced on return."""
    with open(path, "wb", buffering=0) as f:
        return write_safetensors_fd(f.fileno(), tensors, metadata, name=str(path))


def write_safetensors_fd(
    fd: int, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, name: str = "safetensors file"
) -> Written:
    """`write_safetensors` into a file the caller opened (empty, at offset 0): `export` writes into
    a temporary file it created itself and must not reopen by name."""
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
    return Written(digest, total, st)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file: tensors share the page cache (copy-on-write, no copy)."""
    with open(path, "rb") as f:
        return map_safetensors(f, path)


#: What a stored result's tensors are read as: torch tensors (what `load_result` gives), or
#: numpy arrays for readers that only print values (`results --json`), which then start without
#: importing torch (seconds of a command's start). bfloat16 has no numpy type: it is widened to
#: float32, exactly, as the JSON output widens it anyway.
Arrays = Literal["torch", "numpy"]

# safetensors dtype names to numpy's, for `Arrays` "numpy" (BF16 is widened; the float8 kinds
# have no numpy type and are read through torch).
_NUMPY_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}


def map_safetensors(f: BinaryIO, path: Path, arrays: Arrays = "torch") -> dict[str, Any]:
    """`read_safetensors` of a file already open: the store maps the very file it checked."""
    entries, mapped, data_start = _read_header(f, path)
    if arrays == "numpy":
        return {name: _numpy_array(mapped, data_start, dtype, start, end, shape)
                for name, (dtype, start, end, shape) in entries.items()}
    import torch

    out = {}
    for name, (st_dtype, start, end, shape) in entries.items():
        dtype = getattr(torch, _TORCH_DTYPES[st_dtype])
        if start == end:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=data_start + start)
        out[name] = flat.view(dtype).reshape(shape)
    return out


def _numpy_array(mapped: Any, data_start: int, st_dtype: str, start: int, end: int, shape: list[int]) -> Any:
    import numpy as np

    name = _NUMPY_DTYPES.get(st_dtype)
    if name is None and start == end:  # an empty float8 tensor: nothing to widen
        return np.empty(shape, dtype=np.float32)
    if name is None:  # float8: only torch reads it
        import torch

        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=data_start + start)
        return flat.view(getattr(torch, _TORCH_DTYPES[st_dtype])).reshape(shape).float().numpy()
    if start == end:
        array = np.empty(shape, dtype=name)
    else:
        array = np.frombuffer(mapped, dtype=name, count=(end - start) // np.dtype(name).itemsize,
                              offset=data_start + start).reshape(shape)
    if st_dtype == "BF16":  # the high half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


_Entry = tuple[str, int, int, list[int]]  # safetensors dtype, start, end, shape


def _read_header(f: BinaryIO, path: Path) -> tuple[dict[str, _Entry], Any, int]:
    """A safetensors file's tensors (each entry checked against the file's size), the file
    mapped copy-on-write (None when it holds no data), and where the data starts."""
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
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype = info["dtype"]
            itemsize = _ITEMSIZE[st_dtype]
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            expected = math.prod(shape) * itemsize
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ResultCorrupt(f"{path}: bad header entry for {name!r}") from None
        if start < 0 or end - start != expected or min(shape, default=0) < 0:
            raise ResultCorrupt(f"{path}: bad header entry for {name!r}")
        if start != end and (mapped is None or data_start + end > size):
            raise ResultCorrupt(f"{path}: tensor {name!r} runs past the end of the file")
        entries[name] = (st_dtype, start, end, shape)
    return entries, mapped, data_start

