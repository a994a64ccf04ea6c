#!/usr/bin/env python
"""Benchmark `ndif_jobs.collect` against a plain loop of `load_result` calls, on stored jobs.

    .venv/bin/python scripts/bench_collect.py              # 1,000 jobs, 5 rounds
    .venv/bin/python scripts/bench_collect.py --quick      # 200 jobs, 3 rounds

A sweep of N patching-shaped results (a 30-layer logit-difference tensor, three scalars, two
strings) is stored and its jobs completed through the queue, as a worker leaves them. Each round
then builds the same two things three ways, in rotating order: the table of every job's params
and scalar results (a pandas DataFrame) and the `[N, 30]` stacked tensor.

* `collect`: `ndif_jobs.collect(sweep=...)`, `.frame` and `.stack("logit_diff")`;
* `load_result loop`: what a researcher writes without it: list the sweep's jobs, call
  `ndif_jobs.load_result(id)` for each, build the frame and `torch.stack`;
* `Service.load_result loop`: the same loop on one open `Service` (no settings or database
  opened per call): the floor a hand-written loop could reach.

One warm-up round is not counted (imports, page cache). The table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

LAYERS = 30
SWEEP = "bench-collect"


def populate(settings: Any, n: int) -> None:
    """`n` completed jobs of one sweep, each with its own stored result."""
    from ndif_jobs.db.queue import NewJob
    from ndif_jobs.db.sweeps import Sweeps
    from ndif_jobs.service import Service

    service = Service(settings)
    generator = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(n):
        key = hashlib.sha256(f"bench-collect {i}".encode()).hexdigest()
        clean, corrupted = 3.0 + i % 7, -2.0 - i % 5
        service.store.put(key, {
            "layers": torch.arange(LAYERS), "logit_diff": torch.randn(LAYERS, generator=generator),
            "clean_logit_diff": clean, "corrupted_logit_diff": corrupted, "answer_id": 7042, "wrong_answer_id": 7268,
            "answer_token": " Paris", "wrong_answer_token": " Rome",
        })
        params = {"clean_prompt": f"Landmark {i} is in the city of",
                  "corrupted_prompt": "The Colosseum is in the city of",
                  "answer": " Paris", "wrong_answer": " Rome", "layers": None, "position": -1}
        jobs.append(NewJob(key=key, experiment="patching", model="smollm2-135m", model_key="bench", backend="local",
                           params=params, sweep=SWEEP, sweep_row=i))
    Sweeps(service.queue).save(SWEEP, "0" * 64, "", {"name": SWEEP})
    service.queue.enqueue(jobs)
    claimed = service.queue.claim("bench", n, lease_s=600)
    service.queue.complete("bench", [(job.id, job.key, 1) for job in claimed])


def by_collect(settings: Any) -> tuple[Any, Any]:
    from ndif_jobs.collection import collect

    table = collect(sweep=SWEEP, settings=settings)
    return table.frame, table.stack("logit_diff")


def by_loop(settings: Any, load: Callable[[str], Any]) -> tuple[Any, Any]:
    import pandas as pd

    from ndif_jobs.service import Service

    ids = [row.id for row in Service(settings).queue.list_jobs(sweep=SWEEP, limit=None, newest_first=False)]
    records, tensors = [], []
    for job_id in ids:
        result = load(job_id)
        record = {"job_id": job_id, "state": result.job["state"], **result.job["params"]}
        record.update({k: v for k, v in result.items() if isinstance(v, (int, float, str))})
        records.append(record)
        tensors.append(result["logit_diff"])
    return pd.DataFrame.from_records(records), torch.stack(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=None, help="stored jobs (default 1000; 200 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="counted rounds (default 5; 3 with --quick)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = args.n or (200 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 5)

    import ndif_jobs
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-collect-") as folder:
        settings = Settings(home=Path(folder) / "home", log_format="json")
        started = time.perf_counter()
        populate(settings, n)
        print(f"stored {n} jobs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        one = Service(settings)
        methods: dict[str, Callable[[], tuple[Any, Any]]] = {
            "collect": lambda: by_collect(settings),
            "load_result loop": lambda: by_loop(settings, lambda j: ndif_jobs.load_result(j, settings=settings)),
            "Service.load_result loop": lambda: by_loop(settings, one.load_result),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for round_ in range(rounds + 1):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                t = time.perf_counter()
                frame, stacked = methods[name]()
                elapsed = time.perf_counter() - t
                assert len(frame) == n and tuple(stacked.shape) == (n, LAYERS), name
                if round_:
                    times[name].append(elapsed)
                print(f"round {round_} {name}: {elapsed:.3f} s", file=sys.stderr)
    base = statistics.median(times["collect"])
    print(f"### collect: a table and a stacked tensor of {n} stored jobs (median of {rounds} rounds)")
    print()
    print("| method | seconds | vs collect |")
    print("| --- | ---: | ---: |")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.3f} | {median / base:.1f}x |")


if __name__ == "__main__":
    main()
