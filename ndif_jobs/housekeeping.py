"""Keeping the result store honest and small: verify, gc, export.

`verify` re-hashes every stored result and names the jobs whose result is corrupt or missing
(`ndif-jobs retry` runs them again). `gc` removes results by age or total size, never one a job
still in the queue or in flight needs, and detaches the finished jobs that pointed at a removed
result, so the next identical submission runs again instead of finding nothing on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from .db.engine import write_transaction
from .db.tables import JobState, now
from .db.queue import ACTIVE_VALUES, jobs
from .errors import BadInput, ResultCorrupt, ResultMissing
from .results import flatten, to_jsonable
from .service import Service

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)


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


def verify(service: Service) -> VerifyReport:
    """Re-hash every result a finished job points at; report each corrupt or missing one."""
    report = VerifyReport()
    by_key: dict[str, list[str]] = {}
    with service.queue.engine.connect() as conn:
        for row in conn.execute(
            select(jobs.c.id, jobs.c.result_key).where(
                jobs.c.result_key.is_not(None),
                jobs.c.state.in_([JobState.COMPLETED.value, JobState.CACHED.value]),
            )
        ):
            by_key.setdefault(row.result_key, []).append(row.id)
    for key in sorted(by_key):
        report.checked += 1
        try:
            service.store.check(key, full=True)
            report.ok += 1
        except (ResultCorrupt, ResultMissing) as exc:
            kind = "missing" if isinstance(exc, ResultMissing) else "corrupt"
            report.problems.append({"key": key, "jobs": sorted(by_key[key]), "problem": kind, "detail": str(exc)})
    return report


@dataclass
class GcPlan:
    remove: list[tuple[str, int, float]] = field(default_factory=list)  # key, bytes, created_at
    kept_in_use: int = 0
    temp_folders: int = 0

    @property
    def freed(self) -> int:
        return sum(size for _, size, _ in self.remove)


def plan_gc(service: Service, older_than_days: float | None, max_size: int | None) -> GcPlan:
    """Which results to remove: older than the age, then oldest first until under the size."""
    if older_than_days is None and max_size is None:
        raise BadInput("gc needs --older-than DAYS and/or --max-size SIZE")
    with service.queue.engine.connect() as conn:
        protected = {
            row.key
            for row in conn.execute(select(jobs.c.key).where(jobs.c.state.in_(list(ACTIVE_VALUES))))
        }
    plan = GcPlan()
    stored = sorted(service.store.iter_stored(), key=lambda info: info.created_at)
    candidates = []
    for info in stored:
        if info.key in protected:
            plan.kept_in_use += 1
        else:
            candidates.append(info)
    cutoff = now() - older_than_days * 86400 if older_than_days is not None else None
    chosen: set[str] = set()
    if cutoff is not None:
        for info in candidates:
            if info.created_at < cutoff:
                chosen.add(info.key)
    if max_size is not None:
        total = sum(info.bytes for info in stored if info.key not in chosen)
        for info in candidates:
            if total <= max_size:
                break
            if info.key not in chosen:
                chosen.add(info.key)
                total -= info.bytes
    plan.remove = [(i.key, i.bytes, i.created_at) for i in candidates if i.key in chosen]
    return plan


def run_gc(service: Service, plan: GcPlan) -> int:
    """Remove the planned results and detach the jobs that pointed at them; returns bytes freed."""
    freed = 0
    keys = [key for key, _, _ in plan.remove]
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        with write_transaction(service.queue.engine) as conn:
            # Re-check under the write lock: a job may have been queued for this key meanwhile.
            busy = {
                row.key
                for row in conn.execute(
                    select(jobs.c.key).where(jobs.c.key.in_(chunk), jobs.c.state.in_(list(ACTIVE_VALUES)))
                )
            }
            doomed = [k for k in chunk if k not in busy]
            if not doomed:
                continue
            conn.execute(
                update(jobs)
                .where(jobs.c.result_key.in_(doomed))
                .values(result_key=None, error="result removed by gc", updated_at=now())
            )
            for key in doomed:
                freed += service.store.remove(key)
    plan.temp_folders = service.store.clean_temp()
    return freed


# -- export ------------------------------------------------------------------------------------

EXPORT_FORMATS = ("npz", "pt", "safetensors", "json")


def export(result: Any, fmt: str, out: Path) -> Path:
    """Write a result for other tools. Pickle (`pt`) only ever goes out, never comes in."""
    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"unknown export format {fmt!r} (choose from: {', '.join(EXPORT_FORMATS)})")
    out = Path(out)
    if out.is_dir():
        out = out / f"{result.job['id']}.{fmt}"
    if not out.parent.exists():
        raise BadInput(f"cannot write {out}: folder {out.parent} does not exist")
    values = result.to_dict()
    structure, tensors = flatten(values)
    meta = {"job": result.job["id"], "experiment": result.job["experiment"], "model": result.job["model"],
            "params": result.job["params"], "key": result.job["key"]}
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "json":
        tmp.write_text(json.dumps({**meta, "values": to_jsonable(values)}, indent=1, allow_nan=False))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"ndif_jobs": json.dumps({**meta, "values": structure})})
    elif fmt == "pt":
        import torch

        torch.save({**meta, "values": values}, tmp)
    else:
        import numpy as np

        arrays = {name: (t.float() if "bfloat16" in str(t.dtype) else t).numpy() for name, t in tensors.items()}
        arrays["__ndif_jobs__"] = np.array(json.dumps({**meta, "values": structure}))
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    tmp.replace(out)
    return out
