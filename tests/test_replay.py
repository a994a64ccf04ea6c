"""The morning after: dedup, offline replay, verify, export and gc against a real store."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from .conftest import REPO, run_cli

ACT = ["-p", "prompt=The capital of France is", "-p", "layers=[0,15,29]"]


def submit(env, *args) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(run_cli("submit", *args, "--json", env=env, check=True).stdout)


@pytest.fixture
def done(env):  # type: ignore[no-untyped-def]
    """One completed activations job."""
    job = submit(env, "activations", *ACT)
    run_cli("worker", "--until-empty", env=env, check=True)
    return job


def test_same_experiment_runs_once_changes_run_again(env, done, tmp_path) -> None:  # type: ignore[no-untyped-def]
    again = submit(env, "activations", *ACT)
    assert again["state"] == "cached" and again["id"] != done["id"]
    shown = json.loads(run_cli("show", again["id"], "--json", env=env, check=True).stdout)
    first = json.loads(run_cli("show", done["id"], "--json", env=env, check=True).stdout)
    assert shown["result_key"] == first["result_key"] == first["key"]
    assert json.loads(run_cli("results", again["id"], "--json", env=env, check=True).stdout)["values"]["top_tokens"][0] == " Paris"

    changed = submit(env, "activations", "-p", "prompt=The capital of France is", "-p", "layers=[0,15]")
    assert changed["state"] == "queued"
    joined = submit(env, "activations", "-p", "prompt=The capital of France is", "-p", "layers=[0,15]")
    assert joined == {"id": changed["id"], "state": "queued", "joined": True}
    forced = submit(env, "activations", *ACT, "--force")
    assert forced["state"] == "queued"
    # Nothing ran for the cached one: the worker only sees the two queued jobs.
    proc = run_cli("worker", "--until-empty", env=env, check=True)
    assert sum('"job completed"' in line for line in proc.stderr.splitlines()) == 2


def test_a_changed_experiment_source_runs_again(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = tmp_path / "probe_v.py"
    body = textwrap.dedent('''
        from ndif_jobs import experiment, Params
        class P(Params):
            prompt: str
        @experiment("probe-v", params=P)
        def probe(model, p):
            with model.trace(p["prompt"]):
                out = model.output.logits[0, -1].argmax().save()
            return {"top": int(out) + OFFSET}
    ''')
    env = {**env, "NDIF_JOBS_IMPORTS": "probe_v", "PYTHONPATH": str(tmp_path)}
    module.write_text(body.replace("OFFSET", "0"))
    first = submit(env, "probe-v", "-p", "prompt=Hello")
    run_cli("worker", "--until-empty", env=env, check=True)
    assert submit(env, "probe-v", "-p", "prompt=Hello")["state"] == "cached"
    module.write_text(body.replace("OFFSET", "1"))
    edited = submit(env, "probe-v", "-p", "prompt=Hello")
    assert edited["state"] == "queued" and edited["id"] != first["id"]
    run_cli("worker", "--until-empty", env=env, check=True)
    a = json.loads(run_cli("results", first["id"], "--json", env=env, check=True).stdout)["values"]["top"]
    b = json.loads(run_cli("results", edited["id"], "--json", env=env, check=True).stdout)["values"]["top"]
    assert b == a + 1


ANALYSIS = '''
import json, sys
import ndif_jobs
result = ndif_jobs.run("activations", prompt="The capital of France is", layers=[0, 15, 29])
print(json.dumps({"norms": result["norms"].tolist(), "top": result["top_tokens"], "probs": result["top_probs"].tolist()}))
try:
    ndif_jobs.run("logit-lens", prompt="Never ran this", top_k=3)
except ndif_jobs.OfflineMiss as exc:
    print("MISS", exc)
blocked = [m for m in ("transformers", "nnsight", "huggingface_hub") if m in sys.modules]
print("LOADED", blocked)
'''


def test_offline_replay_with_no_network_and_no_model(env, done, tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("transformers", "nnsight", "huggingface_hub", "httpx"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is forbidden in the offline test')\n")
    script = tmp_path / "analysis.py"
    script.write_text(ANALYSIS)
    offline_env = {**env, "NDIF_JOBS_OFFLINE": "1", "NDIF_HOST": "http://127.0.0.1:9", "PYTHONPATH": str(blocker),
                   "HF_ENDPOINT": "http://127.0.0.1:9"}
    runs = [subprocess.run([sys.executable, str(script)], env=offline_env, capture_output=True, text=True, cwd=REPO)
            for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout  # identical numbers, twice
    first_line = json.loads(runs[0].stdout.splitlines()[0])
    assert first_line["top"][0] == " Paris" and len(first_line["norms"]) == 3
    miss = next(line for line in runs[0].stdout.splitlines() if line.startswith("MISS"))
    assert "logit-lens" in miss and "Never ran this" in miss and "ndif-jobs submit logit-lens" in miss
    assert "LOADED []" in runs[0].stdout


def test_python_run_waits_and_then_serves_from_the_store(env) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import api
    from ndif_jobs.settings import Settings

    settings = Settings()
    result = api.run("logit-lens", prompt="Hello", layers=[0, 29], top_k=2, wait=True, settings=settings)
    assert result["top_ids"].shape == (2, 2)
    again = api.run("logit-lens", prompt="Hello", layers=[0, 29], top_k=2, settings=settings)
    assert again.job["id"] == result.job["id"] and torch.equal(again["top_ids"], result["top_ids"])
    queued = api.run("logit-lens", prompt="Hello again", layers=[0], top_k=2, settings=settings)
    assert queued.state == "queued"


def test_flipped_byte_caught_by_results_and_verify(env, done, home) -> None:  # type: ignore[no-untyped-def]
    assert run_cli("verify", env=env).returncode == 0
    (tensor_file,) = list((home / "results").rglob("tensors.safetensors"))
    raw = bytearray(tensor_file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    tensor_file.write_bytes(bytes(raw))
    proc = run_cli("results", done["id"], env=env)
    assert proc.returncode == 1 and "does not match its checksum" in proc.stderr
    report = run_cli("verify", "--json", env=env)
    assert report.returncode == 1
    problems = json.loads(report.stdout)["problems"]
    assert problems[0]["problem"] == "corrupt" and problems[0]["jobs"] == [done["id"]]
    assert done["id"] in run_cli("verify", env=env).stdout  # names the job and the retry command
    run_cli("retry", done["id"], env=env, check=True)
    run_cli("worker", "--until-empty", env=env, check=True)
    assert run_cli("verify", env=env).returncode == 0  # the re-run is stored under a fresh folder


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors", "json"])
def test_export_formats(env, done, tmp_path, fmt) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / f"act.{fmt}"
    run_cli("export", done["id"], "--format", fmt, "--out", str(out), env=env, check=True)
    original = json.loads(run_cli("results", done["id"], "--json", env=env, check=True).stdout)["values"]
    if fmt == "json":
        assert json.loads(out.read_text())["values"]["norms"] == original["norms"]
    elif fmt == "npz":
        data = np.load(out)
        assert np.allclose(data["norms"], original["norms"])
        assert json.loads(str(data["__ndif_jobs__"]))["experiment"] == "activations"
    elif fmt == "pt":
        data = torch.load(out, weights_only=False)  # our own export, written by this test
        assert data["values"]["top_tokens"] == original["top_tokens"]
    else:
        from safetensors.torch import load_file

        assert torch.allclose(load_file(out)["norms"], torch.tensor(original["norms"]))


def test_gc_removes_by_size_but_never_what_the_queue_needs(env, done, home) -> None:  # type: ignore[no-untyped-def]
    other = submit(env, "activations", "-p", "prompt=Another prompt", "-p", "layers=[0]")
    run_cli("worker", "--until-empty", env=env, check=True)
    retried = run_cli("retry", other["id"], env=env, check=True)  # `other` is back in the queue: its result is needed
    assert "queued" in retried.stdout
    dry = json.loads(run_cli("gc", "--max-size", "0", "--dry-run", "--json", env=env, check=True).stdout)
    done_key = json.loads(run_cli("show", done["id"], "--json", env=env, check=True).stdout)["key"]
    assert (dry["removed"], dry["kept_in_use"], dry["keys"]) == (1, 1, [done_key])
    assert len(list((home / "results").rglob("manifest.json"))) == 2  # dry run removed nothing
    real = json.loads(run_cli("gc", "--max-size", "0", "--json", env=env, check=True).stdout)
    assert real["freed_bytes"] > 0
    shown = json.loads(run_cli("show", done["id"], "--json", env=env, check=True).stdout)
    assert shown["result_key"] is None and "removed by gc" in shown["error"]
    # The next identical submission runs again instead of pointing at nothing.
    assert submit(env, "activations", *ACT)["state"] == "queued"
    assert run_cli("gc", "--max-size", "lots", env=env).returncode == 2
    assert run_cli("gc", env=env).returncode == 0  # no criterion: only what no job points at (nothing here)
