"""The built-ins' result sizes, from their checked parameters and the model's shape.

Pre-flight records each job's estimate at submit; the worker packs jobs so that one NDIF
request's answer stays under `max_result_bytes`. Each function is registered as its
experiment's `estimate` hook (named like the experiment's function in `builtin.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_DEFAULT_TOP_K = 5
_DEFAULT_NEW_TOKENS = 20


@dataclass(frozen=True)
class ModelShape:
    """What an estimate may know of the model, from its config: 0 where the config is not at hand."""

    n_layers: int
    hidden_size: int
    vocab_size: int


def _n_layers(params: Mapping[str, Any], shape: ModelShape) -> int:
    return len(params.get("layers") or []) or shape.n_layers


def _top_k(params: Mapping[str, Any]) -> int:
    return int(params.get("top_k") or _DEFAULT_TOP_K)


def activations(params: Mapping[str, Any], shape: ModelShape) -> int:
    return _n_layers(params, shape) * 4 + _top_k(params) * 12


def logit_lens(params: Mapping[str, Any], shape: ModelShape) -> int:
    return _n_layers(params, shape) * _top_k(params) * 12


def patching(params: Mapping[str, Any], shape: ModelShape) -> int:
    return _n_layers(params, shape) * 12 + 64


def cross_prompt(params: Mapping[str, Any], shape: ModelShape) -> int:
    return 2 * shape.vocab_size * 4 + 4 * _top_k(params) * 12


def steering(params: Mapping[str, Any], shape: ModelShape) -> int:
    return shape.hidden_size * 4 + 2 * _top_k(params) * 12


def generate(params: Mapping[str, Any], shape: ModelShape) -> int:
    return int(params.get("max_new_tokens") or _DEFAULT_NEW_TOKENS) * 8 + shape.hidden_size * 4
