"""`gc` on a result store that more than one queue keeps results in.

Two queue databases (SQLite files) share one data folder's store, as when a PostgreSQL queue
takes over a data folder from a SQLite one. Each names itself in the store before it stores a
result there or is served one; `gc` sees only its own queue's jobs, so it refuses while the store
names another queue. The real worker runs on real SQLite files with the fake backend of
`test_fake_backend.py` (no model); the CLI test runs `ndif-jobs gc` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ndif_jobs.db.engine import dispose_engines
from ndif_jobs.errors import BadInput
from ndif_jobs.service import Service
from ndif_jobs.settings import Settings
from ndif_jobs.store.housekeeping import plan_gc, require_own_store, run_gc
from ndif_jobs.worker import Worker

from .conftest import run_cli
from .test_fake_backend import enqueue, fake  # noqa: F401 - the fake backend's fixture

pytestmark = pytest.mark.usefixtures("fake")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def queue_on(home: Path, database: Path) -> Service:
    return Service(Settings(home=home, database_url=f"sqlite:///{database}", poll_s=0.05, log_format="json"))


@pytest.fixture
def queues(home: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two queues, `a` and `b`, each its own SQLite file, on one data folder."""
    yield queue_on(home, tmp_path / "a.db"), queue_on(home, tmp_path / "b.db")
    dispose_engines()


def one_result_each(a: Service, b: Service) -> tuple[str, str]:
    """A job of `a` and one of `b`, each run by its own queue's worker into the shared store."""
    (mine,) = enqueue(a, 21)
    Worker(a).run(until_empty=True)
    (theirs,) = enqueue(b, 5)
    Worker(b).run(until_empty=True)
    return mine, theirs


def test_a_queue_names_itself_once_in_the_store_it_stores_results_in(queues, home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, _ = queues
    enqueue(a, 1)
    Worker(a).run(until_empty=True)
    enqueue(queue_on(home, tmp_path / "a.db"), 2)  # the same queue from another process: no second record

    (named,) = a.store.queues()
    assert named.id == a.queue.identity() and len(named.id) == 32
    assert str(a.settings.database_url) in named.label
    require_own_store(a)  # its own queue only: gc may go on


def test_gc_refuses_while_another_queue_keeps_results_in_the_store_and_removes_nothing(queues) -> None:  # type: ignore[no-untyped-def]
    a, b = queues
    mine, theirs = one_result_each(a, b)
    before = {info.key for info in a.store.iter_stored()}

    with pytest.raises(BadInput, match=r"also keeps the results of 1 other queue \(sqlite:///.*b\.db on .*, since 20\d\d-\d\d-\d\d, id [0-9a-f]{12}\).*"
                                       r"--forget-queue ID"):
        require_own_store(a)
    with pytest.raises(BadInput, match=r"a\.db"):
        require_own_store(b)

    assert {info.key for info in a.store.iter_stored()} == before
    assert a.load_result(mine)["double"] == 42 and b.load_result(theirs)["double"] == 10
    # What the refusal prevents: a's gc would take b's result, which no job of a points at.
    assert [item.key for item in plan_gc(a, None, None).remove] == [b.job(theirs).key]


def test_a_queue_is_named_as_soon_as_it_queues_a_job(queues) -> None:  # type: ignore[no-untyped-def]
    a, b = queues
    enqueue(a, 21)
    Worker(a).run(until_empty=True)
    enqueue(b, 5)  # no worker of b has run: its job may still be served from the store later

    assert {q.id for q in a.store.queues()} == {a.queue.identity(), b.queue.identity()}
    with pytest.raises(BadInput, match="other queue"):
        require_own_store(a)


def test_gc_with_ignore_other_queues_removes_what_its_own_queue_does_not_need(queues) -> None:  # type: ignore[no-untyped-def]
    a, b = queues
    mine, theirs = one_result_each(a, b)

    outcome = run_gc(a, plan_gc(a, None, None))  # what --ignore-other-queues runs

    assert outcome.removed == 1
    assert not a.store.exists(b.job(theirs).key) and a.store.exists(a.job(mine).key)


def test_the_gc_command_refuses_in_one_line_naming_the_other_queue(queues, env, home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = queues
    one_result_each(a, b)
    stored = sorted(str(p) for p in (home / "results").rglob("manifest.json"))
    on_a = {**env, "NDIF_JOBS_HOME": str(home), "NDIF_JOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}"}

    proc = run_cli("gc", "--max-size", "0", env=on_a)

    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "b.db on " in line and f"id {b.queue.identity()[:12]}" in line and "--forget-queue ID" in line
    assert len(stored) == 2 and sorted(str(p) for p in (home / "results").rglob("manifest.json")) == stored

    forced = run_cli("gc", "--ignore-other-queues", "--json", env=on_a)
    assert forced.returncode == 0, forced.stderr
    assert len(list((home / "results").rglob("manifest.json"))) == 1


def test_a_gone_queue_is_forgotten_by_its_id_and_gc_goes_on_without_being_told(queues, env, home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = queues
    one_result_each(a, b)
    on_a = {**env, "NDIF_JOBS_HOME": str(home), "NDIF_JOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}"}

    own = run_cli("gc", "--forget-queue", a.queue.identity()[:12], env=on_a)
    unknown = run_cli("gc", "--forget-queue", "0123456789ab", env=on_a)
    assert own.returncode == 2 and "is this queue" in own.stderr
    assert unknown.returncode == 2 and "named there: " in unknown.stderr
    assert a.queue.identity()[:12] in unknown.stderr and b.queue.identity()[:12] in unknown.stderr
    assert len(a.store.queues()) == 2

    forgot = run_cli("gc", "--forget-queue", b.queue.identity()[:12], env=on_a)
    assert forgot.returncode == 0, forgot.stderr
    assert "b.db on " in forgot.stdout
    assert [q.id for q in a.store.queues()] == [a.queue.identity()]
    assert len(list((home / "results").rglob("manifest.json"))) == 2  # forgetting removes no result

    collected = run_cli("gc", "--json", env=on_a)
    assert collected.returncode == 0, collected.stderr
    (theirs,) = b.queue.jobs_with_results()
    assert json.loads(collected.stdout)["keys"] == [theirs.result_key]  # b's result: no job of a needs it
