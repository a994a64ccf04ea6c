"""The store keeps no false result: gc never leaves a job pointing at nothing, every value a result
holds is under a checksum, and export never writes through a name someone else planted.

One real store is filled once per module (an `activations` job tagged `paper`, and a `big-zeros`
job of 2 MiB with a scalar and a string beside its tensor), then copied into each test's folder.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import MODELS_CACHE, REPO, run_cli

ACT = ["-p", "prompt=The capital of France is", "-p", "layers=[0,15,29]"]
BIG_N = 512 * 1024  # float32 zeros: 2 MiB

BIG = '''
import torch
from ndif_jobs import experiment, Params

class P(Params):
    n: int

@experiment("big-zeros", params=P)
def big_zeros(model, p):
    return {"zeros": torch.zeros(p["n"]), "scale": 0.5, "label": "all zeros"}
'''


def submit(env: dict[str, str], *args: str) -> dict:
    return json.loads(run_cli("submit", *args, "--json", env=env, check=True).stdout)


def show(env: dict[str, str], job: str) -> dict:
    return json.loads(run_cli("show", job, "--json", env=env, check=True).stdout)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding two completed jobs, and `ids.json`: their ids and keys."""
    root = tmp_path_factory.mktemp("seeded")
    (root / "big_zeros.py").write_text(BIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDIF_JOBS_")}
    env.update(NDIF_JOBS_HOME=str(root / "home"), NDIF_JOBS_MODELS_CACHE=str(MODELS_CACHE),
               NDIF_JOBS_LOG_FORMAT="json", NDIF_JOBS_IMPORTS="big_zeros", PYTHONPATH=str(root))
    act = submit(env, "activations", *ACT, "-t", "paper")
    big = submit(env, "big-zeros", "-p", f"n={BIG_N}", "-t", "big")
    run_cli("worker", "--until-empty", env=env, check=True)
    ids = {name: {"id": job["id"], "key": show(env, job["id"])["result_key"]} for name, job in
           (("act", act), ("big", big))}
    assert all(entry["key"] for entry in ids.values())
    (root / "ids.json").write_text(json.dumps(ids))
    return root


@pytest.fixture
def home(seeded: Path, tmp_path: Path) -> Path:
    path = tmp_path / "home"
    shutil.copytree(seeded / "home", path)
    return path


@pytest.fixture
def env(env: dict[str, str], seeded: Path) -> dict[str, str]:
    return {**env, "NDIF_JOBS_IMPORTS": "big_zeros", "PYTHONPATH": str(seeded)}


@pytest.fixture
def ids(seeded: Path) -> dict[str, dict[str, str]]:
    return json.loads((seeded / "ids.json").read_text())


def folder(home: Path, key: str) -> Path:
    return home / "results" / key[:2] / key


def age(home: Path, key: str, days: float) -> None:
    """Make a result look `days` old to gc (which orders by the manifest's time)."""
    t = time.time() - days * 86400
    os.utime(folder(home, key) / "manifest.json", (t, t))


@contextmanager
def unremovable(path: Path) -> Iterator[None]:
    """A result folder that cannot be moved out of its place: immutable as root, else a read-only parent."""
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make a folder unremovable here: chattr +i: {made.stderr.strip()}")
        undo = ["chattr", "-i", str(path)]
    else:
        mode = path.parent.stat().st_mode
        path.parent.chmod(0o500)
        undo = None
    try:
        probe = path.parent / f"{path.name}-probe"
        try:
            os.rename(path, probe)
        except OSError:
            pass
        else:
            os.rename(probe, path)
            pytest.skip("cannot make a folder unremovable here")
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            path.parent.chmod(mode)


# -- gc -----------------------------------------------------------------------------------------


def test_gc_failing_half_way_leaves_no_job_pointing_at_a_removed_result(env, home, ids) -> None:  # type: ignore[no-untyped-def]
    act, big = ids["act"], ids["big"]
    age(home, act["key"], 2)  # removed first
    age(home, big["key"], 1)  # then this one, which cannot be
    with unremovable(folder(home, big["key"])):
        proc = run_cli("gc", "--max-size", "0", "--json", env=env)
        assert not folder(home, act["key"]).exists() and folder(home, big["key"]).exists()
        # Both detachments were committed before any folder was touched.
        for job in (act, big):
            shown = show(env, job["id"])
            assert (shown["state"], shown["result_key"], shown["error"]) == ("completed", None, "result removed by gc")
        assert submit(env, "activations", *ACT)["state"] == "queued"  # runs again, not `cached` on nothing
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "could not remove 1 results" in proc.stderr and "next gc removes them" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        doc = json.loads(proc.stdout)
        assert doc["removed"] == 1 and [f["key"] for f in doc["failed"]] == [big["key"]]
    # The leftover is harmless, and the next gc, with no criterion at all, takes it.
    again = json.loads(run_cli("gc", "--json", env=env, check=True).stdout)
    assert again["keys"] == [big["key"]] and again["removed"] == 1
    assert not folder(home, big["key"]).exists()


def test_gc_leaves_folders_that_are_not_results_alone(env, home, ids) -> None:  # type: ignore[no-untyped-def]
    act_folder = folder(home, ids["act"]["key"])
    backup = act_folder.with_name(act_folder.name + ".backup")  # a user's `cp -r` of a result
    shutil.copytree(act_folder, backup)
    notes = home / "results" / "scratch" / "notes"
    notes.mkdir(parents=True)
    (notes / "todo.txt").write_text("look at layer 15")
    doc = json.loads(run_cli("gc", "--max-size", "0", "--json", env=env, check=True).stdout)
    assert sorted(doc["keys"]) == sorted([ids["act"]["key"], ids["big"]["key"]]) and doc["removed"] == 2
    assert backup.is_dir() and (backup / "manifest.json").exists()
    assert (notes / "todo.txt").read_text() == "look at layer 15"
    assert not act_folder.exists()


def test_gc_puts_back_a_result_that_a_job_finished_on_after_the_detach(env, home, ids) -> None:  # type: ignore[no-untyped-def]
    """Between gc's detach and its removal, the same computation is submitted and run: the worker
    finds the result still in place and completes on it. gc must not then delete it."""
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings
    from ndif_jobs.store.housekeeping import GcOutcome, detach, plan_gc, remove_unneeded

    key = ids["act"]["key"]
    service = Service(Settings())
    try:
        plan = plan_gc(service, None, 0)
        assert key in [item.key for item in plan.remove]
        doomed = detach(service, [key])
        assert doomed == [key] and show(env, ids["act"]["id"])["result_key"] is None
        rerun = submit(env, "activations", *ACT)
        assert rerun["state"] == "queued"
        run_cli("worker", "--until-empty", env=env, check=True)
        assert show(env, rerun["id"])["result_key"] == key
        outcome = GcOutcome()
        remove_unneeded(service, doomed, outcome)
        assert (outcome.removed, outcome.failed) == (0, [])
    finally:
        dispose_engines()
    assert folder(home, key).is_dir() and not list((home / "results").glob(".trash-*"))
    values = json.loads(run_cli("results", rerun["id"], "--json", "--verify", env=env, check=True).stdout)["values"]
    assert values["top_tokens"][0] == " Paris"


def test_gc_dry_run_alone_lists_what_the_defaults_remove_naming_jobs_and_tags(env, home, ids) -> None:  # type: ignore[no-untyped-def]
    act, big = ids["act"], ids["big"]
    # `big` is queued again and then cancelled: no job points at its result any more.
    run_cli("retry", big["id"], env=env, check=True)
    run_cli("cancel", big["id"], env=env, check=True)
    dry = run_cli("gc", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert big["key"][:12] in dry.stdout and "no job points at it" in dry.stdout
    assert act["key"][:12] not in dry.stdout  # a finished job's result stays unless asked
    assert "would remove 1 results" in dry.stdout
    by_age = run_cli("gc", "--dry-run", "--older-than", "0", env=env, check=True).stdout
    line = next(line for line in by_age.splitlines() if act["key"][:12] in line)
    assert act["id"] in line and "activations" in line and "[paper]" in line
    doc = json.loads(run_cli("gc", "--dry-run", "--older-than", "0", "--json", env=env, check=True).stdout)
    listed = {r["key"]: r["jobs"] for r in doc["results"]}
    assert listed[big["key"]] == []
    assert [(j["id"], j["tags"]) for j in listed[act["key"]]] == [(act["id"], ["paper"])]
    assert folder(home, act["key"]).exists() and folder(home, big["key"]).exists()  # a dry run
    removed = json.loads(run_cli("gc", "--json", env=env, check=True).stdout)
    assert removed["keys"] == [big["key"]] and not folder(home, big["key"]).exists()
    assert folder(home, act["key"]).exists()


def test_submit_does_not_serve_a_result_missing_from_disk_as_cached(env, home, ids) -> None:  # type: ignore[no-untyped-def]
    import ndif_jobs
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.settings import Settings

    act = ids["act"]
    shutil.rmtree(folder(home, act["key"]))  # deleted by hand, or lost with a disk
    try:
        with pytest.raises(ndif_jobs.OfflineMiss):
            ndif_jobs.run("activations", prompt="The capital of France is", layers=[0, 15, 29], offline=True,
                          settings=Settings())
    finally:
        dispose_engines()
    again = submit(env, "activations", *ACT)
    assert again["state"] == "queued" and again["id"] != act["id"]
    old = show(env, act["id"])
    assert old["result_key"] is None and old["error"] == "result missing from the store"
    assert run_cli("verify", env=env).returncode == 0  # nothing points at a missing result any more


# -- every value under a checksum ---------------------------------------------------------------


def edit_manifest(home: Path, key: str, change) -> None:  # type: ignore[no-untyped-def]
    path = folder(home, key) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=1))


