#!/usr/bin/env python3
"""A chaos run: many NDIF jobs, random faults, workers killed at random; then check nothing was lost.

    .venv/bin/python scripts/chaos.py --quick                 # ~40 jobs, its own local NDIF, < 2 min
    .venv/bin/python scripts/chaos.py --jobs 300 --duration 300
    .venv/bin/python scripts/chaos.py --quick --ndif-host http://127.0.0.1:8011 --ndif-root .ndif-local

What it does, all with real processes against the real local NDIF (scripts/ndif-local):

1. starts a private local NDIF stack (or reuses the one at --ndif-host / NDIF_HOST);
2. submits cheap `logit-lens` jobs (one or two layers, top_k=2, model local/smollm2, backend ndif),
   each with its own cache key, into a fresh data folder;
3. for a bounded time, keeps several `ndif-jobs worker --until-empty` processes running against a
   fault-injecting proxy (scripts/ndif_local/faultproxy.py), and at random: SIGKILLs a worker and
   starts another, injects a 503 / 429 / dropped connection / truncated or corrupt download / bad
   poll answer, adds latency, takes NDIF down for a few seconds, and restarts the NDIF API once
   (when it knows the stack's folder);
4. stops the chaos, kills the workers, and drains the queue with one clean worker;
5. checks: every job is completed, or failed with a non-empty error; one result folder per stored
   key and none stored twice (no replaced `.corrupt-` copies, no `.tmp-` leftovers, no folder
   without a completed job); `ndif-jobs verify` passes; NDIF accepted at least one request per
   bundle it ran. Prints the counts as a table; exits 1 if a check fails.

The randomness is seeded (--seed, default: from the clock) and the seed is printed first, so a run
can be repeated (timing still varies: processes race).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from ndif_local.faultproxy import FaultProxy  # noqa: E402

NDIF_SCRIPT = REPO / "scripts" / "ndif-local"
SHARED_ROOT = Path(os.environ.get("NDIF_LOCAL_SHARED_ROOT") or REPO / ".ndif-local")
MODEL = "local/smollm2"
REQUEST_LINE = re.compile(r'"POST /request(?:\?\S*)? HTTP/[\d.]+" (\d{3})')
FAULTS = [
    ("submit", "503"), ("submit", "429"), ("submit", "drop"), ("submit", "500"),
    ("poll", "503"), ("poll", "drop"), ("poll", "garbage"),
    ("download", "truncate"), ("download", "corrupt"), ("download", "drop"),
]
PROMPTS = ["The capital of France is", "The Eiffel Tower is in", "Hello there, my name is",
           "One plus one equals", "The opposite of hot is", "Water freezes at"]


def say(*parts: object) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}]", *parts, flush=True)


def free_port_block(size: int = 10) -> int:
    import socket

    rng = random.Random()  # not the seeded one: ports are not part of the experiment
    for _ in range(200):
        base = rng.randrange(30000, 45000, 10)
        ok = True
        for port in range(base, base + size):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit("chaos: no free block of ports for a local NDIF")


class Stack:
    """A local NDIF: started here (and stopped at the end) or reused."""

    def __init__(self, host: str | None, root: Path | None, work: Path) -> None:
        self.owned = host is None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_JOBS_", "HF_HOME"))}
        if self.owned:
            port = free_port_block()
            self.root = work / "ndif"
            self.env.update(NDIF_LOCAL_ROOT=str(self.root), NDIF_LOCAL_PORT=str(port),
                            NDIF_LOCAL_VENV=str(SHARED_ROOT / "venv"),
                            NDIF_LOCAL_MODEL_DIR=str(SHARED_ROOT / "models" / "smollm2"))
            self.host = f"http://127.0.0.1:{port}"
        else:
            self.host = host.rstrip("/")  # type: ignore[union-attr]
            self.root = root
            if root is not None:
                self.env["NDIF_LOCAL_ROOT"] = str(root)
                self.env.setdefault("NDIF_LOCAL_PORT", self.host.rsplit(":", 1)[-1])

    def harness(self, *args: str, timeout: float = 600) -> None:
        proc = subprocess.run([sys.executable, str(NDIF_SCRIPT), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ndif-local {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-2000:]}")

    def start(self) -> None:
        if self.owned:
            say("starting a private local NDIF at", self.host)
            self.harness("setup", timeout=1200)
            self.harness("start")

    def stop(self) -> None:
        if self.owned:
            say("stopping the private local NDIF")
            subprocess.run([sys.executable, str(NDIF_SCRIPT), "stop"], env=self.env, capture_output=True, timeout=180)

    def requests(self) -> int | None:
        """POST /request answered 200 so far (the API's access log), None if unknown."""
        if self.root is None:
            return None
        log = self.root / "run" / "logs" / "api-access.log"
        try:
            text = log.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for m in REQUEST_LINE.finditer(text) if m.group(1) == "200")

    @property
    def hf_home(self) -> str | None:
        return str(self.root / "hf_home") if self.root is not None else os.environ.get("HF_HOME")


