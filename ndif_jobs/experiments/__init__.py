"""The experiment registry: names -> (parameter model, function), built-ins and your own.

Register your own with the decorator in a module you name with `--import mymodule` or
`NDIF_JOBS_IMPORTS=mymodule`::

    from ndif_jobs import experiment, Params

    class MyParams(Params):
        prompt: str

    @experiment("my-probe", params=MyParams)
    def my_probe(model, p):
        with model.trace(p["prompt"]):
            h = model.model.layers[3].output.save()
        return {"mean": h.mean(dim=1)}

Built-ins are registered by name and imported only when run, so listing or submitting them
never imports torch. A job's cache key includes a hash of its experiment's source, so editing
an experiment re-runs it instead of serving a stale result.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from ..errors import BadInput, InvalidParams, UnknownExperiment
from . import params as P

Params = P.Params


@dataclass
class Experiment:
    """One registered experiment. `target` is `module:function`, imported on first use."""

    name: str
    params: type[BaseModel]
    target: str
    description: str = ""
    version: int = 1
    _fn: Callable[..., Any] | None = field(default=None, repr=False)
    _source_hash: str | None = field(default=None, repr=False)

    def function(self) -> Callable[..., Any]:
        if self._fn is None:
            module_name, _, qualname = self.target.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            self._fn = obj
        return self._fn

    @property
    def source_hash(self) -> str:
        """sha256 of the function's source (read from its file; nothing is imported)."""
        if self._source_hash is None:
            source = self._fn_source()
            self._source_hash = hashlib.sha256(f"{self.version}\n{source}".encode()).hexdigest()
        return self._source_hash

    def _fn_source(self) -> str:
        if self._fn is not None:
            try:
                return inspect.getsource(self._fn)
            except (OSError, TypeError):
                return self.target
        module_name, _, qualname = self.target.partition(":")
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin:
            return self.target
        text = open(spec.origin, encoding="utf-8").read()
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == qualname:
                return ast.get_source_segment(text, node) or self.target
        return self.target

    def validate(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Validated parameters as plain JSON-able values; `InvalidParams` with one line if not."""
        try:
            model = self.params.model_validate(raw)
        except ValidationError as exc:
            raise InvalidParams(f"{self.name}: {_one_line(exc)}") from None
        return model.model_dump(mode="json")

    def describe_params(self) -> list[dict[str, Any]]:
        out = []
        for name, info in self.params.model_fields.items():
            annotation = info.annotation.__name__ if isinstance(info.annotation, type) else str(info.annotation)
            out.append(
                {
                    "name": name,
                    "type": annotation.replace("typing.", ""),
                    "required": info.is_required(),
                    "default": None if info.is_required() else info.get_default(call_default_factory=True),
                    "description": info.description or "",
                }
            )
        return out


def _one_line(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(x) for x in error["loc"]) or "params"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown parameter"
        elif error["type"] == "missing":
            message = "missing required parameter"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


_REGISTRY: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    existing = _REGISTRY.get(exp.name)
    if existing is not None and existing.target != exp.target:
        raise BadInput(f"experiment {exp.name!r} is defined twice ({existing.target} and {exp.target})")
    _REGISTRY[exp.name] = exp
    return exp


def experiment(
    name: str, params: type[BaseModel], description: str | None = None, version: int = 1
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn(model, params: dict) -> dict` (or a staged generator) under `name`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(
            Experiment(
                name=name,
                params=params,
                target=f"{fn.__module__}:{fn.__qualname__}",
                description=description or (inspect.getdoc(fn) or "").split("\n")[0],
                version=version,
                _fn=fn,
            )
        )
        return fn

    return wrap


def get(name: str) -> Experiment:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownExperiment(f"unknown experiment {name!r} (known: {known})") from None


def all_experiments() -> list[Experiment]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def import_user_modules(modules: list[str]) -> None:
    """Import the modules that define users' experiments (`--import`, `NDIF_JOBS_IMPORTS`)."""
    import sys
    from pathlib import Path

    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise BadInput(f"cannot import experiment module {name!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - their code, our one-line message
            raise BadInput(f"experiment module {name!r} failed to import: {type(exc).__name__}: {exc}") from None


_BUILTIN = "ndif_jobs.experiments.builtin"
for _name, _params, _fn, _doc in (
    ("activations", P.ActivationsParams, "activations", "Block-output norms per layer and the next-token top-k."),
    ("patching", P.PatchingParams, "patching", "Activation patching sweep: logit difference per patched layer."),
    ("cross-prompt", P.CrossPromptParams, "cross_prompt", "Copy one prompt's block output into another, in one trace."),
    ("steering", P.SteeringParams, "steering", "Steering vector from two prompts; top tokens with and without it."),
    ("logit-lens", P.LogitLensParams, "logit_lens", "Each layer's prediction through the final norm and unembedding."),
    ("generate", P.GenerateParams, "generate", "Greedy generation, optionally steered."),
):
    register(Experiment(name=_name, params=_params, target=f"{_BUILTIN}:{_fn}", description=_doc))
