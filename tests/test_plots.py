"""Figures of real results: every built-in experiment run on the embedded model, then plotted.

One worker run produces all the results (module-scoped); each test draws from them and checks
that a real, readable PNG of a sensible size comes out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MODELS_CACHE

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FEW = [0, 10, 20, 29]
STEER = {"positive_prompt": "I love this, it is wonderful", "negative_prompt": "I hate this, it is terrible"}

SUBMISSIONS = {
    "activations": [
        {"prompt": "The Eiffel Tower is in the city of", "layers": FEW},
        {"prompt": "The capital of Japan is", "layers": FEW},
    ],
    "patching": [
        {"clean_prompt": "When Mary and John went to the store, John gave a drink to",
         "corrupted_prompt": "When Mary and John went to the store, Mary gave a drink to",
         "answer": " Mary", "wrong_answer": " John", "layers": FEW},
        {"clean_prompt": "The Eiffel Tower is in the city of", "corrupted_prompt": "The Colosseum is in the city of",
         "answer": " Paris", "wrong_answer": " Rome", "layers": FEW},
    ],
    "cross-prompt": [
        {"source_prompt": "The Eiffel Tower is in the city of", "target_prompt": "The Colosseum is in the city of", "layer": 10},
        {"source_prompt": "The Eiffel Tower is in the city of", "target_prompt": "The Colosseum is in the city of", "layer": 20},
    ],
    "steering": [
        {**STEER, "prompt": "The movie was", "layer": 10},
        {**STEER, "prompt": "The movie was", "layer": 10, "coefficient": 8.0},
    ],
    "logit-lens": [
        {"prompt": "The Eiffel Tower is in the city of"},  # all 30 layers
        {"prompt": "Price: $5 and $10.\nTotal: $", "layers": FEW, "top_k": 8},
    ],
    "generate": [
        {"prompt": "Once upon a time", "max_new_tokens": 8},
        {"prompt": "I think that", "max_new_tokens": 6, "steering": {**STEER, "layer": 10, "coefficient": 4.0}},
    ],
}


@pytest.fixture(scope="module")
def results(embedded_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every submission above, run in one worker pass: {experiment: [Result, ...]}."""
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service, Submission
    from ndif_jobs.settings import Settings
    from ndif_jobs.worker import Worker

    home = tmp_path_factory.mktemp("plots") / "home"
    service = Service(Settings(home=home, models_cache=MODELS_CACHE, poll_s=0.2, log_format="json"))
    subs = [Submission(exp, params) for exp, many in SUBMISSIONS.items() for params in many]
    jobs = service.submit_many(subs)
    Worker(service).run(until_empty=True)
    out: dict[str, list] = {}
    for sub, job in zip(subs, jobs, strict=True):
        row = service.job(job.id)
        assert row.state == "completed", f"{sub.experiment} job {job.id}: {row.state} {row.error}"
        out.setdefault(sub.experiment, []).append(service.load_result(job.id))
    yield out
    dispose_engines()


