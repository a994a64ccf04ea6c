"""Results on an S3-compatible object store, shared by every machine of a lab's queue.

    <prefix>/results/<key[:2]>/<key>/manifest.json              the commit: a result exists once this does
    <prefix>/results/<key[:2]>/<key>/<write>/tensors.safetensors   the data files of one write
    <prefix>/trash/<key>-<random>/manifest.json                  a manifest `gc` took out
    <prefix>/queues/<queue id>.json                               a queue that keeps results here

The manifest is byte for byte the one the local store writes (`codec.py`), so the same checks
apply. An object store has no rename, so the commit is the manifest alone: the data files go up
first, under a folder named for this write (`<write>`, in the manifest object's metadata), and
the manifest last with `If-None-Match: *`. A reader sees the manifest and every file it names,
or no manifest; two writers of one key never overwrite each other's files, and the second
finds the first's manifest and keeps it (first writer wins, as locally).

Reading goes through this machine's cache (`cache.py`): a result is downloaded once, checked
against the manifest, renamed into the cache and memory-mapped from there. Offline
(`NDIF_JOBS_OFFLINE=1`) only the cache is read, and a result not in it names `ndif-jobs pull`.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NdifJobsError, OfflineMiss, ResultCorrupt, ResultMissing, StoreError
from .backend import StoreBackend, StoreQueue
from .cache import Draft, ResultCache
from .codec import decode_manifest, flatten
from .s3 import CommitRaced, S3Bucket
from .safetensors_io import Arrays, SafetensorsStream
from .store import MANIFEST_FILE, TENSOR_FILE, StoredInfo, StoredResult, is_key

WRITE_META = "ndif-jobs-write"
#: The queues that keep results in the bucket, an object each (named by id) under this prefix.
QUEUES_PREFIX = "queues/"
#: Manifests read at once by `manifests` (small requests: latency, not bandwidth, bounds them).
PARALLEL_READS = 16


@dataclass(frozen=True)
class TakenOut:
    """A result `take_out` removed from view: its manifest kept under trash/ until `purge`."""

    key: str
    trash: str
    write: str
    manifest_body: bytes


class ObjectResultStore(StoreBackend):
    """Results in a bucket, read through a local cache. Safe for several machines at once."""

    shared = True

    def __init__(self, url: str, cache: ResultCache, offline: bool = False) -> None:
        self.bucket = S3Bucket(url)
        self.cache = cache
        self.offline = offline

    # -- names ------------------------------------------------------------------------------

    def _folder(self, key: str) -> str:
        if not is_key(key):
            raise StoreError(f"bad result key {key!r}")
        return f"results/{key[:2]}/{key}/"

    def _manifest_name(self, key: str) -> str:
        return self._folder(key) + MANIFEST_FILE

    def location(self, key: str | None = None) -> str:
        if key is None:
            return self.bucket.url
        where = self.bucket.url + "/" + self._folder(key).rstrip("/")
        return f"{where} (cached here)" if self.cache.exists(key) else where

    # -- reading ----------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Online: whether the bucket holds the result. Offline the bucket cannot be asked, so a
        result is taken to exist; `get` then serves it from the cache or names `pull`."""
        if self.offline:
            return True
        return self.bucket.head(self._manifest_name(key)) is not None

    def _remote_manifest(self, key: str) -> tuple[bytes, dict[str, Any], str]:
        try:
            body, metadata = self.bucket.get_bytes(self._manifest_name(key))
        except ResultMissing:
            raise ResultMissing(f"no stored result for key {key[:12]} in {self.bucket.url} "
                                "(removed by gc, or never stored)") from None
        manifest = decode_manifest(body, key)
        write = metadata.get(WRITE_META, "")
        if not write or "/" in write:
            raise ResultCorrupt(f"result {key[:12]} in {self.bucket.url}: manifest.json names no write folder")
        return body, manifest, write

    def manifest(self, key: str) -> dict[str, Any]:
        if self.cache.exists(key):
            return self.cache.manifest(key)
        if self.offline:
            raise self._offline_miss(key)
        return self._remote_manifest(key)[1]

    def manifests(self, keys: Iterable[str]) -> dict[str, dict[str, Any] | NdifJobsError]:
        """Many manifests, `PARALLEL_READS` requests at a time (those cached read from the cache)."""
        from concurrent.futures import ThreadPoolExecutor

        unique = list(dict.fromkeys(keys))
        with ThreadPoolExecutor(PARALLEL_READS) as pool:
            found = list(pool.map(lambda key: super(ObjectResultStore, self).manifests([key])[key], unique))
        return dict(zip(unique, found, strict=True))

    def prefetch(self, keys: Iterable[str]) -> dict[str, NdifJobsError]:
        """Fetch the results not cached here, `PARALLEL_READS` at a time (a cold `collect` would
        otherwise wait for each in turn); returns the error of each key that could not be."""
        from concurrent.futures import ThreadPoolExecutor

        if self.offline:
            return {}

        def arrive(key: str) -> Path | NdifJobsError:
            try:
                return self._arrive(key, sync=False)[0]
            except NdifJobsError as exc:
                return exc

        unique = [key for key in dict.fromkeys(keys) if not self.cache.exists(key)]
        with ThreadPoolExecutor(PARALLEL_READS) as pool:
            found = dict(zip(unique, pool.map(arrive, unique), strict=True))
        arrived = [(key, path) for key, path in found.items() if isinstance(path, Path)]
        try:
            # Every copy is on disk before any is in place, and in place before this returns.
            self.cache.sync_all()
            while arrived:
                key, path = arrived.pop()
                self.cache.place(key, path, sync=False)
            self.cache.sync_all()
        finally:
            for _key, path in arrived:
                shutil.rmtree(path, ignore_errors=True)
        return {key: exc for key, exc in found.items() if isinstance(exc, NdifJobsError)}

    def get(self, key: str, verify: bool = False, arrays: Arrays = "torch") -> StoredResult:
        """From the cache; fetched into it first if it is not there (online)."""
        if not self.cache.exists(key):
            if self.offline:
                raise self._offline_miss(key)
            self.fetch(key)
        return self.cache.get(key, verify=verify, arrays=arrays)

    def fetch(self, key: str) -> int:
        """Download a result into the cache and check it (nothing is left there if that fails);
        returns its bytes. A result already cached is not fetched again."""
        if self.cache.exists(key):
            return 0
        arrived, size = self._arrive(key, sync=True)
        self.cache.place(key, arrived, sync=True)
        return size

    def _arrive(self, key: str, sync: bool) -> tuple[Path, int]:
        """Download a result and check it into a temporary folder of the cache
        (`ResultCache.arrive`); returns the folder and the bytes fetched."""
        body, manifest, write = self._remote_manifest(key)
        folder = self._folder(key) + write + "/"

        def fetch_file(name: str, path: Path) -> tuple[str, int]:
            size = manifest["files"][name].get("bytes") if isinstance(manifest["files"][name], dict) else None
            try:
                got = self.bucket.download(folder + name, path, size if isinstance(size, int) else None)
                return got.sha256, got.bytes
            except ResultMissing:
                raise ResultCorrupt(f"result {key[:12]} in {self.bucket.url}: {name} is missing") from None

        try:
            arrived = self.cache.arrive(key, body, manifest, fetch_file, sync=sync)
        except ResultCorrupt as exc:
            raise ResultCorrupt(f"{exc} (downloaded from {self.bucket.url}; `ndif-jobs verify` names its jobs)") \
                from None
        return arrived, sum(int(e.get("bytes", 0)) for e in manifest["files"].values()) + len(body)

    def check(self, key: str, full: bool = True) -> dict[str, Any]:
        """The bucket's copy, checked: with `full`, every data file streamed and re-hashed (this
        is what `verify` runs); without, only that each is there with its size."""
        _body, manifest, write = self._remote_manifest(key)
        for name, entry in manifest["files"].items():
            if not isinstance(entry, dict):
                raise ResultCorrupt(f"result {key[:12]}: manifest.json has a bad entry for {name}")
            object_name = self._folder(key) + write + "/" + self.cache.data_name(key, name)
            self._check_object(key, object_name, name, entry, full)
        return manifest

    def _check_object(self, key: str, object_name: str, name: str, entry: dict[str, Any], full: bool) -> None:
        import hashlib

        bad = ResultCorrupt(f"result {key[:12]} in {self.bucket.url}: {name} does not match its checksum")
        if not full:
            head = self.bucket.head(object_name)
            if head is None:
                raise ResultCorrupt(f"result {key[:12]} in {self.bucket.url}: {name} is missing")
            if head["bytes"] != entry.get("bytes"):
                raise bad
            return
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in self.bucket.iter_chunks(object_name):
                digest.update(chunk)
                size += len(chunk)
        except ResultMissing:
            raise ResultCorrupt(f"result {key[:12]} in {self.bucket.url}: {name} is missing") from None
        if size != entry.get("bytes") or digest.hexdigest() != entry.get("sha256"):
            raise bad

    def iter_stored(self) -> Iterator[StoredInfo]:
        """Every committed result in the bucket (one listing; sizes cover every write of a key)."""
        by_key: dict[str, list[Any]] = {}
        for obj in self.bucket.iter_objects("results/"):
            parts = obj.name.split("/")
            if len(parts) >= 4 and is_key(parts[2]) and parts[2][:2] == parts[1]:
                by_key.setdefault(parts[2], []).append(obj)
        for key in sorted(by_key):
            objects = by_key[key]
            manifests = [o for o in objects if o.name == self._manifest_name(key)]
            if manifests:
                yield StoredInfo(key=key, path=self.cache.path_for(key), bytes=sum(o.bytes for o in objects),
                                 created_at=manifests[0].modified)

    # -- writing ----------------------------------------------------------------------------

    def put(self, key: str, result: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> int:
        """Upload the data files, then commit the manifest; a failure removes what this write
        uploaded and leaves this machine's cache as it was.

        The tensor file goes up straight from the tensors' memory (hashed as it is sent) while a
        second thread writes and fsyncs the same bytes into a temporary folder of the cache, so
        neither waits for the other; once the manifest is committed the same folder is renamed
        into the cache. A result already cached here (an earlier put whose upload failed) is
        checked and uploaded from the cache.
        """
        existing = self.bucket.head(self._manifest_name(key))
        if existing is not None:
            return self._stored_bytes(key)
        if self.cache.exists(key):
            return self._put_cached(key, result, info)
        structure, tensors = flatten(result)
        stream = SafetensorsStream(tensors)
        write = uuid.uuid4().hex
        object_name = self._folder(key) + write + "/" + TENSOR_FILE
        uploaded = [object_name]
        draft: Draft | None = None
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="ndif-jobs-put") as pool:
                drafted = pool.submit(self.cache.stage, key, structure, tensors, info)
                try:
                    self.bucket.upload_stream(stream, object_name)
                finally:
                    error = drafted.exception()  # waits for the local copy, whatever happened here
                    draft = drafted.result() if error is None else None
                if draft is None:
                    raise error or StoreError(f"result {key[:12]}: the local copy was not written")
            staged = self.cache.seal(draft, stream.hexdigest())
            self.bucket.put_bytes(self._manifest_name(key), staged.manifest_body, {WRITE_META: write},
                                  if_absent=True)
        except CommitRaced:
            self._discard(uploaded)
            if draft is not None:
                self.cache.drop(draft)
            return self._stored_bytes(key)
        except BaseException:
            self._discard(uploaded)
            if draft is not None:
                self.cache.drop(draft)
            raise
        try:
            self.cache.settle(staged)
        except OSError:
            pass  # stored in the bucket; this machine fetches it when it is read
        self.cache.make_room(0)
        return staged.bytes

    def _put_cached(self, key: str, result: Mapping[str, Any], info: Mapping[str, Any] | None) -> int:
        size = self.cache.put(key, result, info)  # checks the copy there (replacing a damaged one)
        folder = self.cache.path_for(key)
        body = (folder / MANIFEST_FILE).read_bytes()
        manifest = decode_manifest(body, key)
        write = uuid.uuid4().hex
        uploaded: list[str] = []
        try:
            for name in manifest["files"]:
                object_name = self._folder(key) + write + "/" + name
                uploaded.append(object_name)
                self.bucket.upload(folder / name, object_name)
            self.bucket.put_bytes(self._manifest_name(key), body, {WRITE_META: write}, if_absent=True)
        except CommitRaced:
            self._discard(uploaded)
            self.cache.remove(key)  # ours lost: the cache must hold what the bucket holds
            return self._stored_bytes(key)
        except BaseException:
            self._discard(uploaded)
            raise
        self.cache.mark_verified(key, {name: entry.get("stat") for name, entry in manifest["files"].items()})
        return size

    def _stored_bytes(self, key: str) -> int:
        _body, manifest, _write = self._remote_manifest(key)
        return sum(int(e.get("bytes", 0)) for e in manifest["files"].values()) + len(_body)

    def _discard(self, names: list[str]) -> None:
        """Best effort: what is left (the store went down) is an orphan `clean_temp` removes."""
        try:
            self.bucket.delete(names)
        except StoreError:
            pass

    # -- removing ---------------------------------------------------------------------------

    def take_out(self, key: str) -> TakenOut | None:
        """Copy the manifest to trash/, then delete it: from then on no reader sees the result."""
        try:
            body, _manifest, write = self._remote_manifest(key)
        except ResultMissing:
            return None
        except ResultCorrupt:
            body, write = b"", ""
        trash = f"trash/{key}-{uuid.uuid4().hex[:8]}/{MANIFEST_FILE}"
        self.bucket.put_bytes(trash, body, {WRITE_META: write})
        self.bucket.delete([self._manifest_name(key)])
        return TakenOut(key, trash, write, body)

    def put_back(self, handle: TakenOut, key: str) -> bool:
        try:
            self.bucket.put_bytes(self._manifest_name(key), handle.manifest_body, {WRITE_META: handle.write},
                                  if_absent=True)
        except CommitRaced:
            return False
        self.bucket.delete([handle.trash])
        return True

    def purge(self, handle: TakenOut) -> int:
        """Delete the taken-out write's files, its trashed manifest, and this machine's copy."""
        names, freed = [handle.trash], len(handle.manifest_body)
        if handle.write:
            for obj in self.bucket.iter_objects(self._folder(handle.key) + handle.write + "/"):
                names.append(obj.name)
                freed += obj.bytes
        self.bucket.delete(names)
        try:
            self.cache.remove(handle.key)
        except OSError:
            pass
        return freed

    def record_queue(self, queue: StoreQueue) -> None:
        """Offline the bucket cannot be written: the record waits for a worker that stores there."""
        if self.offline:
            return
        name = f"{QUEUES_PREFIX}{queue.id}.json"
        if self.bucket.head(name) is not None:
            return
        try:
            self.bucket.put_bytes(name, queue.encode(), if_absent=True)
        except CommitRaced:
            pass  # recorded meanwhile by another process of the same queue

    def forget_queue(self, queue_id: str) -> None:
        if not StoreQueue.is_id(queue_id):
            raise StoreError(f"bad queue id {queue_id!r}")
        self.bucket.delete([f"{QUEUES_PREFIX}{queue_id}.json"])

    def queues(self) -> list[StoreQueue]:
        found = []
        for obj in self.bucket.iter_objects(QUEUES_PREFIX):
            queue_id = obj.name.removeprefix(QUEUES_PREFIX).removesuffix(".json")
            if StoreQueue.is_id(queue_id):
                found.append(StoreQueue.decode(queue_id, self.bucket.get_bytes(obj.name)[0]))
        return found

    def clean_temp(self, older_than_s: float = 3600) -> int:
        """Remove write folders no manifest names (a writer killed, or cut off, mid-upload) and
        trashed manifests, once older than `older_than_s`; and the cache's own leftovers."""
        cutoff = time.time() - older_than_s
        by_write: dict[tuple[str, str], list[Any]] = {}
        doomed: list[str] = []
        for obj in self.bucket.iter_objects(""):
            parts = obj.name.split("/")
            if parts[0] == "trash" and obj.modified < cutoff:
                doomed.append(obj.name)
            elif parts[0] == "results" and len(parts) == 5 and is_key(parts[2]):
                by_write.setdefault((parts[2], parts[3]), []).append(obj)
        current: dict[str, str] = {}
        for key, write in sorted(by_write):
            objects = by_write[(key, write)]
            if max(o.modified for o in objects) >= cutoff:
                continue
            if key not in current:
                try:
                    current[key] = self._remote_manifest(key)[2]
                except (ResultMissing, ResultCorrupt):
                    current[key] = ""
            if write != current[key]:
                doomed.extend(o.name for o in objects)
        if doomed:
            self.bucket.delete(doomed)
        return len(doomed) + self.cache.clean_temp(older_than_s)

    # -- offline ----------------------------------------------------------------------------

    def _offline_miss(self, key: str) -> OfflineMiss:
        return OfflineMiss(f"offline and result {key[:12]} is not in this machine's cache: fetch it while online "
                           "with `ndif-jobs pull JOB` (or `pull --tag T` / `pull --sweep S`)")

