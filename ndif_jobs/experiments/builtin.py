"""The built-in experiments: one for each seed nnsight tutorial, in nnsight 0.8 semantics.

Each function receives the model and its validated parameters as a plain dict (the pydantic
models in `params.py` check them at submit time) and returns the job's result: tensors, numbers,
strings and lists of them. The staged ones (generators, see `runtime.py`) let the worker pack
their forward passes with other jobs'. This module travels to NDIF inside a session, so it
imports nothing beyond torch, nnsight and its sibling modules.
"""

from __future__ import annotations

from typing import Any

import torch

from .access import blocks, final_norm, hidden, layer_indices, logits, unembedding
from .runtime import encode_prompts, tokenize
from .stages import Pass, Window


def _decode(model: Any, ids: torch.Tensor) -> list[str]:
    return [model.tokenizer.decode([int(i)]) for i in ids.reshape(-1)]


def _top(model: Any, last_logits: torch.Tensor, k: int) -> dict[str, Any]:
    probs = last_logits.float().softmax(-1)
    top = probs.topk(k, dim=-1)
    return {"top_ids": top.indices, "top_probs": top.values, "top_tokens": _decode(model, top.indices)}


def _first_token(model: Any, text: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} has no tokens")
    return int(ids[0])


def activations(model: Any, p: dict) -> Any:
    """Tutorial 1: each layer's block-output norm over the prompt, and the next-token top-k."""
    layers = sorted(set(layer_indices(model, p.get("layers"))))

    def capture(m: Any, w: Window) -> dict:
        out = {f"norm{layer}": w.tokens(hidden(blocks(m)[layer].output)).norm() for layer in layers}
        out["logits"] = logits(m)[0, -1]
        return out

    (kept,) = yield [Pass(p["prompt"], capture)]
    return {
        "layers": torch.tensor(layers),
        "norms": torch.stack([kept[f"norm{layer}"] for layer in layers]).float(),
        **_top(model, kept["logits"], p["top_k"]),
    }


def patching(model: Any, p: dict) -> Any:
    """Tutorial 2: patch each layer's clean block output into the corrupted run; logit differences."""
    layers = sorted(set(layer_indices(model, p.get("layers"))))
    position = p.get("position", -1)
    answer, wrong = _first_token(model, p["answer"]), _first_token(model, p["wrong_answer"])
    if answer == wrong:
        raise ValueError(
            f"answer {p['answer']!r} and wrong_answer {p['wrong_answer']!r} begin with the same token "
            f"{model.tokenizer.decode([answer])!r}: their logit difference is always 0"
        )
    if position == "all":
        n_clean = tokenize(model, p["clean_prompt"]).shape[-1]
        n_corrupt = tokenize(model, p["corrupted_prompt"]).shape[-1]
        if n_clean != n_corrupt:
            raise ValueError(
                f"position 'all' needs prompts of equal token length: the clean prompt has {n_clean} "
                f"tokens, the corrupted one {n_corrupt}"
            )

    def span(w: Window) -> Any:
        return slice(w.offset, None) if position == "all" else w.index(position)

    def clean(m: Any, w: Window) -> dict:
        out = {f"h{layer}": hidden(blocks(m)[layer].output)[:, span(w)] for layer in layers}
        out["logits"] = logits(m)[0, -1]
        return out

    def corrupted(m: Any, w: Window) -> dict:
        return {"logits": logits(m)[0, -1]}

    def patched(layer: int, value: torch.Tensor) -> Any:
        def body(m: Any, w: Window) -> dict:
            hidden(blocks(m)[layer].output)[:, span(w)] = value
            return {"logits": logits(m)[0, -1]}

        return body

    clean_out, corrupt_out = yield [Pass(p["clean_prompt"], clean), Pass(p["corrupted_prompt"], corrupted)]
    runs = yield [Pass(p["corrupted_prompt"], patched(layer, clean_out[f"h{layer}"])) for layer in layers]

    def diff(x: torch.Tensor) -> torch.Tensor:
        return (x[answer] - x[wrong]).float()

    return {
        "layers": torch.tensor(layers),
        "clean_logit_diff": float(diff(clean_out["logits"])),
        "corrupted_logit_diff": float(diff(corrupt_out["logits"])),
        "logit_diff": torch.stack([diff(run["logits"]) for run in runs]),
        "answer_id": answer,
        "wrong_answer_id": wrong,
        "answer_token": model.tokenizer.decode([answer]),
        "wrong_answer_token": model.tokenizer.decode([wrong]),
    }


