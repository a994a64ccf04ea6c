"""Pre-flight at submit: what cannot run is refused before anything is queued (issue 14, items
6 and 7), for users' experiments through typed parameters as for the built-ins; parameters are
keyed in one canonical form; names typed wrong get a suggestion."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_home_with(root: Path, repo: str, source: Path, files: tuple[str, ...]) -> Path:
    """A Hugging Face cache folder (HF_HOME) holding `files` of `repo`, in the hub's layout."""
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    for name in files:
        shutil.copy(source / name, snapshot / name)
    return root


def one_line(proc) -> str:  # type: ignore[no-untyped-def]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def queued(env: dict[str, str]) -> list[dict]:
    return json.loads(run_cli("list", "--json", env=env, check=True).stdout)


# -- item 6: an NDIF job its worker could not build is never queued ---------------------------------


def test_an_ndif_job_whose_model_files_cannot_be_had_is_refused_with_what_to_do(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {**env, "HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("submit", "logit-lens", "-b", "ndif", "-m", "meta-llama/Llama-3.1-8B", "-p", "prompt=Hi", env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_line(proc)
    assert "cannot queue meta-llama/Llama-3.1-8B for NDIF" in line and "HF_HUB_OFFLINE is set" in line
    assert "hf download meta-llama/Llama-3.1-8B --include '*.json' --include 'tokenizer*'" in line and "HF_HOME" in line
    assert queued(env) == []


def test_an_ndif_job_whose_model_files_are_cached_is_queued_and_checked(env, tmp_path, embedded_folder) -> None:  # type: ignore[no-untyped-def]
    hf_home = hf_home_with(tmp_path / "hf", "example-org/small-model", embedded_folder,
                           ("config.json", "tokenizer.json", "tokenizer_config.json"))
    env = {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    ok = run_cli("submit", "logit-lens", "--json", "-b", "ndif", "-m", "example-org/small-model", "-p", "prompt=Hi", env=env)
    assert ok.returncode == 0, ok.stderr
    assert [j["id"] for j in queued(env)] == [json.loads(ok.stdout)["id"]]
    # The cached config is what pre-flight checks against: 30 layers.
    bad = run_cli("submit", "logit-lens", "-b", "ndif", "-m", "example-org/small-model", "-p", "prompt=Hi",
                  "-p", "layers=[40]", env=env)
    assert bad.returncode == 2 and "layer 40 is out of range: the model has 30 layers" in one_line(bad)


def test_offline_miss_of_an_ndif_job_names_the_backend(env) -> None:  # type: ignore[no-untyped-def]
    # Replay never needs the model's files: a miss says how to queue it, on NDIF.
    from ndif_jobs import OfflineMiss, api
    from ndif_jobs.settings import Settings

    with pytest.raises(OfflineMiss) as miss:
        api.run("logit-lens", "example-org/not-cached-here", backend="ndif", offline=True, settings=Settings(),
                prompt="Hi there", layers=[1, 2])
    command = str(miss.value).split("queue it with: ")[1]
    assert command == ("ndif-jobs submit logit-lens --model example-org/not-cached-here --backend ndif "
                       "-p 'prompt=Hi there' -p 'layers=[1, 2]' -p top_k=5 -p position=-1")


# -- item 7: own experiments declare what a parameter is, and get the built-ins' checks -------------

PROBE = '''
from ndif_jobs import Layer, Layers, Params, Position, Prompt, experiment
from ndif_jobs.experiments.access import blocks, hidden


class ProbeParams(Params):
    prompt: Prompt
    layer: Layer = 0
    layers: Layers = None
    position: Position = -1


@experiment("{name}", params=ProbeParams)
def probe(model, p):
    with model.trace(p["prompt"]):
        h = hidden(blocks(model)[p["layer"]].output)[0, p["position"]].save()
    return {{"h": h}}
'''


@pytest.fixture
def probe_env(env, tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    (tmp_path / "typed_probe.py").write_text(PROBE.format(name="typed-probe"))
    return {**env, "PYTHONPATH": f"{tmp_path}:{REPO}", "NDIF_JOBS_IMPORTS": "typed_probe"}


def test_an_own_experiments_layer_out_of_range_is_refused_at_submit(probe_env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("submit", "typed-probe", "-p", "prompt=Hello there", "-p", "layer=40", env=probe_env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert one_line(proc) == "error: typed-probe: layer 40 is out of range: the model has 30 layers (0..29)"
    proc = run_cli("submit", "typed-probe", "-p", "prompt=Hello there", "-p", "position=7", env=probe_env)
    assert proc.returncode == 2 and "position 7 is outside prompt, which is 2 tokens (positions -2..1)" in one_line(proc)
    assert queued(probe_env) == []


def test_an_own_experiments_typed_params_arrive_resolved(probe_env) -> None:  # type: ignore[no-untyped-def]
    job = json.loads(run_cli("submit", "typed-probe", "--json", "-p", "prompt=Hello there", "-p", "layer=-1",
                             "-p", "layers=[5,-1,5,2]", env=probe_env, check=True).stdout)
    shown = json.loads(run_cli("show", job["id"], "--json", env=probe_env, check=True).stdout)
    assert shown["params"] == {"prompt": "Hello there", "layer": 29, "layers": [2, 5, 29], "position": -1}
    described = json.loads(run_cli("experiments", "--json", env=probe_env, check=True).stdout)
    types = {p["name"]: p["type"] for d in described if d["name"] == "typed-probe" for p in d["params"]}
    assert types == {"prompt": "Prompt", "layer": "Layer", "layers": "Layers", "position": "Position"}


def test_typed_params_are_checked_in_process_without_torch() -> None:
    import subprocess

    code = textwrap.dedent('''
        import sys
        from ndif_jobs import Layer, Pass, Params, Window, experiment
        from ndif_jobs.errors import InvalidParams
        from ndif_jobs.experiments import Experiment
        from ndif_jobs.model_refs import resolve_model
        from ndif_jobs.preflight import check
        from pathlib import Path

        class P(Params):
            layer: Layer = 0
        exp = Experiment("inline", P, "x:y")
        ref = resolve_model("smollm2-135m")
        print(check(exp, exp.validate({"layer": -2}), ref, Path("/nonexistent"))[0])
        try:
            check(exp, exp.validate({"layer": 30}), ref, Path("/nonexistent"))
        except InvalidParams as exc:
            print(exc)
        print("torch" in sys.modules)
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.splitlines() == ["{'layer': 28}", "inline: layer 30 is out of range: the model has 30 layers (0..29)", "False"]


# -- one computation, one key ----------------------------------------------------------------------


def test_every_spelling_of_all_layers_is_one_key(service) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.errors import InvalidParams
    from ndif_jobs.service import Submission

    def key(**params) -> str:  # type: ignore[no-untyped-def]
        return service.prepare(Submission("logit-lens", {"prompt": "Hi", **params})).new_job.key

    default = key()
    assert key(layers="0:30") == key(layers=list(range(30))) == key(layers="-30:0") == default
    assert key(layers=[29, 0]) == key(layers=[0, -1, 0])
    assert key(layers="0:29") != default
    with pytest.raises(InvalidParams, match="layers names no layer"):
        key(layers="")
    assert service.prepare(Submission("logit-lens", {"prompt": "Hi", "layers": "0:30"})).new_job.params["layers"] is None


# -- names typed wrong -----------------------------------------------------------------------------


def test_unknown_names_get_a_suggestion_and_where_own_experiments_come_from(env) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import experiments
    from ndif_jobs.errors import InvalidParams, UnknownExperiment

    with pytest.raises(UnknownExperiment) as unknown:
        experiments.get("logit_lens")
    assert "did you mean 'logit-lens'?" in str(unknown.value)
    assert "--import MODULE or NDIF_JOBS_IMPORTS=MODULE" in str(unknown.value)
    with pytest.raises(InvalidParams, match=r"top-k: unknown parameter \(did you mean 'top_k'\?\)"):
        experiments.get("activations").validate({"prompt": "x", "top-k": 3})
    with pytest.raises(InvalidParams, match=r"steering\.layr: unknown parameter \(did you mean 'layer'\?\)"):
        experiments.get("generate").validate({"prompt": "x", "steering": {"positive_prompt": "a", "negative_prompt": "b",
                                                                         "layer": 1, "layr": 2}})
    proc = run_cli("submit", "patchin", "-p", "prompt=x", env=env)
    assert proc.returncode == 2 and "did you mean 'patching'?" in one_line(proc) and "--import" in one_line(proc)
