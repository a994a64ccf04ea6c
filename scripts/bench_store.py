#!/usr/bin/env python
"""Benchmark the result store against safetensors, torch.save and the disk itself.

    .venv/bin/python scripts/bench_store.py                # 1 GiB, 5 rounds
    .venv/bin/python scripts/bench_store.py --quick        # 128 MiB, 2 rounds: a smoke run

Everything runs in one process on one machine, interleaved: each round stores (then loads) with
every method in turn, the order rotating from round to round, and the tables give medians over
rounds. One warm-up round of stores runs first and is not counted (the first writes of a run pay
for fresh page-cache memory). Store times include an fsync; "plain write" is a sequential
os.write of the same tensor bytes plus fsync, the disk's own ceiling. Loads run with a cold page
cache (posix_fadvise DONTNEED on the file, and /proc/sys/vm/drop_caches as well with
--drop-caches) and a warm one; "load" is the call, "+touch" adds a sum over every tensor, so that
lazy (memory-mapped) loads pay for their reads. Peak extra memory of each store is measured in a
fresh subprocess: the peak RSS (VmHWM, reset after building the tensors) minus the RSS
before the store.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ndif_jobs.store import TENSOR_FILE, ResultStore  # noqa: E402

_CHUNK = 16 << 20
STORE_METHODS = ["plain write", "ndif-jobs put", "safetensors", "torch.save"]
# Not a store: sha256 over the same bytes on one core, no I/O. The floor under ndif-jobs put,
# which must put each file's sha256 in the manifest.
SHA256_ONLY = "sha256 only (no I/O)"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 1GiB, 256MiB)")
    unit = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def build_tensors(size: int, count: int) -> dict[str, torch.Tensor]:
    """`count` float32 activations of [rows, 4096] adding up to `size`, filled in place (no temporaries)."""
    width = 4096
    rows_total = max(count, size // (4 * width))
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(count):
        rows = rows_total // count + (1 if i < rows_total % count else 0)
        out[f"layers.{i}.output"] = torch.empty(rows, width, dtype=torch.float32).normal_(generator=gen)
    return out


def nbytes_of(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- stores ----------------------------------------------------------------------------------


class Target:
    """Where one method writes; each store replaces the previous file (removed, untimed)."""

    def __init__(self, root: Path, method: str) -> None:
        self.method = method
        self.dir = root / re.sub(r"[^a-z]+", "-", method)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.round = 0
        self.store = ResultStore(self.dir / "store")

    @property
    def key(self) -> str:
        return f"{self.round:064x}"

    def file(self) -> Path:
        if self.method == "ndif-jobs put":
            return self.store.path_for(self.key) / TENSOR_FILE
        names = {SHA256_ONLY: "none", "plain write": "plain.bin", "safetensors": "t.safetensors", "torch.save": "t.pt"}
        return self.dir / names[self.method]

    def clear(self) -> None:
        if self.method == "ndif-jobs put":
            self.store.remove(self.key)
        else:
            self.file().unlink(missing_ok=True)
        self.round += 1

    def store_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.method == SHA256_ONLY:
            digest = hashlib.sha256()
            for name in sorted(tensors):
                view = memoryview(tensors[name].reshape(-1).view(torch.uint8).numpy())
                for start in range(0, len(view), _CHUNK):
                    digest.update(view[start : start + _CHUNK])
            digest.hexdigest()
            return
        path = self.file()
        if self.method == "ndif-jobs put":
            self.store.put(self.key, tensors)  # fsyncs the file, the manifest and the folders
        elif self.method == "safetensors":
            save_file(tensors, str(path))
            fsync_path(path)
        elif self.method == "torch.save":
            torch.save(tensors, path)
            fsync_path(path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for name in sorted(tensors):
                    view = memoryview(tensors[name].reshape(-1).view(torch.uint8).numpy())
                    for start in range(0, len(view), _CHUNK):
                        chunk = view[start : start + _CHUNK]
                        written = os.write(fd, chunk)
                        while written < len(chunk):
                            written += os.write(fd, chunk[written:])
                os.fsync(fd)
            finally:
                os.close(fd)


# -- loads -----------------------------------------------------------------------------------

LOAD_METHODS = [
    "plain read", "ndif-jobs get", "ndif-jobs get(verify)", "safetensors load_file", "torch.load", "torch.load(mmap)",
]
LOAD_SOURCE = {
    "plain read": "plain write",
    "ndif-jobs get": "ndif-jobs put",
    "ndif-jobs get(verify)": "ndif-jobs put",
    "safetensors load_file": "safetensors",
    "torch.load": "torch.save",
    "torch.load(mmap)": "torch.save",
}


def load(method: str, target: Target) -> dict[str, torch.Tensor]:
    path = target.file()
    if method == "plain read":
        size = path.stat().st_size
        buf = torch.empty(size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buf.numpy())
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    break
                done += n
        return {"all": buf}
    if method == "ndif-jobs get":
        return target.store.get(target.key).tensors
    if method == "ndif-jobs get(verify)":
        return target.store.get(target.key, verify=True).tensors
    if method == "safetensors load_file":
        return load_file(str(path))
    if method == "torch.load":
        return torch.load(path, weights_only=True)
    if method == "torch.load(mmap)":
        return torch.load(path, weights_only=True, mmap=True)
    raise ValueError(method)


def touch(tensors: dict[str, torch.Tensor]) -> float:
    """Read every byte once (a float32 sum runs at memory speed; a float64 one would not)."""
    total = 0.0
    for t in tensors.values():
        if t.dtype == torch.uint8 and t.numel() % 4 == 0:
            t = t.view(torch.float32)
        total += float(t.sum())
    return total


_libc = ctypes.CDLL(None, use_errno=True)


def resident_fraction(path: Path) -> float:
    """How much of the file is in the page cache now (mincore on a fresh mapping)."""
    import mmap

    size = path.stat().st_size
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        rc = _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec)
        if rc != 0:
            return float("nan")
        resident = sum(v & 1 for v in vec)
        del addr
    return resident / pages


def make_cold(path: Path, drop_caches: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if drop_caches:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError:
            pass


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


# -- peak memory in a fresh process ----------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (resettable, and not inherited); ru_maxrss where there is none.

    ru_maxrss alone would not do: Linux carries it across fork and exec, so a child started by a
    big parent begins with the parent's peak.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child_memory(method: str, size: int, count: int, root: Path) -> None:
    tensors = build_tensors(size, count)
    gc.collect()
    target = Target(root, method)
    target.round = os.getpid()
    reset = reset_peak_rss()
    before = rss_bytes()
    peak_before = peak_rss_bytes()
    target.store_tensors(tensors)
    peak_after = peak_rss_bytes()
    target.clear()
    print(json.dumps({"rss_before": before, "peak_before": peak_before, "peak_after": peak_after, "reset": reset,
                      "bytes": nbytes_of(tensors)}))


def measure_memory(method: str, size: int, count: int, root: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", method, "--size", str(size), "--tensors", str(count),
         "--dir", str(root)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the run ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": __import__("safetensors").__version__,
    }


def filesystem(path: Path) -> str:
    best, dev, fstype = "", "?", "?"
    try:
        for line in open("/proc/mounts"):
            parts = line.split()
            mount = parts[1]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, dev, fstype = mount, parts[0], parts[2]
    except OSError:
        pass
    return f"{dev} ({fstype}) mounted at {best}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rotate(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="bytes of float32 activations (default 1GiB)")
    ap.add_argument("--tensors", type=int, default=8, help="how many tensors (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (default 5; medians are reported)")
    ap.add_argument("--dir", type=Path, default=REPO / ".cache" / "bench-store",
                    help="scratch folder (default .cache/bench-store in the repo)")
    ap.add_argument("--quick", action="store_true", help="128 MiB and 2 rounds: a smoke run")
    ap.add_argument("--drop-caches", action="store_true",
                    help="also write /proc/sys/vm/drop_caches for cold loads (needs root; affects the whole machine)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child_memory:
        child_memory(args.child_memory, args.size, args.tensors, args.dir)
        return
    if args.quick:
        args.size = min(args.size, 128 << 20)
        args.repeats = min(args.repeats, 2)

    root = args.dir / f"run-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    info = machine()
    drop = args.drop_caches and can_drop_caches()
    print(f"# machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}")
    print(f"# python {info['python']}, torch {info['torch']}, safetensors {info['safetensors']}")
    print(f"# dir: {root} on {filesystem(root)}; /tmp on {filesystem(Path('/tmp'))}")
    print(f"# cold cache: posix_fadvise(DONTNEED){' + drop_caches' if drop else ''};"
          f" load average at start {os.getloadavg()}")

    tensors = build_tensors(args.size, args.tensors)
    size = nbytes_of(tensors)
    print(f"# {len(tensors)} float32 tensors, {size / (1 << 20):.0f} MiB; {args.repeats} rounds after 1 warm-up;"
          " GB = 1e9 bytes")
    timed_stores = STORE_METHODS + [SHA256_ONLY]
    targets = {m: Target(root, m) for m in timed_stores}
    raw: dict[str, Any] = {"machine": info, "bytes": size, "store": {m: [] for m in timed_stores}}

    try:
        # 1. stores, interleaved, rotating the order; round 0 is a warm-up
        for r in range(args.repeats + 1):
            for method in rotate(timed_stores, r):
                target = targets[method]
                target.clear()
                gc.collect()
                seconds, _ = timed(lambda target=target: target.store_tensors(tensors))
                if r > 0:
                    raw["store"][method].append(seconds)
            print(f"  store round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(
                f"{m} {raw['store'][m][-1]:.2f}s" for m in timed_stores if r > 0
            ), flush=True)

        # 2. loads: cold (call, then touch) and warm (call, then touch), interleaved
        raw["load"] = {m: {"cold": [], "cold_touch": [], "warm": [], "warm_touch": []} for m in LOAD_METHODS}
        resident_after_drop = []
        for r in range(args.repeats):
            for method in rotate(LOAD_METHODS, r):
                target = targets[LOAD_SOURCE[method]]
                for phase in ("cold", "warm"):
                    gc.collect()
                    if phase == "cold":
                        make_cold(target.file(), drop)
                        resident_after_drop.append(resident_fraction(target.file()))
                    t_load, loaded = timed(lambda method=method, target=target: load(method, target))
                    t_touch, _ = timed(lambda loaded=loaded: touch(loaded))
                    raw["load"][method][phase].append(t_load)
                    raw["load"][method][phase + "_touch"].append(t_load + t_touch)
                    del loaded
            print(f"  load round {r + 1} done", flush=True)
        raw["resident_after_drop_max"] = max(resident_after_drop)

        # 3. peak extra memory of each store, each in a fresh process
        raw["memory"] = {m: [] for m in STORE_METHODS}
        if not args.skip_memory:
            del tensors
            gc.collect()
            for r in range(min(args.repeats, 3)):
                for method in rotate(STORE_METHODS, r):
                    m = measure_memory(method, args.size, args.tensors, root / "memory")
                    raw["memory"][method].append(m)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    report(raw, size, args)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


def report(raw: dict[str, Any], size: int, args: argparse.Namespace) -> None:
    gb = size / 1e9
    store = raw["store"]
    ceiling = store["plain write"]
    print()
    print(f"## Store {size / (1 << 20):.0f} MiB (+ fsync), medians of {args.repeats} rounds")
    print("| method | s | GB/s | of disk ceiling | peak extra RSS |")
    print("|---|---|---|---|---|")
    for m in STORE_METHODS + [SHA256_ONLY]:
        times = store[m]
        # the same round's plain write is the baseline: median of per-round ratios
        ratio = median([c / t for c, t in zip(ceiling, times, strict=True)])
        mem = raw.get("memory", {}).get(m) or []
        extra = [x["peak_after"] - x["rss_before"] for x in mem]
        mem_text = f"{median(extra) / (1 << 20):.0f} MiB ({median(extra) / size:.0%})" if extra else "-"
        print(f"| {m} | {median(times):.2f} | {gb / median(times):.2f} | {ratio:.0%} | {mem_text} |")
    loads = raw["load"]
    print()
    print(f"## Load (cold: page cache dropped, at most {raw['resident_after_drop_max']:.0%} of the file left resident)")
    print("| method | cold load s | cold +touch s | warm load s | warm +touch s | +touch vs torch.load (cold / warm) |")
    print("|---|---|---|---|---|---|")
    base = loads["torch.load"]
    for m in LOAD_METHODS:
        d = loads[m]
        speed = [median([b / t for b, t in zip(base[p], d[p], strict=True)]) for p in ("cold_touch", "warm_touch")]
        print(
            f"| {m} | {median(d['cold']):.3f} | {median(d['cold_touch']):.3f} | {median(d['warm']):.3f} | "
            f"{median(d['warm_touch']):.3f} | {speed[0]:.1f}x / {speed[1]:.1f}x |"
        )
    put_ratio = median([c / t for c, t in zip(ceiling, store["ndif-jobs put"], strict=True)])
    nd, tl = loads["ndif-jobs get"], loads["torch.load"]
    print()
    print(f"goal: put at >= 70% of the disk ceiling: {put_ratio:.0%} -> {'met' if put_ratio >= 0.7 else 'MISSED'}")
    for phase in ("cold", "warm"):
        lazy = median([b / t for b, t in zip(tl[phase], nd[phase], strict=True)])
        full = median([b / t for b, t in zip(tl[phase + "_touch"], nd[phase + "_touch"], strict=True)])
        print(
            f"goal: get >= 5x faster than torch.load ({phase}): "
            f"load {lazy:.0f}x -> {'met' if lazy >= 5 else 'MISSED'}; "
            f"load + touch {full:.1f}x -> {'met' if full >= 5 else 'MISSED'}"
        )
    print(f"# load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
