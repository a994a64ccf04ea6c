"""One-glance summaries of results, for `ndif-jobs results` and the demo.

`summarize` asks the experiment's registered `summary` hook; the functions below are the
built-ins' (each named like its experiment's function in `experiments/builtin.py`). They read
torch tensors and numpy arrays alike: `results` reads a built-in's values as numpy arrays, so
that it starts without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# What a summary raises on a result that lacks what it reads: the result is shown without one.
_UNREADABLE = (KeyError, AttributeError, TypeError, ValueError, IndexError)


def summarize(experiment: str, v: Mapping[str, Any]) -> list[str]:
    """A few lines a researcher would read first; empty for an experiment without a summary
    (or not registered in this process: a user's is loaded with `--import`)."""
    from . import experiments
    from .errors import UnknownExperiment

    try:
        summary = experiments.get(experiment).hook("summary")
    except UnknownExperiment:
        return []
    if summary is None:
        return []
    try:
        return [str(line) for line in summary(v)]
    except _UNREADABLE:
        return []


def _norm(values: Any) -> float:
    """The Euclidean norm of a torch tensor or a numpy array alike."""
    return math.sqrt(sum(float(x) ** 2 for x in values.reshape(-1).tolist()))


def _tokens(tokens: list[str], probs: Any, n: int = 3) -> str:
    return ", ".join(f"{t!r} {float(p):.3f}" for t, p in list(zip(tokens, probs.tolist(), strict=False))[:n])


def activations(v: Mapping[str, Any]) -> list[str]:
    layers = v["layers"].tolist()
    norms = v["norms"].tolist()
    peak = max(range(len(norms)), key=norms.__getitem__)
    return [f"next token: {_tokens(v['top_tokens'], v['top_probs'])}",
            f"largest block-output norm: layer {layers[peak]} ({norms[peak]:.1f})"]


def patching(v: Mapping[str, Any]) -> list[str]:
    """Where the effect sits: the first layer whose patch restores half the clean-corrupted gap.

    Not the layer that restores most: patching the last layer at the last position copies the
    clean run's residual stream whole, so it always "restores 100%".
    """
    diffs = v["logit_diff"].tolist()
    layers = v["layers"].tolist()
    clean, corrupt = float(v["clean_logit_diff"]), float(v["corrupted_logit_diff"])
    compared = f" ({v['answer_token']!r} vs {v['wrong_answer_token']!r})" if "answer_token" in v else ""
    lines = [f"logit diff{compared}: clean {clean:.3f}, corrupted {corrupt:.3f}"]
    span = clean - corrupt
    if abs(span) < 1e-6:
        return [*lines, "clean and corrupted runs give the same difference: there is no gap to restore"]
    restored = [(d - corrupt) / span for d in diffs]
    first = next((i for i, f in enumerate(restored) if f >= 0.5), None)
    if first is None:
        best = max(range(len(restored)), key=restored.__getitem__)
        return [*lines, f"no patched layer restores half of the gap (most: layer {layers[best]}, {restored[best]:.0%})"]
    past = f"layer {layers[first]}, {diffs[first]:.3f} ({restored[first]:.0%})"
    return [*lines, f"first layer past half of the gap: {past}"]


def cross_prompt(v: Mapping[str, Any]) -> list[str]:
    return [f"target before: {_tokens(v['top_tokens_before'], v['top_probs_before'])}",
            f"target after:  {_tokens(v['top_tokens_after'], v['top_probs_after'])}"]


def steering(v: Mapping[str, Any]) -> list[str]:
    return [f"without the vector: {_tokens(v['top_tokens'], v['top_probs'])}",
            f"with the vector:    {_tokens(v['steered_top_tokens'], v['steered_top_probs'])}",
            f"vector norm {_norm(v['steering_vector']):.2f}"]


def logit_lens(v: Mapping[str, Any]) -> list[str]:
    layers = v["layers"].tolist()
    probs = v["top_probs"][:, 0].tolist()
    rows = zip(layers, v["top_tokens"], probs, strict=False)
    return [f"layer {layer:>3}: {tokens[0]!r} {p:.3f}" for layer, tokens, p in rows]


def generate(v: Mapping[str, Any]) -> list[str]:
    return [f"generated: {v['text']!r}"]
