"""This machine's copies of results that live in an object store, so that loading still maps.

A result fetched from the object store lands in a `ResultStore` folder under
`NDIF_JOBS_HOME/cache/results`, laid out as the local store is, with one file more:
`verified.json`, the stat stamp of each data file taken once its sha256 matched the manifest.
The manifest's own stamps describe the file on the machine that wrote it and never match a
downloaded copy, so without this every load would re-hash; with it a copy is verified once, on
arrival, and trusted by its stat from then on exactly as a local result is (`store.py`).

The cache is bounded (`NDIF_JOBS_CACHE_MAX`): before a result is added, the least recently used
ones are removed until it fits. Each `get` touches `verified.json` (its mtime is the last use).
Removing a copy a reader has mapped is safe: its mapping outlives the file. Measuring the cache
means a stat of every file in it, which for a thousand results fetched in a row would cost more
than fetching them; so between measurements, at most `RESCAN_S` apart, the size is counted up
from what this process adds (what other processes add meanwhile is seen at the next one).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ResultCorrupt
from .codec import encode_manifest, new_manifest
from .safetensors_io import Arrays, _header, _Staging, _tensor_pieces, _write_all
from .store import (
    MANIFEST_FILE,
    TENSOR_FILE,
    ResultStore,
    StoredResult,
    _fsync_dir,
    _settled_stamp,
    _stamp,
)

#: Downloads one data file of a result to a path; returns the sha256 (hex) and size it wrote.
Fetch = Callable[[str, Path], tuple[str, int]]

VERIFIED_FILE = "verified.json"
#: Seconds the cache's counted size is trusted before it is measured again.
RESCAN_S = 5.0


@dataclass(frozen=True)
class Draft:
    """A result's tensor file written and synced into a temporary folder of the cache: not yet
    hashed (no manifest) nor in place."""

    key: str
    folder: Path
    files: dict[str, Path]
    stamps: dict[str, Any]
    bytes: int
    structure: Any
    tensors: Mapping[str, Any]
    info: Mapping[str, Any]


@dataclass(frozen=True)
class Staged:
    """A result written into a temporary folder of the cache, not yet synced nor in place."""

    key: str
    folder: Path
    manifest_body: bytes
    files: dict[str, Path]
    stamps: dict[str, Any]
    bytes: int


class ResultCache(ResultStore):
    """A bounded, least-recently-used-first folder of results copied from elsewhere."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        super().__init__(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._counted: tuple[int, float] | None = None  # bytes, and when they were last measured

    def _check_open(self, key: str, name: str, entry: Any, f: BinaryIO, full: bool) -> None:
        if not full and isinstance(entry, dict):
            verified = self._verified(key).get(name)
            if verified is not None and verified == _stamp(os.fstat(f.fileno())):
                return
        super()._check_open(key, name, entry, f, full)

    def _verified(self, key: str) -> dict[str, Any]:
        try:
            data = json.loads((self.path_for(key) / VERIFIED_FILE).read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str, verify: bool = False, arrays: Arrays = "torch") -> StoredResult:
        stored = super().get(key, verify=verify, arrays=arrays)
        try:
            os.utime(stored.path / VERIFIED_FILE)
        except OSError:
            pass
        return stored

    def arrive(self, key: str, manifest_body: bytes, manifest: Mapping[str, Any], fetch: Fetch,
               sync: bool) -> Path:
        """Download a result into a temporary folder of the cache: `fetch(name, path)` downloads
        each data file and returns the sha256 and size of the bytes it wrote, each checked against
        `manifest`; `place` then moves the folder in, so a result appears whole or not at all and
        a failure leaves nothing behind.
        With `sync` its files are on disk when this returns; without, a `sync_all` must follow
        before it is placed (many arrivals then cost one filesystem sync, not three each)."""
        files = manifest["files"]
        self.make_room(sum(int(e.get("bytes", 0)) for e in files.values() if isinstance(e, dict))
                       + len(manifest_body))
        tmp = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.mkdir(mode=0o700)
            stamps: dict[str, Any] = {}
            for name, entry in files.items():
                if not isinstance(entry, dict):
                    raise ResultCorrupt(f"result {key[:12]}: manifest.json has a bad entry for {name}")
                path = tmp / self.data_name(key, name)
                sha256, size = fetch(name, path)
                if (sha256, size) != (entry.get("sha256"), entry.get("bytes")):
                    raise ResultCorrupt(f"result {key[:12]}: {name} does not match its checksum")
                fd = os.open(path, os.O_RDONLY)
                try:
                    if sync:
                        os.fsync(fd)
                    stamps[name] = _settled_stamp(os.fstat(fd))
                finally:
                    os.close(fd)
            (tmp / MANIFEST_FILE).write_bytes(manifest_body)
            (tmp / VERIFIED_FILE).write_text(json.dumps(stamps))
            if sync:
                _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def place(self, key: str, arrived: Path, sync: bool) -> None:
        """Move a result `arrive` left in a temporary folder into place (with `sync`, durably).
        A copy another process placed meanwhile is kept and this one dropped."""
        final = self.path_for(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.rename(arrived, final)
            except OSError:
                if not (final / MANIFEST_FILE).exists():
                    raise
                shutil.rmtree(arrived, ignore_errors=True)
            if sync:
                _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(arrived, ignore_errors=True)
            raise

    def sync_all(self) -> None:
        """Flush everything written under the cache to disk in one call (`syncfs` where the
        system has it, else per-file through `sync`)."""
        _sync_filesystem(self.root)

    def stage(self, key: str, structure: Any, tensors: Mapping[str, Any], info: Mapping[str, Any] | None = None,
              ) -> Draft:
        """Write a result's tensor file (from `flatten`'s structure and tensors) into a temporary
        folder here, synced but not yet hashed nor in place: `put` writes it beside the upload,
        which hashes the same bytes as it sends them, then `seal` and `settle` finish it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(mode=0o700)
        try:
            path = folder / TENSOR_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                size = _write_plain(fd, tensors)
                os.fsync(fd)
                stamp = _settled_stamp(os.fstat(fd))
            finally:
                os.close(fd)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Draft(key, folder, {TENSOR_FILE: path}, {TENSOR_FILE: stamp}, size, structure, tensors, info or {})

    def seal(self, draft: Draft, sha256: str) -> Staged:
        """A staged tensor file with its sha256 (taken from the same bytes as they were uploaded)
        and the body of its manifest (not yet written)."""
        files = {TENSOR_FILE: {"sha256": sha256, "bytes": draft.bytes, "stat": draft.stamps[TENSOR_FILE]}}
        body = encode_manifest(new_manifest(draft.key, draft.info, files, draft.structure, draft.tensors))
        return Staged(draft.key, draft.folder, body, draft.files, draft.stamps, draft.bytes + len(body))

    def settle(self, staged: Staged) -> None:
        """Put a synced staged result in place, verified (this machine wrote it). A copy already
        there (another process's) is kept and the staged one dropped."""
        try:
            with open(staged.folder / MANIFEST_FILE, "wb") as f:
                f.write(staged.manifest_body)
                os.fsync(f.fileno())
            (staged.folder / VERIFIED_FILE).write_text(json.dumps(staged.stamps))
            _fsync_dir(staged.folder)
            final = self.path_for(staged.key)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.rename(staged.folder, final)
            except OSError:
                if not (final / MANIFEST_FILE).exists():
                    raise
                self.drop(staged)
                return
            _fsync_dir(final.parent)
        except BaseException:
            self.drop(staged)
            raise
        self._count(staged.bytes)

    def drop(self, staged: Draft | Staged) -> None:
        shutil.rmtree(staged.folder, ignore_errors=True)

    def data_name(self, key: str, name: str) -> str:
        """A data file's name as the manifest gives it, refused unless it is a plain file name."""
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST_FILE, VERIFIED_FILE) or "/" in name:
            raise ResultCorrupt(f"result {key[:12]}: manifest.json names a bad file {name!r}")
        return name

    def mark_verified(self, key: str, stamps: Mapping[str, Any]) -> None:
        """Record stamps of files known good (a copy this machine wrote itself: the manifest's)."""
        try:
            (self.path_for(key) / VERIFIED_FILE).write_text(json.dumps(dict(stamps)))
        except OSError:
            pass  # only costs a re-hash on the next load

    def used_bytes(self) -> int:
        return sum(info.bytes for info in self.iter_stored())

    def put(self, key: str, result: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> int:
        size = super().put(key, result, info)
        self._count(size)
        return size

    def _count(self, added: int) -> bool:
        """Add to the counted size; whether that count is recent and still within the bound."""
        with self._lock:
            if self._counted is None:
                return False
            used, measured_at = self._counted
            self._counted = (used + added, measured_at)
            return used + added <= self.max_bytes and time.monotonic() - measured_at < RESCAN_S

    def make_room(self, incoming: int) -> int:
        """Remove the least recently used copies until `incoming` more bytes fit; returns how many."""
        if self._count(incoming):
            return 0
        entries = []
        for info in self.iter_stored():
            try:
                used = (info.path / VERIFIED_FILE).stat().st_mtime
            except OSError:
                used = info.created_at
            entries.append((used, info))
        total = sum(info.bytes for _, info in entries)
        removed = 0
        for _, info in sorted(entries, key=lambda e: e[0]):
            if total + incoming <= self.max_bytes:
                break
            try:
                total -= self.remove(info.key)
                removed += 1
            except OSError:
                continue
        with self._lock:
            self._counted = (total + incoming, time.monotonic())
        return removed


def _write_plain(fd: int, tensors: Mapping[str, Any]) -> int:
    """The safetensors file `write_safetensors` writes, not hashed (the upload hashes the same
    bytes as it sends them) nor synced; returns its size."""
    head, order = _header(tensors, {})
    staging = _Staging()
    _write_all(fd, memoryview(head))
    for name, _nbytes in order:
        for view, buffer in _tensor_pieces(tensors[name], staging):
            _write_all(fd, view)
            if buffer is not None:
                staging.give(buffer)
    return len(head) + sum(nbytes for _, nbytes in order)


def _sync_filesystem(path: Path) -> None:
    """syncfs(2) on the filesystem holding `path`: one flush for many files just written."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