@pytest.mark.parametrize("edit", ["string", "scalar", "stamp"])
def test_a_hand_edited_manifest_value_is_never_served(env, home, ids, edit) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.errors import ResultCorrupt
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings

    job = ids["act"] if edit == "string" else ids["big"]
    if edit == "string":
        edit_manifest(home, job["key"], lambda m: m["values"]["top_tokens"].__setitem__(0, " Berlin"))
    elif edit == "scalar":
        edit_manifest(home, job["key"], lambda m: m["values"].__setitem__("scale", 0.75))
    else:  # a stamp that would make a changed tensor file look untouched
        edit_manifest(home, job["key"], lambda m: m["files"]["tensors.safetensors"]["stat"].__setitem__("ino", 1))
    proc = run_cli("results", job["id"], env=env)
    assert proc.returncode == 1 and "manifest.json does not match its checksum" in proc.stderr, proc.stdout
    report = run_cli("verify", "--json", env=env)
    assert report.returncode == 1
    problems = json.loads(report.stdout)["problems"]
    assert [(p["problem"], p["jobs"]) for p in problems] == [("corrupt", [job["id"]])]
    if edit == "string":
        assert run_cli("export", job["id"], "-f", "json", "-o", str(home.parent), env=env).returncode == 1
    with pytest.raises(ResultCorrupt, match="does not match its checksum"):
        Service(Settings()).load_result(job["id"], verify=True)


