"""The local NDIF stack (scripts/ndif-local) keeps every socket on loopback.

Ray's endpoints are unauthenticated and run whatever code their caller sends: a stack that
listened on the machine's network address would let anyone on that network run code as the
user. This test takes the session's running stack and, for every process it started (each
part is recorded under ROOT/run/pids and leads its own session, so the part's session and
descendants are all of its processes), lists every socket with psutil:

- every listening TCP socket and every bound UDP socket is on 127.0.0.1 or ::1;
- every connection goes to 127.0.0.1 or ::1 (nothing reaches for the machine's own address).

On a machine whose only addresses are loopback the check holds trivially; CI's machine has others.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ndif]

SERVICES = ("redis", "s3", "ray", "api")


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1),
    which is how a dual-stack listener bound to 127.0.0.1 shows up."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def leaders(root: Path) -> dict[str, int]:
    """{part: pid} of the parts the stack recorded as running."""
    found = {}
    for service in SERVICES:
        record = json.loads((root / "run" / "pids" / f"{service}.json").read_text())
        found[service] = record["pid"]
    return found


def stack_processes(root: Path) -> dict[int, tuple[str, psutil.Process]]:
    """{pid: (part, process)} for every living process of the stack: each recorded leader's
    session and all their descendants (Ray's workers are the raylet's children)."""
    heads = leaders(root)
    by_session = {pid: part for part, pid in heads.items()}
    found: dict[int, tuple[str, psutil.Process]] = {}
    for proc in psutil.process_iter():
        try:
            part = by_session.get(os.getsid(proc.pid))
        except OSError:
            continue
        if part is not None:
            found[proc.pid] = (part, proc)
    for part, pid in heads.items():
        head = psutil.Process(pid)
        for proc in [head, *head.children(recursive=True)]:
            found.setdefault(proc.pid, (part, proc))
    return found


def describe(part: str, proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())[:160] or proc.name()
    except psutil.Error:
        cmd = "?"
    return f"{part} pid {proc.pid} ({cmd})"


def endpoint(addr) -> str:  # type: ignore[no-untyped-def]
    return f"[{addr.ip}]:{addr.port}" if ":" in addr.ip else f"{addr.ip}:{addr.port}"


def test_every_socket_of_the_local_ndif_stack_is_on_loopback(local_ndif) -> None:  # type: ignore[no-untyped-def]
    # A request through the API to the controller actor, so the Ray client path is in use.
    with urllib.request.urlopen(local_ndif.host + "/status", timeout=60) as resp:
        assert resp.status == 200

    processes = stack_processes(local_ndif.root)
    names = set()
    listening, beyond_loopback = [], []
    for _pid, (part, proc) in sorted(processes.items()):
        try:
            names.add(proc.name())
            sockets = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a short-lived helper that ended meanwhile holds nothing
        for conn in sockets:
            proto = "TCP" if conn.type == socket.SOCK_STREAM else "UDP"
            is_listener = conn.status == psutil.CONN_LISTEN or (proto == "UDP" and conn.laddr and not conn.raddr)
            if is_listener:
                listening.append(conn)
                if not is_loopback(conn.laddr.ip):
                    beyond_loopback.append(f"{describe(part, proc)} listens on {proto} {endpoint(conn.laddr)}")
            if conn.raddr and not is_loopback(conn.raddr.ip):
                beyond_loopback.append(f"{describe(part, proc)} is connected from {endpoint(conn.laddr)} "
                                       f"to {proto} {endpoint(conn.raddr)}")

    # The walk found the stack: otherwise an empty list would pass for a safe one.
    assert {"redis-server", "gcs_server", "raylet", "gunicorn"} <= names, sorted(names)
    assert {part for part, _ in processes.values()} == set(SERVICES)
    assert len(listening) >= 15, f"only {len(listening)} listening sockets found in {len(processes)} processes"
    assert not beyond_loopback, "sockets beyond loopback:\n" + "\n".join(beyond_loopback)
