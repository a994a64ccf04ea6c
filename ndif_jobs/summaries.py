"""One-glance summaries of the built-ins' results, for `ndif-jobs results` and the demo."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _tokens(tokens: list[str], probs: Any, n: int = 3) -> str:
    return ", ".join(f"{t!r} {float(p):.3f}" for t, p in list(zip(tokens, probs.tolist()))[:n])


def _patching(v: Mapping[str, Any]) -> list[str]:
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
    return [*lines, f"first layer past half of the gap: layer {layers[first]}, {diffs[first]:.3f} ({restored[first]:.0%})"]


def summarize(experiment: str, v: Mapping[str, Any]) -> list[str]:
    """A few lines a researcher would read first; empty for experiments we do not know."""
    try:
        if experiment == "activations":
            layers = v["layers"].tolist()
            norms = v["norms"].tolist()
            peak = max(range(len(norms)), key=norms.__getitem__)
            return [f"next token: {_tokens(v['top_tokens'], v['top_probs'])}",
                    f"largest block-output norm: layer {layers[peak]} ({norms[peak]:.1f})"]
        if experiment == "patching":
            return _patching(v)
        if experiment == "cross-prompt":
            return [f"target before: {_tokens(v['top_tokens_before'], v['top_probs_before'])}",
                    f"target after:  {_tokens(v['top_tokens_after'], v['top_probs_after'])}"]
        if experiment == "steering":
            return [f"without the vector: {_tokens(v['top_tokens'], v['top_probs'])}",
                    f"with the vector:    {_tokens(v['steered_top_tokens'], v['steered_top_probs'])}",
                    f"vector norm {float(v['steering_vector'].norm()):.2f}"]
        if experiment == "logit-lens":
            layers = v["layers"].tolist()
            probs = v["top_probs"][:, 0].tolist()
            return [f"layer {layer:>3}: {tokens[0]!r} {p:.3f}" for layer, tokens, p in zip(layers, v["top_tokens"], probs)]
        if experiment == "generate":
            return [f"generated: {v['text']!r}"]
    except (KeyError, AttributeError, TypeError, ValueError, IndexError):
        return []
    return []
