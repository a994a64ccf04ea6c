"""Sweeps: a file of hundreds of jobs, validated whole, queued once, resumed, and read as one table.

One local worker run of a 2 x 3 grid on two tiny models (12 patching jobs) serves the end-to-end
tests; the dataset, resume and bad-input tests queue without running, or run a few jobs of a
3-layer model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from .conftest import MODELS_CACHE, run_cli

GRID = '''
# A 2 x 3 grid on two models: 12 jobs.
name = "grid"
experiment = "patching"
models = ["{gpt2}", "{llama}"]
backend = "local"

[params]
clean_prompt = "The Eiffel Tower is in the city of"
corrupted_prompt = "The Colosseum is in the city of"
wrong_answer = " Rome"

[grid]
answer = [" Paris", " London"]
layers = ["0", "1", "0:3"]
'''


def _settings(home: Path, **extra):  # type: ignore[no-untyped-def]
    from ndif_jobs.settings import Settings

    return Settings(home=home, models_cache=MODELS_CACHE, poll_s=0.2, log_format="json", **extra)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path, tiny_llama: Path):  # type: ignore[no-untyped-def]
    """The grid sweep submitted through `ndif-jobs sweep` and run by one local worker."""
    import os

    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.worker import Worker

    folder = tmp_path_factory.mktemp("sweeps")
    file = folder / "grid.toml"
    file.write_text(GRID.format(gpt2=tiny_gpt2, llama=tiny_llama))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDIF_JOBS_")}
    env.update(NDIF_JOBS_HOME=str(folder / "home"), NDIF_JOBS_MODELS_CACHE=str(MODELS_CACHE),
               NDIF_JOBS_LOG_FORMAT="json")
    first = json.loads(run_cli("sweep", str(file), "--json", env=env, check=True).stdout)
    service = Service(_settings(folder / "home"))
    Worker(service).run(until_empty=True)
    yield {"file": file, "env": env, "service": service, "first": first, "folder": folder,
           "models": (str(tiny_gpt2), str(tiny_llama))}
    dispose_engines()


def test_a_grid_sweep_runs_end_to_end_as_one_row_per_job(grid) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.collection import collect

    gpt2, llama = grid["models"]
    assert grid["first"] == {"sweep": "grid", "experiment": "patching", "jobs": 12, "already_in_sweep": 0,
                             "stored": 0, "to_run": 12, "requests": {gpt2: 1, llama: 1},
                             "estimated_bytes": grid["first"]["estimated_bytes"], "queued": 12, "cached": 0}
    assert grid["first"]["estimated_bytes"] > 0
    frame = collect(sweep="grid", settings=grid["service"].settings).frame
    assert list(frame["sweep_row"]) == list(range(12))
    assert set(frame["state"]) == {"completed"}
    assert list(frame["model"][:2]) == [gpt2, llama]  # models innermost
    assert list(frame["answer"][::6]) == [" Paris", " London"]
    assert {"clean_logit_diff", "corrupted_logit_diff", "answer_token", "layers", "job_id", "error"} <= set(frame.columns)


def test_sweep_values_equal_the_same_jobs_submitted_one_by_one(grid) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.collection import collect
    from ndif_jobs.service import Service, Submission
    from ndif_jobs.sweeps.spec import expand, load
    from ndif_jobs.worker import Worker

    table = collect(sweep="grid", settings=grid["service"].settings)
    alone = Service(_settings(grid["folder"] / "one-by-one"))
    ids = [alone.submit(Submission("patching", row.params, model=row.model, backend="local")).id
           for row in expand(load(grid["file"]))]
    Worker(alone).run(until_empty=True)
    for i, job_id in enumerate(ids):
        result = alone.load_result(job_id)
        swept = table.values(i)
        assert swept is not None
        for name in ("clean_logit_diff", "corrupted_logit_diff"):
            assert table.frame[name][i] == pytest.approx(result[name], abs=1e-4), (i, name)
        assert torch.allclose(swept["logit_diff"], result["logit_diff"], atol=1e-4), i


def test_resubmitting_the_same_sweep_queues_nothing(grid) -> None:  # type: ignore[no-untyped-def]
    again = json.loads(run_cli("sweep", str(grid["file"]), "--json", env=grid["env"], check=True).stdout)
    assert (again["jobs"], again["already_in_sweep"], again["queued"], again["cached"]) == (12, 12, 0, 0)
    assert sum(grid["service"].queue.counts(sweep="grid").values()) == 12


def test_sweeps_lists_each_sweep_with_its_progress(grid) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("sweeps", env=grid["env"], check=True)
    assert proc.stdout.startswith("grid  12/0/12 done/failed/total") and "finished" in proc.stdout
    listed = json.loads(run_cli("sweeps", "--json", env=grid["env"], check=True).stdout)
    assert listed[0]["sweep"] == "grid" and listed[0]["remaining"] == 0 and listed[0]["eta_s"] == 0.0


def test_collect_writes_the_sweeps_table_from_the_command_line(grid, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    proc = run_cli("collect", "grid", "-o", str(tmp_path / "grid.csv"), env=grid["env"], check=True)
    assert proc.stdout.strip().endswith("grid.csv: 12 rows (12 completed), 20 columns"), proc.stdout
    assert pd.read_csv(tmp_path / "grid.csv")["sweep_row"].tolist() == list(range(12))
    bad = run_cli("collect", "grid", "-o", str(tmp_path / "grid.xlsx"), env=grid["env"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot write") and len(bad.stderr.splitlines()) == 1


def test_stacking_a_sweep_result_of_differing_shapes_names_the_jobs(grid) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import BadInput
    from ndif_jobs.collection import collect

    table = collect(sweep="grid", settings=grid["service"].settings)
    with pytest.raises(BadInput, match=r"different shapes across jobs \(\[1\]: .*; \[3\]: "):
        table.stack("logit_diff")
    clean = table.stack("clean_logit_diff")
    assert clean.shape == (12,) and torch.allclose(clean, torch.tensor(table.frame["clean_logit_diff"].tolist()))
    three = collect(jobs=list(table.frame["job_id"][4:6]), settings=grid["service"].settings).stack("logit_diff")
    assert three.shape == (2, 3)


def test_the_sweep_figure_and_a_histogram_of_any_scalar(grid, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.sweeps.commands import plot_sweep

    heatmap = plot_sweep(grid["service"], "grid", out=tmp_path / "grid.png")
    histogram = plot_sweep(grid["service"], "grid", value="clean_logit_diff", out=tmp_path / "hist.png")
    for path in (heatmap, histogram):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# -- a dataset: 500 rows in one transaction, added lines alone, a stopped worker --------------------


def _dataset_sweep(folder: Path, model: Path, lines: int, name: str = "prompts") -> Path:
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"text": f"Prompt number {i} is"}) + "\n"
                                                  for i in range(lines)))
    file = folder / f"{name}.toml"
    file.write_text(f'name = "{name}"\nexperiment = "activations"\nmodel = "{model}"\nbackend = "local"\n\n'
                    '[params]\nlayers = "0,2"\n\n[dataset]\nfile = "prompts.jsonl"\ncolumns = { prompt = "text" }\n')
    return file


def test_500_dataset_rows_queue_in_one_transaction_and_added_lines_queue_alone(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.db.queue import Queue
    from ndif_jobs.service import Service
    from ndif_jobs.sweeps.spec import load
    from ndif_jobs.sweeps.submit import plan, submit

    calls: list[int] = []
    enqueue = Queue.enqueue

    def counted(self, new_jobs):  # type: ignore[no-untyped-def]
        calls.append(len(new_jobs))
        return enqueue(self, new_jobs)

    monkeypatch.setattr(Queue, "enqueue", counted)
    service = Service(_settings(tmp_path / "home"))
    file = _dataset_sweep(tmp_path, tiny_llama, 500)
    done = submit(service, plan(service, load(file)))
    assert (done.queued, calls) == (500, [500])
    with (tmp_path / "prompts.jsonl").open("a") as f:
        f.writelines(json.dumps({"text": f"A new prompt {i} is"}) + "\n" for i in range(3))
    planned = plan(service, load(file))
    assert (len(planned.present), planned.new_rows) == (500, [500, 501, 502])
    assert submit(service, planned).queued == 3 and calls == [500, 3]
    rows = service.queue.list_jobs(sweep="prompts", limit=None)
    assert sorted(r.sweep_row for r in rows) == list(range(503))
    dispose_engines()


def test_a_sweep_whose_worker_stopped_halfway_resumes_with_no_flag(tmp_path: Path, tiny_llama: Path) -> None:
    from ndif_jobs.collection import collect
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.sweeps.commands import plot_sweep
    from ndif_jobs.sweeps.spec import load
    from ndif_jobs.sweeps.submit import plan, submit
    from ndif_jobs.worker import Worker

    service = Service(_settings(tmp_path / "home"))
    file = _dataset_sweep(tmp_path, tiny_llama, 4)
    submit(service, plan(service, load(file)))
    stopped = Worker(service, max_bundle=1)
    stopped.on_progress = lambda stats: stopped.stop()
    stopped.run(until_empty=True)
    counts = service.queue.counts(sweep="prompts")
    assert (counts["completed"], counts["queued"]) == (1, 3)
    assert submit(service, plan(service, load(file))).queued == 0
    Worker(service).run(until_empty=True)
    frame = collect(sweep="prompts", settings=service.settings).frame
    assert list(frame["state"]) == ["completed"] * 4 and list(frame["sweep_row"]) == [0, 1, 2, 3]
    norms = plot_sweep(service, "prompts", out=tmp_path / "norms.png")  # activations: norms per layer
    assert norms.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dispose_engines()


# -- bad input: exit 2, one line naming the file and line, nothing queued ----------------------------


def _sweep_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from ndif_jobs.cli import main

    monkeypatch.setattr(sys, "argv", ["ndif-jobs", *args])
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    return int(code or 0), capsys.readouterr().err  # type: ignore[call-overload]


def _nothing_written(env: dict[str, str]) -> None:
    from ndif_jobs.db.sweeps import Sweeps
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings

    service = Service(Settings())
    assert sum(service.queue.counts().values()) == 0
    assert Sweeps(service.queue).all() == []


PLAIN = 'name = "bad"\nexperiment = "activations"\nbackend = "local"\n'


@pytest.mark.parametrize(("body", "data", "expected"), [
    (PLAIN + '\n[grd]\nprompt = ["a"]\n', None, r"sweep\.toml:5: unknown key 'grd' \(did you mean 'grid'\?\)"),
    (PLAIN + '[dataset]\nfile = "d.jsonl"\ncolumns = { prompt = "txt" }\n', '{"text": "a"}\n',
     r"sweep\.toml:4: dataset .*d\.jsonl has no column 'txt' \(for parameter 'prompt'; its columns: text\)"),
    (PLAIN + '[dataset]\nfile = "d.jsonl"\ncolumns = { prompt = "text" }\n', '{"text": "a"}\n{"text": "b"}\n{"text": \n',
     r"d\.jsonl:3: not a valid JSON line"),
    (PLAIN + '[dataset]\nfile = "d.csv"\n', 'prompt,top_k\nHello,3\nWorld,4,5\n', r"d\.csv:3: expected 2 fields"),
    (PLAIN + 'models = ["no-such-model"]\n[params]\nprompt = "Hi"\n', None,
     r"sweep\.toml:4: unknown model 'no-such-model'"),
    (PLAIN + '[grid]\nprompt = ["a", "b"]\nlayers = [[0], [99]]\n', None,
     r"sweep\.toml: row 1 \(prompt=\"a\", layers=\[99\]\): activations: .*layers.*99"),
    (PLAIN + '[grid]\nprompt = ["a", "b", "c"]\ntop_k = [1, 2]\n', None,
     r"sweep\.toml: the sweep expands to 6 jobs, more than 5 \(NDIF_JOBS_MAX_SWEEP_JOBS\)"),
], ids=["unknown-key", "missing-column", "malformed-jsonl", "malformed-csv", "unknown-model", "bad-row",
        "too-many-jobs"])
def test_bad_sweep_input_exits_2_in_one_line_and_queues_nothing(  # type: ignore[no-untyped-def]
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    body: str, data: str | None, expected: str,
) -> None:
    import re

    monkeypatch.setenv("NDIF_JOBS_MAX_SWEEP_JOBS", "5")
    file = tmp_path / "sweep.toml"
    file.write_text(body)
    if data is not None:
        (tmp_path / ("d.csv" if "d.csv" in body else "d.jsonl")).write_text(data)
    code, err = _sweep_cli(monkeypatch, capsys, "sweep", str(file))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(expected, err), err
    _nothing_written(env)


def test_a_sweep_name_reused_with_a_different_file_is_refused_unless_forced(  # type: ignore[no-untyped-def]
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings

    file = tmp_path / "sweep.yaml"  # YAML reads as TOML does
    file.write_text('name: reused\nexperiment: activations\nbackend: local\nparams:\n  prompt: "Hello"\n'
                    'grid:\n  top_k: [1, 2]\n')
    assert _sweep_cli(monkeypatch, capsys, "sweep", str(file))[0] == 0
    file.write_text(file.read_text().replace("[1, 2]", "[1, 2, 3]"))
    code, err = _sweep_cli(monkeypatch, capsys, "sweep", str(file), "--dry-run")
    assert code == 2 and "sweep 'reused' was submitted from a different file" in err and "--force" in err
    assert sum(Service(Settings()).queue.counts(sweep="reused").values()) == 2
    assert _sweep_cli(monkeypatch, capsys, "sweep", str(file), "--force")[0] == 0
    assert sum(Service(Settings()).queue.counts(sweep="reused").values()) == 3


@pytest.mark.parametrize("name", ["landmarks-patching", "landmarks-logit-lens"])
def test_the_example_sweeps_validate(tmp_path: Path, name: str) -> None:
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.sweeps.spec import load
    from ndif_jobs.sweeps.submit import plan

    from .conftest import REPO

    planned = plan(Service(_settings(tmp_path / "home")), load(REPO / "examples" / f"{name}.toml"))
    assert len(planned.to_run) == 12 and planned.requests == {"smollm2-135m": 1} and not planned.warnings
    dispose_engines()


def test_whole_csv_rows_become_params_typed_as_p_reads_them(tmp_path: Path) -> None:
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.sweeps.spec import load
    from ndif_jobs.sweeps.submit import plan

    (tmp_path / "rows.csv").write_text('prompt,top_k,layers\n"Hello, world",3,"0,29"\n42,5,0:2\n')
    file = tmp_path / "rows.toml"
    file.write_text('name = "rows"\nexperiment = "activations"\nbackend = "local"\n[dataset]\nfile = "rows.csv"\n')
    planned = plan(Service(_settings(tmp_path / "home")), load(file))
    params = [p.new_job.params for p in planned.prepared]
    assert [(p["prompt"], p["top_k"], p["layers"]) for p in params] == [("Hello, world", 3, [0, 29]), ("42", 5, [0, 1])]
    dispose_engines()


def test_a_sweep_on_postgresql_queues_once_and_reports_its_rows(tmp_path: Path, postgres_url: str) -> None:
    from ndif_jobs.collection import collect
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.db.sweeps import Sweeps
    from ndif_jobs.service import Service
    from ndif_jobs.sweeps.spec import load
    from ndif_jobs.sweeps.submit import plan, submit

    settings = _settings(tmp_path / "home", database_url=postgres_url)
    service = Service(settings)
    file = tmp_path / "pg.toml"
    file.write_text('name = "pg"\nexperiment = "activations"\nbackend = "local"\n[params]\nlayers = "0,1"\n'
                    '[grid]\nprompt = ["a b", "c d", "e f"]\n')
    assert submit(service, plan(service, load(file))).queued == 3
    assert submit(service, plan(service, load(file))).queued == 0
    sweeps = Sweeps(service.queue)
    assert sweeps.progress("pg").counts["queued"] == 3 and sorted(sweeps.rows("pg")) == [0, 1, 2]
    assert [r.name for r in sweeps.all()] == ["pg"] and sweeps.failed_jobs("pg") == []
    frame = collect(sweep="pg", settings=settings).frame
    assert frame["prompt"].tolist() == ["a b", "c d", "e f"] and set(frame["state"]) == {"queued"}
    dispose_engines()
