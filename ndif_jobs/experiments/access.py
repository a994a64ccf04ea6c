"""Finding a language model's parts across architectures (travels to NDIF with the runtime).

Experiments name layers through these helpers instead of `model.transformer.h` or
`model.model.layers`, so one experiment runs on GPT-2-style, Llama-style and GPT-NeoX-style
models alike. Block outputs are a tensor in transformers 5 and a tuple in older releases;
`hidden` takes the hidden states from either (the old tutorials' `.output[0]` silently reads
batch row 0 on transformers 5).
"""

from __future__ import annotations

from typing import Any

BLOCK_PATHS = (
    "model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks", "layers",
)
NORM_PATHS = (
    "model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
    "transformer.norm_f", "norm",
)
UNEMBED_PATHS = ("lm_head", "embed_out")


def _find(model: Any, paths: tuple[str, ...], what: str) -> Any:
    for path in paths:
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node
    raise AttributeError(f"cannot find the model's {what} (looked for {', '.join(paths)})")


def blocks(model: Any) -> Any:
    """The list of transformer blocks (an envoy supporting len() and indexing)."""
    return _find(model, BLOCK_PATHS, "block list")


def final_norm(model: Any) -> Any:
    return _find(model, NORM_PATHS, "final norm")


def unembedding(model: Any) -> Any:
    return _find(model, UNEMBED_PATHS, "unembedding (lm_head)")


def n_layers(model: Any) -> int:
    return len(blocks(model))


def layer_indices(model: Any, layers: Any) -> list[int]:
    """`None` -> every layer; negative indices count from the end; out of range -> IndexError."""
    total = n_layers(model)
    if layers is None:
        return list(range(total))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if not -total <= layer < total:
            raise IndexError(f"layer {layer} is out of range: the model has {total} layers (0..{total - 1})")
        out.append(layer % total)
    return out


def hidden(output: Any) -> Any:
    """A block's hidden states, whether the block returned a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


def logits(model: Any) -> Any:
    """The model's output logits inside a trace ([batch, seq, vocab])."""
    out = model.output
    return out.logits if hasattr(out, "logits") else hidden(out)
