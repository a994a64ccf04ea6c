"""Running experiments on an nnsight model: the part of ndif-jobs that travels to NDIF.

This module (with `access.py` and `builtin.py`) imports only torch and nnsight, so that nnsight
can ship it by value inside a remote session and NDIF can run it as is.

Two kinds of experiment exist:

* A **staged** experiment is a generator. Each `yield` hands the runner a list of `Pass`es (one
  prompt each, with a body that runs inside that prompt's invoke and returns what to keep) and
  receives the kept values back, in order. Its `return` value is the job's result. Because the
  runner sees every job's passes before running any, it packs the passes of many jobs into
  invokes of as few traces as possible: one forward over a batch instead of one per experiment.
* A **plain** experiment is an ordinary function `fn(model, params) -> dict` that runs whatever
  traces it likes (generation, its own sessions). It runs alone.

Packing keeps every number what running the job alone would give: prompts of different lengths
are left-padded by the runner itself, with an attention mask and position ids that count each
prompt from its first real token, and each body is told where its tokens sit (`Window`).
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import nnsight
import torch

from .stages import Pass, Window


class Failure:
    """A job that raised: its one-line message and the traceback text."""

    __slots__ = ("message", "detail")

    def __init__(self, exc: BaseException) -> None:
        self.message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
        self.detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def __repr__(self) -> str:
        return f"Failure({self.message!r})"


def is_staged(fn: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(fn)


def tokenize(model: Any, prompt: str) -> torch.Tensor:
    """A prompt's token ids as a [1, n] tensor, tokenized the way a plain forward would be."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("a prompt must be a non-empty string")
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    limit = context_length(model)
    if limit is not None and ids.shape[-1] > limit:
        # Past it a model with learned positions fails with an opaque index error, and one with
        # rotary positions runs on into numbers it was never trained for (and memory it may lack).
        raise ValueError(f"the prompt is {ids.shape[-1]} tokens long: this model reads at most {limit}")
    return ids


def context_length(model: Any) -> int | None:
    """The most tokens `model` reads at once, from its config; None when it does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _pad_id(model: Any) -> int:
    tokenizer = model.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_prompts(model: Any, prompts: list[str], ids: list[torch.Tensor] | None = None) -> list[tuple[dict, Window]]:
    """Invoke inputs for prompts that share one trace: left-padded to one width by us.

    Each gets an attention mask and position ids counting from its first real token, so a
    padded prompt computes what it would alone, whatever side the tokenizer pads on.
    """
    ids = ids if ids is not None else [tokenize(model, p) for p in prompts]
    width = max(t.shape[-1] for t in ids)
    pad_id = _pad_id(model)
    encoded = []
    for row in ids:
        n = row.shape[-1]
        pad = width - n
        if pad:
            row = torch.cat([torch.full((1, pad), pad_id, dtype=row.dtype), row], dim=1)
        mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, n, dtype=torch.long)], dim=1)
        inputs = {"input_ids": row, "attention_mask": mask}
        if pad:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        encoded.append((inputs, Window(pad, n)))
    return encoded


def run_passes(model: Any, passes: list[Pass], ids: list[torch.Tensor]) -> list[dict]:
    """Run `passes` as invokes of ONE trace; returns each body's kept values, in order."""
    encoded = encode_prompts(model, [p.prompt for p in passes], ids)
    kept: list[Any] = [None] * len(passes)
    with model.trace() as tracer:
        for i, (step, (inputs, window)) in enumerate(zip(passes, encoded, strict=False)):
            with tracer.invoke(inputs):
                values = step.body(model, window)
                for value in values.values():
                    nnsight.save(value)
                kept[i] = nnsight.save(values)
    return [dict(v) for v in kept]


