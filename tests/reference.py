"""Plain transformers implementations of the built-ins, with forward hooks and no nnsight.

Each built-in's numbers must equal these on the same model (within float tolerance): they are
the independent computation the correctness tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def blocks(model: Any) -> Any:
    for path in ("model.layers", "transformer.h"):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
            return node
        except AttributeError:
            continue
    raise AttributeError("no block list")


def final_norm(model: Any) -> Any:
    return model.model.norm if hasattr(model, "model") else model.transformer.ln_f


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def hook(module: Any, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Run `fn` on a block's hidden states; a returned tensor replaces them."""

    def forward_hook(_mod: Any, _inp: Any, out: Any) -> Any:
        h = _hidden(out)
        new = fn(h)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(forward_hook)
    try:
        yield
    finally:
        handle.remove()


def ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def last_logits(model: Any, tokenizer: Any, prompt: str) -> torch.Tensor:
    return model(ids(tokenizer, prompt)).logits[0, -1]


@torch.no_grad()
def capture(model: Any, tokenizer: Any, prompt: str, layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    stack = [hook(blocks(model)[layer], lambda h, layer=layer: seen.__setitem__(layer, h.clone())) for layer in layers]
    for cm in stack:
        cm.__enter__()
    try:
        logits = model(ids(tokenizer, prompt)).logits[0, -1]
    finally:
        for cm in stack:
            cm.__exit__(None, None, None)
    return seen, logits


def activations(model: Any, tokenizer: Any, prompt: str, layers: list[int], k: int) -> dict[str, Any]:
    seen, logits = capture(model, tokenizer, prompt, layers)
    top = logits.softmax(-1).topk(k)
    return {"norms": torch.stack([seen[layer].norm() for layer in layers]), "top_ids": top.indices, "top_probs": top.values}


@torch.no_grad()
def patching(model: Any, tokenizer: Any, clean: str, corrupted: str, answer: int, wrong: int, layers: list[int], position: int) -> dict[str, Any]:
    seen, clean_logits = capture(model, tokenizer, clean, layers)
    corrupted_logits = last_logits(model, tokenizer, corrupted)
    diffs = []
    for layer in layers:
        def patch(h: torch.Tensor, layer: int = layer) -> torch.Tensor:
            h = h.clone()
            h[:, position] = seen[layer][:, position]
            return h

        with hook(blocks(model)[layer], patch):
            logits = last_logits(model, tokenizer, corrupted)
        diffs.append(logits[answer] - logits[wrong])
    return {
        "clean_logit_diff": float(clean_logits[answer] - clean_logits[wrong]),
        "corrupted_logit_diff": float(corrupted_logits[answer] - corrupted_logits[wrong]),
        "logit_diff": torch.stack(diffs),
    }


@torch.no_grad()
def cross_prompt(model: Any, tokenizer: Any, source: str, target: str, layer: int, position: int) -> dict[str, Any]:
    seen, _ = capture(model, tokenizer, source, [layer])
    before = last_logits(model, tokenizer, target)

    def patch(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, position] = seen[layer][:, position]
        return h

    with hook(blocks(model)[layer], patch):
        after = last_logits(model, tokenizer, target)
    return {"logits_before": before, "logits_after": after}


@torch.no_grad()
def steering_vector(model: Any, tokenizer: Any, positive: str, negative: str, layer: int) -> torch.Tensor:
    pos, _ = capture(model, tokenizer, positive, [layer])
    neg, _ = capture(model, tokenizer, negative, [layer])
    return (pos[layer].mean(dim=1) - neg[layer].mean(dim=1))[0]


@torch.no_grad()
def steering(model: Any, tokenizer: Any, positive: str, negative: str, prompt: str, layer: int, coefficient: float, k: int) -> dict[str, Any]:
    vector = steering_vector(model, tokenizer, positive, negative, layer)
    normal = last_logits(model, tokenizer, prompt)
    with hook(blocks(model)[layer], lambda h: h + coefficient * vector):
        steered = last_logits(model, tokenizer, prompt)
    top_n, top_s = normal.softmax(-1).topk(k), steered.softmax(-1).topk(k)
    return {
        "steering_vector": vector,
        "top_ids": top_n.indices, "top_probs": top_n.values,
        "steered_top_ids": top_s.indices, "steered_top_probs": top_s.values,
    }


@torch.no_grad()
def logit_lens(model: Any, tokenizer: Any, prompt: str, layers: list[int], k: int, position: int) -> dict[str, Any]:
    seen, _ = capture(model, tokenizer, prompt, layers)
    stacked = torch.stack([seen[layer][0, position] for layer in layers])
    probs = model.lm_head(final_norm(model)(stacked)).softmax(-1)
    top = probs.topk(k, dim=-1)
    return {"top_ids": top.indices, "top_probs": top.values}


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, n: int, steer: dict | None = None) -> torch.Tensor:
    input_ids = ids(tokenizer, prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if steer is None:
        out = model.generate(input_ids, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    else:
        vector = steering_vector(model, tokenizer, steer["positive_prompt"], steer["negative_prompt"], steer["layer"])
        vector = vector * steer["coefficient"]
        with hook(blocks(model)[steer["layer"]], lambda h: h + vector):
            out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[0, input_ids.shape[-1]:]
