"""Turning what a user typed (`-p key=value`, a params file) into an experiment's raw params.

A value is read as JSON where the parameter's type is not plain text (`-p layers=[0,4]`,
`-p top_k=10`, `-p steering={"layer": 3, ...}`), and kept as typed where it is text, so
`-p prompt=42` is the prompt "42", not a type error.

What a user types is bounded before anything else looks at it: JSON nested deeper than
`MAX_DEPTH` levels (no experiment's parameters come close, and a deep enough one overflows
Python's stack) and a params file of more jobs than `NDIF_JOBS_MAX_SUBMIT_JOBS` are bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import BadInput

MAX_DEPTH = 64


def _loads(text: str, where: str) -> Any:
    """`json.loads`, with input nested past `MAX_DEPTH` (or past the stack) reported as bad input."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise BadInput(f"{where}: JSON nested deeper than {MAX_DEPTH} levels") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise BadInput(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether lists and objects in `value` nest more than `limit` deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _is_text(params: type[BaseModel], name: str) -> bool:
    info = params.model_fields.get(name)
    if info is None:
        return False
    return info.annotation is str


def parse_pairs(params: type[BaseModel], pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise BadInput(f"-p {pair!r}: expected NAME=VALUE")
        if name in out:
            raise BadInput(f"-p {name}: given twice")
        if _is_text(params, name):
            out[name] = text
            continue
        try:
            out[name] = _loads(text, f"-p {name}")
        except ValueError:
            out[name] = text
    return out


def read_params_file(path: str, max_jobs: int) -> list[dict[str, Any]]:
    """A JSON object (one job) or a list of at most `max_jobs` objects (one job each)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"params file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read params file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = _loads(text, f"params file {path}")
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"params file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and len(data) > max_jobs:
        raise BadInput(f"params file {path} holds {len(data):,} jobs; one submission may hold at most"
                       f" {max_jobs:,} (NDIF_JOBS_MAX_SUBMIT_JOBS): split the file or raise the setting")
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        return data
    raise BadInput(f"params file {path} must hold a JSON object or a non-empty list of objects")
