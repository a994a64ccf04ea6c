"""Pre-flight checks at submit time, from the model's config and tokenizer (no weights, no torch).

A bad layer index found by NDIF after a night in its queue costs a researcher a day; found here
it is a one-line error before anything is queued. What a parameter is comes from its type
(`Layer`, `Layers`, `Position`, `Prompt`, `Token` in `experiments.params`), so users'
experiments get the same checks as the built-ins. Pre-flight also puts parameters in one
canonical form before they are keyed (`layers=0:30` is the default "all layers"), and gives the
result size from the experiment's `estimate` hook, which the worker uses to keep one request's
answer under `max_result_bytes`.

The config and `tokenizer.json` are read as plain files: from a local folder, from the converted
embedded model, or from the Hugging Face cache. Only a job for NDIF reaches for the hub, and only
for the few small files its worker needs to build the request (`MODEL_FILES`); an NDIF job whose
model files cannot be had is refused (`require_buildable`), never queued to fail at night. For a
local model whose files are not at hand the checks are skipped and the worker reports errors.

The tokenizer here is the `tokenizers` library reading `tokenizer.json`: the one transformers
wraps, without importing torch. What it finds about answer tokens is advice (a warning); the
patching result records the tokens the run actually compared.
"""

from __future__ import annotations

import functools
import json
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import BadInput, InvalidParams
from .experiments.estimates import ModelShape
from .experiments.params import LAYER, LAYERS, POSITION, PROMPT, TOKEN, Meaning, meaning_of
from .model_refs import EMBEDDED_NAME, ModelRef

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from .experiments import Experiment

#: SmolLM2-135M's shape, for when the embedded model has not been converted yet.
_EMBEDDED = {"num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}

#: The files an NDIF worker builds a weightless model and its tokenizer from (all small).
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class PreflightWarning(UserWarning):
    """What submit lets through but a researcher should hear about before the results come back."""


# -- the model's files -------------------------------------------------------------------------


def _cached(ref: ModelRef, filename: str) -> Path | None:
    """A hub model's file in the local Hugging Face cache (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref.location, filename, revision=ref.revision)
    except Exception:  # noqa: BLE001 - no cache, no file
        return None
    return Path(found) if isinstance(found, str) and Path(found).exists() else None


def _model_file(ref: ModelRef, models_dir: Path, filename: str) -> Path | None:
    if ref.kind == "folder":
        path: Path | None = Path(ref.location) / filename
    elif ref.kind == "embedded":
        path = models_dir / f"{EMBEDDED_NAME}-{ref.revision}" / filename
    else:
        path = _cached(ref, filename)
    return path if path is not None and path.exists() else None


def model_config(ref: ModelRef, models_dir: Path) -> dict[str, Any] | None:
    """The model's config as a dict (a multimodal one's text config), or None when not at hand."""
    path = _model_file(ref, models_dir, "config.json")
    if path is None:
        return dict(_EMBEDDED) if ref.kind == "embedded" else None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config.get("text_config", config) if isinstance(config, dict) else None


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, mtime_ns: int) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def tokenizer(ref: ModelRef, models_dir: Path) -> Any | None:
    """The model's `tokenizers.Tokenizer` from its tokenizer.json, or None when not at hand."""
    path = _model_file(ref, models_dir, "tokenizer.json")
    if path is None:
        return None
    try:
        return _load_tokenizer(str(path), path.stat().st_mtime_ns)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer: the worker reports it
        return None


def _hub_offline() -> bool:
    import os

    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _files_at_hand(ref: ModelRef) -> bool:
    return _cached(ref, "config.json") is not None and any(_cached(ref, f) for f in _TOKENIZER_FILES)


_fetch_failures: dict[tuple[str, str | None], str] = {}


def fetch_model_files(ref: ModelRef, offline: bool) -> str | None:
    """Make sure a hub model's config and tokenizer are in the local cache, downloading them
    when the hub may be used. None when they are at hand; otherwise why they cannot be had."""
    if _files_at_hand(ref):
        return None
    key = (ref.location, ref.revision)
    if key in _fetch_failures:
        return _fetch_failures[key]
    reason: str | None
    if offline or _hub_offline():
        reason = "NDIF_JOBS_OFFLINE is set" if offline else "HF_HUB_OFFLINE is set"
    else:
        reason = _download(ref)
        if reason is None and not _files_at_hand(ref):
            reason = "the hub's copy of the repo has no config.json or tokenizer"
    if reason is not None:
        _fetch_failures[key] = reason
    return reason


