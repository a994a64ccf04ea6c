"""Figures of stored results: the plot a researcher would otherwise draw by hand.

`plot_results(results, out)` draws one figure for the results of ONE experiment and writes it
to `out` (PNG, or PDF/SVG by suffix). The body of the figure comes from the experiment's
registered `plot` hook, `plot(results, labels) -> Plan`; this module adds the heading (the
experiment, the model and the parameters every job shares), the fonts and the file. Results of
different experiments, or of an experiment without a `plot`, raise `PlotError`.

The functions named like the built-in experiments are their hooks. Several results of one
experiment overlay (line plots, one line per job, labelled by the parameters that differ
between them) or tile (heatmaps and bar charts, one panel per job). Patching jobs overlay as
the fraction of each job's gap restored, and from `MANY_JOBS` on as their mean and spread.

matplotlib is imported only inside `plot_results` (it is the optional `plot` extra), and the
figure is drawn on its own Agg canvas without pyplot, so no global backend is touched.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import PlotError, UnknownExperiment

if TYPE_CHECKING:
    from .service import Result

_DPI = 150
_FONT = 9  # base font size, points
_TITLE_FONT = 10.5
_MAX_TOKEN_CHARS = 14
_MAX_RANKS = 20  # most top-k entries drawn per list; a larger k is cut (and the cut is said)


# -- text helpers ------------------------------------------------------------------------------

_VISIBLE = {"\n": "⏎", "\r": "\\r", "\t": "⇥", "\xa0": "\\xa0", "\u200b": "\\u200b"}


def _escape_math(text: str) -> str:
    """matplotlib reads `$...$` as math: make every dollar sign literal."""
    return text.replace("$", r"\$")


def token_label(token: str, limit: int = _MAX_TOKEN_CHARS) -> str:
    """A decoded token as a readable one-line label: whitespace made visible, long ones cut."""
    if token == "":
        return "∅"
    if token.strip(" ") == "":
        return "␣" if len(token) == 1 else f"␣×{len(token)}"
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif not ch.isprintable() and ch != " ":
            out.append(ascii(ch)[1:-1])
        else:
            out.append(ch)
    text = "".join(out)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _escape_math(text)


def _short(text: str, limit: int) -> str:
    """One line of at most `limit` characters: newlines shown as ⏎, the middle elided between
    whole words (a word is cut only when it alone is longer than its share)."""
    one = text.replace("\r\n", "\n").replace("\n", "⏎").replace("\t", "⇥")
    if len(one) > limit and limit < 8:
        one = one[: limit - 1] + "…"
    elif len(one) > limit:
        budget = limit - 3  # " … "
        head_n = budget * 2 // 5
        tail_n = budget - head_n
        head, tail = one[:head_n], one[len(one) - tail_n :]
        if not one[head_n].isspace() and " " in head.strip():
            head = head[: head.rstrip().rfind(" ")]
        if not one[len(one) - tail_n - 1].isspace() and " " in tail.strip():
            tail = tail[tail.lstrip().find(" ") + (len(tail) - len(tail.lstrip())) + 1 :]
        one = f"{head.rstrip()} … {tail.lstrip()}"
    return _escape_math(one)


def _value_text(value: Any, limit: int) -> str:
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        if "positive_prompt" in value and "negative_prompt" in value:  # a steering spec
            each = max(8, limit // 3)
            text = f'{_value_text(value["positive_prompt"], each)} − {_value_text(value["negative_prompt"], each)}'
            if "layer" in value:
                text += f" at layer {value['layer']}"
            if value.get("coefficient") is not None:
                text += f" ×{_value_text(value['coefficient'], 8)}"
            return text
        return ", ".join(f"{k}={_value_text(v, max(8, limit // max(len(value), 1)))}" for k, v in value.items())
    if isinstance(value, str):
        return f'"{_short(value, limit)}"'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return _escape_math(",".join(str(v) for v in value))
    return _escape_math(str(value))


# -- which parameters to name ------------------------------------------------------------------

# Shown by the axes already, or noise at their default.
_HIDDEN_ALWAYS = {"layers", "top_k", "max_new_tokens"}
_HIDDEN_DEFAULT = {"position": -1}


def _flat_params(result: Result) -> dict[str, Any]:
    """The job's parameters plus its model, for titles and labels."""
    return {"model": result.job.get("model"), **(result.job.get("params") or {})}


def _shown(key: str, value: Any) -> bool:
    if value is None or key in _HIDDEN_ALWAYS:
        return False
    return not (key in _HIDDEN_DEFAULT and value == _HIDDEN_DEFAULT[key])


_KEY_ORDER = (
    "prompt", "clean_prompt", "corrupted_prompt", "source_prompt", "target_prompt", "positive_prompt",
    "negative_prompt", "answer", "wrong_answer", "layer", "coefficient", "position", "model",
)


