"""Pre-flight checks at submit time, from the model's config alone (no weights, no torch).

A bad layer index found by NDIF after a night in its queue costs a researcher a day; found here
it is a one-line error before anything is queued. The same config gives each built-in's result
size, which the worker uses to keep one request's answer under `max_result_bytes`.

The config is read as plain JSON: from a local folder, from the converted embedded model, or
from the Hugging Face cache (never the network). A model whose config is not at hand is not
checked here; the worker reports the error instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InvalidParams
from .models import EMBEDDED_NAME, ModelRef

#: SmolLM2-135M's shape, for when the embedded model has not been converted yet.
_EMBEDDED = {"num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}


def model_config(ref: ModelRef, models_dir: Path) -> dict[str, Any] | None:
    path: Path | None = None
    if ref.kind == "folder":
        path = Path(ref.location) / "config.json"
    elif ref.kind == "embedded":
        path = models_dir / f"{EMBEDDED_NAME}-{ref.revision}" / "config.json"
        if not path.exists():
            return dict(_EMBEDDED)
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(ref.location, "config.json", revision=ref.revision)
        except Exception:  # noqa: BLE001 - no cache, no check
            return None
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # Multimodal configs nest the language model's.
    return config.get("text_config", config) if isinstance(config, dict) else None


def _get(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int):
            return value
    return None


def check(experiment: str, params: dict[str, Any], config: dict[str, Any] | None) -> int | None:
    """Raise `InvalidParams` for what cannot run on this model; return the estimated result bytes."""
    if config is None:
        return None
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _get(config, "hidden_size", "n_embd", "d_model") or 0
    vocab = _get(config, "vocab_size") or 0
    if layers is not None:
        asked = params.get("layers")
        for layer in ([params["layer"]] if isinstance(params.get("layer"), int) else []) + list(asked or []):
            if not -layers <= layer < layers:
                raise InvalidParams(
                    f"{experiment}: layer {layer} is out of range: the model has {layers} layers (0..{layers - 1})"
                )
        steer = params.get("steering")
        if isinstance(steer, dict) and isinstance(steer.get("layer"), int) and not -layers <= steer["layer"] < layers:
            raise InvalidParams(f"{experiment}: steering layer {steer['layer']} is out of range (0..{layers - 1})")
    n = len(params.get("layers") or []) or (layers or 0)
    k = int(params.get("top_k") or 5)
    estimates = {
        "activations": n * 4 + k * 12,
        "logit-lens": n * k * 12,
        "patching": n * 12 + 64,
        "cross-prompt": 2 * vocab * 4 + 4 * k * 12,
        "steering": hidden * 4 + 2 * k * 12,
        "generate": int(params.get("max_new_tokens") or 20) * 8 + hidden * 4,
    }
    return estimates.get(experiment)
