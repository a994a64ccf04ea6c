"""A sweep file (TOML, or YAML) read into a typed `Sweep`, and expanded into rows of jobs.

    name = "capitals-patching"          # the sweep's name: its jobs carry it
    experiment = "patching"
    models = ["smollm2-135m"]           # or model = "..."; each row runs on every model
    backend = "local"                   # optional: NDIF_JOBS_DEFAULT_BACKEND otherwise
    tags = ["night-1"]                  # optional
    priority = 0                        # optional

    [params]                            # the same for every row
    position = -1

    [grid]                              # the cartesian product of these lists
    layers = ["0:10", "10:20", "20:30"] # layers take every form `-p layers=...` takes

    [zip]                               # lists of one length, taken side by side
    answer = [" Paris", " Rome"]
    wrong_answer = [" Rome", " Paris"]

    [dataset]                           # one row per line of a JSONL or CSV file
    file = "capitals.jsonl"             # relative to the sweep file
    columns = { clean_prompt = "clean", corrupted_prompt = "corrupted" }   # param = column
    # no `columns`: every column is a parameter (whole param rows)

Rows are numbered in a fixed order, dataset lines outermost, then zip, then grid (in the
order the file lists it), then models, so that lines added at the end of a dataset get new
row numbers and every existing row keeps its own. Everything a file can get wrong is a
`BadInput` naming the file and its line (or the dataset's line) and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput

#: Most jobs one sweep may expand to (`NDIF_JOBS_MAX_SWEEP_JOBS`).
DEFAULT_MAX_SWEEP_JOBS = 100_000
TOP_LEVEL_KEYS = ("name", "experiment", "model", "models", "backend", "tags", "priority", "params", "grid", "zip",
                  "dataset")
DATASET_KEYS = ("file", "columns", "format")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def max_sweep_jobs(settings: Any = None) -> int:
    """`NDIF_JOBS_MAX_SWEEP_JOBS`: from `settings` where they hold it, else from the environment."""
    configured = getattr(settings, "max_sweep_jobs", None)
    if configured is not None:
        return int(configured)
    text = os.environ.get("NDIF_JOBS_MAX_SWEEP_JOBS", "").strip()
    if not text:
        return DEFAULT_MAX_SWEEP_JOBS
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"NDIF_JOBS_MAX_SWEEP_JOBS={text!r}: expected a whole number") from None
    if value < 1:
        raise BadInput(f"NDIF_JOBS_MAX_SWEEP_JOBS={text!r}: must be at least 1")
    return value


@dataclass(frozen=True)
class Dataset:
    """A JSONL or CSV file of rows; `columns` maps parameter -> column (None: every column)."""

    path: Path
    format: str
    columns: dict[str, str] | None
    #: The line of the sweep file that names the mapping (for errors about columns).
    where: str


@dataclass(frozen=True)
class Row:
    """One job of a sweep: its row number, model (None: the default model) and parameters.
    `origin` says where it came from, for error messages (`dataset line 4, layers=[0, 1]`)."""

    index: int
    model: str | None
    params: dict[str, Any]
    origin: str


@dataclass(frozen=True)
class Sweep:
    name: str
    experiment: str
    models: tuple[str | None, ...]
    backend: str | None
    params: dict[str, Any]
    grid: dict[str, list[Any]]
    zip: dict[str, list[Any]]
    dataset: Dataset | None
    tags: tuple[str, ...] = ()
    priority: int = 0
    path: Path = Path(".")
    source: str = ""
    #: Where each top-level key sits in the file, for error messages.
    lines: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def digest(self) -> str:
        """sha256 of the parsed file (not its dataset's lines: adding lines is no new sweep)."""
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name, "experiment": self.experiment, "models": list(self.models), "backend": self.backend,
            "params": self.params, "grid": self.grid, "zip": self.zip, "tags": list(self.tags),
            "priority": self.priority,
        }
        if self.dataset is not None:
            data["dataset"] = {"file": str(self.dataset.path), "format": self.dataset.format,
                               "columns": self.dataset.columns}
        return data

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line else str(self.path)


# -- reading the file --------------------------------------------------------------------------


def load(path: str | Path) -> Sweep:
    """Read and check a sweep file. Raises `BadInput` naming the file and line."""
    file = Path(path)
    try:
        source = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"sweep file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read sweep file {file}: {getattr(exc, 'strerror', None) or exc}") from None
    data = _parse(file, source)
    return _build(file, source, data)


