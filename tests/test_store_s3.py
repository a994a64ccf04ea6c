"""Results on an S3-compatible object store, shared by two machines.

A real S3 server (moto's server mode) listens on loopback; two data folders stand for two
machines. A worker on "machine A" completes jobs with the local backend and the embedded model;
"machine B" loads, collects, plots and pulls them, then replays them offline with the server
stopped. The faults are real too: the server stopped in the middle of a put or a get, an object
changed in the bucket, credentials the server does not know.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from .conftest import MODELS_CACHE, run_cli

ACT = {"prompt": "The capital of France is", "layers": [0, 15]}
SECRET = "wrong-secret-5f3a9c1e77"


class S3Server:
    """moto's S3 server as a process of its own on a loopback port: `stop` kills it (every open
    connection drops, as when the store goes down), `start` brings it back, empty, with the
    buckets made so far (their objects are gone)."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None
        self.buckets: list[str] = []
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.process is not None:
            return
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        for bucket in self.buckets:
            self.create_bucket(bucket, remember=False)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def create_bucket(self, name: str, remember: bool = True) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="admin",
                     aws_secret_access_key="admin").create_bucket(Bucket=name)
        if remember:
            self.buckets.append(name)

    def check_credentials(self, on: bool) -> None:
        """From now on the server refuses keys it does not know (moto's IAM has none)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh bucket, and the standard AWS environment pointing at it (no ~/.aws is read)."""
    s3_server.start()
    aws = {
        "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "lab-key", "AWS_SECRET_ACCESS_KEY": "lab-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"), "AWS_MAX_ATTEMPTS": "2",
    }
    for name, value in aws.items():
        monkeypatch.setenv(name, value)
    bucket = "lab-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    s3_server.create_bucket(bucket)
    url = f"s3://{bucket}/ndif"
    monkeypatch.setenv("NDIF_JOBS_STORE_URL", url)
    yield {"url": url, "bucket": bucket, "server": s3_server, "env": aws}
    s3_server.start()


