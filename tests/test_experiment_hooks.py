"""An experiment is one place: its size estimate, summary and figure are registered with it.

A user's module, imported with `--import ./probe_hooks.py` in real CLI processes, registers an
experiment with an `estimate`, a `summary` (both as `module:function` strings) and a `plot` (a
function); `submit`, `results` and `plot` find them through the registry alone. Another
experiment returns NaN and ±inf, which `export -f json` and `results --json` write as null.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from .conftest import MODELS_CACHE, REPO, run_cli

pytestmark = pytest.mark.slow

PROBE = '''
import torch

from ndif_jobs import Params, Prompt, experiment


class P(Params):
    prompt: Prompt
    scale: float = 1.0


def summary(values):
    norms = values["norms"].tolist()
    peak = max(range(len(norms)), key=norms.__getitem__)
    # An own summary is given torch tensors, as documented: the dtype shows which it got.
    return [f"probe summary: peak {norms[peak]:.1f} at index {peak} ({values['norms'].dtype})"]


def estimate(params, shape):
    return 1000 + shape.hidden_size


def plot(results, labels):
    def draw(fig):
        ax = fig.subplots()
        for r, label in zip(results, labels):
            ax.plot(r["norms"].tolist(), label=label, linewidth=3)
        ax.legend()

    return 4.0, 3.0, draw


@experiment("hooked-probe", params=P, estimate="probe_hooks:estimate", summary="probe_hooks:summary", plot=plot)
def hooked_probe(model, p):
    return {"norms": torch.tensor([1.0, 3.0, 2.0]) * p["scale"]}
'''

EDGES = '''
import math

import torch

from ndif_jobs import Params, experiment


class P(Params):
    n: int = 1


@experiment("edge-values", params=P)
def edge_values(model, p):
    return {"edges": torch.tensor([1.5, math.inf, -math.inf, math.nan]), "peak": math.inf, "floor": -math.inf,
            "gap": math.nan, "nested": {"x": [2.0, -math.inf]}}
'''

DPI = 150  # what `plot` writes at
EMBEDDED_HIDDEN = 576


def cli(env: dict[str, str], *args: str, check: bool = True):  # type: ignore[no-untyped-def]
    """`ndif-jobs --import ./MODULE.py ARGS` in the folder that holds the module file."""
    return run_cli("--import", env["TEST_MODULE"], *args, env=env, check=check)


def finished_jobs(root: Path, module: str, source: str,
                  submissions: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Write `module.py` into `root`, submit its jobs and run them: (environment, {name: job id})."""
    (root / f"{module}.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDIF_JOBS_")}
    env.update(NDIF_JOBS_HOME=str(root / "home"), NDIF_JOBS_MODELS_CACHE=str(MODELS_CACHE), NDIF_JOBS_LOG_FORMAT="json",
               NDIF_JOBS_TEST_CWD=str(root), PYTHONPATH=str(REPO), TEST_MODULE=f"./{module}.py")
    ids = {name: json.loads(cli(env, "submit", *args, "--json").stdout)["id"] for name, args in submissions.items()}
    cli(env, "worker", "--until-empty")
    return env, ids


def estimated_bytes(env: dict[str, str], job: str) -> int | None:
    """The result size submit recorded for `job` (read from the queue database)."""
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings

    try:
        return Service(Settings(home=Path(env["NDIF_JOBS_HOME"]))).job(job).estimated_bytes
    finally:
        dispose_engines()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, str]]:
    """Two finished jobs of the user's experiment with hooks."""
    return finished_jobs(tmp_path_factory.mktemp("hooks"), "probe_hooks", PROBE, {
        "one": ["hooked-probe", "-p", "prompt=Hi", "-p", "scale=2"],
        "two": ["hooked-probe", "-p", "prompt=Hi", "-p", "scale=-1"],
    })


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], str]:
    """A finished job whose result holds NaN, inf and -inf, as tensor elements and as numbers."""
    env, ids = finished_jobs(tmp_path_factory.mktemp("edges"), "edge_values", EDGES, {"edges": ["edge-values"]})
    return env, ids["edges"]


def test_an_own_experiments_estimate_summary_and_plot_are_found_through_its_registration(
    seeded: tuple[dict[str, str], dict[str, str]], tmp_path: Path
) -> None:
    from matplotlib.image import imread

    env, ids = seeded
    assert estimated_bytes(env, ids["one"]) == 1000 + EMBEDDED_HIDDEN

    printed = cli(env, "results", ids["one"]).stdout
    assert "probe summary: peak 6.0 at index 1 (torch.float32)" in printed

    out = tmp_path / "probe.png"
    assert cli(env, "plot", ids["one"], ids["two"], "-o", str(out)).stdout.strip() == str(out)
    pixels = imread(out)
    assert pixels.shape[1] == 4.0 * DPI  # the width the user's plot asked for
    assert pixels.shape[0] > 3.0 * DPI  # its height, and the heading above it
    assert pixels[..., :3].std() > 0.02

    # Without --import the experiment is unknown here: no plot, and a one-line hint what to do.
    refused = run_cli("plot", ids["one"], "-o", str(tmp_path / "none.png"), env=env)
    assert refused.returncode == 2 and "no plot for experiment 'hooked-probe'" in refused.stderr
    assert "--import" in refused.stderr and not (tmp_path / "none.png").exists()


def test_builtin_estimates_come_from_their_registered_hooks(edges: tuple[dict[str, str], str]) -> None:
    env, _ = edges
    sizes = {}
    for experiment, args in (("activations", ["-p", "layers=[0,15,29]"]), ("logit-lens", ["-p", "top_k=3"]),
                             ("generate", ["-p", "max_new_tokens=4"])):
        job = json.loads(cli(env, "submit", experiment, "-p", "prompt=Estimated", *args, "--json").stdout)
        sizes[experiment] = estimated_bytes(env, job["id"])
    assert sizes == {"activations": 3 * 4 + 5 * 12, "logit-lens": 30 * 3 * 12, "generate": 4 * 8 + EMBEDDED_HIDDEN * 4}


def _strict(text: str) -> dict:
    """JSON as the standard has it: NaN and Infinity are not numbers of it."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_json_export_and_results_json_write_nan_and_infinities_as_null(edges: tuple[dict[str, str], str],
                                                                       tmp_path: Path) -> None:
    env, job = edges
    out = tmp_path / "edges.json"
    cli(env, "export", job, "-f", "json", "-o", str(out))
    expected = {"edges": [1.5, None, None, None], "peak": None, "floor": None, "gap": None,
                "nested": {"x": [2.0, None]}}
    assert _strict(out.read_text())["values"] == expected
    assert _strict(cli(env, "results", job, "--json").stdout)["values"] == expected
    # The binary formats keep them exactly.
    cli(env, "export", job, "-f", "npz", "-o", str(tmp_path / "edges.npz"))
    kept = np.load(tmp_path / "edges.npz")["edges"]
    assert kept[0] == 1.5 and kept[1] == math.inf and kept[2] == -math.inf and math.isnan(kept[3])
