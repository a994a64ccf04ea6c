"""Provenance: what made a stored result, kept in its manifest (`info["provenance"]`).

A result read offline months later should still say what produced it: this machine's nnsight,
torch and transformers versions, the NDIF server's own versions where it answers `GET /env`, the
model and its revision, the backend (NDIF's job id and host, or this machine's device and
dtype), and where the time went: in this queue, queued and running at NDIF, downloading. The
manifest's checksum covers it like every other field; manifests without it stay readable.

Versions come from `importlib.metadata` (no torch import), so the CLI's read paths may import
this module. The times at NDIF come from the bundle's recorded status history, whose entries
are as fine as the polls that saw them (0.25 s at first, up to `NDIF_JOBS_POLL_MAX_S`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

#: The packages whose versions decide what a result holds, on this machine and at NDIF.
PACKAGES = ("nnsight", "torch", "transformers")
#: NDIF's own server package, recorded from its `GET /env` too.
SERVER_PACKAGES = (*PACKAGES, "ndif")
#: The manifest's `info` field that holds the provenance.
FIELD = "provenance"

#: Status history entries that ndif-jobs writes itself (not NDIF's): the POST, a worker taking
#: over, giving up at the deadline.
SUBMITTED, REATTACHED, ABANDONED = "SUBMITTED", "REATTACHED", "ABANDONED"
#: NDIF statuses that say the request has left the queue and is on a model replica.
STARTED = frozenset({"DISPATCHED", "RUNNING"})
#: Statuses after which the request takes no more of NDIF's time.
ENDED = frozenset({"COMPLETED", "ERROR", ABANDONED})


# -- versions ---------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def client_versions() -> dict[str, str | None]:
    """Python's and the deciding packages' versions in this process (None: not installed)."""
    return dict(_client_versions())


@functools.cache
def _client_versions() -> dict[str, str | None]:
    # Read once: a package upgraded while a worker runs is not what that worker has imported.
    return {"python": platform.python_version(), "ndif_jobs": _version("ndif-jobs"),
            **{name: _version(name) for name in PACKAGES}}


def server_versions(env: Mapping[str, Any]) -> dict[str, Any]:
    """The part of NDIF's `GET /env` answer a result keeps: Python's and the deciding packages'
    versions (the full answer lists every package on the cluster), or why there is none."""
    if "error" in env or not isinstance(env.get("packages"), Mapping):
        return {"answered": False, "error": str(env.get("error") or "no package list in NDIF's /env answer")}
    packages = env["packages"]
    python = str(env.get("python_version") or "").split(" ", 1)[0] or None
    return {"answered": True, "python": python, **{name: packages.get(name) for name in SERVER_PACKAGES}}


# -- the model --------------------------------------------------------------------------------


def model_facts(spec: str, model_key: str) -> dict[str, Any]:
    """The model as a result records it: what was asked for, its key, and its revision (a hub
    model's revision as requested, and the commit of the config this machine built the request
    from; the embedded model's package version; a folder's content digest)."""
    facts: dict[str, Any] = {"spec": spec, "key": model_key}
    try:
        from .model_refs import resolve_model

        ref = resolve_model(spec)
    except Exception as exc:  # noqa: BLE001 - a description, never a reason to lose a result
        facts["revision_error"] = str(exc).splitlines()[0][:200]
        return facts
    facts["kind"] = ref.kind
    facts["revision"] = ref.revision
    if ref.kind == "folder":
        facts["digest"] = ref.digest
    elif ref.kind == "hub":
        facts["config_commit"] = _cached_commit(ref.location, ref.revision)
    return facts


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of `repo_id`'s config in the local Hugging Face cache (None when not there)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - no cache, or a revision it cannot read: nothing to record
        return None
    if not isinstance(found, str):
        return None
    parts = found.replace("\\", "/").split("/")
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


# -- times at NDIF ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteTimes:
    """A request's time at NDIF, from its status history: queued (from the POST to the first
    status that says it runs) and running (from then to COMPLETED, ERROR or giving up). A
    request still there counts up to its latest status."""

    queued_s: float
    running_s: float
    ended: bool

    @property
    def total_s(self) -> float:
        return self.queued_s + self.running_s


def remote_times(history: Sequence[Mapping[str, Any]], submitted_at: float | None = None) -> RemoteTimes | None:
    """The request's queued and running time, or None for a history with no time in it.

    NDIF's statuses are seen only when polled. Where no DISPATCHED or RUNNING status was seen
    (a request that ran between two polls), the request is taken to have run from the last
    status seen before its end: the queued time is then what the polls saw for certain."""
    entries = [(str(e.get("status", "")).upper(), float(e["at"])) for e in history
               if isinstance(e, Mapping) and isinstance(e.get("at"), (int, float))]
    entries = [(s, at) for s, at in entries if s != REATTACHED]
    start = submitted_at
    if start is None:
        start = next((at for s, at in entries if s == SUBMITTED), entries[0][1] if entries else None)
    if start is None:
        return None
    entries = [(s, at) for s, at in entries if at >= start]
    end_index = next((i for i, (s, _) in enumerate(entries) if s == "COMPLETED"), None)
    if end_index is None:
        end_index = max((i for i, (s, _) in enumerate(entries) if s in ENDED), default=None)
    ended = end_index is not None
    if end_index is None:
        if not entries:
            return RemoteTimes(0.0, 0.0, False)
        end_index = len(entries) - 1
    end = entries[end_index][1]
    running_from = next((at for s, at in entries[:end_index + 1] if s in STARTED), None)
    if running_from is None:
        running_from = entries[end_index - 1][1] if ended and end_index > 0 else (start if ended else end)
    running_from = min(max(running_from, start), end)
    return RemoteTimes(queued_s=running_from - start, running_s=end - running_from, ended=ended)


# -- a bundle's provenance, then each job's ---------------------------------------------------


def public_host(url: str) -> str:
    """A host URL without any user or password in it."""
    parsed = urlparse(url)
    netloc = parsed.hostname or ""
    if parsed.port:
        netloc = f"{netloc}:{parsed.port}"
    return f"{parsed.scheme}://{netloc}" if parsed.scheme else url


def for_bundle(backend: Any, handle: Any, bundle: Any, model: str, model_key: str) -> dict[str, Any]:
    """What every result of one bundle records: versions, model, backend and its facts, and the
    bundle's times. `handle` is the backend's `Handle` (None when nothing was sent), `bundle`
    the bundle's row as it stands once its answer is in (None where unknown)."""
    out: dict[str, Any] = {"backend": getattr(backend, "name", str(backend)), "recorded_at": time.time(),
                           "client": client_versions(), "model": model_facts(model, model_key)}
    describe = getattr(backend, "provenance", None)
    facts: dict[str, Any] = {}
    if callable(describe):
        try:
            from .model_refs import resolve_model

            facts = dict(describe(resolve_model(model)))
        except Exception as exc:  # noqa: BLE001 - a description, never a reason to lose a result
            facts = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    times: dict[str, Any] = {}
    remote_id = getattr(bundle, "remote_job_id", None) or getattr(handle, "remote_id", None)
    if remote_id is not None:
        env = facts.pop("server_env", None)
        if "host" in facts:
            facts["host"] = public_host(str(facts["host"]))
        out["ndif"] = {"job_id": str(remote_id), **facts,
                       "server": server_versions(env if isinstance(env, Mapping) else {"error": "not asked"})}
        history = parse_history(getattr(bundle, "status_history", None))
        sent = getattr(bundle, "submitted_at", None)
        at_ndif = remote_times(history, sent)
        times["sent_at"] = sent
        if at_ndif is not None:
            times["ndif_queued_s"] = round(at_ndif.queued_s, 3)
            times["run_s"] = round(at_ndif.running_s, 3)
        out["bytes"] = {"up": getattr(bundle, "payload_bytes", None) or getattr(handle, "payload_bytes", None),
                        "down": getattr(handle, "downloaded_bytes", None)}
    else:
        out["local"] = facts
        times["sent_at"] = getattr(bundle, "created_at", None)
        run_s = getattr(handle, "run_s", None)
        if run_s is not None:
            times["run_s"] = round(run_s, 3)
    download_s = getattr(handle, "download_s", None)
    if download_s is not None:
        times["download_s"] = round(download_s, 3)
    out["times"] = times
    return out


