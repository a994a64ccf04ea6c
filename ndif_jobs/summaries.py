"""One-glance summaries of the built-ins' results, for `ndif-jobs results` and the demo."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _tokens(tokens: list[str], probs: Any, n: int = 3) -> str:
    return ", ".join(f"{t!r} {float(p):.3f}" for t, p in list(zip(tokens, probs.tolist()))[:n])


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
            diffs = v["logit_diff"].tolist()
            layers = v["layers"].tolist()
            clean, corrupt = v["clean_logit_diff"], v["corrupted_logit_diff"]
            span = clean - corrupt
            best = max(range(len(diffs)), key=diffs.__getitem__)
            restored = (diffs[best] - corrupt) / span if span else float("nan")
            return [f"logit diff: clean {clean:.3f}, corrupted {corrupt:.3f}",
                    f"patching layer {layers[best]} restores most: {diffs[best]:.3f} ({restored:.0%} of the gap)"]
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