def _parse(file: Path, source: str) -> dict[str, Any]:
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise BadInput(f"{file}: reading YAML needs PyYAML (pip install pyyaml), or write the sweep as TOML") \
                from None
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
            raise BadInput(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    elif suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            data = tomllib.loads(source)
        except tomllib.TOMLDecodeError as exc:
            raise BadInput(f"{file}: not valid TOML: {exc}") from None
    else:
        raise BadInput(f"sweep file {file}: expected a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise BadInput(f"{file}: a sweep file holds a table of keys (name, experiment, ...)")
    return data


def _key_lines(source: str, keys: Mapping[str, Any]) -> dict[str, int]:
    """The line each top-level key (or table) first appears on: TOML and YAML parsers drop it."""
    lines: dict[str, int] = {}
    for number, text in enumerate(source.splitlines(), 1):
        stripped = text.strip()
        for key in keys:
            if key in lines:
                continue
            escaped = re.escape(key)
            if re.match(rf"^\[\s*{escaped}\s*\]$|^\"?{escaped}\"?\s*[=:]", stripped):
                lines[key] = number
    return lines


def _build(file: Path, source: str, data: dict[str, Any]) -> Sweep:
    lines = _key_lines(source, data)

    def where(key: str) -> str:
        return f"{file}:{lines[key]}" if key in lines else str(file)

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            import difflib

            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(TOP_LEVEL_KEYS)})"
            raise BadInput(f"{where(key)}: unknown key {key!r}{hint}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadInput(f"{where('name')}: `name` must be a name of letters, digits, '.', '_' or '-'"
                       " (at most 200), e.g. name = \"capitals-patching\"")
    experiment = data.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise BadInput(f"{where('experiment')}: `experiment` must name an experiment (see ndif-jobs experiments)")
    if "model" in data and "models" in data:
        raise BadInput(f"{where('models')}: give `model` or `models`, not both")
    models: tuple[str | None, ...]
    if "models" in data:
        raw = data["models"]
        if not isinstance(raw, list) or not raw or not all(isinstance(m, str) and m for m in raw):
            raise BadInput(f"{where('models')}: `models` must be a non-empty list of model names")
        if len(set(raw)) != len(raw):
            raise BadInput(f"{where('models')}: `models` lists a model twice")
        models = tuple(raw)
    elif "model" in data:
        if not isinstance(data["model"], str) or not data["model"]:
            raise BadInput(f"{where('model')}: `model` must be a model name")
        models = (data["model"],)
    else:
        models = (None,)
    backend = data.get("backend")
    if backend is not None and backend not in ("local", "ndif"):
        raise BadInput(f"{where('backend')}: unknown backend {backend!r} (choose from: local, ndif)")
    tags = data.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadInput(f"{where('tags')}: `tags` must be a list of strings")
    priority = data.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise BadInput(f"{where('priority')}: `priority` must be a whole number")
    params = _table(data, "params", where)
    grid = _table(data, "grid", where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BadInput(f"{where('grid')}: grid.{key} must be a non-empty list of values")
    zipped = _table(data, "zip", where)
    lengths = {key: len(values) if isinstance(values, list) else -1 for key, values in zipped.items()}
    for key, n in lengths.items():
        if n < 1:
            raise BadInput(f"{where('zip')}: zip.{key} must be a non-empty list of values")
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise BadInput(f"{where('zip')}: the lists of `zip` must be of one length ({shown})")
    dataset = _dataset(file, data.get("dataset"), where("dataset"))
    _no_overlap(params, grid, zipped, dataset, where)
    return Sweep(
        name=name, experiment=experiment, models=models, backend=backend, params=params, grid=grid, zip=zipped,
        dataset=dataset, tags=tuple(tags), priority=priority, path=file, source=source, lines=lines,
    )


def _table(data: dict[str, Any], key: str, where: Any) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise BadInput(f"{where(key)}: `{key}` must be a table of parameter = value")
    return dict(value)


def _dataset(file: Path, raw: Any, where: str) -> Dataset | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"file": raw}
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: `dataset` must be a table with `file` (and optionally `columns`)")
    for key in raw:
        if key not in DATASET_KEYS:
            raise BadInput(f"{where}: unknown key dataset.{key} (known: {', '.join(DATASET_KEYS)})")
    name = raw.get("file")
    if not isinstance(name, str) or not name:
        raise BadInput(f"{where}: dataset.file must name a JSONL or CSV file")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = file.parent / path
    fmt = raw.get("format") or path.suffix.lower().lstrip(".")
    if fmt == "json":
        fmt = "jsonl"
    if fmt not in ("jsonl", "csv"):
        raise BadInput(f"{where}: dataset {name}: expected a .jsonl or .csv file (or format = \"jsonl\" / \"csv\")")
    if not path.is_file():
        raise BadInput(f"{where}: dataset file {path} does not exist")
    columns = raw.get("columns")
    if columns is not None:
        if isinstance(columns, list) and all(isinstance(c, str) for c in columns):
            columns = {c: c for c in columns}
        if not isinstance(columns, dict) or not columns or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in columns.items()
        ):
            raise BadInput(f"{where}: dataset.columns must map parameter = \"column\"")
    return Dataset(path=path, format=fmt, columns=columns, where=where)


def _no_overlap(params: dict[str, Any], grid: dict[str, Any], zipped: dict[str, Any], dataset: Dataset | None,
                where: Any) -> None:
    """A parameter set in two places would be set twice per row: say which two."""
    seen: dict[str, str] = {}
    sources = [("params", params), ("grid", grid), ("zip", zipped)]
    if dataset is not None and dataset.columns is not None:
        sources.append(("dataset", dataset.columns))
    for section, names in sources:
        for name in names:
            if name in seen:
                raise BadInput(f"{where(section)}: parameter {name!r} is set in both `{seen[name]}` and `{section}`")
            seen[name] = section