def for_job(common: Mapping[str, Any], created_at: float | None) -> dict[str, Any]:
    """One job's provenance: its bundle's, with the time it waited in this queue before it was
    sent (retries included)."""
    times = dict(common.get("times") or {})
    sent = times.get("sent_at")
    times["created_at"] = created_at
    if sent is not None and created_at is not None:
        times["queued_s"] = round(max(sent - created_at, 0.0), 3)
    return {**common, "times": times}


def parse_history(raw: Any) -> list[dict[str, Any]]:
    """A bundle's `status_history` column as a list (empty where it is missing or unreadable)."""
    import json

    if isinstance(raw, list):
        return raw
    try:
        found = json.loads(raw or "[]")
    except (TypeError, ValueError):
        return []
    return found if isinstance(found, list) else []


# -- reading it back --------------------------------------------------------------------------


def of_manifest(manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The provenance a manifest holds (None for one stored before results recorded it)."""
    info = (manifest or {}).get("info")
    found = info.get(FIELD) if isinstance(info, Mapping) else None
    return dict(found) if isinstance(found, Mapping) else None


def seconds_text(value: Any) -> str:
    """A duration as `show` and `usage` print it: `0.42s`, `12.3s`, `4m05s`, `2h07m`; `-` when unknown."""
    if not isinstance(value, (int, float)):
        return "-"
    if value < 60:
        return f"{value:.2f}s" if value < 10 else f"{value:.1f}s"
    minutes, seconds = divmod(value, 60)
    if minutes < 60:
        return f"{minutes:.0f}m{seconds:02.0f}s"
    return f"{minutes // 60:.0f}h{minutes % 60:02.0f}m"


def _versions(found: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"{name} {found.get(name) or '?'}" for name in names)


def lines(prov: Mapping[str, Any] | None, show_job_id: bool = True) -> list[tuple[str, str]]:
    """The provenance as (label, text) lines, as `show`, `results` and the job page print it."""
    if not prov:
        return [("provenance", "not recorded (stored before ndif-jobs recorded provenance)")]
    out: list[tuple[str, str]] = []
    client = prov.get("client") or {}
    out.append(("ran with", f"{_versions(client, ('python', *PACKAGES))} (ndif-jobs {client.get('ndif_jobs') or '?'})"))
    model = prov.get("model") or {}
    revision = model.get("revision") or "default branch"
    extra = model.get("config_commit") or model.get("digest")
    out.append(("model", f"{model.get('spec', '?')} @ {revision}" + (f" ({extra[:12]})" if extra else "")))
    times = prov.get("times") or {}
    ndif = prov.get("ndif")
    if isinstance(ndif, Mapping):
        job = f", NDIF job {ndif.get('job_id')}" if show_job_id else ""
        out.append(("backend", f"ndif at {ndif.get('host', '?')}{job}"))
        server = ndif.get("server") or {}
        out.append(("NDIF env", _versions(server, ("python", *SERVER_PACKAGES)) if server.get("answered")
                    else f"not known: NDIF did not answer GET /env ({server.get('error', '?')})"))
        sizes = prov.get("bytes") or {}
        from .units import size_text

        out.append(("times", f"queued here {seconds_text(times.get('queued_s'))}, at NDIF queued "
                    f"{seconds_text(times.get('ndif_queued_s'))}, running {seconds_text(times.get('run_s'))}, "
                    f"download {seconds_text(times.get('download_s'))}"))
        out.append(("bytes", f"sent {size_text(sizes.get('up'))}, downloaded {size_text(sizes.get('down'))}"))
    else:
        local = prov.get("local") or {}
        out.append(("backend", f"{prov.get('backend', 'local')} on {local.get('device', '?')}, "
                    f"{local.get('dtype', '?')}"))
        out.append(("times", f"queued here {seconds_text(times.get('queued_s'))}, "
                    f"running {seconds_text(times.get('run_s'))}"))
    return out


def text_lines(prov: Mapping[str, Any] | None, show_job_id: bool = True) -> list[str]:
    """The provenance as `show` and `results` print it: a heading and one indented line each."""
    found = lines(prov, show_job_id)
    if not prov:
        return [f"  {label:<11} {text}" for label, text in found]
    return ["  provenance", *(f"     {label:<10} {text}" for label, text in found)]
