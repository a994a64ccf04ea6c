"""Shared fixtures: private data folders, the embedded model, tiny models built from configs.

Nothing here is mocked: databases are real SQLite files (and the real PostgreSQL server where a
test asks for it), models run real forward passes. The embedded model is converted once per
machine into `.cache/models` (about 20 s) and reused by every test and every process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS_CACHE = Path(os.environ.get("NDIF_JOBS_TEST_MODELS", REPO / ".cache" / "models"))
POSTGRES_URL = os.environ.get("NDIF_JOBS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# Child processes and Settings() in this process see the same clean configuration.
for _name in list(os.environ):
    if _name.startswith("NDIF_JOBS_") and not _name.startswith("NDIF_JOBS_TEST_"):
        del os.environ[_name]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: Modules whose tests share a module fixture worth building once: one server, browser and queue
#: (`test_web`), one worker's run over a sweep or a tag (`test_sweeps`, `test_collect`).
SHARED_FIXTURE_MODULES = ("test_web.py", "test_sweeps.py", "test_collect.py")

#: How many local NDIF stacks the NDIF tests are spread over under xdist. Each process that runs
#: NDIF tests starts its own session stack, and the tests on one stack run one after another: on a
#: single stack they would outlast the rest of the run. NDIF_JOBS_TEST_NDIF_STACKS=1: one stack.
NDIF_STACKS = max(1, int(os.environ.get("NDIF_JOBS_TEST_NDIF_STACKS", "2")))

#: Groups handed out first, longest first (xdist starts a group on a free process in the order
#: the tests are collected): a long group started last would run on alone at the end. The harness
#: test's own stack comes after the others, so that it does not start beside the session stacks.
GROUPS_FIRST = ("ndif-stack", "db-outage", "test_sweeps", "test_collect", "test_web", "ndif-harness")


def _group(item: pytest.Item, ndif_index: int) -> str | None:
    module = item.path.name
    if module == "test_ndif_local_harness.py":
        return "ndif-harness"
    if "local_ndif" in getattr(item, "fixturenames", ()):
        # Dealt out in turn: consecutive tests of a module land on different stacks.
        return "ndif-stack" if NDIF_STACKS == 1 else f"ndif-stack-{ndif_index % NDIF_STACKS}"
    if module == "test_db_outage.py":
        return "db-outage"
    if module in SHARED_FIXTURE_MODULES:
        return module.removesuffix(".py")
    return None


def _start_rank(item: pytest.Item) -> int:
    """Where a test's unit goes in the queue: the groups (longest first), then tests marked slow,
    then the rest, each in collection order."""
    marks = [mark.args[0] for mark in item.iter_markers("xdist_group")]
    if marks:
        name = marks[0]
        for rank, prefix in enumerate(GROUPS_FIRST):
            if name == prefix or name.startswith(prefix + "-"):
                return rank
        return len(GROUPS_FIRST)
    return len(GROUPS_FIRST) + (1 if item.get_closest_marker("slow") else 2)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`scripts/test` runs several processes with `--dist loadgroup`), tests
    that share something outside their tmp folder run one after another in one process: the tests
    on one session NDIF stack (NDIF_STACKS stacks, one per process that runs them), the harness
    test with its own stack, the database-outage tests (one shared database they take offline),
    and the modules whose tests share one expensive module fixture (a server and browser, a
    worker's run). A PostgreSQL test has a database of its own (`postgres_url`), so those spread
    freely. The long units are queued first (pytest_configure turns off xdist's own ordering by
    test count). Without xdist the marks change nothing and the order stays as collected."""
    ndif_index = 0
    for item in items:
        group = _group(item, ndif_index)
        if group is None:
            continue
        if group.startswith("ndif-stack"):
            ndif_index += 1
        item.add_marker(pytest.mark.xdist_group(group))
    if config.getoption("dist", "no") == "loadgroup":
        items.sort(key=_start_rank)  # stable: collection order within a rank


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run grouped tests side by side. pytest-xdist 3.8 groups tests by rewriting
    `Item._nodeid`, which pytest 9.2 no longer reads: the groups would silently run in parallel
    (two tests on one NDIF stack, two tests dropping the same PostgreSQL tables). Under loadgroup,
    xdist's reordering by test count is turned off: pytest_collection_modifyitems orders the units."""
    import inspect

    from _pytest.nodes import Node

    if config.getoption("dist", "no") == "loadgroup" and "_nodeid" not in inspect.getsource(Node.nodeid.fget):
        raise pytest.UsageError("pytest-xdist cannot group tests under this pytest: install the pytest "
                                "pinned in constraints.txt (scripts/setup does)")
    if config.getoption("dist", "no") == "loadgroup":
        config.option.loadscopereorder = False  # the order of pytest_collection_modifyitems stands


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    return path


