"""One table out of many jobs: `collect(sweep=... | tag=... | jobs=[...])`.

The morning after a sweep, a researcher wants a `pandas.DataFrame` with one row per job (its
id, state, error, every parameter and every scalar result as columns) and, for a tensor result,
one `[n_jobs, ...]` tensor aligned with that table. Both come from the queue database and the
result store alone: no model, no network, no nnsight or transformers import, so it works offline
(`NDIF_JOBS_OFFLINE=1`) and on a laptop the data folder was copied to.

The table reads only each result's manifest (where scalars and strings are kept, under its
checksum); tensors are memory-mapped on `.stack(name)`, result by result, each checked as
`load_result` checks it.

Each computation counts once: a tag or a sweep submitted again holds several jobs of one cache
key (a `cached` job beside the `completed` one), and a sweep row run again after its experiment
changed holds two jobs. By default a sweep gives one row per sweep row (its newest job) and a
tag one row per key (a job holding the result first); `all_rows=True` keeps every job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput, NdifJobsError

if TYPE_CHECKING:
    import pandas
    import torch

    from .settings import Settings

#: The columns every table starts with (a parameter or result of these names is suffixed).
JOB_COLUMNS = ("job_id", "state", "error", "experiment", "model", "sweep", "sweep_row", "key")
DONE = ("completed", "cached")
TABLE_FORMATS = (".csv", ".jsonl", ".parquet")


class Collection:
    """The jobs of a sweep, tag or list, as `.frame` (a DataFrame) and `.stack(name)` (tensors)."""

    def __init__(self, rows: list[Any], store: Any, manifests: dict[str, dict[str, Any] | None],
                 problems: dict[str, str]) -> None:
        self._rows = rows
        self._store = store
        self._manifests = manifests
        self._problems = problems
        self._frame: pandas.DataFrame | None = None
        #: Results opened so far, by result key (memory-mapped: kept open costs no copy).
        self._opened: dict[str, Any] = {}

    @property
    def job_ids(self) -> list[str]:
        return [r.id for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def _repr_html_(self) -> str:
        """In Jupyter: the sweep figure and the first rows of the table."""
        from .web.notebook import collection_html

        return collection_html(self)

    @property
    def frame(self) -> pandas.DataFrame:
        """One row per job, in the collection's order (a sweep's row order)."""
        if self._frame is None:
            self._frame = self._build_frame()
        return self._frame

    def _build_frame(self) -> pandas.DataFrame:
        import pandas as pd

        records = []
        for row in self._rows:
            record: dict[str, Any] = {
                "job_id": row.id, "state": row.state, "error": row.error or self._problems.get(row.id),
                "experiment": row.experiment, "model": row.model, "sweep": row.sweep, "sweep_row": row.sweep_row,
                "key": row.key,
            }
            for name, value in _flat(json.loads(row.params)).items():
                record[_free(record, name)] = value
            manifest = self._manifests.get(row.result_key) if row.state in DONE and row.result_key else None
            if manifest is not None:
                for name, value in _scalars(manifest.get("values", {})).items():
                    record[_free(record, name)] = value
            records.append(record)
        frame = pd.DataFrame.from_records(records, columns=_columns(records))
        return frame

    def stack(self, name: str) -> torch.Tensor:
        """Result `name` of every job stacked `[n_jobs, ...]`, aligned with `.frame`: the rows of
        jobs without a result (failed, not run yet, missing from the store) are NaN. Raises
        `BadInput` naming the jobs when the shapes differ or no job has `name`."""
        import torch

        # A store behind a network fetches what this machine lacks in parallel first.
        self._store.prefetch([row.result_key for row in self._rows
                              if row.state in DONE and row.result_key and row.result_key not in self._opened
                              and self._manifests.get(row.result_key) is not None])
        values: list[torch.Tensor | None] = []
        for row in self._rows:
            values.append(self._value(row, name))
        present = [v for v in values if v is not None]
        if not present:
            raise BadInput(f"no job of this collection has a result {name!r}" + self._names_hint())
        shapes: dict[tuple[int, ...], list[str]] = {}
        for row, value in zip(self._rows, values, strict=True):
            if value is not None:
                shapes.setdefault(tuple(value.shape), []).append(row.id)
        if len(shapes) > 1:
            shown = "; ".join(f"{list(shape)}: {_few(ids)}" for shape, ids in shapes.items())
            raise BadInput(f"result {name!r} has different shapes across jobs ({shown}): stack jobs of one shape"
                           " (filter .frame by a parameter, e.g. layers), or pass jobs=[...]")
        shape = next(iter(shapes))
        missing = any(v is None for v in values)
        dtype = present[0].dtype
        if missing and not dtype.is_floating_point:
            dtype = torch.float32
        if missing and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        out = torch.full((len(values), *shape), float("nan") if dtype.is_floating_point else 0, dtype=dtype)
        for i, value in enumerate(values):
            if value is not None:
                out[i] = value.to(dtype)
        return out

    def values(self, i: int) -> dict[str, Any] | None:
        """The values of the result of row `i` (tensors memory-mapped), None where it has none."""
        stored = self._stored(self._rows[i])
        return None if stored is None else stored.values

    def _stored(self, row: Any) -> Any:
        key = row.result_key
        if row.state not in DONE or not key or self._manifests.get(key) is None:
            return None
        if key not in self._opened:
            try:
                self._opened[key] = self._store.get(key)
            except NdifJobsError as exc:
                self._problems[row.id] = str(exc)
                return None
        return self._opened[key]

    def _value(self, row: Any, name: str) -> torch.Tensor | None:
        import torch

        stored = self._stored(row)
        if stored is None:
            return None
        structure = stored.manifest.get("values", {})
        if name not in structure:
            return None
        item = structure[name]
        if isinstance(item, dict) and set(item) == {"$tensor"}:
            return stored.tensors[item["$tensor"]]
        if isinstance(item, dict) and set(item) == {"$float"}:
            return torch.tensor(float(item["$float"]))
        try:
            return torch.tensor(item)
        except (TypeError, ValueError, RuntimeError):
            raise BadInput(f"result {name!r} of job {row.id} is not numeric ({type(item).__name__}): it cannot be"
                           " stacked; read it from .frame or load_result") from None

    def _names_hint(self) -> str:
        names: set[str] = set()
        for manifest in self._manifests.values():
            if manifest is not None:
                names.update(manifest.get("values", {}))
        return f" (results hold: {', '.join(sorted(names))})" if names else " (no job has a result yet)"

    def write(self, path: str | Path) -> Path:
        """Write `.frame` as CSV, JSONL or Parquet, chosen by the file's suffix."""
        return write_table(self.frame, path)


