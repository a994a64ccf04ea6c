"""Parameter models of the built-in experiments, checked at submit time.

A job's parameters are validated here before anything is queued: a wrong type, a value out of
range or an unknown name is a bad input with a one-line message. The experiment functions then
receive the validated values as a plain dict (they travel to NDIF, pydantic does not).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

#: Longest prompt accepted, in characters: far beyond any real context, short of a memory hazard.
MAX_PROMPT_CHARS = 100_000

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]


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


class Params(BaseModel):
    """Base for experiment parameters: unknown names are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ActivationsParams(Params):
    prompt: Prompt
    layers: list[int] | None = Field(default=None, description="Block indices (default: all).")
    top_k: int = Field(default=5, ge=1, le=1000)

    _layers = field_validator("layers", mode="before")(_layer_list)


class PatchingParams(Params):
    clean_prompt: Prompt
    corrupted_prompt: Prompt
    answer: str = Field(min_length=1, description="Its first token is the right answer.")
    wrong_answer: str = Field(min_length=1, description="Its first token is the wrong answer.")
    layers: list[int] | None = Field(default=None, description="Layers to patch (default: all).")
    position: int | Literal["all"] = Field(default=-1, description="Token position to patch, or 'all'.")

    _layers = field_validator("layers", mode="before")(_layer_list)

    @field_validator("position", mode="before")
    @classmethod
    def _position(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        return value


class CrossPromptParams(Params):
    source_prompt: Prompt
    target_prompt: Prompt
    layer: int
    position: int = -1
    top_k: int = Field(default=5, ge=1, le=1000)


class SteeringParams(Params):
    positive_prompt: Prompt
    negative_prompt: Prompt
    prompt: Prompt
    layer: int
    coefficient: float = 3.0
    top_k: int = Field(default=5, ge=1, le=1000)


class LogitLensParams(Params):
    prompt: Prompt
    layers: list[int] | None = Field(default=None, description="Block indices (default: all).")
    top_k: int = Field(default=5, ge=1, le=1000)
    position: int = -1

    _layers = field_validator("layers", mode="before")(_layer_list)


class GenerationSteering(Params):
    positive_prompt: Prompt
    negative_prompt: Prompt
    layer: int
    coefficient: float = 3.0


class GenerateParams(Params):
    prompt: Prompt
    max_new_tokens: int = Field(default=20, ge=1, le=4096)
    steering: GenerationSteering | None = None