def cross_prompt(model: Any, p: dict) -> dict:
    """Tutorial 3: copy the source prompt's block output into the target prompt, in ONE trace.

    Three invokes: the source (read), the target as is (before) and the target patched
    (after); a barrier hands the source's value to the patched invoke.
    """
    (layer,) = layer_indices(model, p["layer"])
    position = p.get("position", -1)
    k = p.get("top_k", 5)
    source, before, after = encode_prompts(model, [p["source_prompt"], p["target_prompt"], p["target_prompt"]])
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(source[0]):
            copied = hidden(blocks(model)[layer].output)[:, source[1].index(position)].clone()
            barrier()
        with tracer.invoke(before[0]):
            logits_before = logits(model)[0, -1].save()
        with tracer.invoke(after[0]):
            barrier()
            hidden(blocks(model)[layer].output)[:, after[1].index(position)] = copied
            logits_after = logits(model)[0, -1].save()
    top_before, top_after = _top(model, logits_before, k), _top(model, logits_after, k)
    return {
        "logits_before": logits_before.float(),
        "logits_after": logits_after.float(),
        "top_ids_before": top_before["top_ids"],
        "top_probs_before": top_before["top_probs"],
        "top_tokens_before": top_before["top_tokens"],
        "top_ids_after": top_after["top_ids"],
        "top_probs_after": top_after["top_probs"],
        "top_tokens_after": top_after["top_tokens"],
    }


def steering_vector(model: Any, positive: str, negative: str, layer: int) -> Any:
    """Stage helper: yields the two contrast passes, returns mean(positive) - mean(negative)."""

    def mean_hidden(m: Any, w: Window) -> dict:
        return {"mean": w.tokens(hidden(blocks(m)[layer].output)).mean(dim=1)[0]}

    pos, neg = yield [Pass(positive, mean_hidden), Pass(negative, mean_hidden)]
    return (pos["mean"] - neg["mean"]).float()


def steering(model: Any, p: dict) -> Any:
    """Tutorial 5: a steering vector from two contrasting prompts, added at one layer."""
    (layer,) = layer_indices(model, p["layer"])
    coefficient = float(p.get("coefficient", 3.0))
    vector = yield from steering_vector(model, p["positive_prompt"], p["negative_prompt"], layer)

    def plain(m: Any, w: Window) -> dict:
        return {"logits": logits(m)[0, -1]}

    def steered(m: Any, w: Window) -> dict:
        h = w.tokens(hidden(blocks(m)[layer].output))
        h += coefficient * vector.to(h.dtype)
        return {"logits": logits(m)[0, -1]}

    normal, steered_out = yield [Pass(p["prompt"], plain), Pass(p["prompt"], steered)]
    k = p.get("top_k", 5)
    top_n, top_s = _top(model, normal["logits"], k), _top(model, steered_out["logits"], k)
    return {
        "steering_vector": vector,
        "top_ids": top_n["top_ids"],
        "top_probs": top_n["top_probs"],
        "top_tokens": top_n["top_tokens"],
        "steered_top_ids": top_s["top_ids"],
        "steered_top_probs": top_s["top_probs"],
        "steered_top_tokens": top_s["top_tokens"],
    }


def logit_lens(model: Any, p: dict) -> Any:
    """Tutorial 6: each layer's block output through the final norm and unembedding."""
    layers = sorted(set(layer_indices(model, p.get("layers"))))
    position = p.get("position", -1)

    def capture(m: Any, w: Window) -> dict:
        at = w.index(position)
        return {f"h{layer}": hidden(blocks(m)[layer].output)[0, at] for layer in layers}

    (kept,) = yield [Pass(p["prompt"], capture)]
    stacked = torch.stack([kept[f"h{layer}"] for layer in layers])
    with torch.no_grad():
        lens_logits = unembedding(model)(final_norm(model)(stacked))
    probs = lens_logits.float().softmax(-1)
    top = probs.topk(p["top_k"], dim=-1)
    return {
        "layers": torch.tensor(layers),
        "top_ids": top.indices,
        "top_probs": top.values,
        "top_tokens": [_decode(model, row) for row in top.indices],
    }


def generate(model: Any, p: dict) -> dict:
    """Greedy generation, optionally with a steering vector added at every step."""
    ids = tokenize(model, p["prompt"])
    n = int(p["max_new_tokens"])
    steer = p.get("steering")
    vector = None
    if steer:
        (layer,) = layer_indices(model, steer["layer"])
        (pos_in, pos_w), (neg_in, neg_w) = encode_prompts(model, [steer["positive_prompt"], steer["negative_prompt"]])
        with model.trace() as tracer:
            with tracer.invoke(pos_in):
                pos = pos_w.tokens(hidden(blocks(model)[layer].output)).mean(dim=1)[0].save()
            with tracer.invoke(neg_in):
                neg = neg_w.tokens(hidden(blocks(model)[layer].output)).mean(dim=1)[0].save()
        vector = (pos - neg).float() * float(steer.get("coefficient", 3.0))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    # nnsight runs nothing after a step loop the generation cut short, so a steered run is
    # pinned to its step count: it always produces `max_new_tokens` tokens.
    pinned = {"min_new_tokens": n} if vector is not None else {}
    with model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=pad, **pinned) as tracer:
        if vector is not None:
            for _step in tracer.iter[:n]:
                h = hidden(blocks(model)[layer].output)
                h += vector.to(h.dtype)
        generated = tracer.result.save()
    new_ids = generated[0, ids.shape[-1] :]
    out = {"token_ids": new_ids, "text": model.tokenizer.decode(new_ids), "prompt_tokens": int(ids.shape[-1])}
    if vector is not None:
        out["steering_vector"] = vector.float()
    return out