@pytest.fixture
def env(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for a CLI subprocess (and this process) pointing at a private data folder."""
    values = {
        "NDIF_JOBS_HOME": str(home),
        "NDIF_JOBS_MODELS_CACHE": str(MODELS_CACHE),
        "NDIF_JOBS_LOG_FORMAT": "json",
        "NDIF_JOBS_POLL_S": "0.2",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    from ndif_jobs.settings import reset_settings_cache

    reset_settings_cache()
    full = dict(os.environ)
    full.update(values)
    return full


@pytest.fixture
def settings(env: dict[str, str]):  # type: ignore[no-untyped-def]
    from ndif_jobs.settings import Settings

    return Settings()


@pytest.fixture
def service(settings):  # type: ignore[no-untyped-def]
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service

    yield Service(settings)
    dispose_engines()


def run_cli(*args: str, env: dict[str, str], check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ndif-jobs ARGS` as a real subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "ndif_jobs", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=env.get("NDIF_JOBS_TEST_CWD", str(REPO)),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ndif-jobs {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_until(condition: Callable[[], bool], timeout: float = 120, what: str = "the condition") -> None:
    """Poll `condition` every 0.1 s until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded model, dequantized into a safetensors folder (cached across runs)."""
    from ndif_jobs.model_refs import local_folder, resolve_model

    return Path(local_folder(resolve_model("smollm2-135m"), MODELS_CACHE))


@pytest.fixture(scope="session")
def embedded(embedded_folder: Path):  # type: ignore[no-untyped-def]
    """The embedded model as an nnsight model on the CPU, float32."""
    from ndif_jobs.model_refs import load_local_model, resolve_model

    return load_local_model(resolve_model("smollm2-135m"), MODELS_CACHE, device="cpu")


def _tiny(folder: Path, kind: str, tokenizer_from: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=3, n_head=4)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(embedded_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer GPT-2 (block list `transformer.h`) built from a config: random weights."""
    return _tiny(tmp_path_factory.mktemp("tiny") / "gpt2", "gpt2", embedded_folder)


@pytest.fixture(scope="session")
def tiny_llama(embedded_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer Llama (block list `model.layers`) built from a config: random weights."""
    return _tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", embedded_folder)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database of its own on the real PostgreSQL server, dropped afterwards: tests
    that run side by side (xdist, or several checkouts on one machine) never share tables."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    name = f"ndif_jobs_test_{uuid.uuid4().hex[:12]}"
    admin = make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the real NDIF server (scripts/ndif-local), one private stack per test process ------------------

NDIF_SCRIPT = REPO / "scripts" / "ndif-local"
NDIF_SHARED_ROOT = Path(os.environ.get("NDIF_LOCAL_ROOT") or REPO / ".ndif-local")


def _free_port_block() -> int:
    """A free block of ports, searched from a start of this xdist process's own (gw0, gw1, ...),
    so that two processes starting their stacks at once do not both take the first free block.
    The starts lie between the ports Ray's client server hands out (23000-23999) and the kernel's
    ephemeral ports (32768 up), either of which could take a port of the block after the check."""
    sys.path.insert(0, str(REPO / "scripts"))
    from ndif_local.harness import free_port_block

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return free_port_block(start=24000 + 1000 * (int(worker) % 8 if worker.isdigit() else 0), stop=32700)


class LocalNdif:
    """A running local NDIF: its address, client environment, and fault-injection handles."""

    def __init__(self, root: Path, port: int, env: dict[str, str]) -> None:
        self.root, self.port, self.env = root, port, env
        self.host = f"http://127.0.0.1:{port}"

    def harness(self, *args: str, extra: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(NDIF_SCRIPT), *args], env={**self.env, **(extra or {})},
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"ndif-local {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        return proc

    def requests(self) -> int:
        """POST /request answered 200 by the server so far (its access log)."""
        return int(self.harness("requests", "--status", "200").stdout.strip())

    def client_env(self, base: dict[str, str], host: str | None = None) -> dict[str, str]:
        """`base` pointed at this stack. A worker polls a request at most every second (unless
        `base` says otherwise): the production ceiling of 10 s would leave each test waiting up to
        that long after NDIF has finished."""
        return {"NDIF_JOBS_POLL_MAX_S": "1", **base, "NDIF_HOST": host or self.host,
                "HF_HOME": str(self.root / "hf_home"), "HF_HUB_OFFLINE": "1", "NDIF_JOBS_ALLOW_HTTP_LOOPBACK": "1"}


@pytest.fixture(scope="session")
def local_ndif(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real NDIF 0.1.2 server with the embedded model deployed as `local/smollm2`."""
    import fcntl

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_", "HF_HOME"))}
    NDIF_SHARED_ROOT.mkdir(parents=True, exist_ok=True)
    with open(NDIF_SHARED_ROOT / ".setup.lock", "w") as lock:  # one setup at a time (xdist processes)
        fcntl.flock(lock, fcntl.LOCK_EX)
        setup = subprocess.run([sys.executable, str(NDIF_SCRIPT), "setup", "--root", str(NDIF_SHARED_ROOT)],
                               env=env, capture_output=True, text=True, timeout=1200)
    assert setup.returncode == 0, setup.stderr[-3000:]
    root = tmp_path_factory.mktemp("ndif-local")
    env.update(NDIF_LOCAL_ROOT=str(root), NDIF_LOCAL_PORT=str(_free_port_block()),
               NDIF_LOCAL_VENV=str(NDIF_SHARED_ROOT / "venv"),
               NDIF_LOCAL_MODEL_DIR=str(NDIF_SHARED_ROOT / "models" / "smollm2"))
    stack = LocalNdif(root, int(env["NDIF_LOCAL_PORT"]), env)
    stack.harness("setup", timeout=300)
    try:
        stack.harness("start", timeout=600)
        yield stack
    finally:
        subprocess.run([sys.executable, str(NDIF_SCRIPT), "stop"], env=env, capture_output=True, timeout=180)
