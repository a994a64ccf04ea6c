"""`ndif_jobs.collect`: one table and stacked tensors out of many stored jobs, offline.

One local worker run (a user experiment on a tiny model, one row of which fails) serves every
test here: the table, NaN rows for the failed job, each key once, shapes that differ, the
files written, and the same collect in a subprocess where nnsight and transformers cannot be
imported at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from .conftest import MODELS_CACHE, REPO

PROBE = '''
import torch
from ndif_jobs import Params, experiment


class ProbeParams(Params):
    k: int
    n: int = 3


def sweep_figure(collection):
    """A user's own sweep figure: the score per row."""
    scores = collection.frame["score"].tolist()

    def draw(fig):
        fig.subplots().plot(range(len(scores)), scores, marker="o")

    return 4.0, 3.0, draw


@experiment("probe-collect", params=ProbeParams, sweep_plot="probe_collect:sweep_figure")
def probe(model, p):
    """A vector and a score from k; k = 2 fails, as a bad row of a real sweep would."""
    if p["k"] == 2:
        raise ValueError("k = 2 is refused")
    return {"vec": torch.arange(p["n"], dtype=torch.float32) * p["k"], "score": float(p["k"]), "label": f"k{p['k']}"}
'''

SWEEP = '''
name = "probe-grid"
experiment = "probe-collect"
model = "{model}"
backend = "local"