def _chunks(order: list[int], ids: list[torch.Tensor], max_invokes: int, max_tokens: int) -> Iterator[list[int]]:
    """Split pass indices (sorted by length) into traces of bounded size and padded area."""
    chunk: list[int] = []
    for i in order:
        width = max([ids[j].shape[-1] for j in chunk] + [ids[i].shape[-1]])
        if chunk and (len(chunk) >= max_invokes or width * (len(chunk) + 1) > max_tokens):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def run_jobs(
    model: Any,
    jobs: list[tuple[str, Callable[..., Any], dict]],
    max_invokes: int = 32,
    max_tokens: int = 16384,
    pack: bool = True,
) -> dict[str, Any]:
    """Run experiments on `model`, packing the passes of staged ones into shared traces.

    `jobs` holds (job id, experiment function, params). Returns, per job id, the experiment's
    result dict or a `Failure`. One job's error never fails another: when a shared trace
    raises, each of its jobs' passes run again alone to find which one was at fault.
    """
    results: dict[str, Any] = {}
    staged: dict[str, Any] = {}
    waiting: dict[str, list[Pass]] = {}

    def advance(job_id: str, sent: Any) -> None:
        generator = staged[job_id]
        try:
            stage = generator.send(sent)
            if not isinstance(stage, (list, tuple)) or not all(isinstance(p, Pass) for p in stage):
                raise TypeError("a staged experiment must yield a list of Pass objects")
            if not stage:
                raise ValueError("a staged experiment yielded no passes")
            waiting[job_id] = list(stage)
        except StopIteration as stop:
            results[job_id] = stop.value if stop.value is not None else {}
            del staged[job_id]
        except Exception as exc:  # noqa: BLE001 - the job's own error, recorded as its failure
            results[job_id] = Failure(exc)
            del staged[job_id]

    for job_id, fn, params in jobs:
        try:
            if is_staged(fn):
                staged[job_id] = fn(model, params)
                advance(job_id, None)
            else:
                results[job_id] = fn(model, params)
        except Exception as exc:  # noqa: BLE001 - an experiment's own error fails its job alone
            results[job_id] = Failure(exc)
            staged.pop(job_id, None)

    while waiting:
        batch = waiting
        waiting = {}
        outputs = _run_stage(model, batch, max_invokes, max_tokens, pack)
        for job_id, out in outputs.items():
            if isinstance(out, Failure):
                staged[job_id].close()
                del staged[job_id]
                results[job_id] = out
            else:
                advance(job_id, out)
    return results


def _run_stage(
    model: Any, batch: dict[str, list[Pass]], max_invokes: int, max_tokens: int, pack: bool
) -> dict[str, Any]:
    """One stage of every waiting job: their passes packed into traces."""
    owners: list[str] = []
    passes: list[Pass] = []
    ids: list[torch.Tensor] = []
    out: dict[str, Any] = {}
    for job_id, stage in batch.items():
        try:
            stage_ids = [tokenize(model, p.prompt) for p in stage]
        except Exception as exc:  # noqa: BLE001 - a prompt that does not tokenize fails its job alone
            out[job_id] = Failure(exc)
            continue
        owners += [job_id] * len(stage)
        passes += stage
        ids += stage_ids
    kept: list[Any] = [None] * len(passes)
    if pack:
        order = sorted(range(len(passes)), key=lambda i: ids[i].shape[-1])
        chunks = list(_chunks(order, ids, max_invokes, max_tokens))
    else:
        chunks = []
        for job_id in batch:
            chunks.append([i for i, owner in enumerate(owners) if owner == job_id])
        chunks = [c for c in chunks if c]
    for chunk in chunks:
        try:
            values = run_passes(model, [passes[i] for i in chunk], [ids[i] for i in chunk])
            for i, v in zip(chunk, values, strict=False):
                kept[i] = v
        except Exception as exc:  # noqa: BLE001 - a packed trace that fails is re-run job by job below
            if len({owners[i] for i in chunk}) == 1:
                out[owners[chunk[0]]] = Failure(exc)
                continue
            # Isolate: every job of the failed trace runs its passes of this stage alone.
            for job_id in dict.fromkeys(owners[i] for i in chunk):
                mine = [i for i in chunk if owners[i] == job_id]
                try:
                    values = run_passes(model, [passes[i] for i in mine], [ids[i] for i in mine])
                    for i, v in zip(mine, values, strict=False):
                        kept[i] = v
                except Exception as inner:  # noqa: BLE001 - this job's own passes failed: it alone fails
                    out[job_id] = Failure(inner)
    for i, job_id in enumerate(owners):
        collected = out.setdefault(job_id, [])
        if not isinstance(collected, Failure):
            collected.append(kept[i])
    return out


def run_bundle(model: Any, jobs: list[tuple[str, Callable[..., Any], dict]], max_invokes: int = 32) -> dict[str, Any]:
    """The body of one NDIF request: every job of a bundle, with plain data coming back.

    A job that raised comes back as `{"$error": message, "$detail": traceback}` (an instance of
    a class shipped by value could not be unpickled by the client), so one experiment's error
    fails its own job, not the request.
    """
    with torch.no_grad():
        raw = run_jobs(model, jobs, max_invokes=max_invokes)
    out: dict[str, Any] = {}
    for job_id, value in raw.items():
        if isinstance(value, Failure):
            out[job_id] = {"$error": value.message, "$detail": value.detail[-4000:]}
        else:
            out[job_id] = value
    return out