def collect(sweep: str | None = None, *, tag: str | None = None, jobs: Sequence[str] | None = None,
            all_rows: bool = False, settings: Settings | None = None) -> Collection:
    """The jobs of one sweep, one tag, or a list of job ids (or keys), as a `Collection`.

    A sweep gives one row per sweep row and a tag one per cache key, unless `all_rows`; a list
    gives the jobs named, in that order."""
    from .db.sweeps import Sweeps
    from .service import Service

    if sum(x is not None for x in (sweep, tag, jobs)) != 1:
        raise BadInput("collect takes one of: sweep=NAME, tag=TAG, jobs=[ID, ...]")
    service = Service(settings)
    queue = service.queue
    if sweep is not None:
        Sweeps(queue).require(sweep)
        rows = queue.list_jobs(sweep=sweep, limit=None, newest_first=False)
        rows = rows if all_rows else _newest_per_row(rows)
        rows.sort(key=lambda r: (r.sweep_row if r.sweep_row is not None else -1, r.created_at))
    elif tag is not None:
        rows = queue.list_jobs(tag=tag, limit=None, newest_first=False)
        rows = rows if all_rows else _one_per_key(rows)
    else:
        assert jobs is not None
        rows = [queue.get(j) for j in jobs]
    wanted = {row.result_key for row in rows if row.state in DONE and row.result_key}
    read = service.store.manifests(sorted(wanted))  # in parallel where the store is behind a network
    manifests: dict[str, dict[str, Any] | None] = {}
    problems: dict[str, str] = {}
    for key, found in read.items():
        manifests[key] = None if isinstance(found, NdifJobsError) else found
    for row in rows:
        error = read.get(row.result_key) if row.state in DONE and row.result_key else None
        if isinstance(error, NdifJobsError):
            problems[row.id] = str(error)
    return Collection(rows, service.store, manifests, problems)


def _newest_per_row(rows: list[Any]) -> list[Any]:
    newest: dict[Any, Any] = {}
    for row in rows:  # oldest first: the last one seen is the newest
        newest[row.sweep_row if row.sweep_row is not None else row.id] = row
    return list(newest.values())


def _one_per_key(rows: list[Any]) -> list[Any]:
    """One job per cache key, where the key first appeared: the first that holds the result (the
    one that ran, not the `cached` ones after it), else the newest."""
    chosen: dict[str, Any] = {}
    for row in rows:  # oldest first
        held = chosen.get(row.key)
        if held is None or held.state not in DONE:
            chosen[row.key] = row
    order = {key: i for i, key in reversed(list(enumerate(r.key for r in rows)))}
    return sorted(chosen.values(), key=lambda r: order[r.key])


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Parameters as columns: a nested one (`steering.layer`) flattened with dots."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _scalars(structure: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level numbers, strings and booleans of a result (tensors and lists stay out)."""
    out: dict[str, Any] = {}
    for name, value in structure.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        elif isinstance(value, dict) and set(value) == {"$float"}:
            out[name] = float(value["$float"])
    return out


def _free(record: Mapping[str, Any], name: str) -> str:
    """`name`, or `NAME_2` (`NAME_3`, ...) where the record already has a column `name`."""
    if name not in record:
        return name
    n = 2
    while f"{name}_{n}" in record:
        n += 1
    return f"{name}_{n}"


def _columns(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = dict.fromkeys(JOB_COLUMNS)
    for record in records:
        for name in record:
            seen.setdefault(name, None)
    return list(seen)


def _few(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def write_table(frame: pandas.DataFrame, path: str | Path) -> Path:
    """`frame` as CSV, JSONL or Parquet by the suffix of `path`."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise BadInput(f"cannot write {out}: name a .csv, .jsonl or .parquet file")
    if not out.parent.exists():
        raise BadInput(f"cannot write {out}: folder {out.parent} does not exist")
    if suffix == ".csv":
        frame.to_csv(out, index=False)
    elif suffix == ".jsonl":
        frame.to_json(out, orient="records", lines=True)
    else:
        try:
            import pyarrow  # noqa: F401 - imported only to say which extra is missing before pandas does
        except ImportError:
            raise BadInput(f"writing {out} needs pyarrow: pip install 'ndif-jobs[parquet]' (or write .csv/.jsonl)")\
                from None
        frame.to_parquet(out, index=False)
    return out
