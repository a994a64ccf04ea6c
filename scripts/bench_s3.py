#!/usr/bin/env python
"""Put and get of one result through ndif-jobs' object store against the S3 client's own speed.

    .venv/bin/python scripts/bench_s3.py            # 256 MiB, 5 rounds (+1 warm-up)
    .venv/bin/python scripts/bench_s3.py --quick    # 64 MiB, 2 rounds
    .venv/bin/python scripts/bench_s3.py --collect 1000   # collect's reads of 1,000 small results

One S3 server (moto's server mode, a process of its own on loopback) serves every method in the
same run, interleaved, the order rotating from round to round; tables give medians, and the
"of boto3" column the median of per-round ratios to the same round's boto3 figure.

- put: `ObjectResultStore.put` of the result (it writes the local copy with its sha256 and fsync,
  uploads the tensor file, commits the manifest) against boto3's `upload_file` of a file of the
  same bytes already on disk (boto3's own transfer manager, default settings), and obstore's
  `put` of the same file (the other well-kept client measured for the choice).
- get: `ObjectResultStore.get` into an empty cache (download, sha256 check, fsync, rename,
  memory-map) against boto3's `download_file` and obstore's `get` into a file.

Goal: ndif-jobs at 90% or more of boto3's throughput, both ways.

With `--collect N`, instead: N small results (a 30-float tensor and three scalars, as a patching
sweep leaves them) are stored once, then each round reads them all into an empty cache, the way
`collect` does, against the same reads made with boto3 by hand, `PARALLEL_READS` requests at a
time on a client with as many connections:

- manifests: `ObjectResultStore.manifests(keys)` (what `collect`'s table needs) against parallel
  `get_object` of the same manifest objects;
- results: `ObjectResultStore.prefetch(keys)` alone (manifest, tensor file, sha256 check, per
  result; one filesystem sync, the renames, one more sync), then followed by `get` of each from
  the cache (what `collect` does: the local reads and memory maps), and `get` of one result after
  another with no prefetch, against parallel `get_object` of every manifest and tensor file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUCKET = "bench-results"


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).close()
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit("moto's server did not start") from None
            time.sleep(0.1)


def parse_size(text: str) -> int:
    from ndif_jobs.store.housekeeping import parse_size as parse

    return parse(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds")
    parser.add_argument("--collect", type=int, metavar="N", help="read N small results the way collect does")
    args = parser.parse_args()
    size = parse_size("64MiB" if args.quick else args.size)
    repeats = 2 if args.quick else args.repeats

    server, endpoint = start_server()
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    })
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=REPO / ".cache" if (REPO / ".cache").exists() else None))
    try:
        if args.collect:
            run_collect(args.collect, 2 if args.quick else min(args.repeats, 3), work)
        else:
            run(endpoint, size, repeats, work)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def run(endpoint: str, size: int, repeats: int, work: Path) -> None:
    import boto3
    import obstore
    import torch
    from obstore.store import S3Store

    from ndif_jobs.store.cache import ResultCache
    from ndif_jobs.store.remote import ObjectResultStore

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    ob = S3Store(BUCKET, endpoint=endpoint, region="us-east-1", access_key_id="bench", secret_access_key="bench",
                 client_options={"allow_http": True})
    n_tensors = 8
    result = {f"t{i}": torch.randn(size // 4 // n_tensors) for i in range(n_tensors)}
    plain = work / "plain.bin"
    with open(plain, "wb") as f:
        for t in result.values():
            f.write(t.numpy().tobytes())
    nbytes = plain.stat().st_size

    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        started = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - started)

    # One store per side for the whole run, as a worker or a session holds one (building a boto3
    # client costs about a second of CPU here); each round starts with empty caches.
    writer = ObjectResultStore(f"s3://{BUCKET}/ndif", ResultCache(work / "w", 1 << 40))
    reader = ObjectResultStore(f"s3://{BUCKET}/ndif", ResultCache(work / "r", 1 << 40))

    def one_round(round_: int) -> None:
        key = f"{round_:02x}" * 16
        writer.cache = ResultCache(work / f"w{round_}", 1 << 40)
        reader.cache = ResultCache(work / f"r{round_}", 1 << 40)
        puts = [
            ("ndif-jobs put", lambda: writer.put(key, result)),
            ("boto3 upload_file", lambda: client.upload_file(str(plain), BUCKET, f"plain/{round_}")),
            ("obstore put", lambda: obstore.put(ob, f"ob/{round_}", plain)),
        ]
        gets = [
            ("ndif-jobs get", lambda: reader.get(key)),
            ("boto3 download_file", lambda: client.download_file(BUCKET, f"plain/{round_}", str(work / "b.bin"))),
            ("obstore get", lambda: (work / "o.bin").write_bytes(obstore.get(ob, f"ob/{round_}").bytes())),
        ]
        shift = round_ % 3
        for name, fn in puts[shift:] + puts[:shift]:
            timed(name if round_ else f"warm-up {name}", fn)
        for name, fn in gets[shift:] + gets[:shift]:
            timed(name if round_ else f"warm-up {name}", fn)
        for leftover in ("b.bin", "o.bin", f"w{round_}", f"r{round_}"):
            path = work / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        names = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
        if names:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in names]})
        print(f"round {round_}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()
                                              if not n.startswith("warm-up") and len(v) == round_), file=sys.stderr)

    for round_ in range(repeats + 1):
        one_round(round_)

    def row(name: str, base: str) -> str:
        median = statistics.median(times[name])
        ratio = statistics.median(times[base][i] / t for i, t in enumerate(times[name]))
        return f"| {name} | {median:.2f} | {nbytes / median / 1e6:.0f} | {ratio:.0%} |"

    print(f"### Object store: put and get of a {nbytes / 2**20:.0f} MiB result "
          f"(moto server on loopback, {repeats} rounds, medians)")
    print()
    print("| method | s | MB/s | of boto3 |")
    print("|---|---|---|---|")
    for name in ("ndif-jobs put", "boto3 upload_file", "obstore put"):
        print(row(name, "boto3 upload_file"))
    for name in ("ndif-jobs get", "boto3 download_file", "obstore get"):
        print(row(name, "boto3 download_file"))


def run_collect(n: int, repeats: int, work: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import torch
    from botocore.config import Config

    from ndif_jobs.store.cache import ResultCache
    from ndif_jobs.store.remote import PARALLEL_READS, ObjectResultStore

    client = boto3.client("s3", config=Config(max_pool_connections=PARALLEL_READS))
    client.create_bucket(Bucket=BUCKET)
    writer = ObjectResultStore(f"s3://{BUCKET}/ndif", ResultCache(work / "w", 1 << 40))
    keys = [f"{i:08x}" * 4 for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: writer.put(keys[i], {"logit_diff": torch.randn(30), "p": i, "q": i / 3,
                                                      "best": float(i % 7)}), range(n)))
    print(f"stored {n} results in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    names = [o.name for o in writer.bucket.iter_objects("results/")]
    manifests = [writer.bucket._key(name) for name in names if name.endswith("manifest.json")]
    tensors = [writer.bucket._key(name) for name in names if name.endswith(".safetensors")]
    nbytes = sum(o.bytes for o in writer.bucket.iter_objects("results/"))
    assert len(manifests) == len(tensors) == n

    def get_all(objects: list[str]) -> None:
        with ThreadPoolExecutor(PARALLEL_READS) as pool:
            list(pool.map(lambda k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read(), objects))

    reader = ObjectResultStore(f"s3://{BUCKET}/ndif", ResultCache(work / "r", 1 << 40))
    times: dict[str, list[float]] = {}

    def empty_cache() -> None:
        shutil.rmtree(reader.cache.root, ignore_errors=True)
        reader.cache = ResultCache(work / "r", 1 << 40)

    def every_get() -> None:
        for key in keys:
            reader.get(key)

    def prefetch_then_get() -> None:
        assert not reader.prefetch(keys)
        for key in keys:
            reader.get(key)

    # (name, what is timed, whether ndif-jobs' cache is emptied first, untimed)
    methods: list[tuple[str, Callable[[], object], bool]] = [
        ("ndif-jobs manifests", lambda: reader.manifests(keys), True),
        ("boto3 GET manifests", lambda: get_all(manifests), False),
        ("ndif-jobs prefetch", lambda: reader.prefetch(keys), True),
        ("ndif-jobs prefetch + get", prefetch_then_get, True),
        ("ndif-jobs get one by one", every_get, True),
        ("boto3 GET manifests + tensors", lambda: get_all(manifests + tensors), False),
    ]
    for round_ in range(repeats + 1):
        shift = round_ % len(methods)
        for name, fn, cold in methods[shift:] + methods[:shift]:
            if cold:
                empty_cache()
            started = time.perf_counter()
            fn()
            if round_:
                times.setdefault(name, []).append(time.perf_counter() - started)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr)

    def row(name: str, base: str, objects: int) -> str:
        median = statistics.median(times[name])
        ratio = statistics.median(times[base][i] / t for i, t in enumerate(times[name]))
        return f"| {name} | {median:.2f} | {objects / median:.0f} | {ratio:.0%} |"

    print(f"### Object store: {n} small results ({nbytes / n / 1024:.1f} KiB each with the manifest) into an empty "
          f"cache (moto server on loopback, {PARALLEL_READS} requests at a time, {repeats} rounds, medians)")
    print()
    print("| method | s | objects/s | of boto3 |")
    print("|---|---|---|---|")
    print(row("ndif-jobs manifests", "boto3 GET manifests", n))
    print(row("boto3 GET manifests", "boto3 GET manifests", n))
    for name in ("ndif-jobs prefetch", "ndif-jobs prefetch + get", "ndif-jobs get one by one",
                 "boto3 GET manifests + tensors"):
        print(row(name, "boto3 GET manifests + tensors", 2 * n))


if __name__ == "__main__":
    main()
