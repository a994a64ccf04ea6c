"""The CLI package: how commands are registered, what the read commands import, listing pages,
the `ndif_jobs.jobs` API, sweep filters, and usage errors. Queues are real SQLite files filled
through the real `Queue`; the CLI runs as a real subprocess where its start-up is the point."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import typer

from ndif_jobs.db.queue import NewJob

from .conftest import REPO, run_cli


def _fill(service: Any, n: int, *, tag: str = "night", sweep: str | None = None, experiment: str = "logit-lens") -> list[str]:
    jobs = [NewJob(key=f"{experiment}-{sweep}-{tag}-{i}".ljust(64, "0"), experiment=experiment, model="smollm2-135m",
                   model_key="embedded:smollm2", backend="local", params={"prompt": f"prompt {i}", "top_k": i},
                   tags=[tag], **({"sweep": sweep, "sweep_row": i} if sweep else {}))
            for i in range(n)]
    return [e.id for e in service.queue.enqueue(jobs)]


def _command_names(app: typer.Typer) -> set[str]:
    group = typer.main.get_command(app)
    return set(group.commands)  # type: ignore[attr-defined]


def test_each_builtin_command_is_registered_by_the_module_that_builtin_names() -> None:
    import importlib

    from ndif_jobs.cli import BUILTIN
    from ndif_jobs.cli.app import new_app

    for module in set(BUILTIN.values()):
        app = new_app()
        importlib.import_module(f"ndif_jobs.cli.{module}").register(app)
        assert _command_names(app) == {name for name, where in BUILTIN.items() if where == module}, module


def test_a_builtin_command_is_run_by_an_app_of_that_command_alone() -> None:
    from ndif_jobs.cli import BUILTIN, build_app

    assert _command_names(build_app("status")) == {"status"}
    assert _command_names(build_app("db")) == {"db"}
    assert _command_names(build_app("nosuch")) >= set(BUILTIN)
    assert _command_names(build_app(None)) >= set(BUILTIN)


def test_the_command_name_is_the_first_word_after_the_apps_own_options() -> None:
    from ndif_jobs.cli import command_name

    assert command_name(["--import", "list", "--offline", "status", "--json"]) == "status"
    assert command_name(["--env-file", "x.env", "show", "abc"]) == "show"
    assert command_name(["--import=mod", "list"]) == "list"
    assert command_name(["--help"]) is None


HEAVY = ("pydantic", "pydantic_settings", "rich", "sqlalchemy", "torch", "nnsight", "structlog")


def test_the_read_commands_import_no_pydantic_rich_sqlalchemy_or_torch(service, env) -> None:  # type: ignore[no-untyped-def]
    ids = _fill(service, 3)
    probe = (
        "import sys\n"
        "from ndif_jobs.cli import main\n"
        "sys.argv = ['ndif-jobs', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        f"sys.stderr.write('HEAVY ' + ' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    # The test suite's own variables are no settings, but would send the command to `Settings`.
    plain_env = {k: v for k, v in env.items() if not k.startswith("NDIF_JOBS_TEST_")}
    for args in (["status"], ["list", "--state", "queued"], ["show", ids[0]], ["list", "--json"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], env=plain_env, capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.rsplit("HEAVY", 1)[1].strip() == "", (args, proc.stderr)
        assert ids[0] in proc.stdout or args[0] == "status"


def test_list_json_pages_carries_params_and_says_how_many_were_left_out(service, env) -> None:  # type: ignore[no-untyped-def]
    _fill(service, 5)
    first = run_cli("list", "--json", "-n", "2", env=env, check=True)
    docs = json.loads(first.stdout)
    assert len(docs) == 2 and docs[0]["params"] == {"prompt": "prompt 4", "top_k": 4}
    assert "jobs 1-2 of 5 shown" in first.stderr and "--offset 2" in first.stderr
    last = run_cli("list", "--json", "-n", "2", "--offset", "4", env=env, check=True)
    assert [d["params"]["top_k"] for d in json.loads(last.stdout)] == [0]
    every = run_cli("list", "--json", "--all", env=env, check=True)
    assert len(json.loads(every.stdout)) == 5 and every.stderr == ""


def test_jobs_lists_with_the_clis_filters_as_typed_jobs(service, settings) -> None:  # type: ignore[no-untyped-def]
    import ndif_jobs

    _fill(service, 3, tag="a")
    _fill(service, 2, tag="b", experiment="activations")
    found = ndif_jobs.jobs(tag="b", settings=settings)
    assert [j.params["top_k"] for j in found] == [1, 0]
    assert all(j.experiment == "activations" and j.tags == ("b",) for j in found)
    assert len(ndif_jobs.jobs(state="queued", settings=settings)) == 5
    assert len(ndif_jobs.jobs(experiment="logit-lens", limit=2, settings=settings)) == 2
    with pytest.raises(ndif_jobs.BadInput, match="unknown state 'done'"):
        ndif_jobs.jobs(state="done", settings=settings)


def test_list_and_status_filter_by_sweep(service, env) -> None:  # type: ignore[no-untyped-def]
    _fill(service, 3, sweep="layers")
    _fill(service, 2, sweep="other")
    listed = json.loads(run_cli("list", "--sweep", "layers", "--json", env=env, check=True).stdout)
    assert sorted(d["sweep_row"] for d in listed) == [0, 1, 2] and {d["sweep"] for d in listed} == {"layers"}
    status = json.loads(run_cli("status", "--sweep", "layers", "--json", env=env, check=True).stdout)
    assert status["total"] == 3 and status["counts"]["queued"] == 3
    assert {j["sweep"] for j in status["latest"]} == {"layers"}


def test_a_backend_named_in_the_registry_is_accepted_at_submit(service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs import backends
    from ndif_jobs.errors import BadInput
    from ndif_jobs.service import Submission

    monkeypatch.setitem(backends.REGISTRY, "elsewhere", "ndif_jobs.backends.local:LocalBackend")
    prepared = service.prepare(Submission("logit-lens", {"prompt": "Hi"}, backend="elsewhere"))
    assert prepared.new_job.backend == "elsewhere"
    with pytest.raises(BadInput, match="choose from: local, ndif, elsewhere"):
        service.prepare(Submission("logit-lens", {"prompt": "Hi"}, backend="nowhere"))


def test_a_job_is_built_once_from_its_row_with_its_facts_typed(service) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.db.queue import JobRow
    from ndif_jobs.states import JobState

    job_id = _fill(service, 1, sweep="s")[0]
    job = service.job(job_id[:6])
    assert job.id == job_id and job.state is JobState.QUEUED and job.tags == ("night",)
    assert job.params == {"prompt": "prompt 0", "top_k": 0} and job.sweep_row == 0
    assert set(job.to_dict()) == set(JobRow._fields)
    assert service.list_jobs(limit=1).jobs == [job]


@pytest.mark.parametrize("args", [["list", "--limit", "x"], ["list", "--limit", "-1"], ["nosuch"], ["list", "--state"],
                                  ["plot"]])
def test_usage_errors_are_one_line_and_exit_2(env, args) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_plot_by_tag_takes_each_stored_computation_once(service, env) -> None:  # type: ignore[no-untyped-def]
    first = _fill(service, 3, tag="fig")
    again = service.queue.enqueue([NewJob(key="logit-lens-None-fig-0".ljust(64, "0"), experiment="logit-lens",
                                          model="smollm2-135m", model_key="embedded:smollm2", backend="local",
                                          params={"prompt": "prompt 0", "top_k": 0}, tags=["fig"], force=True)])
    claimed = service.queue.claim("w", 10, 60.0)
    service.queue.start_bundle("w", "local", "embedded:smollm2", [j.id for j in claimed])
    done = [j for j in claimed if j.id != first[2]]
    service.queue.complete("w", [(j.id, j.key, 10) for j in done])
    assert again[0].id in {j.id for j in done}  # the same computation, run twice
    assert service.done_job_ids(tag="fig") == [first[0], first[1]]
    proc = run_cli("plot", "--tag", "nothing", env=env)
    assert proc.returncode == 2 and "no finished jobs with tag 'nothing'" in proc.stderr
