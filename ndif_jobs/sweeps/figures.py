"""Figures of a whole sweep: what its table means at a glance.

`draw_sweep(collection, out)` looks up the experiment's `sweep_plot` hook (registered like its
`plot` hook: a function or a lazy `module:function`, see `experiments/__init__.py`) and writes
the figure; `value=NAME` draws a histogram of a scalar result instead, for any experiment. A
hook is `sweep_plot(collection) -> (width_in, height_in, draw)`, with `draw(fig)` drawing on a
matplotlib `Figure`, as `plot` hooks do. The built-ins' hooks are here:

* patching: each row's fraction of the clean - corrupted gap restored, rows x layers, with the
  mean per layer under it;
* logit lens: per layer, the fraction of rows whose top token there is already the final one;
* activations: the norm per layer, mean and spread (min-max and quartiles) across rows.

matplotlib is imported only here, on its own Agg canvas (no pyplot), as in `plots.py`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PlotError
from ..plots import _DPI, _FONT, _TITLE_FONT, Plan, _bottom_legend, _rc, restored_fractions

if TYPE_CHECKING:
    from ..collection import Collection

_MAX_ROW_LABELS = 40
_LABEL_CHARS = 48


def draw_sweep(collection: Collection, out: Path, *, value: str | None = None, title: str | None = None) -> Path:
    """Draw the sweep's figure (or the histogram of `value`) and write it to `out`."""
    frame = collection.frame
    if len(frame) == 0:
        raise PlotError("the sweep has no jobs to draw")
    if value is not None:
        width, height, draw = _histogram(collection, value)[:3]
    else:
        from .. import experiments

        names = sorted(set(frame["experiment"]))
        if len(names) != 1:
            raise PlotError(f"a sweep figure needs jobs of one experiment, not {', '.join(names)}")
        exp = experiments.get(names[0])
        hook = exp.hook("sweep_plot")
        if hook is None:
            raise PlotError(f"experiment {exp.name!r} has no sweep figure: draw a histogram of a scalar result with"
                            f" --value NAME (its scalars: {', '.join(_numeric_columns(collection)) or 'none'})")
        width, height, draw = Plan(*hook(collection))[:3]
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'ndif-jobs[plot]'") from None
    done = int(frame["state"].isin(["completed", "cached"]).sum())
    heading = f"{title or 'sweep'}: {frame['experiment'].iloc[0]}, {done} of {len(frame)} jobs with results"
    with matplotlib.rc_context(_rc()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig = Figure(figsize=(width, height + 0.45), layout="constrained")
        draw(fig)
        fig.suptitle(heading, fontsize=_TITLE_FONT)
        out = out if out.suffix else out.with_suffix(".png")
        fig.savefig(out, dpi=_DPI)
    return out


def _numeric_columns(collection: Collection) -> list[str]:
    import pandas as pd

    frame = collection.frame
    skip = {"sweep_row"}
    return [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])]


def _histogram(collection: Collection, name: str) -> Plan:
    import numpy as np
    import pandas as pd

    frame = collection.frame
    if name not in frame.columns:
        raise PlotError(f"no scalar {name!r} in the sweep's table (numeric columns:"
                        f" {', '.join(_numeric_columns(collection)) or 'none'})")
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise PlotError(f"{name!r} has no numeric value in the sweep's table")

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.hist(values, bins=min(50, max(5, int(np.sqrt(values.size)) * 2)), color="tab:blue", alpha=0.8)
        ax.axvline(float(np.mean(values)), color="black", linestyle="--", linewidth=1.2,
                   label=f"mean {np.mean(values):.4g} (n={values.size})")
        ax.set_xlabel(name, fontsize=_FONT + 0.5)
        ax.set_ylabel("jobs", fontsize=_FONT + 0.5)
        _bottom_legend(fig)

    return Plan(6.5, 4.0, draw)


def _row_labels(collection: Collection, indices: list[int]) -> list[str]:
    """Each row by its prompt (the first prompt-like parameter), and its model where several."""
    frame = collection.frame
    prompt = next((c for c in ("clean_prompt", "prompt", "source_prompt", "positive_prompt") if c in frame.columns),
                  None)
    several_models = frame["model"].nunique() > 1
    labels = []
    for i in indices:
        text = str(frame[prompt].iloc[i]) if prompt else f"row {frame['sweep_row'].iloc[i]}"
        if len(text) > _LABEL_CHARS:
            text = "…" + text[-(_LABEL_CHARS - 1):]
        if several_models:
            text += f" [{frame['model'].iloc[i]}]"
        labels.append(text)
    return labels