def _order(key: str) -> tuple[int, str]:
    return (_KEY_ORDER.index(key) if key in _KEY_ORDER else len(_KEY_ORDER)), key


def _differing(results: Sequence[Result]) -> tuple[list[str], dict[str, Any]]:
    """The parameter names whose values differ between jobs, and the ones all jobs share."""
    flats = [_flat_params(r) for r in results]
    keys: list[str] = []
    for flat in flats:
        keys.extend(k for k in flat if k not in keys)
    keys.sort(key=_order)
    missing = object()
    differ = [k for k in keys if len({repr(f.get(k, missing)) for f in flats}) > 1]
    common = {k: flats[0][k] for k in keys if k not in differ and k in flats[0]}
    return differ, common


def _is_prompt(key: str) -> bool:
    return "prompt" in key


def job_labels(results: Sequence[Result], limit: int = 64, exclude: Sequence[str] = ()) -> list[str]:
    """A short label per job, built from the parameters that differ between the jobs.

    The first differing prompt is shown as its quoted text; up to two other differing
    parameters follow as `name=value`. Jobs that differ in nothing shown get their id.
    """
    differ, _ = _differing(results)
    shown = [k for k in differ if k not in _HIDDEN_ALWAYS and k not in exclude]
    if not shown:
        shown = [k for k in differ if k not in exclude]
    prompts = [k for k in shown if _is_prompt(k)]
    others = [k for k in shown if not _is_prompt(k)][:2]
    keys = prompts[:1] + others
    pair = others == ["answer", "wrong_answer"]  # patching: `" Mary" vs " John"`
    labels = []
    for r in results:
        flat = _flat_params(r)
        parts = []
        for key in keys:
            value = flat.get(key)
            if _is_prompt(key) and isinstance(value, str):
                parts.append(_value_text(value, max(28, limit - 16 * len(others))))
            elif pair and key == "answer":
                parts.append(f"{_value_text(value, 12)} vs {_value_text(flat.get('wrong_answer'), 12)}")
            elif not (pair and key == "wrong_answer"):
                parts.append(f"{key}={_value_text(value, 48 if isinstance(value, Mapping) else 16)}")
        labels.append(", ".join(parts) if parts else f"job {r.job.get('id')}")
    # Two jobs with the same visible label (they differ only in what is not shown) get their id.
    if len(set(labels)) < len(labels):
        labels = [f"{lab} (job {r.job.get('id')})" if keys else lab for lab, r in zip(labels, results, strict=False)]
    return labels


def _heading(results: Sequence[Result], title: str | None, width_in: float, skip: Sequence[str] = ()) -> str:
    """The figure's title: experiment, model and the parameters every job shares (but those in
    `skip`, which the figure shows itself), wrapped."""
    exp = results[0].job["experiment"]
    _, common = _differing(results)
    model = common.pop("model", None)
    for key in skip:
        common.pop(key, None)
    first = " · ".join(x for x in (title or exp, model and _escape_math(str(model)), _job_ids(results)) if x)
    parts = [f"{k}={_value_text(v, 70)}" for k, v in common.items() if _shown(k, v)]
    chars = max(40, int(width_in * 72 / (_TITLE_FONT * 0.56)))
    lines = [first]
    line = ""
    for part in parts:
        if line and len(line) + 3 + len(part) > chars:
            lines.append(line)
            line = part
        else:
            line = f"{line}   {part}" if line else part
    if line:
        lines.append(line)
    return "\n".join(lines)


def _job_ids(results: Sequence[Result]) -> str:
    ids = [str(r.job.get("id")) for r in results]
    if len(ids) > 4:
        return f"{len(ids)} jobs: {', '.join(ids[:3])}, …"
    return ("job " if len(ids) == 1 else "jobs ") + ", ".join(ids)


# -- small numeric helpers ---------------------------------------------------------------------


def _array(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=float)


def _field(result: Result, name: str) -> Any:
    try:
        return result[name]
    except KeyError:
        exp = result.job.get("experiment")
        job = result.job.get("id")
        raise PlotError(f"result of job {job} ({exp}) has no {name!r}: not a built-in {exp} result") from None


