"""The experiment registry: names -> (parameter model, function), built-ins and your own.

Register your own with the decorator in a module you name with `--import mymodule` (a module on
the import path), `--import ./my_probes.py` or `--import path/to/folder:mymodule`, or with
`NDIF_JOBS_IMPORTS` in the environment::

    from ndif_jobs import Layer, Params, Prompt, experiment

    class MyParams(Params):
        prompt: Prompt
        layer: Layer = 3      # checked against the model at submit (see `params.py`)

    @experiment("my-probe", params=MyParams)
    def my_probe(model, p):
        with model.trace(p["prompt"]):
            h = model.model.layers[p["layer"]].output.save()
        return {"mean": h.mean(dim=1)}

An experiment may also name, as `module:function` strings or as functions, its one-glance
`summary` (for `ndif-jobs results`), its `plot` (for `ndif-jobs plot`) and its result-size
`estimate` (which keeps one NDIF request's answer under `max_result_bytes`)::

    @experiment("my-probe", params=MyParams, summary="my_probes:summary", plot="my_probes:plot")

* `summary(values) -> list[str]`: a few lines a researcher reads first.
* `plot(results, labels) -> (width_in, height_in, draw)`: `draw(fig)` draws on a matplotlib
  `Figure` of that size; `labels` name each result by the parameters that differ between them.
* `estimate(params, shape) -> int`: the result's bytes, from the checked parameters and the
  model's `ModelShape` (see `estimates.py`).
* `sweep_plot(collection) -> (width_in, height_in, draw)`: the figure of a whole sweep
  (`ndif-jobs plot --sweep NAME`), from its `ndif_jobs.collect` collection (see `sweeps/figures.py`).

Built-ins are registered by name, with their hooks, and imported only when used, so listing or
submitting them never imports torch, and the code shipped to NDIF stays torch and nnsight only.
A job's cache key includes a hash of its experiment's source, so editing an experiment re-runs
it instead of serving a stale result.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from ..errors import BadInput, InvalidParams, UnknownExperiment
from . import params as P

Params = P.Params

#: A hook: a function, or the `module:function` that names it (imported on first use).
Hook = str | Callable[..., Any] | None
HookKind = Literal["estimate", "summary", "plot", "sweep_plot"]


@dataclass
class Experiment:
    """One registered experiment. `target` is `module:function`, imported on first use; so are
    its hooks (see the module doc). `builtin`: shipped with ndif-jobs, needs no `--import`."""

    name: str
    params: type[BaseModel]
    target: str
    description: str = ""
    version: int = 1
    estimate: Hook = None
    summary: Hook = None
    plot: Hook = None
    sweep_plot: Hook = None
    builtin: bool = False
    _fn: Callable[..., Any] | None = field(default=None, repr=False)
    _source_hash: str | None = field(default=None, repr=False)

    def function(self) -> Callable[..., Any]:
        if self._fn is None:
            self._fn = _resolve(self.target)
        return self._fn

    def hook(self, kind: HookKind) -> Callable[..., Any] | None:
        """The experiment's `estimate`, `summary` or `plot` function; None if it has none.
        Raises `BadInput` when a `module:function` it names cannot be imported."""
        ref = getattr(self, kind)
        if ref is None or callable(ref):
            return ref
        try:
            return _resolve(ref)
        except (ImportError, AttributeError) as exc:
            raise BadInput(f"experiment {self.name!r}: its {kind} {ref!r} cannot be imported: {exc}") from None

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
            raise InvalidParams(f"{self.name}: {_one_line(exc, self.params)}") from None
        return model.model_dump(mode="json")

    def describe_params(self) -> list[dict[str, Any]]:
        out = []
        for name, info in self.params.model_fields.items():
            out.append(
                {
                    "name": name,
                    "type": P.type_text(info.annotation, info.metadata),
                    "required": info.is_required(),
                    "default": None if info.is_required() else info.get_default(call_default_factory=True),
                    "description": info.description or "",
                }
            )
        return out


def _resolve(target: str) -> Any:
    """The object `module:qualified.name` names, importing the module."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _one_line(exc: ValidationError, params: type[BaseModel]) -> str:
    parts = []
    for error in exc.errors():
        # A name is user text: one with a line break or other control character is shown quoted.
        where = ".".join(str(x) if str(x).isprintable() else repr(str(x)) for x in error["loc"]) or "params"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown parameter" + _did_you_mean(str(error["loc"][-1]), _names_at(params, error["loc"][:-1]))
        elif error["type"] == "missing":
            message = "missing required parameter"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def _names_at(params: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """The parameter names of the (nested) model at `path`, e.g. `("steering",)`."""
    model: Any = params
    for part in path:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return []
        members = typing.get_args(info.annotation) or (info.annotation,)
        model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if known else ""


_REGISTRY: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    existing = _REGISTRY.get(exp.name)
    if existing is not None and existing.target != exp.target:
        raise BadInput(f"experiment {exp.name!r} is defined twice ({existing.target} and {exp.target})")
    _REGISTRY[exp.name] = exp
    return exp


def experiment(
    name: str, params: type[BaseModel], description: str | None = None, version: int = 1, *,
    estimate: Hook = None, summary: Hook = None, plot: Hook = None, sweep_plot: Hook = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn(model, params: dict) -> dict` (or a staged generator) under `name`, with
    its optional hooks (functions or `module:function` strings; see the module doc)."""
    for kind, ref in (("estimate", estimate), ("summary", summary), ("plot", plot), ("sweep_plot", sweep_plot)):
        if not (ref is None or callable(ref) or (isinstance(ref, str) and _is_target(ref))):
            raise BadInput(f"experiment {name!r}: {kind} must be a function or 'module:function', not {ref!r}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        exp = register(
            Experiment(
                name=name,
                params=params,
                target=f"{fn.__module__}:{fn.__qualname__}",
                description=description or (inspect.getdoc(fn) or "").split("\n")[0],
                version=version,
                estimate=estimate,
                summary=summary,
                plot=plot,
                sweep_plot=sweep_plot,
                _fn=fn,
            )
        )
        # Hashed now, from the file this function was just compiled from: a worker that runs for
        # hours must key its results by the code it runs, not by the file as edited since.
        _ = exp.source_hash
        return fn

    return wrap


def _is_target(ref: str) -> bool:
    module_name, sep, qualname = ref.partition(":")
    return bool(sep) and all(p.isidentifier() for p in [*module_name.split("."), *qualname.split(".")])


def get(name: str) -> Experiment:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownExperiment(
            f"unknown experiment {name!r} ({hint}known: {', '.join(known)}); your own experiments are "
            "loaded with --import MODULE or NDIF_JOBS_IMPORTS=MODULE"
        ) from None


def all_experiments() -> list[Experiment]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def import_user_modules(modules: list[str]) -> None:
    """Import the modules that define users' experiments (`--import`, `NDIF_JOBS_IMPORTS`), each
    from where it was named: `package.module` on the normal import path, `path/to/file.py`, or
    `path/to/folder:module`. The folder a command runs in is not searched by itself, so a file
    that happens to sit there (in a cloned repository, say) is never imported unless named."""
    for spec in modules:
        folder, name = _locate(spec)
        try:
            if folder is None:
                importlib.import_module(name)
            else:
                _import_from(folder, name, spec)
        except BadInput:
            raise
        except ImportError as exc:
            here = folder is None and Path(f"{name}.py").is_file()
            hint = f" (to import {name}.py from this folder: --import ./{name}.py)" if here else ""
            raise BadInput(f"cannot import experiment module {spec!r}: {exc}{hint}") from None
        except Exception as exc:  # noqa: BLE001 - their code, our one-line message
            raise BadInput(f"experiment module {spec!r} failed to import: {type(exc).__name__}: {exc}") from None


def _locate(spec: str) -> tuple[Path | None, str]:
    """(folder, module name) for a path form, (None, name) for a module on the import path."""
    if spec.endswith(".py"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BadInput(f"experiment module file {spec} does not exist")
        return path.absolute().parent, path.stem
    folder, sep, name = spec.rpartition(":")
    if not all(part.isidentifier() for part in name.split(".")):
        raise BadInput(f"experiment module {spec!r}: expected a module name, path/to/file.py or path/to/folder:module")
    if not sep:
        return None, name
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise BadInput(f"experiment module {spec!r}: folder {folder} does not exist")
    return path.absolute(), name


def _import_from(folder: Path, name: str, spec: str) -> None:
    """Import `name` from `folder` exactly. The folder joins the end of the import path so the
    module's own sibling imports resolve, without letting its files stand in for installed ones."""
    import importlib.machinery
    import sys

    top = name.partition(".")[0]
    found = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
    if found is None or found.loader is None:
        raise BadInput(f"cannot import experiment module {spec!r}: no module {top!r} in {folder}")
    loaded = sys.modules.get(top)
    if loaded is not None:
        loaded_spec = getattr(loaded, "__spec__", None)
        if loaded_spec is None or loaded_spec.origin != found.origin:
            where = getattr(loaded, "__file__", None) or "built in"
            raise BadInput(f"experiment module {spec!r}: the name {top!r} is already taken by {where}; rename the file")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    if loaded is None:
        module = importlib.util.module_from_spec(found)
        sys.modules[top] = module
        try:
            found.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(top, None)
            raise
    importlib.import_module(name)


# Each built-in's function, size estimate, summary and figure share one name in four modules.
#: The built-ins with a figure of a whole sweep (`ndif_jobs/sweeps/figures.py`).
_SWEEP_FIGURES = ("activations", "patching", "logit_lens")
for _name, _params, _fn, _doc in (
    ("activations", P.ActivationsParams, "activations", "Block-output norms per layer and the next-token top-k."),
    ("patching", P.PatchingParams, "patching", "Activation patching sweep: logit difference per patched layer."),
    ("cross-prompt", P.CrossPromptParams, "cross_prompt", "Copy one prompt's block output into another, in one trace."),
    ("steering", P.SteeringParams, "steering", "Steering vector from two prompts; top tokens with and without it."),
    ("logit-lens", P.LogitLensParams, "logit_lens", "Each layer's prediction through the final norm and unembedding."),
    ("generate", P.GenerateParams, "generate", "Greedy generation, optionally steered."),
):
    register(Experiment(
        name=_name, params=_params, target=f"ndif_jobs.experiments.builtin:{_fn}", description=_doc,
        estimate=f"ndif_jobs.experiments.estimates:{_fn}", summary=f"ndif_jobs.summaries:{_fn}",
        plot=f"ndif_jobs.plots:{_fn}", builtin=True,
        sweep_plot=f"ndif_jobs.sweeps.figures:{_fn}" if _fn in _SWEEP_FIGURES else None,
    ))