def patching(collection: Collection) -> Plan:
    import numpy as np

    rows, kept = [], []
    for i in range(len(collection)):
        values = collection.values(i)
        if values is None:
            continue
        layers = [int(x) for x in np.asarray(values["layers"]).reshape(-1)]
        rows.append((layers, np.asarray(values["logit_diff"], dtype=float),
                     float(values["clean_logit_diff"]), float(values["corrupted_logit_diff"])))
        kept.append(i)
    if not rows:
        raise PlotError("no job of the sweep has a result yet: run a worker first")
    layers, fractions, dropped = restored_fractions(rows)
    gapped = [i for i, row in zip(kept, rows, strict=True) if abs(row[2] - row[3]) > 1e-6]
    labels = _row_labels(collection, gapped)
    n = len(labels)
    height = min(14.0, 1.2 + 0.22 * n) + 2.2

    def draw(fig: Any) -> None:
        top, bottom = fig.subplots(2, 1, height_ratios=[max(2.0, 0.22 * n), 1.8], sharex=True)
        image = top.imshow(fractions, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest",
                           extent=(layers[0] - 0.5, layers[-1] + 0.5, n - 0.5, -0.5))
        if n <= _MAX_ROW_LABELS:
            top.set_yticks(range(n), labels, fontsize=_FONT - 1.5)
        else:
            top.set_ylabel(f"{n} prompts", fontsize=_FONT + 0.5)
        fig.colorbar(image, ax=top, label="fraction of the gap restored", shrink=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer no row patched: NaN
            mean = np.nanmean(fractions, axis=0)
            sd = np.nanstd(fractions, axis=0)
        bottom.fill_between(layers, mean - sd, mean + sd, color="tab:blue", alpha=0.2, linewidth=0)
        bottom.plot(layers, mean, marker="o", markersize=3.5, color="tab:blue", label="mean ± sd over prompts")
        bottom.axhline(1.0, color="tab:green", linestyle="--", linewidth=1)
        bottom.axhline(0.0, color="tab:red", linestyle=":", linewidth=1)
        bottom.set_xlabel("patched layer", fontsize=_FONT + 0.5)
        bottom.set_ylabel("mean restored", fontsize=_FONT + 0.5)
        note = f" ({dropped} rows without a clean - corrupted gap left out)" if dropped else ""
        bottom.legend(fontsize=_FONT - 1, frameon=False, title=note or None, title_fontsize=_FONT - 1)

    return Plan(max(7.0, 0.18 * len(layers) + 4.5), height, draw)


def logit_lens(collection: Collection) -> Plan:
    import numpy as np

    agree: dict[int, list[float]] = {}
    for i in range(len(collection)):
        values = collection.values(i)
        if values is None:
            continue
        layers = [int(x) for x in np.asarray(values["layers"]).reshape(-1)]
        top = np.asarray(values["top_ids"]).reshape(len(layers), -1)[:, 0]
        final = top[-1]
        for layer, token in zip(layers, top, strict=True):
            agree.setdefault(layer, []).append(float(token == final))
    if not agree:
        raise PlotError("no job of the sweep has a result yet: run a worker first")
    layers = sorted(agree)
    fraction = [float(np.mean(agree[layer])) for layer in layers]
    counts = [len(agree[layer]) for layer in layers]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.plot(layers, fraction, marker="o", markersize=4, color="tab:purple")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("layer", fontsize=_FONT + 0.5)
        ax.set_ylabel("fraction of prompts whose top token\nequals the final answer", fontsize=_FONT + 0.5)
        ax.set_title(f"{max(counts)} jobs", fontsize=_FONT)

    return Plan(max(6.5, 0.15 * len(layers) + 3.5), 4.0, draw)


def activations(collection: Collection) -> Plan:
    import numpy as np

    norms: dict[int, list[float]] = {}
    for i in range(len(collection)):
        values = collection.values(i)
        if values is None:
            continue
        layers = [int(x) for x in np.asarray(values["layers"]).reshape(-1)]
        for layer, norm in zip(layers, np.asarray(values["norms"], dtype=float).reshape(-1), strict=True):
            norms.setdefault(layer, []).append(float(norm))
    if not norms:
        raise PlotError("no job of the sweep has a result yet: run a worker first")
    layers = sorted(norms)
    q = np.array([np.percentile(norms[layer], [0, 25, 50, 75, 100]) for layer in layers])
    mean = [float(np.mean(norms[layer])) for layer in layers]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.fill_between(layers, q[:, 0], q[:, 4], color="tab:orange", alpha=0.15, linewidth=0, label="min - max")
        ax.fill_between(layers, q[:, 1], q[:, 3], color="tab:orange", alpha=0.35, linewidth=0, label="quartiles")
        ax.plot(layers, mean, marker="o", markersize=3.5, color="tab:orange", label="mean")
        ax.set_xlabel("layer", fontsize=_FONT + 0.5)
        ax.set_ylabel("block output norm", fontsize=_FONT + 0.5)
        _bottom_legend(fig, ncols=3)

    return Plan(max(6.5, 0.15 * len(layers) + 3.5), 4.0, draw)
