"""Who holds a job: a worker's id says where its process runs, so another worker can tell it is gone.

A worker's id is `HOST:PID:START:RANDOM`. HOST is the host name, with the process namespace
appended inside a container that has its own (two containers may share a host name, and a pid
means nothing across namespaces); START is the second the worker's process started. A worker
that meets a job held by an id of its own HOST whose process is gone (no such pid, a zombie, or
a pid the system has since given to a process that started at another second) knows that worker
is dead now, not in `lease_s`. An id from another host, or one that does not parse (an older
worker's), is never judged: its lease is waited out.

psutil is imported only when a process must be looked at, so `status` stays light.
"""

from __future__ import annotations

import functools
import os
import random
import socket
from typing import NamedTuple

#: The inode of Linux's initial pid namespace (PROC_PID_INIT_INO): the host's own processes.
_INIT_PID_NAMESPACE = "4026531836"
#: Process start times are compared to the second; one second of slack absorbs rounding.
_START_SLACK_S = 1


class Owner(NamedTuple):
    """A worker id taken apart."""

    host: str
    pid: int
    started: int


@functools.lru_cache(maxsize=1)
def this_host() -> str:
    """This machine (and pid namespace) as worker ids name it."""
    host = socket.gethostname()[:40]
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:  # not Linux: processes share one namespace per host name
        return host
    return host if namespace == _INIT_PID_NAMESPACE else f"{host}/{namespace}"


def process_started(pid: int) -> int | None:
    """The second process `pid` started, or None if there is no such (living) process."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(proc.create_time())
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return None


def new_worker_id() -> str:
    """A worker id for this process: where it runs, and a random part for workers in one process."""
    pid = os.getpid()
    return f"{this_host()}:{pid}:{process_started(pid)}:{random.randrange(16**4):04x}"


def parse(worker: str) -> Owner | None:
    """The parts of a worker id, or None for an id in another form."""
    host, sep, rest = worker.partition(":")
    parts = rest.split(":")
    if not sep or len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return Owner(host, int(parts[0]), int(parts[1]))


def is_gone(worker: str) -> bool:
    """True only when `worker` ran on this host and its process is no longer alive.

    A process we may not look at (another user's, `AccessDenied`) counts as alive: a job is
    never taken from a worker that may still be running it."""
    owner = parse(worker)
    if owner is None or owner.host != this_host():
        return False
    import psutil

    try:
        started = process_started(owner.pid)
    except psutil.Error:
        return False
    return started is None or abs(started - owner.started) > _START_SLACK_S


def describe(worker: str) -> str:
    """`pid N on this host` or `on host H`, for log lines and `status`."""
    owner = parse(worker)
    if owner is None:
        return "an older worker (its id names no process)"
    if owner.host == this_host():
        return f"pid {owner.pid} on this host"
    return f"pid {owner.pid} on host {owner.host}"