def _download(ref: ModelRef) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot_download(ref.location, revision=ref.revision, allow_patterns=list(MODEL_FILES))
    except GatedRepoError:
        return "the repo is gated: accept its terms on huggingface.co, then set HF_TOKEN (or run `hf auth login`)"
    except RepositoryNotFoundError:
        return "the hub has no such repo (a private one needs HF_TOKEN)"
    except RevisionNotFoundError:
        return f"the hub has no revision {ref.revision!r} of it"
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, a timeout: all "cannot reach"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"the hub cannot be reached ({type(exc).__name__}{': ' + first if first else ''})"
    return None


def require_buildable(ref: ModelRef, backend: str, offline: bool) -> None:
    """Refuse an NDIF job whose worker could not build the request: its model's config and
    tokenizer are neither in the local Hugging Face cache nor to be had from the hub."""
    if backend != "ndif" or ref.kind != "hub":
        return
    reason = fetch_model_files(ref, offline)
    if reason is None:
        return
    from huggingface_hub import constants

    revision = f" --revision {ref.revision}" if ref.revision else ""
    raise BadInput(
        f"cannot queue {ref.spec} for NDIF: its config and tokenizer are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {reason}; the worker builds every NDIF request from them. "
        f"Fetch them once where the hub is reachable: hf download {ref.location}{revision} --include '*.json' "
        "--include 'tokenizer*' (or set HF_HOME to a cache that holds them)"
    )


# -- what the model allows ---------------------------------------------------------------------


