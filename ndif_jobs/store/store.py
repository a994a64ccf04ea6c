"""The result store: one folder per cache key, tensors in safetensors, the rest in a manifest.

    results/<key[:2]>/<key>/
        tensors.safetensors   every tensor of the result (no pickle on disk, ever)
        manifest.json         the result's structure, scalars and strings, each file's sha256,
                              and a sha256 of everything else in the manifest

A result is written into a temporary folder beside its final place, fsynced, and renamed into
place, so a crash leaves either the whole result or none of it. How the values and the manifest
are written down is `codec.py`; the tensor file itself, `safetensors_io.py`.

Reading memory-maps the tensor file: tensors share the page cache rather than being copied.
Re-hashing a large file on every read would cost more than the read itself, so the manifest
also records the file's stat as written: size, inode, mtime and ctime. A file whose stat still
matches is trusted; any other is re-hashed before use, and `verify` always re-hashes. ctime
cannot be set from user space, so a file rewritten in place with its mtime put back is caught;
the stamp is recorded only once the file-time clock has moved past the file's times, so a
change in the same clock tick is caught too. The stat is taken from the very file descriptor
that is then hashed or mapped. What a stat cannot see (bits flipped by the disk itself) only
`verify` finds.

The values kept in the manifest itself (scalars, strings, the structure, the stamps) are covered
by `manifest_sha256`, checked on every read (a manifest is small). See docs/store.md.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .. import crashpoints
from ..errors import ResultCorrupt, ResultMissing, StoreError
from .backend import StoreBackend, StoreQueue
from .codec import decode_manifest, encode_manifest, flatten, is_sealed, new_manifest, unflatten
from .safetensors_io import Arrays, map_safetensors, write_safetensors

TENSOR_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
#: The queues that keep results in a folder store, a file each (named by id) in this folder.
QUEUES_FOLDER = ".queues"
_HASH_CHUNK = 16 << 20
_KEY = re.compile(r"[0-9a-f]{8,}")


def is_key(name: str) -> bool:
    """Whether a folder name under `results/<prefix>/` can be a result key."""
    return _KEY.fullmatch(name) is not None


def _sha256_fd(fd: int, size: int) -> str:
    """sha256 of an open file's first `size` bytes, read through a mapping (no copy into Python)."""
    digest = hashlib.sha256()
    if size > 0:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                for start in range(0, size, _HASH_CHUNK):
                    digest.update(view[start : start + _HASH_CHUNK])
            finally:
                view.release()
    return digest.hexdigest()


# -- trusting a file by its stat -----------------------------------------------------------------


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


# -- the store -----------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class StoredInfo:
    key: str
    path: Path
    bytes: int
    created_at: float


class ResultStore(StoreBackend):
    """Results in a folder on this machine, keyed by cache key. Safe for several processes at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def location(self, key: str | None = None) -> str:
        return str(self.root if key is None else self.path_for(key))

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
            written = write_safetensors(tmp / TENSOR_FILE, tensors)
            crashpoints.reached("storing")
            stamp = _settled_stamp(written.stat)
            files = {TENSOR_FILE: {"sha256": written.sha256, "bytes": written.bytes, "stat": stamp}}
            body = encode_manifest(new_manifest(key, info or {}, files, structure, tensors))
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
            return written.bytes + len(body)
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
        return decode_manifest(path.read_bytes(), key)

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

    def get(self, key: str, verify: bool = False, arrays: Arrays = "torch") -> StoredResult:
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
            tensors = map_safetensors(f, folder / TENSOR_FILE, arrays)
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
                if not folder.is_dir() or folder.is_symlink() or not is_key(folder.name):
                    continue
                if folder.name[:2] != prefix.name:
                    continue
                try:
                    size = self._size(folder)
                    created = (folder / MANIFEST_FILE).stat().st_mtime
                except OSError:
                    size, created = 0, 0.0
                yield StoredInfo(key=folder.name, path=folder, bytes=size, created_at=created)

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

    def record_queue(self, queue: StoreQueue) -> None:
        path = self.root / QUEUES_FOLDER / queue.id
        if path.exists():
            return
        temp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temp.write_bytes(queue.encode())
            os.link(temp, path)  # never replaces an existing record: the first one stays
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot store results in {self.root}: {exc.strerror or exc}") from None
        finally:
            temp.unlink(missing_ok=True)

    def forget_queue(self, queue_id: str) -> None:
        if not StoreQueue.is_id(queue_id):
            raise StoreError(f"bad queue id {queue_id!r}")
        try:
            (self.root / QUEUES_FOLDER / queue_id).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot forget queue {queue_id} in {self.root}: {exc.strerror or exc}") from None

    def queues(self) -> list[StoreQueue]:
        folder = self.root / QUEUES_FOLDER
        if not folder.is_dir():
            return []
        return [StoreQueue.decode(entry.name, entry.read_bytes())
                for entry in sorted(folder.iterdir()) if StoreQueue.is_id(entry.name)]

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