def test_an_older_manifest_without_a_checksum_is_read_and_reported(env, home, ids) -> None:  # type: ignore[no-untyped-def]
    """Format 1 (before values were checksummed): its tensors are checked, and `verify` says that
    only they were; running the job again stores it sealed."""
    act, big = ids["act"], ids["big"]

    def to_format_1(m: dict) -> None:
        del m["manifest_sha256"]
        m["format"] = 1

    big_manifest = folder(home, big["key"]) / "manifest.json"
    sealed = big_manifest.read_text()
    edit_manifest(home, big["key"], lambda m: m.__setitem__("format", 1))  # relabelled, checksum kept
    assert "does not match its checksum" in run_cli("results", big["id"], env=env).stderr
    big_manifest.write_text(sealed)
    edit_manifest(home, act["key"], to_format_1)
    shown = json.loads(run_cli("results", act["id"], "--json", "--verify", env=env, check=True).stdout)
    assert shown["values"]["top_tokens"][0] == " Paris"
    report = run_cli("verify", "--json", env=env)
    assert report.returncode == 0, report.stdout
    doc = json.loads(report.stdout)
    assert doc["problems"] == [] and doc["ok"] == 1 and doc["unsealed"] == [{"key": act["key"], "jobs": [act["id"]]}]
    text = run_cli("verify", env=env).stdout
    assert "only their tensors checked" in text and f"ndif-jobs retry {act['id']}" in text
    exported = run_cli("export", act["id"], "-f", "json", "-o", str(home.parent / "act.json"), env=env, check=True)
    assert "only its tensors were checked" in exported.stderr
    tensors = folder(home, act["key"]) / "tensors.safetensors"  # its tensors are still checked
    raw = tensors.read_bytes()
    tensors.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert "does not match its checksum" in run_cli("results", act["id"], "--verify", env=env).stderr
    tensors.write_bytes(raw)
    # Running it again replaces it with a sealed result.
    run_cli("retry", act["id"], env=env, check=True)
    run_cli("worker", "--until-empty", env=env, check=True)
    manifest = json.loads((folder(home, act["key"]) / "manifest.json").read_text())
    assert manifest["format"] == 2 and "manifest_sha256" in manifest
    doc = json.loads(run_cli("verify", "--json", env=env, check=True).stdout)
    assert (doc["ok"], doc["unsealed"], doc["problems"]) == (2, [], [])


