"""Parameter models of the built-in experiments, and the parameter types pre-flight understands.

A job's parameters are validated here before anything is queued: a wrong type, a value out of
range or an unknown name is a bad input with a one-line message. The experiment functions then
receive the validated values as a plain dict (they travel to NDIF, pydantic does not).

A field typed `Layer`, `Layers`, `Position`, `Prompt` or `Token` says what it means, so that
pre-flight (`ndif_jobs.preflight`) can check it against the model's config and tokenizer at
submit time, for your own experiments exactly as for the built-ins:

* `Layer`: one block index; negative counts from the end. Out of range: refused at submit.
  The function receives it counted from the start (`-1` arrives as `n_layers - 1`).
* `Layers`: a set of block indices (`[0, 4]`, `"0,4"`, `"0:12"`, or `None` for all). Checked
  like `Layer`; delivered sorted, without duplicates, and as `None` when it names every layer,
  so that `layers=0:30` and the default are one computation with one cache key.
* `Position`: a token position (negative counts from the end); it must lie inside every
  `Prompt` of the job.
* `Prompt`: a text the model reads (what `Position` and `Token` are checked against).
* `Token`: a text naming one token, its first (an answer to compare). Submit warns when it is
  several tokens or lacks the leading space a word usually has after a prompt, and refuses two
  `Token` fields of one job that begin with the same token.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

#: Longest prompt accepted, in characters: far beyond any real context, short of a memory hazard.
MAX_PROMPT_CHARS = 100_000


@dataclass(frozen=True)
class Meaning:
    """What a parameter is, as pre-flight reads it from the field's type (see the module doc)."""

    name: str


LAYER = Meaning("layer")
LAYERS = Meaning("layers")
POSITION = Meaning("position")
PROMPT = Meaning("prompt")
TOKEN = Meaning("token")


def meaning_of(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> Meaning | None:
    """The `Meaning` a field's type declares, looking through `X | None` and `X | Literal[...]`."""
    for item in metadata:
        if isinstance(item, Meaning):
            return item
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *extra = typing.get_args(annotation)
        return meaning_of(inner, extra)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = meaning_of(arg)
            if found is not None:
                return found
    return None


def type_text(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> str:
    """A field's type as a user wrote it: `Layers`, `Position | Literal['all']`, `int`."""
    for item in metadata:
        if isinstance(item, Meaning):
            return item.name.capitalize()
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *extra = typing.get_args(annotation)
        return type_text(inner, extra)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _layer_list(value: Any) -> Any:
    """Accept `[0, 1, 2]`, `"0,1,2"`, `"0:6"` (a range) or a single int for a layer list."""
    if isinstance(value, str):
        text = value.strip()
        if ":" in text:
            start, _, stop = text.partition(":")
            try:
                return list(range(int(start or 0), int(stop)))
            except ValueError:
                raise ValueError(f"layers {value!r}: a range is START:STOP with integers") from None
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"layers {value!r}: expected integers such as 0,4,8 or a range 0:12") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return value


Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS), PROMPT]
Token = Annotated[str, StringConstraints(min_length=1), TOKEN]
Layer = Annotated[int, LAYER]
Layers = Annotated[list[int] | None, BeforeValidator(_layer_list), LAYERS]
Position = Annotated[int, POSITION]


class Params(BaseModel):
    """Base for experiment parameters: unknown names are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ActivationsParams(Params):
    prompt: Prompt
    layers: Layers = Field(default=None, description="Block indices (default: all).")
    top_k: int = Field(default=5, ge=1, le=1000)


class PatchingParams(Params):
    clean_prompt: Prompt
    corrupted_prompt: Prompt
    answer: Token = Field(description="Its first token is the right answer.")
    wrong_answer: Token = Field(description="Its first token is the wrong answer.")
    layers: Layers = Field(default=None, description="Layers to patch (default: all).")
    position: Position | Literal["all"] = Field(default=-1, description="Token position to patch, or 'all'.")

    @field_validator("position", mode="before")
    @classmethod
    def _position(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        return value


class CrossPromptParams(Params):
    source_prompt: Prompt
    target_prompt: Prompt
    layer: Layer
    position: Position = -1
    top_k: int = Field(default=5, ge=1, le=1000)


class SteeringParams(Params):
    positive_prompt: Prompt
    negative_prompt: Prompt
    prompt: Prompt
    layer: Layer
    coefficient: float = 3.0
    top_k: int = Field(default=5, ge=1, le=1000)


class LogitLensParams(Params):
    prompt: Prompt
    layers: Layers = Field(default=None, description="Block indices (default: all).")
    top_k: int = Field(default=5, ge=1, le=1000)
    position: Position = -1


class GenerationSteering(Params):
    positive_prompt: Prompt
    negative_prompt: Prompt
    layer: Layer
    coefficient: float = 3.0


class GenerateParams(Params):
    prompt: Prompt
    max_new_tokens: int = Field(default=20, ge=1, le=4096)
    steering: GenerationSteering | None = None