def _get(config: dict[str, Any] | None, *names: str) -> int | None:
    for name in names:
        value = (config or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass
class _Model:
    """What pre-flight knows of the model: its shape from the config, its tokenizer if at hand."""

    n_layers: int | None
    load_tokenizer: Callable[[], Any]
    _tokenizer: Any = None
    _loaded: bool = False
    _lengths: dict[str, int] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        if not self._loaded:
            self._tokenizer, self._loaded = self.load_tokenizer(), True
        return self._tokenizer

    def prompt_tokens(self, text: str) -> int | None:
        """How many tokens a forward pass of `text` reads (special tokens included)."""
        if self.tokenizer is None:
            return None
        if text not in self._lengths:
            self._lengths[text] = len(self.tokenizer.encode(text).ids)
        return self._lengths[text]


def check(exp: Experiment, params: dict[str, Any], ref: ModelRef, models_dir: Path,
          *, fetch: bool = False, offline: bool = False) -> tuple[dict[str, Any], int | None]:
    """Check `params` (already validated) against the model; return them in canonical form with
    the estimated result bytes. Raises `InvalidParams` for what cannot run on this model and
    warns (`PreflightWarning`, one line per job) about what runs but may not measure what was
    meant. `fetch`: a hub model's files may be downloaded first (jobs for NDIF). The estimate is
    None for an experiment that registered no `estimate` hook."""
    if fetch and ref.kind == "hub":
        fetch_model_files(ref, offline)
    config = model_config(ref, models_dir)
    model = _Model(
        n_layers=_get(config, "num_hidden_layers", "n_layer", "num_layers"),
        load_tokenizer=lambda: tokenizer(ref, models_dir),
    )
    notes: list[str] = []
    checked = _walk(exp.name, exp.params, params, model, notes, prefix="")
    if notes:
        warnings.warn(f"{exp.name}: {'; '.join(notes)}", PreflightWarning, stacklevel=2)
    estimate = exp.hook("estimate")
    if estimate is None:
        return checked, None
    shape = ModelShape(n_layers=model.n_layers or 0, hidden_size=_get(config, "hidden_size", "n_embd", "d_model") or 0,
                       vocab_size=_get(config, "vocab_size") or 0)
    return checked, estimate(checked, shape)


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _element_meaning(annotation: Any) -> Meaning | None:
    """The meaning of a list's items (`list[Layer]`: an ordered list of layers)."""
    for arg in _members(annotation):
        if typing.get_origin(arg) is list and typing.get_args(arg):
            return meaning_of(typing.get_args(arg)[0])
    return None


def _nested(annotation: Any) -> type[BaseModel] | None:
    for arg in _members(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _walk(exp: str, params_model: type[BaseModel], values: dict[str, Any], model: _Model,
          notes: list[str], prefix: str) -> dict[str, Any]:
    fields: dict[str, FieldInfo] = params_model.model_fields
    meanings = {name: meaning_of(info.annotation, info.metadata) for name, info in fields.items()}
    prompts = {prefix + n: values[n] for n, m in meanings.items() if m is PROMPT and isinstance(values.get(n), str)}
    out = dict(values)
    tokens: dict[str, tuple[str, int]] = {}
    for name, info in fields.items():
        value, where, meaning = values.get(name), prefix + name, meanings[name]
        if value is None:
            continue
        if meaning is LAYER and _is_int(value):
            out[name] = _layer(exp, where, value, model.n_layers)
        elif meaning is LAYERS and isinstance(value, list):
            out[name] = _layer_set(exp, where, value, model.n_layers, all_is_none=info.default is None)
        elif _element_meaning(info.annotation) is LAYER and isinstance(value, list):
            out[name] = [_layer(exp, where, v, model.n_layers, item=True) for v in value]
        elif meaning is POSITION and _is_int(value):
            _position(exp, where, value, prompts, model)
        elif meaning is TOKEN and isinstance(value, str):
            first = _token(exp, where, value, prompts, model, notes)
            if first is not None:
                tokens[where] = (value, first)
        elif (inner := _nested(info.annotation)) is not None and isinstance(value, dict):
            out[name] = _walk(exp, inner, value, model, notes, prefix=f"{where}.")
    _distinct(exp, tokens, model)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer(exp: str, where: str, layer: int, n: int | None, item: bool = False) -> int:
    if n is None:
        return layer
    if not -n <= layer < n:
        said = f"{where}: layer {layer}" if item else f"{where} {layer}"
        raise InvalidParams(f"{exp}: {said} is out of range: the model has {n} layers (0..{n - 1})")
    return layer % n


def _layer_set(exp: str, where: str, layers: list[int], n: int | None, all_is_none: bool) -> list[int] | None:
    if not layers:
        raise InvalidParams(f"{exp}: {where} names no layer: give at least one, or leave it out for all")
    if n is None:
        return sorted(set(layers))
    resolved = sorted({_layer(exp, where, layer, n, item=True) for layer in layers})
    return None if all_is_none and resolved == list(range(n)) else resolved


def _position(exp: str, where: str, position: int, prompts: dict[str, str], model: _Model) -> None:
    if position in (0, -1):  # inside every prompt: each has a token
        return
    for name, text in prompts.items():
        n = model.prompt_tokens(text)
        if n is not None and not -n <= position < n:
            tokens = f"{n} token{'s' if n != 1 else ''}"
            raise InvalidParams(f"{exp}: {where} {position} is outside {name}, which is {tokens} "
                                f"(positions {-n}..{n - 1})")


def _token(exp: str, where: str, text: str, prompts: dict[str, str], model: _Model, notes: list[str]) -> int | None:
    """The first token of a `Token` field; notes what will surprise (several tokens, no space)."""
    tok = model.tokenizer
    if tok is None:
        return None
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise InvalidParams(f"{exp}: {where} {text!r} has no tokens")
    first = tok.decode([ids[0]])
    said = []
    if len(ids) > 1:
        said.append(f"is {len(ids)} tokens, so only its first, {first!r}, is compared")
    if not text[:1].isspace() and any(not p[-1:].isspace() for p in prompts.values()):
        spaced = tok.encode(" " + text, add_special_tokens=False).ids
        if spaced and spaced[0] != ids[0]:
            said.append(f"has no leading space: the token compared is {first!r}, not {tok.decode([spaced[0]])!r}, "
                        "which is what usually follows a prompt that ends in a word")
    if said:
        notes.append(f"{where} {text!r} " + " and ".join(said))
    return ids[0]


def _distinct(exp: str, tokens: dict[str, tuple[str, int]], model: _Model) -> None:
    seen: dict[int, tuple[str, str]] = {}
    for where, (text, first) in tokens.items():
        if first in seen:
            other, other_text = seen[first]
            shared = model.tokenizer.decode([first])
            raise InvalidParams(
                f"{exp}: {other} {other_text!r} and {where} {text!r} begin with the same token {shared!r}, which "
                "is all that is compared: the difference would always be 0. Choose texts whose first tokens differ"
            )
        seen[first] = (where, text)
