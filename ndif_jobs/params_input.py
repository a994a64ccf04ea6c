"""Turning what a user typed (`-p key=value`, a params file) into an experiment's raw params.

A value is read as JSON where the parameter's type is not plain text (`-p layers=[0,4]`,
`-p top_k=10`, `-p steering={"layer": 3, ...}`), and kept as typed where it is text, so
`-p prompt=42` is the prompt "42", not a type error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import BadInput


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
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def read_params_file(path: str) -> list[dict[str, Any]]:
    """A JSON object (one job) or a list of objects (one job each)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"params file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read params file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"params file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        return data
    raise BadInput(f"params file {path} must hold a JSON object or a non-empty list of objects")
