"""Imported at start-up by every Python process of a local NDIF stack (the harness puts this
folder on their PYTHONPATH); does something only where NDIF_LOCAL_CLIENT_SERVER_PORTS is set.

Ray's client server gives each client connection (NDIF's API, `ndif deploy`) a server process of
its own on the first port of 23000-23999 that it can bind at that moment; the new process binds it
seconds later, with SO_REUSEPORT. Two stacks on one machine that connect at about the same time
(two test processes starting their stacks) can both pick the same port, and both bind it: one
stack's API then reaches the other stack's Ray, and its requests are never answered. The harness
gives each stack a range of its own, LOW-HIGH (HIGH excluded), set here on Ray's proxier module
when it is imported (its ProxyManager reads the two bounds when it is created).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

_PROXIER = "ray.util.client.server.proxier"


class _ProxierPorts(importlib.abc.MetaPathFinder):
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if name != _PROXIER:
            return None
        sys.meta_path.remove(self)  # once, and not in the way of the lookup below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module
        low, high = self.low, self.high

        def exec_module(module: ModuleType) -> None:
            run(module)
            module.MIN_SPECIFIC_SERVER_PORT = low  # type: ignore[attr-defined]
            module.MAX_SPECIFIC_SERVER_PORT = high  # type: ignore[attr-defined]

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_range = os.environ.get("NDIF_LOCAL_CLIENT_SERVER_PORTS", "")
if "-" in _range:
    _low, _high = (int(part) for part in _range.split("-", 1))
    sys.meta_path.insert(0, _ProxierPorts(_low, _high))