def read_png(path: Path) -> tuple[int, int]:
    """Check `path` is a real PNG matplotlib can read, with some ink on it; return (width, height)."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    height, width = pixels.shape[:2]
    assert 300 <= width <= 4500 and 100 <= height <= 6000, f"odd size {width}x{height}"
    assert pixels[..., :3].std() > 0.02, "blank figure"
    return width, height


@pytest.mark.parametrize("experiment", list(SUBMISSIONS))
def test_one_job(results: dict, experiment: str, tmp_path: Path) -> None:
    from ndif_jobs.plots import plot_results

    out = plot_results(results[experiment][:1], tmp_path / "one.png")
    assert out == tmp_path / "one.png"
    read_png(out)


@pytest.mark.parametrize("experiment", list(SUBMISSIONS))
def test_several_jobs_overlay_or_tile(results: dict, experiment: str, tmp_path: Path) -> None:
    from ndif_jobs.plots import plot_results

    one = read_png(plot_results(results[experiment][:1], tmp_path / "one.png"))
    many = read_png(plot_results(results[experiment], tmp_path / "many.png", title=f"{experiment}: both jobs"))
    if experiment in ("steering", "cross-prompt", "logit-lens"):  # tiled side by side
        assert many[0] > one[0] * 1.5
    elif experiment == "generate":  # stacked text panels
        assert many[1] > one[1]


def test_full_logit_lens_is_sized_from_its_layers(results: dict, tmp_path: Path) -> None:
    from ndif_jobs.plots import plot_results

    full, few = results["logit-lens"]
    tall = read_png(plot_results([full], tmp_path / "full.png"))
    short = read_png(plot_results([few], tmp_path / "few.png"))
    assert tall[1] > tall[0]  # 30 layers x 5 ranks stands upright
    assert tall[1] > 2 * short[1]


def test_mixed_experiments_are_refused(results: dict, tmp_path: Path) -> None:
    from ndif_jobs.errors import BadInput
    from ndif_jobs.plots import PlotError, plot_results

    with pytest.raises(ValueError, match="^plot takes results of one experiment; got activations and patching$") as info:
        plot_results([results["activations"][0], results["patching"][0]], tmp_path / "x.png")
    assert isinstance(info.value, (PlotError, BadInput))
    with pytest.raises(PlotError, match="at least one result"):
        plot_results([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_output_path_forms(results: dict, tmp_path: Path) -> None:
    from ndif_jobs.plots import default_plot_name, plot_results

    rs = results["patching"]
    name = default_plot_name(rs)
    assert name == f"patching-{rs[0].job['id']}-{rs[1].job['id']}.png"
    assert plot_results(rs, tmp_path) == tmp_path / name  # a folder: named for the jobs
    assert plot_results(rs[:1], tmp_path / "sub" / "fig") == tmp_path / "sub" / "fig.png"  # no suffix: PNG
    read_png(tmp_path / "sub" / "fig.png")
    svg = plot_results(rs[:1], tmp_path / "fig.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_labels_and_tokens(results: dict) -> None:
    from ndif_jobs.plots import job_labels, token_label

    assert job_labels(results["activations"]) == ['"The Eiffel Tower is in the city of"', '"The capital of Japan is"']
    assert job_labels(results["steering"]) == ["coefficient=3", "coefficient=8"]
    assert job_labels(results["patching"])[0].endswith('" Mary" vs " John"')
    assert token_label("\n") == "⏎" and token_label(" ") == "␣" and token_label("   ") == "␣×3"
    assert token_label(" $") == r" \$"  # never read as mathtext
    assert token_label("\xa0") == "\\xa0" and token_label("a\tb") == "a⇥b"
    assert len(token_label("x" * 40)) == 14


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, ndif_jobs.plots; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _fractions(r) -> list[float]:  # type: ignore[no-untyped-def]
    clean, corrupted = float(r["clean_logit_diff"]), float(r["corrupted_logit_diff"])
    return [(float(d) - corrupted) / (clean - corrupted) for d in r["logit_diff"]]


def test_several_patching_jobs_overlay_as_the_fraction_of_each_gap_restored(results: dict) -> None:
    from ndif_jobs.plots import figure

    rs = results["patching"]
    fig = figure(rs)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "fraction of the clean − corrupted gap restored"
    jobs = [line for line in ax.get_lines() if len(line.get_xdata()) == len(FEW)]
    assert len(jobs) == len(rs)
    for line, r in zip(jobs, rs, strict=True):
        assert list(line.get_ydata()) == pytest.approx(_fractions(r))
    # One clean and one corrupted level for all jobs (1 and 0), not two reference lines per job.
    levels = sorted(float(line.get_ydata()[0]) for line in ax.get_lines() if len(line.get_xdata()) == 2)
    assert levels == [0.0, 1.0]


def test_many_patching_jobs_overlay_as_their_mean_and_spread(results: dict, tmp_path: Path) -> None:
    import numpy as np

    from ndif_jobs.plots import MANY_JOBS, figure, plot_results

    rs = (results["patching"] * MANY_JOBS)[: MANY_JOBS + 1]
    fig = figure(rs)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"mean over {len(rs)} jobs", "± one standard deviation", "each job", "clean run (1)", "corrupted run (0)"]
    (ax,) = fig.axes
    mean = next(line for line in ax.get_lines() if line.get_linewidth() > 2)
    assert list(mean.get_ydata()) == pytest.approx(list(np.mean([_fractions(r) for r in rs], axis=0)))
    assert len(ax.collections) == 1  # the spread band
    read_png(plot_results(rs, tmp_path / "many.png"))


def test_job_labels_cut_prompts_between_words(results: dict) -> None:
    from ndif_jobs.plots import job_labels

    for label, r in zip(job_labels(results["patching"]), results["patching"], strict=True):
        prompt = r.job["params"]["clean_prompt"]
        shown = label[1 : label.index('"', 1)]  # the quoted prompt
        words = [w for w in shown.replace("…", " ").split() if w]
        assert all(w in prompt.split() for w in words), (label, prompt)
    assert "…" in job_labels(results["patching"])[0]  # the long prompt was cut
