#!/usr/bin/env python
"""Server-side render time of the results pages on a queue of 100,000 jobs, beside `ndif-jobs status`.

    .venv/bin/python scripts/bench_web.py            # 100k jobs, 15 rounds
    .venv/bin/python scripts/bench_web.py --quick    # 100k jobs, 5 rounds

The queue is built as `bench_cli.py` builds it (90% completed in bundles, 1% failed, the rest
queued or claimed, seven tags). Each page is requested through the app in this process
(Starlette's test client: routing, the reads, Jinja2 rendering; no socket), so the time is what
the server spends on it. The counts per tag and the bytes stored take a pass over the whole
table: a served app counts them as it starts, in the background, and then at most every 15 s
(`queries.Snapshot`); the first row times an overview that comes before that count is made
(the test client skips the start-up), the worst a person meets. The CLI's `status`
runs as a whole process on the same database: the start-up it pays is what a person waits for
at a terminal. Medians over rounds; goal < 300 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

GOAL_S = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--keep", type=Path, help="Build the queue in this folder once and reuse it on later runs.")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds

    from bench_cli import build_queue

    with tempfile.TemporaryDirectory(prefix="ndif-jobs-bench-web-") as folder:
        home = args.keep or Path(folder) / "home"
        marker = home / "bench-show-id"
        if marker.exists():
            show_id = marker.read_text()
        else:
            t0 = time.perf_counter()
            show_id = build_queue(home, args.jobs)
            marker.write_text(show_id)
            print(f"built a queue of {args.jobs} jobs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        os.environ["NDIF_JOBS_HOME"] = str(home)
        from starlette.testclient import TestClient

        from ndif_jobs.service import Service
        from ndif_jobs.settings import Settings
        from ndif_jobs.web.app import create_app

        client = TestClient(create_app(Service(Settings(home=home))), base_url="http://127.0.0.1")
        pages = {
            "overview": "/",
            "overview (live part)": "/part/overview",
            "jobs, newest": "/jobs",
            "jobs, failed": "/jobs?state=failed",
            "jobs, tag + experiment": "/jobs?tag=sweep3&experiment=patching",
            "jobs, text in params": "/jobs?text=France+is+4242",
            "jobs, page 1000": "/jobs?page=1000",
            "a job": f"/jobs/{show_id}",
        }
        for path in pages.values():  # warm: templates compiled, connections opened
            assert client.get(path).status_code == 200, path
        cold = "overview, first of a new app (tag counts and bytes stored counted now)"
        times: dict[str, list[float]] = {name: [] for name in [cold, *pages, "CLI: ndif-jobs status (process)"]}
        env = {**os.environ, "NDIF_JOBS_HOME": str(home)}
        for _ in range(rounds):
            fresh = TestClient(create_app(Service(Settings(home=home))), base_url="http://127.0.0.1")
            t = time.perf_counter()
            assert fresh.get("/").status_code == 200
            times[cold].append(time.perf_counter() - t)
            for name, path in pages.items():
                t = time.perf_counter()
                response = client.get(path)
                times[name].append(time.perf_counter() - t)
                assert response.status_code == 200
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ndif_jobs", "status"], env=env, check=True, capture_output=True)
            times["CLI: ndif-jobs status (process)"].append(time.perf_counter() - t)
    print(f"### results pages, server-side render time ({args.jobs:,} jobs, SQLite, median of {rounds} rounds)")
    print()
    print("| page | median ms | max ms | goal |")
    print("|---|---:|---:|---|")
    for name, values in times.items():
        median = statistics.median(values)
        mark = "ok" if median < GOAL_S else "over"
        print(f"| {name} | {median * 1000:.0f} | {max(values) * 1000:.0f} | {mark} (< {GOAL_S * 1000:.0f} ms) |")


if __name__ == "__main__":
    main()