# -- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors", "json"])
def test_export_never_writes_through_a_planted_name_and_is_owner_only(env, home, ids, tmp_path, fmt) -> None:  # type: ignore[no-untyped-def]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    out = out_dir / f"act.{fmt}"
    planted = out_dir / f".act.{fmt}.tmp"  # the name a predictable writer would use
    planted.symlink_to(victim)
    old_umask = os.umask(0o022)
    try:
        run_cli("export", ids["act"]["id"], "-f", fmt, "-o", str(out), env=env, check=True)
    finally:
        os.umask(old_umask)
    assert victim.read_text() == "precious"
    st = os.lstat(out)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([out.name, planted.name])
    if fmt == "npz":
        assert np.load(out)["layers"].tolist() == [0, 15, 29]
    elif fmt == "pt":
        assert torch.load(out, weights_only=False)["values"]["top_tokens"][0] == " Paris"  # our own export
    elif fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        assert load_file(out)["layers"].tolist() == [0, 15, 29]
        with safe_open(out, "pt") as f:
            assert json.loads(f.metadata()["ndif_jobs"])["job"] == ids["act"]["id"]
    else:
        assert json.loads(out.read_text())["values"]["top_tokens"][0] == " Paris"


def test_export_over_an_existing_file_keeps_its_mode(env, ids, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "shared.npz"
    out.write_bytes(b"an earlier export")
    out.chmod(0o644)
    run_cli("export", ids["act"]["id"], "-f", "npz", "-o", str(out), env=env, check=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and np.load(out)["layers"].tolist() == [0, 15, 29]


def test_export_that_fails_half_way_leaves_no_temporary_file(env, ids, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    limit = 1 << 20  # half the 2 MiB result: the write fails part-way with EFBIG

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "ndif_jobs", "export", ids["big"]["id"], "-f", "npz", "-o", str(out_dir / "big.npz")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot write {out_dir / 'big.npz'}: File too large")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(out_dir.iterdir()) == []
