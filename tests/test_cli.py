"""The `ndif-jobs` command end to end, as real subprocesses on a private data folder."""

from __future__ import annotations

import json

import pytest

from .conftest import REPO, run_cli

SEEDS = {
    "activations": ["-p", "prompt=The capital of France is", "-p", "layers=0:30:1".replace(":1", "")],
    "patching": ["-p", "clean_prompt=The Eiffel Tower is in the city of", "-p", "corrupted_prompt=The Colosseum is in the city of",
                 "-p", "answer= Paris", "-p", "wrong_answer= Rome", "-p", "layers=[0,8,16,24,29]"],
    "cross-prompt": ["-p", "source_prompt=The cat sat on the mat", "-p", "target_prompt=The dog ran through the park", "-p", "layer=6"],
    "steering": ["-p", "positive_prompt=I love this movie, it's wonderful", "-p", "negative_prompt=I hate this movie, it's terrible",
                 "-p", "prompt=This restaurant is", "-p", "layer=6"],
    "logit-lens": ["-p", "prompt=The quick brown fox jumps over the lazy"],
    "generate": ["-p", "prompt=The capital of France is", "-p", "max_new_tokens=5"],
}


@pytest.mark.slow
def test_submit_every_builtin_run_worker_read_results(env) -> None:  # type: ignore[no-untyped-def]
    ids = {}
    for name, args in SEEDS.items():
        proc = run_cli("submit", name, "--tag", "seed", "--json", *args, env=env, check=True)
        doc = json.loads(proc.stdout)
        assert doc["state"] == "queued"
        ids[name] = doc["id"]
    status = json.loads(run_cli("status", "--json", env=env, check=True).stdout)
    assert status["counts"]["queued"] == len(SEEDS)

    run_cli("worker", "--until-empty", env=env, check=True)

    status = json.loads(run_cli("status", "--json", env=env, check=True).stdout)
    assert status["counts"]["completed"] == len(SEEDS), status
    assert status["counts"]["queued"] == 0 and status["store_bytes"] > 0
    listed = json.loads(run_cli("list", "--tag", "seed", "--json", env=env, check=True).stdout)
    assert {j["id"] for j in listed} == set(ids.values())

    act = json.loads(run_cli("results", ids["activations"], "--json", env=env, check=True).stdout)["values"]
    assert act["top_tokens"][0] == " Paris" and len(act["norms"]) == 30
    lens = json.loads(run_cli("results", ids["logit-lens"], "--json", env=env, check=True).stdout)["values"]
    assert len(lens["top_ids"]) == 30 and len(lens["top_ids"][0]) == 5
    patch = json.loads(run_cli("results", ids["patching"], "--json", env=env, check=True).stdout)["values"]
    assert len(patch["logit_diff"]) == 5 and patch["clean_logit_diff"] > patch["corrupted_logit_diff"]
    gen = json.loads(run_cli("results", ids["generate"], "--json", env=env, check=True).stdout)["values"]
    assert gen["text"].startswith(" Paris")

    shown = json.loads(run_cli("show", ids["steering"][:6], "--json", env=env, check=True).stdout)
    assert shown["id"] == ids["steering"] and shown["state"] == "completed"
    assert shown["bundle"]["jobs"] == len(SEEDS) and shown["result_path"]
    assert shown["attempt_history"][-1]["outcome"] == "completed"

    table = run_cli("results", ids["activations"], env=env, check=True).stdout
    assert "top_tokens" in table and "float32[30]" in table
    human = run_cli("status", env=env, check=True).stdout
    assert "completed" in human and ids["generate"] in human


