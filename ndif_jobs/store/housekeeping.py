"""Keeping the result store honest and small: verify, gc, export.

`verify` re-hashes every stored result and names the jobs whose result is corrupt or missing
(`ndif-jobs retry` runs them again). `gc` removes results by age or total size, never one a job
still in the queue or in flight needs, and detaches the finished jobs that pointed at a removed
result, so the next identical submission runs again instead of finding nothing on disk. With no
age or size given it removes only what nothing can reach: result folders no job points at.

`gc` commits the detach before it touches a folder: a kill or a failed removal half-way leaves
at worst a folder no job points at, which the next `gc` removes, never a finished job pointing
at nothing. A folder is moved aside first and put back if a job came to need it meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..db.queue import now
from ..errors import BadInput, ResultCorrupt, ResultMissing, StoreError
from ..service import Service
from ..states import ACTIVE_STATES
from .backend import StoreQueue
from .codec import flatten, is_sealed, to_jsonable, widened
from .safetensors_io import write_safetensors_fd

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)
_CHUNK = 500


def parse_size(text: str) -> int:
    """`10GiB`, `500MB`, `1.5g`, `2048` -> bytes (k/m/g/t are powers of 1024 either way)."""
    match = _SIZE.match(text)
    if not match:
        raise BadInput(f"size {text!r}: expected a number with an optional unit (KiB, MiB, GiB, TiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    #: Results from before values were checksummed (format 1): tensors checked, other values not.
    unsealed: list[dict[str, Any]] = field(default_factory=list)


def verify(service: Service) -> VerifyReport:
    """Re-hash every result a finished job points at; report each corrupt or missing one."""
    report = VerifyReport()
    by_key: dict[str, list[str]] = {}
    for job in service.queue.jobs_with_results():
        if job.result_key is not None:
            by_key.setdefault(job.result_key, []).append(job.id)
    for key in sorted(by_key):
        report.checked += 1
        try:
            manifest = service.store.check(key, full=True)
        except (ResultCorrupt, ResultMissing) as exc:
            kind = "missing" if isinstance(exc, ResultMissing) else "corrupt"
            report.problems.append({"key": key, "jobs": sorted(by_key[key]), "problem": kind, "detail": str(exc)})
            continue
        if is_sealed(manifest):
            report.ok += 1
        else:
            report.unsealed.append({"key": key, "jobs": sorted(by_key[key])})
    return report


# -- gc ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GcItem:
    """One result `gc` removes, with the finished jobs that point at it (none: unreachable)."""

    key: str
    bytes: int
    created_at: float
    jobs: tuple[dict[str, Any], ...] = ()


@dataclass
class GcPlan:
    remove: list[GcItem] = field(default_factory=list)
    kept_in_use: int = 0

    @property
    def freed(self) -> int:
        return sum(item.bytes for item in self.remove)


@dataclass
class GcOutcome:
    freed: int = 0
    removed: int = 0
    #: (key, why) of each result that could not be removed; its jobs are detached all the same.
    failed: list[tuple[str, str]] = field(default_factory=list)
    temp_folders: int = 0


def require_own_store(service: Service) -> None:
    """Refuse to gc a store that other queues keep results in too (a bucket two machines'
    SQLite files share, a data folder a PostgreSQL queue took over from a SQLite one): `gc`
    sees only its own queue's jobs, and would remove results the others' jobs point at."""
    service.record_queue_in_store()
    others = service.other_queues_in_store()
    if not others:
        return
    named = "; ".join(f"{q.label}, since {time.strftime('%Y-%m-%d', time.localtime(q.since))}, id {q.id[:12]}"
                      for q in others[:3])
    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
    raise BadInput(f"{service.store.location()} also keeps the results of {len(others)} other "
                   f"queue{'s' if len(others) > 1 else ''} ({named}{more}), whose jobs gc cannot see: "
                   "once a queue is gone, run gc --forget-queue ID for it (or --ignore-other-queues)")


def forget_queue(service: Service, prefix: str) -> StoreQueue:
    """Remove the record of another queue that is gone (by its id or a unique start of it), so
    that `gc` may judge the store again; returns the queue forgotten."""
    named = service.store.queues()
    matches = [q for q in named if q.id.startswith(prefix.strip().lower())]
    if not prefix.strip() or not matches:
        known = ", ".join(f"{q.id[:12]} ({q.label})" for q in named) or "none"
        raise BadInput(f"no queue {prefix!r} is named in {service.store.location()}; named there: {known}")
    if len(matches) > 1:
        raise BadInput(f"queue id {prefix!r} is ambiguous: {', '.join(q.id[:12] for q in matches)}")
    (queue,) = matches
    if queue.id == service.queue_id:
        raise BadInput(f"queue {queue.id[:12]} is this queue ({queue.label}): only another queue can be forgotten")
    service.store.forget_queue(queue.id)
    return queue


def plan_gc(service: Service, older_than_days: float | None, max_size: int | None) -> GcPlan:
    """Which results to remove: those no job points at; then those older than the age; then the
    oldest until the store is under the size. Never one a queued or running job needs."""
    protected, pointing = _job_refs(service)
    plan = GcPlan()
    stored = sorted(service.store.iter_stored(), key=lambda info: info.created_at)
    candidates = []
    for info in stored:
        if info.key in protected:
            plan.kept_in_use += 1
        else:
            candidates.append(info)
    chosen = {info.key for info in candidates if info.key not in pointing}
    if older_than_days is not None:
        cutoff = now() - older_than_days * 86400
        chosen.update(info.key for info in candidates if info.created_at < cutoff)
    if max_size is not None:
        total = sum(info.bytes for info in stored if info.key not in chosen)
        for info in candidates:
            if total <= max_size:
                break
            if info.key not in chosen:
                chosen.add(info.key)
                total -= info.bytes
    plan.remove = [GcItem(i.key, i.bytes, i.created_at, tuple(pointing.get(i.key, ())))
                   for i in candidates if i.key in chosen]
    return plan


def _job_refs(service: Service) -> tuple[set[str], dict[str, list[dict[str, Any]]]]:
    """The keys of unfinished jobs, and for each result key the finished jobs pointing at it."""
    protected: set[str] = set()
    pointing: dict[str, list[dict[str, Any]]] = {}
    for row in service.queue.result_references():
        if row.state in ACTIVE_STATES:
            protected.add(row.key)
        if row.result_key is not None:
            pointing.setdefault(row.result_key, []).append({
                "id": row.id, "state": row.state, "experiment": row.experiment,
                "tags": [t for t in row.tags.strip(",").split(",") if t],
            })
    return protected, pointing


def run_gc(service: Service, plan: GcPlan) -> GcOutcome:
    """Remove the planned results, a chunk at a time: detach their jobs and commit, then remove."""
    outcome = GcOutcome()
    keys = [item.key for item in plan.remove]
    for start in range(0, len(keys), _CHUNK):
        doomed = detach(service, keys[start : start + _CHUNK])
        remove_unneeded(service, doomed, outcome)
    outcome.temp_folders = service.store.clean_temp()
    return outcome


def detach(service: Service, keys: Sequence[str]) -> list[str]:
    """Detach every finished job from these results (committed on return), except those a
    job queued or running meanwhile needs; returns the keys that may now be removed."""
    return service.queue.detach_results(keys, "result removed by gc")


def remove_unneeded(service: Service, keys: Sequence[str], outcome: GcOutcome) -> None:
    """Move each result aside, then delete it unless a job came to need it since `detach`
    (a job of its key queued, or finished on the folder as it was): that one is put back."""
    store = service.store
    taken: dict[str, Path] = {}
    for key in keys:
        try:
            trash = store.take_out(key)
        except OSError as exc:
            outcome.failed.append((key, exc.strerror or str(exc)))
            continue
        if trash is not None:
            taken[key] = trash
    needed = _needed(service, list(taken))
    for key, trash in taken.items():
        if key in needed and store.put_back(trash, key):
            continue
        outcome.freed += store.purge(trash)
        outcome.removed += 1


def _needed(service: Service, keys: Sequence[str]) -> set[str]:
    return service.queue.needed_results(keys) if keys else set()


# -- export ------------------------------------------------------------------------------------

EXPORT_FORMATS = ("npz", "pt", "safetensors", "json")


#: Mode of a new export: owner only, as the store itself (results may hold unpublished findings).
EXPORT_MODE = 0o600


def export(result: Any, fmt: str, out: Path) -> Path:
    """Write a result for other tools. Pickle (`pt`) only ever goes out, never comes in. `json`
    holds NaN, inf and -inf as null (JSON has no number for them); the other formats keep them.

    The file is written into a temporary file created exclusively beside the output (so a
    symlink or file planted under a guessable name is never written through), fsynced, and
    renamed over the output; on any failure the temporary file is removed. A new output is
    readable by its owner only; replacing a regular file keeps that file's mode.
    """
    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"unknown export format {fmt!r} (choose from: {', '.join(EXPORT_FORMATS)})")
    out = Path(out)
    if out.is_dir():
        out = out / f"{result.job['id']}.{fmt}"
    if not out.parent.exists():
        raise BadInput(f"cannot write {out}: folder {out.parent} does not exist")
    mode = _export_mode(out)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise BadInput(f"cannot write {out}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            _EXPORTERS[fmt](result, f)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _export_mode(out: Path) -> int:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return EXPORT_MODE
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else EXPORT_MODE


def _meta(result: Any) -> dict[str, Any]:
    job = result.job
    return {"job": job["id"], "experiment": job["experiment"], "model": job["model"], "params": job["params"],
            "key": job["key"]}


def _export_json(result: Any, f: IO[bytes]) -> None:
    doc = {**_meta(result), "values": to_jsonable(result.to_dict())}
    f.write(json.dumps(doc, indent=1, allow_nan=False).encode())


def _export_safetensors(result: Any, f: IO[bytes]) -> None:
    structure, tensors = flatten(result.to_dict())
    f.flush()
    write_safetensors_fd(f.fileno(), tensors, {"ndif_jobs": json.dumps({**_meta(result), "values": structure})})


def _export_pt(result: Any, f: IO[bytes]) -> None:
    import torch

    torch.save({**_meta(result), "values": result.to_dict()}, f)


def _export_npz(result: Any, f: IO[bytes]) -> None:
    import numpy as np

    structure, tensors = flatten(result.to_dict())
    arrays = {name: widened(t).numpy() for name, t in tensors.items()}
    arrays["__ndif_jobs__"] = np.array(json.dumps({**_meta(result), "values": structure}))
    np.savez(f, **arrays)


_EXPORTERS: dict[str, Callable[[Any, IO[bytes]], None]] = {
    "npz": _export_npz, "pt": _export_pt, "safetensors": _export_safetensors, "json": _export_json,
}
