"""Every bad input: one clear line on stderr, exit 2, and the database unchanged."""

from __future__ import annotations

import json
import sqlite3

import pytest

from .conftest import run_cli


def dump(home) -> list:  # type: ignore[no-untyped-def]
    """Every row of every table, to compare before and after."""
    db = sqlite3.connect(home / "queue.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return [(t, sorted(map(repr, db.execute(f"SELECT * FROM {t}")))) for t in tables]
    finally:
        db.close()


@pytest.fixture
def seeded(env, home):  # type: ignore[no-untyped-def]
    run_cli("submit", "activations", "-p", "prompt=Hello", env=env, check=True)
    return dump(home)


BAD = [
    (["submit", "no-such-experiment", "-p", "prompt=x"], "unknown experiment 'no-such-experiment'"),
    (["submit", "activations", "--model", "not a model!", "-p", "prompt=x"], "unknown model"),
    (["submit", "activations", "--model", "/no/such/folder", "-p", "prompt=x"], "does not exist"),
    (["submit", "activations"], "prompt: missing required parameter"),
    (["submit", "activations", "-p", "prompt=x", "-p", "top_k=many"], "top_k"),
    (["submit", "activations", "-p", "prompt=x", "-p", "top_k=0"], "top_k"),
    (["submit", "activations", "-p", "prompt=x", "-p", "colour=red"], "colour: unknown parameter"),
    (["submit", "activations", "-p", "promptx"], "expected NAME=VALUE"),
    (["submit", "activations", "-p", "prompt=x", "-p", "prompt=y"], "given twice"),
    (["submit", "activations", "-p", "prompt=x", "-p", "layers=a,b"], "layers"),
    (["submit", "patching", "-p", "clean_prompt=a", "-p", "corrupted_prompt=b", "-p", "answer=x", "-p", "wrong_answer=y",
      "-p", "position=middle"], "position"),
    (["submit", "activations", "-p", "prompt=x", "--backend", "carrier-pigeon"], "unknown backend"),
    (["submit", "activations", "-p", "prompt=" + "x" * 100_001], "prompt"),
    (["submit", "activations", "--params-file", "{missing}"], "does not exist"),
    (["submit", "activations", "--params-file", "{malformed}"], "not valid JSON"),
    (["submit", "activations", "--params-file", "{wrongshape}"], "must hold a JSON object"),
    (["submit", "activations", "--params-file", "{badlist}"], "top_k"),
    (["submit", "activations", "-p", "prompt=x", "-p", "layers=[0,99]"], "layer 99 is out of range: the model has 30 layers"),
    (["submit", "steering", "-p", "positive_prompt=a", "-p", "negative_prompt=b", "-p", "prompt=c", "-p", "layer=-31"],
     "layer -31 is out of range"),
    (["show", "deadbeef0000"], "no job 'deadbeef0000'"),
    (["show", "not-hex!"], "no job"),
    (["results", "deadbeef0000"], "no job"),
    (["cancel", "deadbeef0000"], "no job"),
    (["retry", "deadbeef0000"], "no job"),
    (["list", "--state", "sleeping"], "unknown state"),
    (["worker", "--backend", "carrier-pigeon"], "unknown backend"),
    (["--import", "no_such_module_xyz", "status"], "cannot import experiment module"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_exits_2_and_changes_nothing(args, message, env, home, seeded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = {
        "{missing}": tmp_path / "nope.json",
        "{malformed}": tmp_path / "malformed.json",
        "{wrongshape}": tmp_path / "wrongshape.json",
        "{badlist}": tmp_path / "badlist.json",
    }
    files["{malformed}"].write_text('{"prompt": "x",')
    files["{wrongshape}"].write_text('["prompt"]')
    files["{badlist}"].write_text(json.dumps([{"prompt": "ok"}, {"prompt": "x", "top_k": -1}]))
    args = [str(files[a]) if a in files else a for a in args]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert dump(home) == seeded


def test_a_params_file_list_is_all_or_nothing(env, home, seeded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"prompt": "one"}, {"prompt": "two", "top_k": 3}]))
    out = json.loads(run_cli("submit", "activations", "--params-file", str(good), "--json", env=env, check=True).stdout)
    assert [d["state"] for d in out] == ["queued", "queued"]
    assert len(dict(dump(home))["jobs"]) == 3  # the seeded job and these two


def test_bad_configuration_is_a_bad_input(env, home) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("status", env={**env, "NDIF_JOBS_MAX_BUNDLE": "zero"})
    assert proc.returncode == 2
    assert "bad configuration" in proc.stderr and "max_bundle" in proc.stderr


# -- oversized and malformed input --------------------------------------------------------------


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


OVERSIZED = [
    (["submit", "activations", "-p", "prompt=x", "-p", f"layers={deep(20_000)}"], "-p layers: JSON nested deeper than"),
    (["submit", "activations", "-p", "prompt=x", "-p", f"layers={deep(200)}"], "-p layers: JSON nested deeper than"),
    (["submit", "activations", "--params-file", "{deep}"], "JSON nested deeper than"),
    (["submit", "activations", "--params-file", "{million}"], "holds 1,000,000 jobs; one submission may hold at most 100,000"
                                                              " (NDIF_JOBS_MAX_SUBMIT_JOBS)"),
]


@pytest.mark.parametrize(("args", "message"), OVERSIZED, ids=["deep -p", "200 levels -p", "deep file", "million jobs"])
def test_oversized_input_exits_2_and_changes_nothing(args, message, env, home, seeded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = {"{deep}": tmp_path / "deep.json", "{million}": tmp_path / "million.json"}
    files["{deep}"].write_text('{"prompt": "x", "layers": ' + deep(100_000) + "}")
    files["{million}"].write_text("[" + ",".join(['{"prompt": "x"}'] * 1_000_000) + "]")
    proc = run_cli(*[str(files[a]) if a in files else a for a in args], env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-500:]
    assert dump(home) == seeded


def test_jobs_per_submission_follow_the_setting(env, home, seeded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    three = tmp_path / "three.json"
    three.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]))
    proc = run_cli("submit", "activations", "--params-file", str(three), env={**env, "NDIF_JOBS_MAX_SUBMIT_JOBS": "2"})
    assert proc.returncode == 2 and "holds 3 jobs" in proc.stderr and "NDIF_JOBS_MAX_SUBMIT_JOBS" in proc.stderr
    assert dump(home) == seeded
    run_cli("submit", "activations", "--params-file", str(three), env={**env, "NDIF_JOBS_MAX_SUBMIT_JOBS": "3"}, check=True)
    assert len(dict(dump(home))["jobs"]) == 4


