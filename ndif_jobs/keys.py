"""Cache keys: one key per computation, so the same experiment is never run twice.

key = sha256 of canonical JSON of {model key, model revision, experiment name, hash of the
experiment's source, parameters, nnsight major.minor}. Canonical means sorted keys and no
whitespace, so equal inputs give equal keys on every machine.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model_refs import ModelRef


@functools.lru_cache(maxsize=1)
def nnsight_major_minor() -> str:
    try:
        version = importlib.metadata.version("nnsight")
    except importlib.metadata.PackageNotFoundError:
        return "none"
    return ".".join(version.split(".")[:2])


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(model_key: str, revision: str | None, experiment: str, source_hash: str, params: dict[str, Any]) -> str:
    payload = {
        "model_key": model_key,
        "revision": revision,
        "experiment": experiment,
        "source": source_hash,
        "params": params,
        "nnsight": nnsight_major_minor(),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def computation_keys(
    ref: ModelRef, experiment: str, source_hash: str, params: dict[str, Any]
) -> tuple[str, tuple[str, ...]]:
    """The key of running `experiment` with `params` on `ref`, and the keys earlier versions filed
    the same computation under (they named local models by path: see `model_refs.ModelRef.legacy`)."""
    key = cache_key(ref.model_key, ref.revision, experiment, source_hash, params)
    older = (cache_key(model_key, revision, experiment, source_hash, params) for model_key, revision in ref.legacy)
    return key, tuple(k for k in older if k != key)
