"""Packing a bundle's forward passes into shared traces, on a tiny model with random weights.

`run_jobs` is what both backends run: the local one on this machine, NDIF inside the request.
These tests watch how it cuts the passes into traces (`run_passes` calls) and check that the
cutting changes no number and that one job's error stays that job's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ndif_jobs.experiments import builtin, runtime
from ndif_jobs.experiments.runtime import Failure, run_jobs
from ndif_jobs.experiments.stages import Pass

PROMPTS = ["Hi", "The cat sat", "A longer prompt than the others here", "One two", "The dog ran far away"]


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> Any:
    from ndif_jobs.model_refs import load_local_model, resolve_model

    return load_local_model(resolve_model(str(tiny_llama)), tiny_llama, device="cpu")


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """The prompts of every trace `run_jobs` runs, in order (the real `run_passes` still runs)."""
    seen: list[list[str]] = []
    real = runtime.run_passes

    def watched(model: Any, passes: list[Pass], ids: list[torch.Tensor]) -> list[dict]:
        seen.append([p.prompt for p in passes])
        return real(model, passes, ids)

    monkeypatch.setattr(runtime, "run_passes", watched)
    yield seen


def activations(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "layers": None, "top_k": 3}


def test_passes_are_packed_by_length_into_traces_of_at_most_max_invokes(model: Any, traces: list[list[str]]) -> None:
    jobs = [(f"j{i}", builtin.activations, activations(p)) for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        out = run_jobs(model, jobs, max_invokes=2)
    assert [len(t) for t in traces] == [2, 2, 1]
    lengths = [runtime.tokenize(model, p).shape[-1] for t in traces for p in t]
    assert lengths == sorted(lengths)  # similar lengths share a trace: little padding
    assert not [v for v in out.values() if isinstance(v, Failure)]


def test_packing_changes_no_number(model: Any) -> None:
    jobs = [(f"j{i}", builtin.activations, activations(p)) for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        packed = run_jobs(model, jobs, max_invokes=32)
        alone = {job[0]: run_jobs(model, [job], pack=False)[job[0]] for job in jobs}
    for job_id, result in alone.items():
        torch.testing.assert_close(packed[job_id]["norms"], result["norms"], atol=1e-4, rtol=1e-4)
        assert packed[job_id]["top_ids"].tolist() == result["top_ids"].tolist()


def test_a_trace_is_cut_where_its_padded_area_would_pass_max_tokens(model: Any, traces: list[list[str]]) -> None:
    jobs = [(f"j{i}", builtin.activations, activations(p)) for i, p in enumerate(PROMPTS)]
    length = {p: runtime.tokenize(model, p).shape[-1] for p in PROMPTS}
    budget = max(length.values()) * 2
    with torch.no_grad():
        run_jobs(model, jobs, max_invokes=32, max_tokens=budget)
    assert sorted(p for t in traces for p in t) == sorted(PROMPTS)
    assert len(traces) > 1
    for trace in traces:  # each trace's prompts, left-padded to its longest, fit the budget
        assert max(length[p] for p in trace) * len(trace) <= budget


def test_without_packing_each_job_runs_its_own_trace(model: Any, traces: list[list[str]]) -> None:
    jobs = [(f"j{i}", builtin.activations, activations(p)) for i, p in enumerate(PROMPTS[:3])]
    with torch.no_grad():
        run_jobs(model, jobs, pack=False)
    assert traces == [[p] for p in PROMPTS[:3]]


def broken(model: Any, params: dict) -> Any:
    """A staged experiment whose pass fails inside the trace."""

    def body(model: Any, window: Any) -> dict:
        raise RuntimeError("broken body")

    yield [Pass(params["prompt"], body)]


def test_one_jobs_error_in_a_shared_trace_fails_that_job_alone(model: Any, traces: list[list[str]]) -> None:
    jobs = [("good1", builtin.activations, activations(PROMPTS[1])), ("bad", broken, {"prompt": PROMPTS[3]}),
            ("good2", builtin.activations, activations(PROMPTS[4]))]
    with torch.no_grad():
        out = run_jobs(model, jobs)
    assert isinstance(out["bad"], Failure) and "broken body" in out["bad"].message
    assert not isinstance(out["good1"], Failure) and not isinstance(out["good2"], Failure)
    assert len(traces[0]) == 3 and len(traces) == 4  # the shared trace, then each job alone


def test_a_prompt_that_cannot_be_read_fails_its_job_before_any_trace(model: Any, traces: list[list[str]]) -> None:
    too_long = "word " * 500  # past the tiny model's 128 positions
    jobs = [("long", builtin.activations, activations(too_long)), ("ok", builtin.activations, activations("Hi"))]
    with torch.no_grad():
        out = run_jobs(model, jobs)
    assert isinstance(out["long"], Failure) and "reads at most 128" in out["long"].message
    assert not isinstance(out["ok"], Failure) and traces == [["Hi"]]
