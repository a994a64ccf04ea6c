"""Patching that cannot measure what was meant is refused or named at submit, and the result
says which tokens it compared (issue 14, item 3), and its summary names where the effect sits."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import run_cli

CLEAN = "The Eiffel Tower is in the city of"
CORRUPTED = "The Colosseum is in the city of"


def patching_args(answer: str, wrong: str, *extra: str) -> list[str]:
    return ["submit", "patching", "--json", "-p", f"clean_prompt={CLEAN}", "-p", f"corrupted_prompt={CORRUPTED}",
            "-p", f"answer={answer}", "-p", f"wrong_answer={wrong}", "-p", "layers=[0,29]", *extra]


def jobs(env: dict[str, str]) -> list[dict]:
    return json.loads(run_cli("list", "--json", env=env, check=True).stdout)


def test_answers_sharing_their_first_token_are_refused_at_submit(env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(*patching_args(" New York", " New Jersey"), env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "begin with the same token ' New'" in line and "' New York'" in line and "' New Jersey'" in line
    assert jobs(env) == []


def test_an_answer_without_its_leading_space_warns_and_is_queued(env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(*patching_args("Paris", " Rome"), env=env)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("warning: patching: answer 'Paris' has no leading space")
    assert "'Paris', not ' Paris'" in line
    assert [j["id"] for j in jobs(env)] == [json.loads(proc.stdout)["id"]]


def test_a_multi_token_answer_warns_that_only_its_first_token_is_compared(env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(*patching_args(" New York", " Rome"), env=env)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "answer ' New York' is 2 tokens, so only its first, ' New', is compared" in line
    assert "wrong_answer" not in line  # " Rome" is one token with its space: nothing to say


def test_warnings_of_a_params_file_are_said_once_with_their_count(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    params = tmp_path / "sweep.json"
    params.write_text(json.dumps([{"clean_prompt": f"{CLEAN} {i}", "corrupted_prompt": CORRUPTED, "answer": "Paris",
                                   "wrong_answer": " Rome", "layers": [0]} for i in range(3)]))
    proc = run_cli("submit", "patching", "--params-file", str(params), env=env)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.endswith("(3 jobs)") and "answer 'Paris'" in line
    assert len(jobs(env)) == 3


@pytest.mark.slow
def test_the_result_records_which_tokens_were_compared(env, embedded_folder) -> None:  # type: ignore[no-untyped-def]
    job = json.loads(run_cli(*patching_args("Paris", " Rome"), env=env, check=True).stdout)
    run_cli("worker", "--until-empty", env=env, check=True)
    values = json.loads(run_cli("results", job["id"], "--json", env=env, check=True).stdout)["values"]
    assert values["answer_token"] == "Paris" and values["wrong_answer_token"] == " Rome"
    assert values["answer_id"] != values["wrong_answer_id"]
    shown = run_cli("results", job["id"], env=env, check=True).stdout
    assert "logit diff ('Paris' vs ' Rome')" in shown


@pytest.mark.slow
def test_the_run_refuses_answers_sharing_a_first_token(embedded) -> None:  # type: ignore[no-untyped-def]
    # Submit refuses these; a job queued where no tokenizer was at hand fails with the reason, not nan.
    from ndif_jobs.experiments import builtin
    from ndif_jobs.experiments.runtime import Failure, run_jobs

    params = {"clean_prompt": CLEAN, "corrupted_prompt": CORRUPTED, "answer": " New York", "wrong_answer": " New Jersey",
              "layers": [0], "position": -1}
    (out,) = run_jobs(embedded, [("j", builtin.patching, params)]).values()
    assert isinstance(out, Failure)
    assert "begin with the same token ' New'" in out.message


def summary(clean: float, corrupted: float, diffs: list[float], layers: list[int]) -> list[str]:
    from ndif_jobs.summaries import summarize

    return summarize("patching", {"layers": torch.tensor(layers), "logit_diff": torch.tensor(diffs),
                                  "clean_logit_diff": clean, "corrupted_logit_diff": corrupted,
                                  "answer_token": " Paris", "wrong_answer_token": " Rome"})


def test_the_summary_names_the_first_layer_past_half_of_the_gap() -> None:
    # The last layer at the last position restores everything, always: it says nothing.
    lines = summary(4.0, -2.0, [-1.9, 0.5, 1.4, 3.1, 4.0], [0, 8, 16, 24, 29])
    assert lines[0] == "logit diff (' Paris' vs ' Rome'): clean 4.000, corrupted -2.000"
    assert lines[1] == "first layer past half of the gap: layer 16, 1.400 (57%)"


def test_the_summary_says_when_no_layer_restores_half_or_there_is_no_gap() -> None:
    assert summary(4.0, -2.0, [-1.9, 0.5], [0, 8])[1] == "no patched layer restores half of the gap (most: layer 8, 42%)"
    assert summary(1.0, 1.0, [1.0, 1.0], [0, 8])[1].startswith("clean and corrupted runs give the same difference")