# -- the dataset ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRow:
    line: int
    values: dict[str, Any]


def read_dataset(dataset: Dataset) -> list[DatasetRow]:
    """Every row of the dataset with its line number, mapped to parameters. `BadInput` names
    the file and line of a malformed line, or the sweep file's line of a column that is missing."""
    try:
        text = dataset.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read dataset {dataset.path}: {getattr(exc, 'strerror', None) or exc}") from None
    raw = _read_jsonl(dataset.path, text) if dataset.format == "jsonl" else _read_csv(dataset.path, text)
    if not raw:
        raise BadInput(f"dataset {dataset.path} has no rows")
    if dataset.columns is None:
        return raw
    present: set[str] = set()
    for row in raw:
        present.update(row.values)
    for param, column in dataset.columns.items():
        if column not in present:
            raise BadInput(f"{dataset.where}: dataset {dataset.path} has no column {column!r} (for parameter"
                           f" {param!r}; its columns: {', '.join(sorted(present))})")
    out = []
    for row in raw:
        missing = [c for c in dataset.columns.values() if c not in row.values]
        if missing:
            raise BadInput(f"{dataset.path}:{row.line}: no value for column {missing[0]!r}")
        out.append(DatasetRow(row.line, {p: row.values[c] for p, c in dataset.columns.items()}))
    return out


def _read_jsonl(path: Path, text: str) -> list[DatasetRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
            raise BadInput(f"{path}:{number}: not a valid JSON line ({reason})") from None
        if not isinstance(value, dict):
            raise BadInput(f"{path}:{number}: each line must be a JSON object of column: value")
        rows.append(DatasetRow(number, value))
    return rows


def _read_csv(path: Path, text: str) -> list[DatasetRow]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or not all(header):
            raise BadInput(f"{path}:1: the header must name each column once")
        rows = []
        for fields in reader:
            number = reader.line_num
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                raise BadInput(f"{path}:{number}: expected {len(header)} fields ({', '.join(header)}),"
                               f" got {len(fields)}")
            rows.append(DatasetRow(number, dict(zip(header, fields, strict=True))))
        return rows
    except csv.Error as exc:
        raise BadInput(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


# -- expansion --------------------------------------------------------------------------------


def count(sweep: Sweep, dataset_rows: list[DatasetRow] | None) -> int:
    n = len(sweep.models)
    for values in sweep.grid.values():
        n *= len(values)
    if sweep.zip:
        n *= len(next(iter(sweep.zip.values())))
    if dataset_rows is not None:
        n *= len(dataset_rows)
    return n


def expand(sweep: Sweep, limit: int | None = None,
           typed: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> list[Row]:
    """Every row of the sweep in its fixed order (see the module doc). `BadInput` when there
    are more than `limit` (`NDIF_JOBS_MAX_SWEEP_JOBS`), counted before any row is built.
    `typed` turns a CSV line's texts into the parameters' types (a CSV cell is always text)."""
    dataset_rows = read_dataset(sweep.dataset) if sweep.dataset is not None else None
    if dataset_rows is not None and typed is not None and sweep.dataset is not None and sweep.dataset.format == "csv":
        dataset_rows = [DatasetRow(r.line, _typed_at(sweep.dataset.path, r, typed)) for r in dataset_rows]
    total = count(sweep, dataset_rows)
    limit = max_sweep_jobs() if limit is None else limit
    if total > limit:
        raise BadInput(f"{sweep.path}: the sweep expands to {total:,} jobs, more than {limit:,}"
                       " (NDIF_JOBS_MAX_SWEEP_JOBS): shrink the grid or split the sweep")
    return list(_rows(sweep, dataset_rows))


def _typed_at(path: Path, row: DatasetRow, typed: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    try:
        return typed(row.values)
    except BadInput as exc:
        raise BadInput(f"{path}:{row.line}: {exc}") from None


def _rows(sweep: Sweep, dataset_rows: list[DatasetRow] | None) -> Iterator[Row]:
    data = dataset_rows if dataset_rows is not None else [None]
    n_zip = len(next(iter(sweep.zip.values()))) if sweep.zip else 1
    zipped = [{k: v[i] for k, v in sweep.zip.items()} for i in range(n_zip)]
    grid_keys = list(sweep.grid)
    combos = [dict(zip(grid_keys, values, strict=True)) for values in itertools.product(*sweep.grid.values())]
    index = 0
    for item in data:
        for z in zipped:
            for combo in combos:
                for model in sweep.models:
                    params = {**sweep.params, **(item.values if item is not None else {}), **z, **combo}
                    parts = [f"dataset line {item.line}"] if item is not None else []
                    parts += [f"{k}={json.dumps(v)}" for k, v in {**z, **combo}.items()]
                    if len(sweep.models) > 1:
                        parts.append(f"model {model}")
                    yield Row(index, model, params, ", ".join(parts))
                    index += 1
