#!/usr/bin/env python
"""Peak memory of storing a large result: `ResultStore.put` beside safetensors and torch.save.

    .venv/bin/python scripts/bench_memory.py            # a 1 GiB result, 3 rounds
    .venv/bin/python scripts/bench_memory.py --quick    # 256 MiB, 2 rounds

Each measurement runs in a fresh process: it imports torch and ndif-jobs, builds the result (a
dict of float32 tensors, 8 large and a few small, SIZE in all), then resets the kernel's peak-RSS
mark (`/proc/self/clear_refs`) and stores the result once. "extra" is the peak RSS during the
store minus the RSS just before it (the tensors already built); "peak" is the process's whole
peak (interpreter, torch, the tensors and the extra), which the worker must keep under 2.5x the
largest result it stores. The rounds interleave the three ways of storing, the order rotating;
the table gives medians. (`ndif-jobs status`'s peak RSS is in bench_cli.py's table.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ["ndif-jobs ResultStore.put", "safetensors save_file", "torch.save"]
GOAL = 2.5


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(method: str, size_mib: int, folder: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from ndif_jobs.store import ResultStore

    base = rss_kib("VmRSS")
    big = 8
    small_elems = 1024 * 256  # eight of the result's bytes in small tensors, the rest in 8 big ones
    n = (size_mib * 2**20 // 4 - 4 * small_elems) // big
    result = {
        "hidden": [torch.full((n,), float(i)) for i in range(big)],
        "logits": {f"layer{i}": torch.full((small_elems,), 0.5) for i in range(4)},
        "prompt": "The capital of France is",
        "top_k": 5,
    }
    nbytes = sum(t.numel() * t.element_size() for t in result["hidden"]) + sum(
        t.numel() * t.element_size() for t in result["logits"].values())
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark restarts at the current RSS
    t0 = time.perf_counter()
    if method == METHODS[0]:
        ResultStore(folder / "store").put("ab" * 32, result, info={"experiment": "bench"})
    elif method == METHODS[1]:
        from safetensors.torch import save_file

        flat = {f"hidden.{i}": t for i, t in enumerate(result["hidden"])}
        flat.update({f"logits.{k}": t for k, t in result["logits"].items()})
        save_file(flat, str(folder / "result.safetensors"))
        with open(folder / "result.safetensors", "rb+") as f:
            os.fsync(f.fileno())
    else:
        with open(folder / "result.pt", "wb") as f:
            torch.save(result, f)
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    print(json.dumps({"bytes": nbytes, "base_kib": base, "before_kib": before, "peak_kib": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 2 rounds")
    parser.add_argument("--size-mib", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--dir", type=Path, help="where the results are written (default: a temp folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return
    size = args.size_mib or (256 if args.quick else 1024)
    rounds = args.rounds or (2 if args.quick else 3)
    root = Path(tempfile.mkdtemp(prefix="ndif-bench-mem-", dir=args.dir))
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    try:
        for rnd in range(rounds):
            k = rnd % len(METHODS)
            for method in METHODS[k:] + METHODS[:k]:
                folder = root / f"r{rnd}-{METHODS.index(method)}"
                folder.mkdir()
                out = subprocess.run([sys.executable, __file__, "--child", method, str(size), str(folder)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[method].append(r)
                shutil.rmtree(folder, ignore_errors=True)
                print(f"  round {rnd + 1} {method:<26} extra {(r['peak_kib'] - r['before_kib']) / 1024:8.1f} MiB"
                      f"  peak {r['peak_kib'] / 1024:8.1f} MiB  {r['seconds']:.2f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size_b = results[METHODS[0]][0]["bytes"]
    print(f"\nStoring a {size_b / 2**20:,.0f} MiB result, each in a fresh process: medians of {rounds} rounds. "
          "extra = peak RSS during the store - RSS before it; peak = the process's whole peak RSS.")
    print("| method | RSS before (interpreter + torch + result) MiB | extra MiB | extra / result | "
          "peak MiB | peak / result | seconds | goal: peak < 2.5x |")
    print("|---|---|---|---|---|---|---|---|")
    for method, rs in results.items():
        before = statistics.median(r["before_kib"] for r in rs) / 1024
        extra = statistics.median(r["peak_kib"] - r["before_kib"] for r in rs) / 1024
        peak = statistics.median(r["peak_kib"] for r in rs) / 1024
        secs = statistics.median(r["seconds"] for r in rs)
        ratio = peak * 2**20 / size_b
        goal = ("met" if ratio < GOAL else "MISSED") if method == METHODS[0] else ""
        print(f"| {method} | {before:,.0f} | {extra:,.1f} | {extra * 2**20 / size_b:.3f}x | {peak:,.0f} | "
              f"{ratio:.2f}x | {secs:.2f} | {goal} |")


if __name__ == "__main__":
    main()
