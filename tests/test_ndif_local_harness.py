"""The local NDIF harness (scripts/ndif-local) end to end: the real NDIF 0.1.2 server, the real
nnsight client, no mocks.

Starts a private stack under tmp on a non-default port, checks `status`, runs one blocking trace
with the nnsight client of this venv, checks that `requests` counted exactly one more
`POST /request`, stops the stack and checks that every recorded process is gone.

The server's venv and the converted model are reused from the shared setup
(`scripts/ndif-local setup`, default <repo>/.ndif-local; NDIF_LOCAL_VENV and
NDIF_LOCAL_MODEL_DIR point elsewhere). The test runs that setup first: seconds when it is there,
about 100 s on a machine that never had it. About a minute otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "ndif-local"
CLIENT = REPO / "scripts" / "ndif_local" / "client_check.py"
SHARED_ROOT = Path(os.environ.get("NDIF_LOCAL_ROOT") or REPO / ".ndif-local")
SHARED_VENV = Path(os.environ.get("NDIF_LOCAL_VENV") or SHARED_ROOT / "venv")
SHARED_MODEL = Path(os.environ.get("NDIF_LOCAL_MODEL_DIR") or SHARED_ROOT / "models" / "smollm2")

pytestmark = [pytest.mark.ndif]


def _harness(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _free_base_port() -> int:
    """A base port whose whole block (PORT..PORT+99, what the harness derives) is free."""
    sys.path.insert(0, str(REPO / "scripts"))
    from ndif_local.harness import free_port_block

    return free_port_block(start=18400, stop=30000)


def _sessions(leaders: list[int]) -> list[int]:
    """Every process in the sessions these pids lead (each service is started as one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) in leaders and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie waits for init to reap it: it holds nothing


@pytest.fixture(scope="module")
def local_ndif(tmp_path_factory: pytest.TempPathFactory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDIF_")}
    shared = _harness("setup", "--root", str(SHARED_ROOT), "--venv", str(SHARED_VENV),
                      "--model-dir", str(SHARED_MODEL), env=env, timeout=900)
    assert shared.returncode == 0, shared.stderr

    root = tmp_path_factory.mktemp("ndif-local")
    port = _free_base_port()
    env.update(NDIF_LOCAL_ROOT=str(root), NDIF_LOCAL_PORT=str(port), NDIF_LOCAL_VENV=str(SHARED_VENV),
               NDIF_LOCAL_MODEL_DIR=str(SHARED_MODEL))
    setup = _harness("setup", env=env, timeout=120)
    assert setup.returncode == 0, setup.stderr
    try:
        start = _harness("start", env=env, timeout=400)
        assert start.returncode == 0, start.stderr[-4000:]
        yield {"env": env, "root": root, "port": port, "start": start}
    finally:
        _harness("stop", env=env, timeout=120)


def test_status_trace_requests_stop(local_ndif) -> None:
    env, port = local_ndif["env"], local_ndif["port"]
    host = f"http://127.0.0.1:{port}"
    # start prints exactly one machine-readable line on stdout
    assert local_ndif["start"].stdout.strip().splitlines() == [f"NDIF_HOST={host}"]

    status = _harness("status", "--json", env=env, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["up"] and report["ndif_host"] == host
    assert report["services"]["model"]["state"] == "RUNNING"
    leaders = [item["pid"] for item in report["services"].values() if item["pid"]]
    assert len(leaders) == 4
    pids = _sessions(leaders)
    assert len(pids) > 10  # Ray alone runs a dozen processes

    before = int(_harness("requests", "--status", "200", env=env).stdout)
    client_env = {**env, "NDIF_HOST": host, "HF_HOME": str(local_ndif["root"] / "hf_home"),
                  "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    client = subprocess.run([sys.executable, str(CLIENT), "--quick"], env=client_env, capture_output=True,
                            text=True, timeout=180)
    assert client.returncode == 0, client.stdout + client.stderr[-3000:]
    assert "top token ' Paris'" in client.stdout
    after = int(_harness("requests", "--status", "200", env=env).stdout)
    assert after == before + 1

    stop = _harness("stop", env=env, timeout=120)
    assert stop.returncode == 0, stop.stderr
    down = _harness("status", env=env, timeout=60)
    assert down.returncode == 3
    assert all(_gone(pid) for pid in pids)