def client_env(home: Path, host: str, hf_home: str | None, lease_s: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_JOBS_", "NDIF_HOST", "NDIF_API_KEY"))}
    env.update(
        NDIF_JOBS_HOME=str(home), NDIF_HOST=host, NDIF_JOBS_ALLOW_HTTP_LOOPBACK="1", HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NDIF_JOBS_LOG_FORMAT="json",
        NDIF_JOBS_LEASE_S=str(lease_s), NDIF_JOBS_POLL_S="0.3", NDIF_JOBS_RETRY_BACKOFF_S="0.2",
        NDIF_JOBS_RETRY_BACKOFF_MAX_S="1.0", NDIF_JOBS_HTTP_RETRIES="4", NDIF_JOBS_HTTP_RETRY_MAX_S="15",
        NDIF_JOBS_MAX_ATTEMPTS="6", NDIF_JOBS_POLL_MIN_S="0.1", NDIF_JOBS_POLL_MAX_S="0.5",
        NDIF_JOBS_EVICTION_GRACE_S="10", NDIF_JOBS_HTTP_TIMEOUT_S="20",
    )
    if hf_home:
        env["HF_HOME"] = hf_home
    return env


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ndif_jobs", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


class Workers:
    def __init__(self, env: dict[str, str], logs: Path, max_bundle: int) -> None:
        self.env, self.logs, self.max_bundle = env, logs, max_bundle
        self.procs: list[subprocess.Popen] = []
        self.started = self.killed = 0

    def spawn(self) -> None:
        self.started += 1
        log = open(self.logs / f"worker-{self.started:03d}.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "ndif_jobs", "worker", "--until-empty", "-b", "ndif",
             "--max-bundle", str(self.max_bundle)],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def kill_one(self, rng: random.Random) -> bool:
        alive = self.alive()
        if not alive:
            return False
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.killed += 1
        return True

    def bad_exits(self) -> list[int]:
        """Exit codes other than 0 of workers that were not killed on purpose."""
        return [p.returncode for p in self.procs if p.returncode not in (0, -signal.SIGKILL, None)]

    def kill_all(self) -> None:
        for p in self.alive():
            p.send_signal(signal.SIGKILL)
            p.wait()


def submit_jobs(env: dict[str, str], n: int, rng: random.Random, work: Path) -> None:
    params = []
    for i in range(n):
        layers = sorted(rng.sample(range(30), rng.choice((1, 2))))
        params.append({"prompt": f"{rng.choice(PROMPTS)} (#{i})", "layers": layers, "top_k": 2})
    path = work / "params.json"
    path.write_text(json.dumps(params))
    proc = cli("submit", "logit-lens", "-b", "ndif", "-m", MODEL, "--params-file", str(path), "--json", env=env,
               timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"chaos: submit failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def queue_waiting(db: Path) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute(
            "SELECT count(*) FROM jobs WHERE state NOT IN ('completed', 'cached', 'failed', 'cancelled')").fetchone()[0]


def chaos(args: argparse.Namespace, rng: random.Random, stack: Stack, proxy: FaultProxy, workers: Workers,
          db: Path) -> Counter:
    actions: Counter = Counter()
    end = time.time() + args.duration
    restart_at = time.time() + args.duration * rng.uniform(0.3, 0.6) if args.restart_api and stack.root else None
    for _ in range(args.workers):
        workers.spawn()
    restarter = None
    while time.time() < end:
        if queue_waiting(db) == 0:
            break
        # Keep the pool full: a worker that exited (queue looked empty to it) or was killed is replaced.
        while len(workers.alive()) < args.workers:
            workers.spawn()
        roll = rng.random()
        if roll < 0.20:
            if workers.kill_one(rng):
                actions["worker SIGKILLed"] += 1
                workers.spawn()
        elif roll < 0.75:
            kind, fault = rng.choice(FAULTS)
            proxy.inject(kind, fault, times=rng.choice((1, 1, 2)))
            actions[f"inject {kind}:{fault}"] += 1
        elif roll < 0.85:
            kind = rng.choice(("submit", "poll", "download"))
            proxy.latency_s[kind] = rng.choice((0.0, 0.3, 1.0))
            actions["latency changed"] += 1
        elif roll < 0.90 and not proxy.down:
            # NDIF down for a while: every connection through the proxy is cut, unanswered.
            proxy.down = True
            threading.Timer(rng.uniform(1.0, 4.0), setattr, args=(proxy, "down", False)).start()
            actions["NDIF down (every connection cut)"] += 1
        if restart_at is not None and time.time() >= restart_at:
            # In a thread: the API takes 10-20 s to come back, and the chaos goes on meanwhile.
            restart_at = None
            say("restarting the NDIF API")
            restarter = threading.Thread(target=stack.harness, args=("restart-api", "--kill"),
                                         kwargs={"timeout": 180}, daemon=True)
            restarter.start()
            actions["API restarted"] += 1
        time.sleep(rng.uniform(0.5, args.tick_s))
    if restarter is not None:
        restarter.join(timeout=180)  # the clean drain needs the API back
    proxy.down = False
    return actions


def check(home: Path, env: dict[str, str], stack: Stack, requests_before: int | None, workers: Workers,
          actions: Counter, proxy: FaultProxy) -> int:
    db = sqlite3.connect(home / "queue.db", timeout=30)
    rows = db.execute("SELECT id, state, error, result_key, attempts FROM jobs").fetchall()
    bundles = db.execute("SELECT state, remote_job_id FROM bundles").fetchall()
    db.close()
    states = Counter(r[1] for r in rows)
    unfinished = [r[0] for r in rows if r[1] not in ("completed", "failed")]
    failed_silent = [r[0] for r in rows if r[1] == "failed" and not (r[2] or "").strip()]
    completed_no_key = [r[0] for r in rows if r[1] == "completed" and not r[3]]
    keys = {r[3] for r in rows if r[1] == "completed" and r[3]}

    results = home / "results"
    folders = [p.parent for p in results.glob("*/*/manifest.json")] if results.exists() else []
    folder_keys = Counter(p.name for p in folders)
    twice = [k for k, c in folder_keys.items() if c > 1]
    leftovers = [p.name for p in results.iterdir() if p.name.startswith((".tmp-", ".corrupt-", ".trash-"))] \
        if results.exists() else []
    orphans = sorted(set(folder_keys) - keys)
    missing = sorted(keys - set(folder_keys))
    wrong_key = [p.name for p in folders if json.loads((p / "manifest.json").read_text()).get("key") != p.name]

    verify = cli("verify", "--json", env=env)
    remote_bundles = {b[1] for b in bundles if b[1]}
    requests = None if requests_before is None else stack.requests() - requests_before  # type: ignore[operator]

    checks = [
        ("every job completed or failed", not unfinished, f"{len(unfinished)} unfinished"),
        ("every failed job has an error", not failed_silent, f"{len(failed_silent)} without one"),
        ("every completed job has a result key", not completed_no_key, f"{len(completed_no_key)} without"),
        ("one result folder per completed key", not missing and not orphans and not twice,
         f"{len(missing)} missing, {len(orphans)} orphan, {len(twice)} twice"),
        ("no result replaced or half-written", not leftovers and not wrong_key,
         f"{len(leftovers)} leftovers, {len(wrong_key)} misnamed"),
        ("ndif-jobs verify passes", verify.returncode == 0, f"exit {verify.returncode}"),
        ("workers exited 0 unless killed", not workers.bad_exits(), f"exit codes {workers.bad_exits()}"),
    ]
    if requests is not None:
        checks.append(("NDIF requests >= bundles sent", requests >= len(remote_bundles),
                       f"{requests} requests, {len(remote_bundles)} bundles"))

    rows_out = [
        ("jobs", len(rows)),
        *[(f"  {state}", n) for state, n in sorted(states.items())],
        ("result folders", len(folders)),
        ("results stored twice", len(twice) + sum(1 for x in leftovers if x.startswith(".corrupt-"))),
        (".tmp- leftovers", sum(1 for x in leftovers if x.startswith(".tmp-"))),
        ("verify exit code", verify.returncode),
        ("bundles (all attempts)", len(bundles)),
        ("bundles sent to NDIF", len(remote_bundles)),
        ("NDIF requests received (200)", "n/a" if requests is None else requests),
        ("workers started", workers.started),
        ("workers SIGKILLed", workers.killed),
        ("faults injected by proxy", sum(proxy.injected.values())),
        ("API restarts", actions.get("API restarted", 0)),
        ("NDIF outages", actions.get("NDIF down (every connection cut)", 0)),
        ("max attempts of a job", max((r[4] for r in rows), default=0)),
    ]
    width = max(len(name) for name, _ in rows_out)
    print()
    print(f"{'count'.ljust(width)}  value")
    print(f"{'-' * width}  -----")
    for name, value in rows_out:
        print(f"{name.ljust(width)}  {value}")
    print()
    failures = 0
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"  ({detail})"))
        failures += not ok
    if verify.returncode != 0:
        print(verify.stdout[-2000:], verify.stderr[-2000:])
    for state in ("failed",):
        for r in rows:
            if r[1] == state:
                print(f"  failed {r[0]}: {(r[2] or '')[:160]}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short form for CI: 40 jobs, 25 s of chaos")
    parser.add_argument("--seed", type=int, help="random seed (default: from the clock; always printed)")
    parser.add_argument("--ndif-host", default=os.environ.get("NDIF_HOST") or None,
                        help="reuse the local NDIF at this URL (env NDIF_HOST) instead of starting one")
    parser.add_argument("--ndif-root", default=os.environ.get("NDIF_LOCAL_ROOT") or None,
                        help="that stack's ndif-local folder (env NDIF_LOCAL_ROOT): its model cache, access "
                             "log and restart-api")
    parser.add_argument("--jobs", type=int, help="jobs to submit (default 300; quick 40)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes kept running (default 3)")
    parser.add_argument("--duration", type=float, help="seconds of chaos (default 240; quick 25)")
    parser.add_argument("--drain-timeout", type=float,
                        help="seconds for the final clean worker (default 600; quick 60)")
    parser.add_argument("--max-bundle", type=int, default=8, help="jobs per bundle (default 8)")
    parser.add_argument("--lease-s", type=float, default=3.0, help="NDIF_JOBS_LEASE_S of the workers (default 3)")
    parser.add_argument("--tick-s", type=float, default=2.0, help="longest pause between chaos actions")
    parser.add_argument("--no-restart-api", dest="restart_api", action="store_false",
                        help="never restart the NDIF API")
    parser.add_argument("--work-dir", help="keep the data folder and worker logs here (default: a temp dir)")
    args = parser.parse_args()
    args.jobs = args.jobs or (40 if args.quick else 300)
    args.duration = args.duration if args.duration is not None else (25.0 if args.quick else 240.0)
    args.drain_timeout = args.drain_timeout or (60.0 if args.quick else 600.0)
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 2**31
    rng = random.Random(seed)
    say(f"seed {seed} (repeat with --seed {seed})")
    t0 = time.time()

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ndif-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    home, logs = work / "home", work / "logs"
    logs.mkdir(exist_ok=True)
    stack = Stack(args.ndif_host, Path(args.ndif_root) if args.ndif_root else None, work)
    proxy = None
    workers = None
    try:
        stack.start()
        proxy = FaultProxy(stack.host).start()
        proxy.server.handle_error = lambda *_: None  # a client hanging up mid-request is part of the chaos
        env = client_env(home, proxy.url, stack.hf_home, args.lease_s)
        say(f"NDIF {stack.host} via fault proxy {proxy.url}; data folder {home}")
        submit_jobs(env, args.jobs, rng, work)
        say(f"submitted {args.jobs} logit-lens jobs")
        requests_before = stack.requests()
        workers = Workers(env, logs, args.max_bundle)
        actions = chaos(args, rng, stack, proxy, workers, home / "queue.db")
        say("chaos over:", dict(actions) or "nothing done")
        workers.kill_all()
        proxy.clear()
        proxy.latency_s.clear()
        say("draining with one clean worker")
        drain = cli("worker", "--until-empty", "-b", "ndif", env=env, timeout=args.drain_timeout)
        (logs / "drain.log").write_text(drain.stdout + drain.stderr)
        if drain.returncode != 0:
            say(f"the clean worker exited {drain.returncode}: {drain.stderr.strip()[-500:]}")
        failures = check(home, env, stack, requests_before, workers, actions, proxy)
        if drain.returncode != 0:
            failures += 1
            print("FAIL  the clean worker exited 0")
    except subprocess.TimeoutExpired as exc:
        say(f"timed out: {exc}")
        failures = 1
    finally:
        if workers is not None:
            workers.kill_all()
        if proxy is not None:
            proxy.stop()
        stack.stop()
    say(f"{'OK' if not failures else f'{failures} check(s) FAILED'} in {time.time() - t0:.1f} s; seed {seed}; "
        f"logs in {logs}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