[grid]
k = [0, 1, 2, 3]
'''


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path):  # type: ignore[no-untyped-def]
    """A 4-row sweep (row 2 fails), a ragged pair of jobs and a tag submitted twice, all run."""
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service, Submission
    from ndif_jobs.settings import Settings
    from ndif_jobs.sweeps.spec import load
    from ndif_jobs.sweeps.submit import plan, submit
    from ndif_jobs.worker import Worker

    folder = tmp_path_factory.mktemp("collect")
    (folder / "probe_collect.py").write_text(PROBE)
    settings = Settings(home=folder / "home", models_cache=MODELS_CACHE, poll_s=0.2, log_format="json",
                        imports=str(folder / "probe_collect.py"))
    service = Service(settings)
    (folder / "sweep.toml").write_text(SWEEP.format(model=tiny_llama))
    submit(service, plan(service, load(folder / "sweep.toml")))
    model = str(tiny_llama)
    ragged = service.submit_many([Submission("probe-collect", {"k": 1, "n": 2}, model=model, backend="local"),
                                  Submission("probe-collect", {"k": 1, "n": 5}, model=model, backend="local")])
    first = service.submit(Submission("probe-collect", {"k": 7}, model=model, backend="local", tags=["twice"]))
    Worker(service).run(until_empty=True)
    again = service.submit(Submission("probe-collect", {"k": 7}, model=model, backend="local", tags=["twice"]))
    assert again.state == "cached"
    yield {"settings": settings, "service": service, "ragged": [j.id for j in ragged], "tagged": [first.id, again.id],
           "home": folder / "home"}
    dispose_engines()


def test_frame_has_a_row_per_job_with_params_scalars_and_the_failed_jobs_error(night) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.collection import collect

    frame = collect(sweep="probe-grid", settings=night["settings"]).frame
    assert list(frame["sweep_row"]) == [0, 1, 2, 3]
    assert list(frame["k"]) == [0, 1, 2, 3]
    assert list(frame["state"]) == ["completed", "completed", "failed", "completed"]
    assert "k = 2 is refused" in frame["error"][2]
    assert frame["score"].tolist()[:2] == [0.0, 1.0] and frame["score"].isna()[2] and frame["score"][3] == 3.0
    assert frame["label"].tolist()[3] == "k3"
    assert "vec" not in frame.columns  # a tensor is for .stack, not a column


def test_stack_gives_a_nan_row_for_the_failed_job_aligned_with_the_frame(night) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.collection import collect

    table = collect(sweep="probe-grid", settings=night["settings"])
    vec = table.stack("vec")
    assert vec.shape == (4, 3)
    assert torch.isnan(vec[2]).all()
    for i, k in enumerate(table.frame["k"]):
        if k != 2:
            assert torch.equal(vec[i], torch.arange(3, dtype=torch.float32) * k)
    assert table.stack("score").tolist()[3] == 3.0


def test_stack_names_the_jobs_whose_shapes_differ(night) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import BadInput
    from ndif_jobs.collection import collect

    table = collect(jobs=night["ragged"], settings=night["settings"])
    with pytest.raises(BadInput) as caught:
        table.stack("vec")
    message = str(caught.value)
    assert "different shapes" in message and all(job in message for job in night["ragged"])
    assert "[2]" in message and "[5]" in message


def test_a_tag_submitted_twice_counts_each_key_once_unless_all_rows(night) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.collection import collect

    once = collect(tag="twice", settings=night["settings"]).frame
    assert len(once) == 1 and once["job_id"][0] == night["tagged"][0] and once["score"][0] == 7.0
    every = collect(tag="twice", all_rows=True, settings=night["settings"]).frame
    assert sorted(every["job_id"]) == sorted(night["tagged"]) and set(every["state"]) == {"completed", "cached"}


def test_collect_writes_csv_jsonl_and_parquet(night, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    from ndif_jobs.collection import collect

    table = collect(sweep="probe-grid", settings=night["settings"])
    csv = pd.read_csv(table.write(tmp_path / "t.csv"))
    assert csv["k"].tolist() == [0, 1, 2, 3] and csv["state"][2] == "failed"
    lines = (table.write(tmp_path / "t.jsonl")).read_text().splitlines()
    assert [json.loads(line)["k"] for line in lines] == [0, 1, 2, 3]
    parquet = pd.read_parquet(table.write(tmp_path / "t.parquet"))
    assert parquet["score"].tolist()[3] == 3.0


def test_parquet_without_pyarrow_names_the_extra(night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import BadInput
    from ndif_jobs.collection import collect

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    with pytest.raises(BadInput, match=r"ndif-jobs\[parquet\]"):
        collect(sweep="probe-grid", settings=night["settings"]).write(tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_collect_needs_one_of_sweep_tag_jobs_and_a_known_sweep(night) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import BadInput
    from ndif_jobs.collection import collect

    with pytest.raises(BadInput, match="one of"):
        collect(sweep="probe-grid", tag="twice", settings=night["settings"])
    with pytest.raises(BadInput, match="no sweep 'nope'.*probe-grid"):
        collect(sweep="nope", settings=night["settings"])


def test_a_user_experiment_draws_its_own_sweep_figure(night, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.sweeps.commands import plot_sweep

    path = plot_sweep(night["service"], "probe-grid", out=tmp_path / "probe.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_an_experiment_without_a_sweep_figure_points_to_value(night, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.errors import PlotError
    from ndif_jobs.experiments import get
    from ndif_jobs.sweeps.commands import plot_sweep

    exp = get("probe-collect")
    hook, exp.sweep_plot = exp.sweep_plot, None
    try:
        with pytest.raises(PlotError, match=r"has no sweep figure: .*--value NAME \(its scalars: .*score"):
            plot_sweep(night["service"], "probe-grid", out=tmp_path / "none.png")
    finally:
        exp.sweep_plot = hook


BLOCKED = textwrap.dedent('''
    import json, sys

    class Blocker:
        """Any import of nnsight or transformers fails, as on a machine without them."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("nnsight", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    from ndif_jobs.collection import collect
    table = collect(sweep="probe-grid")
    vec = table.stack("vec")
    print(json.dumps({"states": table.frame["state"].tolist(), "nan_row": bool(vec[2].isnan().all()),
                      "row3": vec[3].tolist(),
                      "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("nnsight", "transformers"))}))
''')


def test_collect_works_offline_with_nnsight_and_transformers_blocked(night) -> None:  # type: ignore[no-untyped-def]
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("NDIF_JOBS_")}
    env.update(NDIF_JOBS_HOME=str(night["home"]), NDIF_JOBS_OFFLINE="1", NDIF_JOBS_MODELS_CACHE=str(MODELS_CACHE))
    proc = subprocess.run([sys.executable, "-c", BLOCKED], env=env, capture_output=True, text=True, timeout=120,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out == {"states": ["completed", "completed", "failed", "completed"], "nan_row": True,
                   "row3": [0.0, 3.0, 6.0], "loaded": []}


def test_ndif_jobs_collect_is_the_function_even_once_its_module_is_imported() -> None:
    import ndif_jobs
    import ndif_jobs.collection  # noqa: F401 - importing the module must not shadow the function

    assert callable(ndif_jobs.collect) and ndif_jobs.collect.__name__ == "collect"


def test_retry_of_a_sweep_queues_its_failed_rows_again(night) -> None:  # type: ignore[no-untyped-def]
    """Last in this file: it queues row 2 again (collect then shows it queued, its row still NaN)."""
    from ndif_jobs.collection import collect
    from ndif_jobs.sweeps.commands import retry_failed

    failed = collect(sweep="probe-grid", settings=night["settings"]).frame
    assert retry_failed(night["service"], "probe-grid") == [failed["job_id"][2]]
    after = collect(sweep="probe-grid", settings=night["settings"])
    assert list(after.frame["state"]) == ["completed", "completed", "queued", "completed"]
    assert torch.isnan(after.stack("vec")[2]).all()
    assert retry_failed(night["service"], "probe-grid") == []