def _grid(n: int, panel_w: float, max_w: float = 18.0, max_cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(n, max_cols, int(max_w // max(panel_w, 0.1)) or 1))
    return cols, math.ceil(n / cols)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def _bottom_legend(fig: Any, **kw: Any) -> Any:
    """A legend under the plots (constrained layout makes room for it)."""
    return fig.legend(loc="outside lower center", fontsize=_FONT, frameon=False, **kw)


class Plan(NamedTuple):
    """What a `plot` hook returns: the body's size in inches and the function that draws it on a
    matplotlib `Figure`. A plain `(width, height, draw)` tuple will do."""

    width: float
    height: float
    draw: Callable[[Any], None]
    #: Parameters the figure shows in full itself, left out of the heading.
    shown_in_figure: tuple[str, ...] = ()


# -- logit lens --------------------------------------------------------------------------------


def logit_lens(results: Sequence[Result], labels: list[str]) -> Plan:
    data = []
    for r in results:
        probs = _array(_field(r, "top_probs"))
        if probs.ndim == 1:
            probs = probs[None, :]
        tokens = _field(r, "top_tokens")
        if tokens and isinstance(tokens[0], str):
            tokens = [tokens]
        layers = [int(x) for x in _array(_field(r, "layers")).reshape(-1)]
        full_k = probs.shape[1]
        probs = probs[:, :_MAX_RANKS]
        data.append((layers, probs, [[token_label(t) for t in row[:_MAX_RANKS]] for row in tokens], full_k))

    n_layers = max(len(d[0]) for d in data)
    k = max(d[1].shape[1] for d in data)
    longest = max((len(t.replace("\\$", "$")) for d in data for row in d[2] for t in row), default=4)
    cell_w = min(1.15, max(0.55, 0.068 * longest + 0.22))
    cell_h = 0.27
    font = 8.0
    panel_w = k * cell_w + 0.7  # y tick labels and padding
    # Keep big grids (many ranks, many layers) on a page: shrink cells and font together.
    scale = min(1.0, 17.0 / panel_w, 26.0 / (n_layers * cell_h + 0.8))
    cell_w, cell_h, font = cell_w * scale, cell_h * scale, max(4.0, font * scale)
    panel_w = k * cell_w + 0.7
    panel_h = n_layers * cell_h + (0.95 if len(results) > 1 else 0.6)
    cols, rows = _grid(len(results), panel_w, max_w=17.0)
    widths = [d[1].shape[1] * cell_w + 0.7 for d in data]
    # One row: each panel as wide as its own ranks; several rows: columns as wide as the widest.
    ratios = widths if rows == 1 else None
    width = (sum(widths) if rows == 1 else cols * panel_w) + 1.3  # colorbar
    height = rows * panel_h

    def draw(fig: Any) -> None:
        from matplotlib.colors import Normalize

        cmap = _cmap("Blues")
        norm = Normalize(0.0, 1.0)
        axes = fig.subplots(rows, cols, squeeze=False, width_ratios=ratios)
        image = None
        for i, ax in enumerate(axes.flat):
            if i >= len(data):
                ax.set_axis_off()
                continue
            layers, probs, toks, full_k = data[i]
            image = ax.imshow(probs, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            # Every grid keeps the same cell size; one with fewer layers sits at the top.
            ax.set_box_aspect(probs.shape[0] * cell_h / (probs.shape[1] * cell_w))
            for y in range(probs.shape[0]):
                for x in range(probs.shape[1]):
                    rgba = cmap(norm(probs[y, x]))
                    light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
                    ax.text(x, y, toks[y][x], ha="center", va="center", fontsize=font,
                            color="white" if light < 0.5 else "black", clip_on=True)
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=max(font, 6.5))
            ax.set_xticks(range(probs.shape[1]), [str(j + 1) for j in range(probs.shape[1])], fontsize=max(font, 6.5))
            shown_k = probs.shape[1]
            ax.set_xlabel("rank" if shown_k == full_k else f"rank (first {shown_k} of {full_k})", fontsize=_FONT)
            ax.set_ylabel("layer", fontsize=_FONT)
            ax.tick_params(length=0)
            for spine in ax.spines.values():
                spine.set_visible(False)
            if len(data) > 1:
                ax.set_title(labels[i], fontsize=_FONT)
        if image is not None:
            bar = fig.colorbar(image, ax=axes, shrink=min(1.0, 5.0 / max(height, 0.1)) if height > 6 else 1.0,
                               aspect=30, pad=0.02, panchor=False)
            for ax in axes.flat:
                ax.set_anchor("N")
            bar.set_label("probability", fontsize=_FONT)
            bar.ax.tick_params(labelsize=_FONT - 1)

    return Plan(width, height, draw)


# Fonts for the scripts DejaVu lacks (CJK and more), used as fallbacks where installed.
_FALLBACK_FONTS = (
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans",
    "WenQuanYi Zen Hei", "Droid Sans Fallback", "Hiragino Sans", "Microsoft YaHei", "Noto Sans",
    "Noto Sans Symbols 2", "Arial Unicode MS",
)


def _fallback_fonts() -> list[str]:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return [name for name in _FALLBACK_FONTS if name in installed]


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


# -- patching ----------------------------------------------------------------------------------


#: From this many jobs on, a patching overlay draws the jobs' mean and spread, not a line each.
MANY_JOBS = 5


def patching(results: Sequence[Result], labels: list[str]) -> Plan:
    """One job: its logit differences with the clean and corrupted levels. Several: the fraction
    of each job's gap restored, which is comparable across prompts and answers where raw logit
    differences are not; many: their mean and spread."""
    rows = []
    for r in results:
        layers = [int(x) for x in _array(_field(r, "layers")).reshape(-1)]
        diff = _array(_field(r, "logit_diff")).reshape(-1)
        rows.append((layers, diff, float(_field(r, "clean_logit_diff")), float(_field(r, "corrupted_logit_diff"))))
    n_layers = len({layer for row in rows for layer in row[0]})
    width = min(13.0, max(6.8, 0.22 * n_layers + 5.2))
    if len(rows) == 1:
        answers = (results[0].job["params"].get("answer"), results[0].job["params"].get("wrong_answer"))
        return Plan(width, 4.4 + 0.19 * 4, _patching_one(rows[0], answers))
    entries = 4 if len(rows) >= MANY_JOBS else len(rows) + 2
    return Plan(width, 4.4 + 0.19 * (entries + 2), _patching_many(rows, labels))


def _layer_axis(ax: Any, rows: Sequence[tuple[list[int], Any, float, float]]) -> None:
    all_layers = sorted({layer for row in rows for layer in row[0]})
    if len(all_layers) <= 40:
        ax.set_xticks(all_layers)
    ax.set_xlabel("patched layer", fontsize=_FONT + 0.5)
    ax.tick_params(labelsize=_FONT)
    ax.grid(axis="y", color="0.92")
    ax.margins(x=0.03)


def _patching_one(row: tuple[list[int], Any, float, float], answers: tuple[Any, Any]) -> Callable[[Any], None]:
    layers, diff, clean, corrupted = row

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        (line,) = ax.plot(layers, diff, marker="o", markersize=4.5, linewidth=1.8, color="tab:blue",
                          label="patched run (clean layer output → corrupted run)")
        h1 = ax.axhline(clean, color="tab:green", linestyle="--", linewidth=1.2, label=f"clean run ({clean:+.2f})")
        h2 = ax.axhline(corrupted, color="tab:red", linestyle=":", linewidth=1.4,
                        label=f"corrupted run ({corrupted:+.2f})")
        ax.axhline(0.0, color="0.75", linewidth=0.8, zorder=0)
        _layer_axis(ax, [row])
        answer, wrong = answers
        ax.set_ylabel(f'logit("{token_label(str(answer))}") − logit("{token_label(str(wrong))}")', fontsize=_FONT + 0.5)
        if abs(clean - corrupted) > 1e-6:
            def frac(y: Any) -> Any:
                return (y - corrupted) / (clean - corrupted)

            def unfrac(f: Any) -> Any:
                return f * (clean - corrupted) + corrupted

            sec = ax.secondary_yaxis("right", functions=(frac, unfrac))
            sec.set_ylabel("fraction of the clean difference recovered", fontsize=_FONT)
            sec.tick_params(labelsize=_FONT - 0.5)
        _bottom_legend(fig, handles=[line, h1, h2], ncols=1)

    return draw


def restored_fractions(rows: Sequence[tuple[list[int], Any, float, float]]) -> tuple[list[int], Any, int]:
    """(layers, [job, layer] fraction of each job's gap restored, NaN where a job lacks the
    layer, number of jobs left out because their clean and corrupted runs do not differ)."""
    import numpy as np

    layers = sorted({layer for row in rows for layer in row[0]})
    column = {layer: i for i, layer in enumerate(layers)}
    kept = [row for row in rows if abs(row[2] - row[3]) > 1e-6]
    out = np.full((len(kept), len(layers)), np.nan)
    for j, (job_layers, diff, clean, corrupted) in enumerate(kept):
        for layer, value in zip(job_layers, diff, strict=False):
            out[j, column[layer]] = (value - corrupted) / (clean - corrupted)
    return layers, out, len(rows) - len(kept)


def _patching_many(rows: Sequence[tuple[list[int], Any, float, float]], labels: list[str]) -> Callable[[Any], None]:
    layers, fractions, dropped = restored_fractions(rows)
    many = len(rows) >= MANY_JOBS

    def draw(fig: Any) -> None:
        import numpy as np
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        ax = fig.subplots()
        handles: list[Any] = []
        if many:
            for values in fractions:
                ax.plot(layers, values, color="0.55", linewidth=0.7, alpha=0.45, zorder=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a layer no job patched: NaN
                mean, sd = np.nanmean(fractions, axis=0), np.nanstd(fractions, axis=0)
            ax.fill_between(layers, mean - sd, mean + sd, color="tab:blue", alpha=0.2, linewidth=0, zorder=2)
            ax.plot(layers, mean, marker="o", markersize=4, linewidth=2.2, color="tab:blue", zorder=3)
            handles += [Line2D([], [], color="tab:blue", linewidth=2.2, marker="o", markersize=4,
                               label=f"mean over {len(fractions)} jobs"),
                        Patch(color="tab:blue", alpha=0.2, label="± one standard deviation"),
                        Line2D([], [], color="0.55", linewidth=0.7, label="each job")]
        else:
            kept = [label for label, row in zip(labels, rows, strict=False) if abs(row[2] - row[3]) > 1e-6]
            for values, label, color in zip(fractions, kept, _colors(len(rows)), strict=False):
                (line,) = ax.plot(layers, values, marker="o", markersize=4.5, linewidth=1.8, color=color, label=label)
                handles.append(line)
        ax.axhline(1.0, color="tab:green", linestyle="--", linewidth=1.2)
        ax.axhline(0.0, color="tab:red", linestyle=":", linewidth=1.4)
        handles += [Line2D([], [], color="tab:green", linestyle="--", linewidth=1.2, label="clean run (1)"),
                    Line2D([], [], color="tab:red", linestyle=":", linewidth=1.4, label="corrupted run (0)")]
        if dropped:
            handles.append(Line2D([], [], linestyle="none",
                                  label=f"{dropped} job{'s' if dropped > 1 else ''} left out: "
                                        "no gap between clean and corrupted"))
        _layer_axis(ax, rows)
        ax.set_ylabel("fraction of the clean − corrupted gap restored", fontsize=_FONT + 0.5)
        _bottom_legend(fig, handles=handles, ncols=2 if many or len(handles) > 6 else 1)

    return draw


# -- activations -------------------------------------------------------------------------------


def activations(results: Sequence[Result], labels: list[str]) -> Plan:
    rows = []
    for r in results:
        layers = [int(x) for x in _array(_field(r, "layers")).reshape(-1)]
        norms = _array(_field(r, "norms")).reshape(-1)
        probs = _array(_field(r, "top_probs")).reshape(-1)[:_MAX_RANKS]
        tokens = [token_label(t) for t in _field(r, "top_tokens")[:_MAX_RANKS]]
        rows.append((layers, norms, probs, tokens))
    k = max(len(row[2]) for row in rows)
    full_k = max(int(_array(_field(r, "top_probs")).size) for r in results)
    bars_title = f"next-token top {k}" if k == full_k else f"next-token top {full_k} (first {k})"
    n = len(rows)
    n_layers = len({layer for row in rows for layer in row[0]})
    bar_h = 0.24 * k + 0.55
    height = max(4.2, n * bar_h + 0.6) + (0.25 * math.ceil(n / 2) if n > 1 else 0)
    width = min(14.0, max(6.0, 0.2 * n_layers + 4.5)) + 3.6

    def draw(fig: Any) -> None:
        import numpy as np

        colors = _colors(n)
        left, right = fig.subfigures(1, 2, width_ratios=[width - 3.6, 3.6], wspace=0.02)
        ax = left.subplots()
        for (layers, norms, _, _), label, color in zip(rows, labels, colors, strict=False):
            ax.plot(layers, norms, marker="o", markersize=4.5, linewidth=1.8, color=color, label=label)
        every = np.concatenate([row[1] for row in rows])
        positive = every[every > 0]
        if positive.size and positive.max() / positive.min() > 30:
            ax.set_yscale("log")
        all_layers = sorted({layer for row in rows for layer in row[0]})
        if len(all_layers) <= 40:
            ax.set_xticks(all_layers)
        ax.set_xlabel("layer", fontsize=_FONT + 0.5)
        ax.set_ylabel("block-output norm over the prompt tokens", fontsize=_FONT + 0.5)
        ax.tick_params(labelsize=_FONT)
        ax.grid(color="0.92")
        ax.margins(x=0.03)
        if n > 1:
            left.legend(loc="outside lower center", ncols=2, fontsize=_FONT, frameon=False)
        axes = right.subplots(n, 1, squeeze=False)[:, 0]
        short = job_labels(results, limit=40) if n > 1 else labels
        if n > 1:
            right.suptitle(bars_title, fontsize=_FONT + 0.5)
        xmax = max(float(row[2].max()) for row in rows if row[2].size)
        for ax_b, (_, _, probs, tokens), label, color in zip(axes, rows, short, colors, strict=False):
            _hbars(ax_b, tokens, [float(p) for p in probs], color, xmax)
            ax_b.set_box_aspect((0.24 * len(tokens) + 0.1) / 2.6)
            ax_b.set_title(label if n > 1 else bars_title, fontsize=_FONT, color=color if n > 1 else "black")

    return Plan(width, height, draw)


def _hbars(ax: Any, tokens: list[str], probs: list[float], color: Any, xmax: float) -> None:
    y = list(range(len(tokens)))
    ax.barh(y, probs, color=color, height=0.7)
    for yy, p in zip(y, probs, strict=False):
        ax.text(p + xmax * 0.02, yy, f"{p:.3f}", va="center", fontsize=_FONT - 1.5, color="0.3")
    ax.set_yticks(y, tokens, fontsize=_FONT)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax * 1.22)
    ax.set_xlabel("probability", fontsize=_FONT - 0.5)
    ax.tick_params(axis="x", labelsize=_FONT - 1)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# -- steering and cross-prompt: two top-k lists side by side -----------------------------------


def _softmax(logits: Any) -> Any:
    import numpy as np

    z = logits - logits.max()
    e = np.exp(z)
    return e / e.sum()


Panel = tuple[list[str], list[float | None], list[float | None], float, float]


def steering(results: Sequence[Result], labels: list[str]) -> Plan:
    return _pair(results, labels, ("without the vector", "with the steering vector"), _steering_panel,
                 ("top_ids", "steered_top_ids"))


def cross_prompt(results: Sequence[Result], labels: list[str]) -> Plan:
    names = ("target prompt, unpatched", "target with the source prompt's layer output copied in")
    return _pair(results, labels, names, _cross_prompt_panel, ("top_ids_before", "top_ids_after"))


def _pair(results: Sequence[Result], labels: list[str], names: tuple[str, str], get: Callable[[Result], Panel],
          top_ids: tuple[str, str]) -> Plan:
    """Two top-k lists per job, side by side; `top_ids` names each list's ids (their sizes are k)."""
    panels = [get(r) for r in results]
    ks = [(int(_array(_field(r, top_ids[0])).size), int(_array(_field(r, top_ids[1])).size)) for r in results]
    longest = max((len(t) for p in panels for t in p[0]), default=6)
    panel_w = max(5.0, 3.6 + 0.075 * longest)
    cols, rows = _grid(len(panels), panel_w, max_w=16.0, max_cols=3)
    tallest = max(len(p[0]) for p in panels)
    panel_h = 0.42 * tallest + (1.05 if len(panels) > 1 else 0.8)
    width, height = cols * panel_w, rows * panel_h + 0.35

    def draw(fig: Any) -> None:
        import numpy as np
        from matplotlib.patches import Patch

        base, alt = "0.62", "tab:blue"
        axes = fig.subplots(rows, cols, squeeze=False)
        xmax = max((p for panel in panels for seq in (panel[1], panel[2]) for p in seq if p is not None), default=1.0)
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.set_axis_off()
                continue
            tokens, a, b, floor_a, floor_b = panels[i]
            k_a, k_b = ks[i]
            y = np.arange(len(tokens))
            hh = 0.38
            for offset, values, color, floor, k in ((-hh / 2, a, base, floor_a, k_a), (hh / 2, b, alt, floor_b, k_b)):
                for yy, v in zip(y, values, strict=False):
                    if v is None:
                        ax.text(xmax * 0.01, yy + offset, f"not in its top {k} (< {floor:.3f})", va="center",
                                fontsize=_FONT - 2.5, color="0.45", style="italic")
                        continue
                    ax.barh(yy + offset, v, height=hh, color=color)
                    ax.text(v + xmax * 0.015, yy + offset, f"{v:.3f}", va="center", fontsize=_FONT - 2, color="0.3")
            ax.set_yticks(y, tokens, fontsize=_FONT)
            ax.set_ylim(len(tokens) - 0.5, -0.5)
            ax.set_xlim(0, xmax * 1.25)
            xlabel = "next-token probability"
            if max(k_a, k_b) > _MAX_RANKS // 2:
                xlabel += f"\n(tokens: each run's first {_MAX_RANKS // 2} of its top {max(k_a, k_b)})"
            ax.set_xlabel(xlabel, fontsize=_FONT - 0.5)
            ax.tick_params(axis="x", labelsize=_FONT - 1)
            ax.tick_params(axis="y", length=0)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
            if len(panels) > 1:
                ax.set_title(labels[i], fontsize=_FONT)
        _bottom_legend(fig, handles=[Patch(color=base, label=names[0]), Patch(color=alt, label=names[1])], ncols=2)

    return Plan(width, height, draw)


def _union(ids_a: Sequence[int], toks_a: Sequence[str], ids_b: Sequence[int],
           toks_b: Sequence[str]) -> tuple[list[int], dict[int, str]]:
    order: list[int] = []
    names: dict[int, str] = {}
    cap = _MAX_RANKS // 2
    for i, t in [*zip(ids_a[:cap], toks_a[:cap], strict=False), *zip(ids_b[:cap], toks_b[:cap], strict=False)]:
        if i not in names:
            order.append(i)
            names[i] = t
    return order, names


def _steering_panel(r: Result) -> Panel:
    ids_a = [int(x) for x in _array(_field(r, "top_ids")).reshape(-1)]
    ids_b = [int(x) for x in _array(_field(r, "steered_top_ids")).reshape(-1)]
    pa = [float(x) for x in _array(_field(r, "top_probs")).reshape(-1)]
    pb = [float(x) for x in _array(_field(r, "steered_top_probs")).reshape(-1)]
    order, names = _union(ids_a, _field(r, "top_tokens"), ids_b, _field(r, "steered_top_tokens"))
    # Probabilities from the full lists: a token is "not in its top k" only when it truly is not.
    a = dict(zip(ids_a, pa, strict=False))
    b = dict(zip(ids_b, pb, strict=False))
    order.sort(key=lambda i: -max(a.get(i, 0.0), b.get(i, 0.0)))
    return ([token_label(names[i]) for i in order], [a.get(i) for i in order], [b.get(i) for i in order],
            min(pa, default=0.0), min(pb, default=0.0))


def _cross_prompt_panel(r: Result) -> Panel:
    ids_a = [int(x) for x in _array(_field(r, "top_ids_before")).reshape(-1)]
    ids_b = [int(x) for x in _array(_field(r, "top_ids_after")).reshape(-1)]
    order, names = _union(ids_a, _field(r, "top_tokens_before"), ids_b, _field(r, "top_tokens_after"))
    try:  # the full logits give every token's probability in both runs
        pa_all = _softmax(_array(r["logits_before"]).reshape(-1))
        pb_all = _softmax(_array(r["logits_after"]).reshape(-1))
        a = {i: float(pa_all[i]) for i in order}
        b = {i: float(pb_all[i]) for i in order}
    except KeyError:
        a = dict(zip(ids_a, (float(x) for x in _array(_field(r, "top_probs_before")).reshape(-1)), strict=False))
        b = dict(zip(ids_b, (float(x) for x in _array(_field(r, "top_probs_after")).reshape(-1)), strict=False))
    order.sort(key=lambda i: -max(a.get(i, 0.0), b.get(i, 0.0)))
    floor_a = min((a[i] for i in ids_a if i in a), default=0.0)
    floor_b = min((b[i] for i in ids_b if i in b), default=0.0)
    tokens = [token_label(names[i]) for i in order]
    return tokens, [a.get(i) for i in order], [b.get(i) for i in order], floor_a, floor_b


# -- generation --------------------------------------------------------------------------------

_WRAP = 96  # characters per line of the text panel
_MAX_LINES = 48
_MONO_ADVANCE = 0.602  # DejaVu Sans Mono: every glyph is 0.602 em wide


def _wrap_spans(text: str, width: int = _WRAP) -> list[tuple[int, int]]:
    """Greedy word wrap as (start, end) spans of `text`, so a span can be split at any index."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for para in text.split("\n"):
        i, n = 0, len(para)
        if n == 0:
            spans.append((pos, pos))
        while i < n:
            if n - i <= width:
                spans.append((pos + i, pos + n))
                break
            cut = para.rfind(" ", i + 1, i + width + 1)
            if cut <= i:  # one word longer than the line: break it
                spans.append((pos + i, pos + i + width))
                i += width
            else:  # the space at the break is dropped
                spans.append((pos + i, pos + cut))
                i = cut + 1
        pos += n + 1
    return spans


def _shorten_line(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def generate(results: Sequence[Result], labels: list[str]) -> Plan:
    blocks = []
    others = job_labels(results, exclude=("prompt",)) if len(results) > 1 else [""]
    for r, other in zip(results, others, strict=False):
        prompt = str(r.job.get("params", {}).get("prompt", "")).replace("\r\n", "\n").replace("\t", "    ")
        text = str(_field(r, "text")).replace("\r\n", "\n").replace("\t", "    ")
        n_tokens = int(_array(_field(r, "token_ids")).size)
        combined = prompt + text
        spans = _wrap_spans(combined)
        more = 0
        if len(spans) > _MAX_LINES:
            more = len(spans) - (_MAX_LINES - 1)
            spans = spans[: _MAX_LINES - 1]
        head = f"job {r.job.get('id')}" + (f"   {other}" if other and not other.startswith("job ") else "")
        heading = _shorten_line(head, 70) if len(results) > 1 else ""
        blocks.append((combined, len(prompt), spans, more, n_tokens, heading))
    line_h = _FONT * 1.5 / 72  # inches per line
    heights = [0.27 + (len(b[2]) + (1 if b[3] else 0)) * line_h + 0.12 for b in blocks]
    width = _WRAP * _FONT * _MONO_ADVANCE / 72 + 0.5
    height = sum(heights)

    def draw(fig: Any) -> None:
        from matplotlib import rcParams

        axes = fig.subplots(len(blocks), 1, squeeze=False, height_ratios=heights)[:, 0]
        mono = list(rcParams["font.monospace"])  # with any fallback fonts for other scripts
        for ax, (combined, boundary, spans, more, n_tokens, head) in zip(axes, blocks, strict=True):
            ax.set_axis_off()

            def put(text: str, x: float, y: float, escape: bool = True, ax: Any = ax, **kw: Any) -> Any:
                return ax.annotate(_escape_math(text) if escape else text, xy=(0, 1), xycoords="axes fraction",
                                   xytext=(x, -y), textcoords="offset points", va="top", ha="left",
                                   annotation_clip=False, **kw)

            key = f"prompt (grey) + {n_tokens} generated token{'s' if n_tokens != 1 else ''} (black)"
            if head:
                title = put(head, 0, 0, escape=False, fontsize=_FONT - 0.5, color="0.2", weight="bold")
                ax.annotate("   ·   " + key, xy=(1, 0), xycoords=title, va="bottom", ha="left",
                            fontsize=_FONT - 0.5, color="0.4", annotation_clip=False)
            else:
                put(key, 0, 0, fontsize=_FONT - 0.5, color="0.4")
            y = 0.27 * 72
            for start, stop in spans:
                cut = min(max(boundary, start), stop)
                # The line is drawn whole (so its glyphs sit where the font puts them) and the
                # prompt's part drawn over it in grey: no seam where the colours meet.
                text = combined[start:stop]
                put(text, 0, y, fontsize=_FONT, family=mono, color="black")
                if cut > start:
                    put(combined[start:cut], 0, y, fontsize=_FONT, family=mono, color="0.55",
                        bbox=dict(boxstyle="square,pad=0", facecolor="white", edgecolor="none"))
                y += line_h * 72
            if more:
                put(f"… ({more} more lines)", 0, y, fontsize=_FONT - 0.5, color="0.4", style="italic")

    return Plan(width, height, draw, shown_in_figure=("prompt",))


# -- entry points ------------------------------------------------------------------------------

def _plot_hook(results: Sequence[Result]) -> Callable[[Sequence[Result], list[str]], Any]:
    """The `plot` hook of the one experiment these results are of; `PlotError` if none."""
    from . import experiments

    if not results:
        raise PlotError("plot takes at least one result")
    names: list[str] = []
    for r in results:
        name = str(r.job.get("experiment"))
        if name not in names:
            names.append(name)
    if len(names) > 1:
        shown = ", ".join(names[:-1]) + f" and {names[-1]}"
        raise PlotError(f"plot takes results of one experiment; got {shown}")
    try:
        plot = experiments.get(names[0]).hook("plot")
    except UnknownExperiment:
        plot = None
    if plot is None:
        drawn = ", ".join(e.name for e in experiments.all_experiments() if e.plot is not None)
        raise PlotError(f"no plot for experiment {names[0]!r}: plot draws {drawn} (an experiment of your own "
                        "names one with @experiment(..., plot=...), and is loaded with --import)")
    return plot


def default_plot_name(results: Sequence[Result]) -> str:
    """A file name for the figure of these results: `<experiment>-<job id>[-<job id>…].png`."""
    results = list(results)
    if not results:
        raise PlotError("plot takes at least one result")
    exp = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(results[0].job.get("experiment", "results"))).strip("._") or "results"
    ids = [re.sub(r"[^A-Za-z0-9]+", "", str(r.job.get("id", ""))) for r in results]
    name = "-".join([exp, *ids[:3]])
    if len(ids) > 3:
        name += f"-and-{len(ids) - 3}-more"
    return name + ".png"


def figure(results: Sequence[Result], title: str | None = None) -> Any:
    """The matplotlib `Figure` for results of one experiment, drawn but not written (for a
    notebook, or to inspect); `plot_results` writes it. Raises `PlotError` as `plot_results`."""
    results = list(results)
    plot = _plot_hook(results)
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'ndif-jobs[plot]'") from None
    labels = job_labels(results)
    width, height, draw, shown_in_figure = Plan(*plot(results, labels))
    heading = _heading(results, title, width, skip=shown_in_figure)
    title_h = (heading.count("\n") + 1) * _TITLE_FONT * 1.35 / 72 + 0.15
    with matplotlib.rc_context(_rc()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig = Figure(figsize=(width, height + title_h), layout="constrained")
        draw(fig)
        fig.suptitle(heading, fontsize=_TITLE_FONT)
    return fig


def _rc() -> dict[Any, Any]:  # matplotlib types its keys as a Literal of every rc name
    fallbacks = _fallback_fonts()
    return {
        "font.size": _FONT,
        "axes.titlesize": _FONT + 0.5,
        "font.family": ["DejaVu Sans", *fallbacks],
        "font.monospace": ["DejaVu Sans Mono", *fallbacks],
        "savefig.dpi": _DPI,
    }


def plot_results(results: Sequence[Result], out: Path | str, title: str | None = None) -> Path:
    """Draw the figure for results of one experiment and write it to `out`; returns the path written.

    `out` may be a file (its suffix picks the format: .png, .pdf, .svg; none means .png) or an
    existing folder (the file is then named by `default_plot_name`). Raises `PlotError` (a
    `ValueError` and a `BadInput`) for no results, mixed experiments or an experiment without a
    `plot` hook.
    """
    results = list(results)
    fig = figure(results, title)
    import matplotlib

    out = Path(out)
    if out.is_dir():
        out = out / default_plot_name(results)
    elif not out.suffix:
        out = out.with_suffix(".png")
    with matplotlib.rc_context(_rc()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=_DPI)
    return out
