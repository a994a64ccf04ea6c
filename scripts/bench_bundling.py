#!/usr/bin/env python3
"""Bundling benchmark: N patching experiments on a local NDIF with queue latency per request.

(a) plain nnsight: one `model.trace(remote=True)` per experiment (two invokes: the clean run,
    and the corrupted run with one layer's last-position block output patched in), in a loop;
(b) ndif-jobs: the same N experiments submitted, the worker run until the queue is empty.
Both go through a proxy that adds LATENCY seconds to every `POST /request` (NDIF's real queue
waits are often longer). Prints requests seen by the server, wall time and the ratios.

    .venv/bin/python scripts/bench_bundling.py            # starts/uses scripts/ndif-local
    .venv/bin/python scripts/bench_bundling.py --n 16 --latency 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from ndif_local.faultproxy import FaultProxy  # noqa: E402

MODEL = "local/smollm2"
PAIRS = [
    ("The Eiffel Tower is in the city of", "The Colosseum is in the city of", " Paris", " Rome"),
    ("The capital of Japan is the city of", "The capital of Italy is the city of", " Tokyo", " Rome"),
]


def experiments(n: int, layers: int = 30) -> list[dict]:
    return [{"clean_prompt": c, "corrupted_prompt": x, "answer": a, "wrong_answer": w, "layers": [i % layers],
             "position": -1} for i, (c, x, a, w) in zip(range(n), PAIRS * n, strict=False)]


def requests(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "ndif-local"), "requests", "--status", "200"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def plain_nnsight(host: str, params: list[dict]) -> float:
    import nnsight
    import nnsight.modeling.huggingface as hf
    from transformers import AutoTokenizer

    hf._ID_CACHE[MODEL] = MODEL  # nnsight canonicalises repo ids through the hub; offline, seed it
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = nnsight.LanguageModel(MODEL, tokenizer=tokenizer)
    t = time.perf_counter()
    for p in params:
        layer = p["layers"][0]
        a = tokenizer(p["answer"], add_special_tokens=False)["input_ids"][0]
        w = tokenizer(p["wrong_answer"], add_special_tokens=False)["input_ids"][0]
        with model.trace(remote=host) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(p["clean_prompt"]):
                clean = model.model.layers[layer].output[:, -1].clone()
                barrier()
            with tracer.invoke(p["corrupted_prompt"]):
                barrier()
                model.model.layers[layer].output[:, -1] = clean
                logits = model.output.logits[0, -1].save()
        float(logits[a] - logits[w])
    return time.perf_counter() - t


def ndif_jobs(host: str, params: list[dict], home: Path) -> float:
    from ndif_jobs.service import Service, Submission
    from ndif_jobs.settings import Settings
    from ndif_jobs.worker import Worker

    settings = Settings(home=home, ndif_host=host, allow_http_loopback=True, max_bundle=len(params),
                        log_level="warning", log_format="json")
    service = Service(settings)
    t = time.perf_counter()
    service.submit_many([Submission("patching", p, model=MODEL, backend="ndif", force=True) for p in params])
    Worker(service).run(until_empty=True)
    elapsed = time.perf_counter() - t
    done = service.queue.counts()["completed"]
    if done != len(params):
        raise SystemExit(f"ndif-jobs completed {done} of {len(params)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds added to every POST /request")
    args = parser.parse_args()

    env = dict(os.environ)
    if subprocess.run([sys.executable, str(REPO / "scripts" / "ndif-local"), "status"], env=env,
                      capture_output=True).returncode != 0:
        subprocess.run([sys.executable, str(REPO / "scripts" / "ndif-local"), "setup"], env=env, check=True)
        subprocess.run([sys.executable, str(REPO / "scripts" / "ndif-local"), "start"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    upstream = "http://127.0.0.1:" + os.environ.get("NDIF_LOCAL_PORT", "8011")
    root = Path(os.environ.get("NDIF_LOCAL_ROOT", REPO / ".ndif-local"))
    os.environ.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proxy = FaultProxy(upstream).start()
    proxy.latency_s["submit"] = args.latency
    params = experiments(args.n)
    try:
        r0 = requests(env)
        plain_s = plain_nnsight(proxy.url, params)
        r1 = requests(env)
        ours_s = ndif_jobs(proxy.url, params, Path(tempfile.mkdtemp(prefix="bench-bundling-")))
        r2 = requests(env)
    finally:
        proxy.stop()
    plain_r, ours_r = r1 - r0, r2 - r1
    print(f"{args.n} patching experiments, {args.latency:g} s queue latency per request, local NDIF (CPU)")
    print(f"{'':<16}{'requests':>10}{'wall s':>10}")
    print(f"{'plain nnsight':<16}{plain_r:>10}{plain_s:>10.1f}")
    print(f"{'ndif-jobs':<16}{ours_r:>10}{ours_s:>10.1f}")
    print(f"{'ratio':<16}{plain_r / max(ours_r, 1):>9.1f}x{plain_s / ours_s:>9.1f}x")


if __name__ == "__main__":
    main()