def test_a_printed_error_line_is_cut_to_a_few_kilobytes(env, home, seeded) -> None:  # type: ignore[no-untyped-def]
    name = "x" * 100_000
    proc = run_cli("submit", name, "-p", "prompt=x", env=env)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and len(line) < 5000, len(line)
    assert line.startswith("error: unknown experiment 'xxxx") and line.endswith("more characters)")


def test_a_stored_error_is_cut_to_a_few_kilobytes(env, home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "loud_probe.py").write_text(
        "from ndif_jobs import experiment, Params\n"
        "class P(Params):\n    prompt: str\n"
        "@experiment('loud', params=P)\n"
        "def loud(model, p):\n    raise ValueError('x' * 3_000_000)\n"
    )
    env = {**env, "NDIF_JOBS_IMPORTS": "loud_probe", "PYTHONPATH": str(tmp_path)}
    job = json.loads(run_cli("submit", "loud", "-p", "prompt=Hi", "--json", env=env, check=True).stdout)
    worker = run_cli("worker", "--until-empty", env=env, check=True)
    shown = json.loads(run_cli("show", job["id"], "--json", env=env, check=True).stdout)
    assert shown["state"] == "failed"
    for error in (shown["error"], shown["attempt_history"][0]["error"]):
        assert error.startswith("ValueError: xxx") and error.endswith(" more characters)") and len(error) < 5000
    assert len(worker.stderr) < 100_000
    db_bytes = sum(p.stat().st_size for p in home.glob("queue.db*"))
    assert db_bytes < 1_000_000, db_bytes


def test_tag_filter_matches_the_tag_literally(env, home) -> None:  # type: ignore[no-untyped-def]
    tagged = json.loads(run_cli("submit", "activations", "-p", "prompt=a", "-t", "alpha", "--json", env=env, check=True).stdout)
    run_cli("submit", "activations", "-p", "prompt=b", "-t", "beta", env=env, check=True)
    for wildcard in ("%", "_", "%a", "alph_"):
        listed = json.loads(run_cli("list", "-t", wildcard, "--json", env=env, check=True).stdout)
        assert listed == [], (wildcard, listed)
    assert [j["id"] for j in json.loads(run_cli("list", "-t", "alpha", "--json", env=env, check=True).stdout)] == [tagged["id"]]