@pytest.fixture(autouse=True)
def store_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Service.store` built by `open_store`, as service.py builds it once the store URL is wired."""
    from ndif_jobs.service import Service
    from ndif_jobs.store.config import open_store

    prop = cached_property(lambda self: open_store(self.settings))
    prop.__set_name__(Service, "store")
    monkeypatch.setattr(Service, "store", prop)


def machine(root: Path, database_url: str | None = None, **extra: Any):  # type: ignore[no-untyped-def]
    """One machine's service: its own data folder, the shared queue if given."""
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings

    settings = Settings(home=root, database_url=database_url, models_cache=MODELS_CACHE, poll_s=0.2,
                        retry_backoff_s=0, **extra)
    return Service(settings)


def complete(service: Any, *params: dict[str, Any], tags: tuple[str, ...] = (), untagged: int = 0) -> list[str]:
    """Submit activations jobs (the last `untagged` of them without the tags) and run a worker
    here until they are done; their ids."""
    from ndif_jobs.service import Submission
    from ndif_jobs.worker import Worker

    n = len(params) - untagged
    ids = [service.submit(Submission("activations", p, tags=tags if i < n else ())).id for i, p in enumerate(params)]
    Worker(service).run(until_empty=True)
    return ids


def cache_entries(service: Any) -> list[str]:
    root = service.settings.home / "cache" / "results"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def objects(s3: dict[str, Any]) -> list[str]:
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=s3["bucket"]).get("Contents", [])
    return sorted(o["Key"] for o in listed)


@pytest.fixture
def dispose() -> Iterator[None]:
    from ndif_jobs.db.engine import dispose_engines

    yield
    dispose_engines()


# -- two machines, one queue, one bucket -----------------------------------------------------------


def test_machine_b_loads_collects_plots_pulls_and_replays_offline_what_machine_a_ran(
    s3, env, tmp_path, postgres_url, dispose  # type: ignore[no-untyped-def]
) -> None:
    import ndif_jobs
    from ndif_jobs.errors import OfflineMiss
    from ndif_jobs.store.config import where

    a = machine(tmp_path / "a", postgres_url)
    first, second, third = complete(a, ACT, {**ACT, "layers": [1]}, {**ACT, "layers": [2]}, tags=("lab",), untagged=1)
    assert {a.job(j).state for j in (first, second, third)} == {"completed"}
    assert not (tmp_path / "a" / "results").exists() or not any((tmp_path / "a" / "results").rglob("*.safetensors"))

    b = machine(tmp_path / "b", postgres_url)
    key = a.job(first).result_key
    assert where(b.store, key) == f"{s3['url']}/results/{key[:2]}/{key}"
    on_a, on_b = a.load_result(first), b.load_result(first)
    assert on_b["top_tokens"] == on_a["top_tokens"]
    assert set(on_b.tensors) == set(on_a.tensors)
    for name in on_a.tensors:
        assert on_b.tensors[name].equal(on_a.tensors[name])
    assert where(b.store, key).endswith("(cached here)")
    assert on_b.path.is_relative_to(tmp_path / "b" / "cache")

    from ndif_jobs.collection import collect
    from ndif_jobs.errors import ResultMissing

    read = b.store.manifests([a.job(second).result_key, a.job(third).result_key, "ee" * 16])
    assert [m["key"] for m in list(read.values())[:2]] == [a.job(second).result_key, a.job(third).result_key]
    assert isinstance(read["ee" * 16], ResultMissing)
    table = collect(tag="lab", settings=b.settings)
    assert len(table) == 2 and sorted(table.job_ids) == sorted([first, second])

    from ndif_jobs.plots import plot_results

    assert plot_results([on_b], tmp_path / "b.png").stat().st_size > 0

    b_env = {**env, **s3["env"], "NDIF_JOBS_HOME": str(tmp_path / "b"), "NDIF_JOBS_DATABASE_URL": postgres_url,
             "NDIF_JOBS_STORE_URL": s3["url"]}
    pulled = run_cli("pull", "--tag", "lab", env=b_env)
    assert pulled.returncode == 0, pulled.stderr
    assert "2 of 2 results in this machine's cache" in pulled.stderr

    s3["server"].stop()
    offline = machine(tmp_path / "b", postgres_url, offline=True)
    replayed = ndif_jobs.run("activations", settings=offline.settings, **{**ACT, "layers": [1]})
    assert replayed.job["id"] == second and replayed["top_tokens"] == a.load_result(second)["top_tokens"]
    with pytest.raises(OfflineMiss, match="ndif-jobs pull"):
        ndif_jobs.run("activations", settings=offline.settings, **{**ACT, "layers": [2]})


# -- faults ------------------------------------------------------------------------------------------


def test_store_down_during_a_put_retries_the_job_and_shows_nothing_half_written(
    s3, env, tmp_path, dispose  # type: ignore[no-untyped-def]
) -> None:
    from ndif_jobs.errors import ResultMissing, StoreError

    db = f"sqlite:///{tmp_path / 'queue.db'}"
    a, b = machine(tmp_path / "a", db), machine(tmp_path / "b", db)
    bucket = a.store.bucket
    commit = bucket.put_bytes
    seen: dict[str, Any] = {}

    def server_gone_before_the_first_commit(name: str, *args: Any, **kwargs: Any) -> None:
        if seen or not name.endswith("manifest.json"):
            return commit(name, *args, **kwargs)
        key = name.split("/")[-2]
        s3["server"].stop()
        try:
            commit(name, *args, **kwargs)
        except StoreError as exc:
            seen["error"] = str(exc)
            raise
        finally:
            s3["server"].start()
            seen["exists"] = b.store.exists(key)
            seen["manifests"] = [n for n in objects(s3) if n.endswith("manifest.json")]
            try:
                b.store.get(key)
            except ResultMissing:
                seen["get"] = "missing"

    bucket.put_bytes = server_gone_before_the_first_commit
    (job,) = complete(a, ACT)
    assert "cannot be reached" in seen["error"] and "\n" not in seen["error"]
    assert seen["exists"] is False and seen["manifests"] == [] and seen["get"] == "missing"
    assert cache_entries(b) == []
    row = a.job(job)
    assert row.state == "completed" and row.attempts == 2, (row.state, row.attempts, row.error)
    assert b.load_result(job)["top_tokens"] == a.load_result(job)["top_tokens"]
    assert len([n for n in objects(s3) if n.endswith(".safetensors")]) == 1  # the failed write left nothing


def test_store_down_during_a_get_is_one_clear_error_and_the_cache_stays_as_it_was(
    s3, env, tmp_path, dispose  # type: ignore[no-untyped-def]
) -> None:
    from ndif_jobs.errors import StoreError

    db = f"sqlite:///{tmp_path / 'queue.db'}"
    a, b = machine(tmp_path / "a", db), machine(tmp_path / "b", db)
    (job,) = complete(a, ACT)
    before = cache_entries(b)
    download = b.store.bucket.download

    def server_gone_mid_get(name: str, path: Path, *args: Any) -> None:
        s3["server"].stop()
        download(name, path, *args)

    b.store.bucket.download = server_gone_mid_get
    with pytest.raises(StoreError) as caught:
        b.load_result(job)
    message = str(caught.value)
    assert "cannot be reached" in message and s3["url"] in message and "\n" not in message
    assert cache_entries(b) == before


def test_a_corrupted_object_is_refused_and_named_by_verify(s3, env, tmp_path, dispose) -> None:  # type: ignore[no-untyped-def]
    import boto3

    from ndif_jobs.errors import ResultCorrupt
    from ndif_jobs.store.housekeeping import verify

    db = f"sqlite:///{tmp_path / 'queue.db'}"
    a, b = machine(tmp_path / "a", db), machine(tmp_path / "b", db)
    (job,) = complete(a, ACT)
    (tensor_object,) = [name for name in objects(s3) if name.endswith(".safetensors")]
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket=s3["bucket"], Key=tensor_object)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=s3["bucket"], Key=tensor_object, Body=bytes(data))

    with pytest.raises(ResultCorrupt, match="does not match its checksum"):
        b.load_result(job)
    assert cache_entries(b) == []
    report = verify(b)
    assert [(p["key"], p["jobs"], p["problem"]) for p in report.problems] == [(a.job(job).key, [job], "corrupt")]


def test_wrong_credentials_are_one_line_that_never_echoes_the_secret(
    s3, env, tmp_path, monkeypatch, capfd, request, dispose  # type: ignore[no-untyped-def]
) -> None:
    from ndif_jobs.errors import StoreError

    s3["server"].check_credentials(True)
    request.addfinalizer(lambda: s3["server"].check_credentials(False))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY00000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    b = machine(tmp_path / "b", f"sqlite:///{tmp_path / 'queue.db'}")
    with pytest.raises(StoreError) as caught:
        b.store.exists("ab" * 16)
    message = str(caught.value)
    assert "refused the credentials" in message and "AWS_PROFILE" in message and "\n" not in message
    assert SECRET not in message and "AKIAWRONGKEY" not in message
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err


# -- the worker's refusal, gc, the cache ---------------------------------------------------------------


def test_a_worker_on_a_shared_queue_with_a_local_store_is_refused_unless_told_it_is_intended(
    env, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    from ndif_jobs.errors import BadInput
    from ndif_jobs.settings import Settings
    from ndif_jobs.store.config import require_shared

    shared = Settings(home=tmp_path, database_url="postgresql+psycopg://lab@db.example/queue")
    with pytest.raises(BadInput, match="NDIF_JOBS_STORE_URL=s3://.*NDIF_JOBS_STORE_LOCAL_OK=1") as caught:
        require_shared(shared)
    assert "db.example" not in str(caught.value)
    require_shared(Settings(home=tmp_path))  # a SQLite queue on this machine: nothing to share
    monkeypatch.setenv("NDIF_JOBS_STORE_URL", "s3://lab/ndif")
    require_shared(shared)
    monkeypatch.delenv("NDIF_JOBS_STORE_URL")
    monkeypatch.setenv("NDIF_JOBS_STORE_LOCAL_OK", "1")
    require_shared(shared)


def test_gc_on_the_object_store_removes_unreachable_results_and_keeps_what_a_queued_job_needs(
    s3, env, tmp_path, dispose  # type: ignore[no-untyped-def]
) -> None:
    import torch

    from ndif_jobs.store.housekeeping import plan_gc, run_gc

    a = machine(tmp_path / "a", f"sqlite:///{tmp_path / 'queue.db'}")
    (job,) = complete(a, ACT)
    kept = a.job(job).key
    orphan = "cd" * 16
    a.store.put(orphan, {"x": torch.ones(4)})
    assert {i.key for i in a.store.iter_stored()} == {kept, orphan}
    plan = plan_gc(a, None, None)
    assert [item.key for item in plan.remove] == [orphan]
    outcome = run_gc(a, plan)
    assert outcome.removed == 1 and outcome.freed > 0
    assert not a.store.exists(orphan) and a.store.exists(kept)
    assert not any(orphan in name for name in objects(s3))

    everything = run_gc(a, plan_gc(a, None, 0))  # size 0: all but what jobs in flight need
    assert everything.removed == 1 and not a.store.exists(kept)
    assert a.job(job).result_key is None


def test_gc_refuses_a_bucket_that_another_machines_queue_keeps_results_in(s3, env, tmp_path, dispose) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.errors import BadInput
    from ndif_jobs.service import Submission
    from ndif_jobs.store.backend import StoreQueue
    from ndif_jobs.store.housekeeping import forget_queue, require_own_store

    a = machine(tmp_path / "a")  # each machine its own SQLite queue, one bucket
    b = machine(tmp_path / "b")
    complete(a, ACT)
    require_own_store(a)  # a alone keeps results there
    b.submit(Submission("activations", {**ACT, "layers": [1]}))

    assert sorted(n for n in objects(s3) if n.startswith("ndif/queues/")) == sorted(
        f"ndif/queues/{svc.queue.identity()}.json" for svc in (a, b))
    with pytest.raises(BadInput, match=rf"{s3['url']} also keeps the results of 1 other queue \(sqlite:///.*/b/"):
        require_own_store(a)
    first = {q.id: q for q in a.store.queues()}[a.queue.identity()]
    a.store.record_queue(StoreQueue.new(a.queue.identity(), "a relabelled"))  # the first record stays
    assert {q.id: q for q in a.store.queues()}[a.queue.identity()] == first

    forget_queue(a, b.queue.identity()[:12])  # b's machine is gone: gc on a may go on
    assert [n for n in objects(s3) if n.startswith("ndif/queues/")] == [f"ndif/queues/{a.queue.identity()}.json"]
    require_own_store(a)


def test_the_cache_keeps_within_its_bound_removing_the_least_recently_used_first(
    s3, env, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    import torch

    from ndif_jobs.settings import Settings
    from ndif_jobs.store.config import open_store

    writer = open_store(Settings(home=tmp_path / "a"))
    keys = [c * 32 for c in "abc"]
    for key in keys:
        writer.put(key, {"x": torch.ones(64 << 10)})  # 256 KiB each
    monkeypatch.setenv("NDIF_JOBS_CACHE_MAX", "600KiB")
    reader = open_store(Settings(home=tmp_path / "b"))
    reader.get(keys[0])
    reader.get(keys[1])
    os.utime(reader.cache.path_for(keys[1]) / "verified.json", (1, 1))  # keys[1] is the oldest use
    reader.get(keys[0])
    reader.get(keys[2])
    assert [k for k in keys if reader.cache.exists(k)] == [keys[0], keys[2]]
    assert json.loads((reader.cache.path_for(keys[2]) / "verified.json").read_text())["tensors.safetensors"]


def test_prefetch_fills_an_empty_cache_in_parallel_and_names_what_it_could_not_fetch(
    s3, env, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    import torch

    from ndif_jobs.errors import ResultMissing
    from ndif_jobs.settings import Settings
    from ndif_jobs.store.config import open_store

    writer = open_store(Settings(home=tmp_path / "a"))
    keys = [f"{i:02x}" * 16 for i in range(40)]
    for i, key in enumerate(keys):
        writer.put(key, {"logit_diff": torch.full((30,), float(i)), "p": i})
    written = writer.cache.path_for(keys[0])
    stamp = json.loads((written / "manifest.json").read_text())["files"]["tensors.safetensors"]["stat"]
    assert json.loads((written / "verified.json").read_text()) == {"tensors.safetensors": stamp}
    assert not list((tmp_path / "a" / "cache" / "results").glob(".tmp-*"))  # written once, then moved in
    missing = "ff" * 16
    reader = open_store(Settings(home=tmp_path / "b"))
    errors = reader.prefetch([*keys, missing])
    assert list(errors) == [missing] and isinstance(errors[missing], ResultMissing)
    s3["server"].stop()
    assert [float(reader.get(key).values["logit_diff"][0]) for key in keys] == [float(i) for i in range(40)]


def test_a_result_over_one_part_is_hashed_as_it_downloads_and_a_flipped_byte_in_a_middle_part_refused(
    s3, env, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    """The transfer manager reads a large object in parallel ranged parts; they reach the hash in
    order, so an intact result loads and one byte changed inside a middle part is refused."""
    import boto3
    import torch

    from ndif_jobs.errors import ResultCorrupt
    from ndif_jobs.settings import Settings
    from ndif_jobs.store.config import open_store
    from ndif_jobs.store.s3 import PART_BYTES

    values = torch.arange(3 * PART_BYTES // 4, dtype=torch.float32)  # three parts' worth of bytes
    writer = open_store(Settings(home=tmp_path / "a"))
    intact, damaged = "a1" * 32, "b2" * 32
    writer.put(intact, {"x": values})
    writer.put(damaged, {"x": values})
    assert torch.equal(open_store(Settings(home=tmp_path / "b")).get(intact).values["x"], values)

    (tensor_object,) = [name for name in objects(s3) if damaged in name and name.endswith(".safetensors")]
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket=s3["bucket"], Key=tensor_object)["Body"].read())
    data[PART_BYTES + 12345] ^= 0x01
    client.put_object(Bucket=s3["bucket"], Key=tensor_object, Body=bytes(data))
    reader = open_store(Settings(home=tmp_path / "c"))
    with pytest.raises(ResultCorrupt, match="does not match its checksum"):
        reader.get(damaged)
    assert not reader.cache.exists(damaged)