def test_experiment_error_fails_its_job_alone(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Patching every position of prompts of different lengths is found only when it runs.
    good = json.loads(run_cli("submit", "logit-lens", "--json", "-p", "prompt=Hello", "-p", "layers=[0]", env=env, check=True).stdout)
    bad = json.loads(run_cli("submit", "patching", "--json", "-p", "clean_prompt=Hello", "-p", "corrupted_prompt=Hello there",
                             "-p", "answer= a", "-p", "wrong_answer= b", "-p", "layers=[0]", "-p", "position=all",
                             env=env, check=True).stdout)
    proc = run_cli("worker", "--until-empty", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(run_cli("show", good["id"], "--json", env=env).stdout)["state"] == "completed"
    failed = json.loads(run_cli("show", bad["id"], "--json", env=env).stdout)
    assert failed["state"] == "failed"
    assert "position 'all' needs prompts of equal token length" in failed["error"]
    assert failed["attempts"] == 1  # an experiment's own error is not blind-retried


def test_a_prompt_longer_than_the_models_context_fails_its_job_alone(env, tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    # GPT-2's learned positions end at 128 here: past them torch would raise an opaque index error.
    long_prompt = " ".join(["word"] * 400)
    good = json.loads(run_cli("submit", "activations", "-m", str(tiny_gpt2), "--json", "-p", "prompt=Hello", env=env,
                              check=True).stdout)
    bad = json.loads(run_cli("submit", "activations", "-m", str(tiny_gpt2), "--json", "-p", f"prompt={long_prompt}",
                             env=env, check=True).stdout)
    run_cli("worker", "--until-empty", env=env, check=True)
    assert json.loads(run_cli("show", good["id"], "--json", env=env).stdout)["state"] == "completed"
    failed = json.loads(run_cli("show", bad["id"], "--json", env=env).stdout)
    assert failed["state"] == "failed" and failed["attempts"] == 1
    assert "tokens long: this model reads at most 128" in failed["error"]


def test_cancel_and_retry(env) -> None:  # type: ignore[no-untyped-def]
    job = json.loads(run_cli("submit", "activations", "--json", "-p", "prompt=Hi", "-p", "layers=[0]", env=env, check=True).stdout)
    assert run_cli("cancel", job["id"], env=env, check=True).stdout.split() == [job["id"], "cancelled"]
    assert json.loads(run_cli("show", job["id"], "--json", env=env).stdout)["state"] == "cancelled"
    assert run_cli("retry", job["id"], env=env, check=True).stdout.split() == [job["id"], "queued"]
    assert json.loads(run_cli("status", "--json", env=env).stdout)["counts"]["queued"] == 1


def test_experiments_lists_builtins_with_params(env) -> None:  # type: ignore[no-untyped-def]
    docs = json.loads(run_cli("experiments", "--json", env=env, check=True).stdout)
    names = {d["name"] for d in docs}
    assert {"activations", "patching", "cross-prompt", "steering", "logit-lens", "generate"} <= names
    patching = next(d for d in docs if d["name"] == "patching")
    assert {p["name"] for p in patching["params"]} >= {"clean_prompt", "corrupted_prompt", "answer", "wrong_answer", "layers", "position"}


def test_status_list_show_do_not_import_torch(env) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    job = json.loads(run_cli("submit", "activations", "--json", "-p", "prompt=Hi", env=env, check=True).stdout)
    for args in (["status"], ["list", "--state", "failed"], ["show", job["id"]]):
        code = (
            f"import sys; sys.argv=['ndif-jobs', *{args!r}]\n"
            "from ndif_jobs.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'nnsight', 'transformers', 'alembic') if m in sys.modules]\n"
            "print('HEAVY', heavy)"
        )
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert "HEAVY []" in out, (args, out[-300:])


def test_user_experiment_module(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "my_probe.py").write_text(
        "from ndif_jobs import experiment, Params\n"
        "from ndif_jobs.experiments.access import blocks, hidden\n"
        "class P(Params):\n    prompt: str\n    layer: int = 0\n"
        "@experiment('mean-hidden', params=P)\n"
        "def mean_hidden(model, p):\n"
        "    with model.trace(p['prompt']):\n"
        "        h = hidden(blocks(model)[p['layer']].output).mean(dim=1).save()\n"
        "    return {'mean': h[0], 'width': int(h.shape[-1])}\n"
    )
    env = {**env, "NDIF_JOBS_TEST_CWD": str(tmp_path), "PYTHONPATH": str(REPO)}
    job = json.loads(run_cli("--import", "./my_probe.py", "submit", "mean-hidden", "--json", "-p", "prompt=Hello there", env=env, check=True).stdout)
    run_cli("--import", "./my_probe.py", "worker", "--until-empty", env=env, check=True)
    values = json.loads(run_cli("--import", "./my_probe.py", "results", job["id"], "--json", env=env, check=True).stdout)["values"]
    assert values["width"] == 576 and len(values["mean"]) == 576
    env2 = {**env, "NDIF_JOBS_IMPORTS": f"{tmp_path}:my_probe"}
    assert "mean-hidden" in run_cli("experiments", env=env2, check=True).stdout


def test_try_an_ndif_queue_locally_first(env) -> None:  # type: ignore[no-untyped-def]
    env = {**env, "NDIF_JOBS_LOCAL_STANDINS": '{"example-org/huge-model-70b": "smollm2-135m"}'}
    remote = json.loads(run_cli("submit", "logit-lens", "-b", "ndif", "-m", "example-org/huge-model-70b", "--json",
                                "-p", "prompt=The capital of France is", "-p", "layers=[29]", env=env, check=True).stdout)
    before = json.loads(run_cli("show", remote["id"], "--json", env=env, check=True).stdout)
    assert before["backend"] == "ndif" and before["model"] == "example-org/huge-model-70b"
    run_cli("worker", "--backend", "local", "--until-empty", env=env, check=True)
    after = json.loads(run_cli("show", remote["id"], "--json", env=env, check=True).stdout)
    assert after["state"] == "completed" and after["backend"] == "local" and after["model"] == "smollm2-135m"
    assert after["key"] != before["key"]  # a stand-in's result never poses as the remote model's
    top = json.loads(run_cli("results", remote["id"], "--json", env=env, check=True).stdout)["values"]["top_tokens"]
    assert top[0][0] == " Paris"
    # Submitting for the local backend maps the remote model to its stand-in at once: the same
    # computation, so it is served from the store.
    local = json.loads(run_cli("submit", "logit-lens", "-b", "local", "-m", "example-org/huge-model-70b", "--json",
                               "-p", "prompt=The capital of France is", "-p", "layers=[29]", env=env, check=True).stdout)
    assert local["state"] == "cached"


def test_models_json_stays_one_json_document_while_ndif_is_retried(env) -> None:  # type: ignore[no-untyped-def]
    """The retries of an unreachable NDIF are logged on stderr: stdout is only the answer."""
    env = {**env, "NDIF_HOST": "http://127.0.0.1:9", "NDIF_JOBS_ALLOW_HTTP_LOOPBACK": "1",
           "NDIF_JOBS_HTTP_RETRY_MAX_S": "1"}
    proc = run_cli("models", "--json", env=env, check=True)
    doc = json.loads(proc.stdout)
    assert doc["ndif"] == [] and "cannot reach NDIF" in doc["ndif_error"]
    assert "retrying NDIF" in proc.stderr


def test_results_as_json_and_a_json_export_start_without_torch(env, service, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Printing a result's values needs no torch (seconds of a command's start): `results --json`
    and `export -f json` read the result as numpy arrays and print what its tensors hold."""
    import torch

    from ndif_jobs.db.queue import NewJob
    from ndif_jobs.store.codec import to_jsonable

    key = "cd" * 32
    (job,) = service.queue.enqueue([NewJob(key=key, experiment="activations", model="smollm2-135m",
                                           model_key="test-model", backend="local", params={})])
    (row,) = service.queue.claim("w", 1, 60.0)
    service.store.put(key, {"acts": torch.randn(2, 3).to(torch.bfloat16), "norm": torch.tensor(float("nan")),
                            "ids": torch.arange(4), "tokens": [" Paris"]})
    service.queue.complete("w", [(row.id, key, 1)])
    traced = {**env, "PYTHONPROFILEIMPORTTIME": "1"}  # each import on stderr, as -X importtime

    shown = run_cli("results", job.id, "--json", env=traced, check=True)
    exported = run_cli("export", job.id, "-f", "json", "-o", str(tmp_path / "r.json"), env=traced, check=True)

    for proc in (shown, exported):
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "numpy" in imported and "torch" not in imported
    expected = to_jsonable(service.load_result(job.id).to_dict())  # torch tensors, through the Python API
    assert expected["norm"] is None and len(expected["acts"]) == 2
    assert json.loads(shown.stdout)["values"] == expected
    assert json.loads((tmp_path / "r.json").read_text())["values"] == expected


def test_the_results_table_of_a_builtin_starts_without_torch_and_shows_what_was_stored(env, service) -> None:  # type: ignore[no-untyped-def]
    """`results` as a table reads a built-in's values as numpy arrays: it starts without torch,
    names each tensor's dtype as stored (bfloat16, not the float32 numpy widens it to), and its
    summary says what the summary says of torch tensors."""
    import torch

    from ndif_jobs.db.queue import NewJob
    from ndif_jobs.summaries import summarize

    key = "ef" * 32
    (job,) = service.queue.enqueue([NewJob(key=key, experiment="steering", model="smollm2-135m",
                                           model_key="test-model", backend="local", params={})])
    (row,) = service.queue.claim("w", 1, 60.0)
    torch.manual_seed(0)
    service.store.put(key, {
        "top_tokens": [" good", " bad", " fine"], "top_probs": torch.tensor([0.5, 0.25, 0.125]),
        "steered_top_tokens": [" great", " good", " nice"], "steered_top_probs": torch.tensor([0.625, 0.25, 0.0625]),
        "steering_vector": torch.randn(576).to(torch.bfloat16), "layer": 6,
    })
    service.queue.complete("w", [(row.id, key, 1)])

    proc = run_cli("results", job.id, env={**env, "PYTHONPROFILEIMPORTTIME": "1", "COLUMNS": "200"}, check=True)

    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "numpy" in imported and "torch" not in imported
    assert "bfloat16[576]" in proc.stdout and "float32[3] [0.5, 0.25, 0.125]" in proc.stdout
    with_torch = summarize("steering", service.load_result(job.id))
    assert len(with_torch) == 3 and with_torch[2].startswith("vector norm ")
    for line in with_torch:
        assert line in proc.stdout
