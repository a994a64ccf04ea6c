"""The result store: atomic, checksummed, valid safetensors, never unpickled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ndif_jobs.errors import ResultCorrupt, ResultMissing, StoreError
from ndif_jobs.store import MANIFEST_FILE, TENSOR_FILE, ResultStore

KEY = "ab" * 32
REPO = Path(__file__).resolve().parent.parent


def sample() -> dict:
    return {
        "norms": torch.arange(30, dtype=torch.float32),
        "ids": torch.tensor([[1, 2], [3, 4]]),
        "half": torch.randn(3, 5).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "tokens": [" Paris", " the"],
        "nested": {"a": 1, "b": [torch.ones(2), "x"], "c": None, "inf": float("inf")},
        "diff": 2.5,
    }


def test_round_trip_restores_nested_values(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    data = sample()
    size = store.put(KEY, data, info={"experiment": "x"})
    assert size > 0
    got = store.get(KEY, verify=True).values
    for name in ("norms", "ids", "half", "mask", "scalar", "empty"):
        assert got[name].dtype == data[name].dtype and torch.equal(got[name], data[name])
    assert got["tokens"] == [" Paris", " the"] and got["diff"] == 2.5
    assert torch.equal(got["nested"]["b"][0], torch.ones(2)) and got["nested"]["b"][1] == "x"
    assert got["nested"]["inf"] == float("inf") and got["nested"]["c"] is None


def test_written_file_is_valid_safetensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    data = sample()
    store.put(KEY, data)
    loaded = load_file(store.path_for(KEY) / TENSOR_FILE)
    assert torch.equal(loaded["norms"], data["norms"]) and torch.equal(loaded["half"], data["half"])
    assert torch.equal(loaded["nested.b.0"], torch.ones(2))


def test_tensors_are_memory_mapped_not_copied(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    store.put(KEY, {"big": torch.ones(1 << 20)})
    a = store.get(KEY).tensors["big"]
    b = store.get(KEY).tensors["big"]
    assert a.data_ptr() != b.data_ptr()  # two private mappings of one file
    a[0] = 5  # copy-on-write: the file is not changed by writing to a loaded tensor
    assert store.get(KEY, verify=True).tensors["big"][0] == 1


def test_flipped_byte_is_caught(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    store.put(KEY, sample())
    path = store.path_for(KEY) / TENSOR_FILE
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ResultCorrupt, match="does not match its checksum"):
        store.get(KEY)
    with pytest.raises(ResultCorrupt):
        store.check(KEY)


def test_corrupt_manifest_and_missing_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    with pytest.raises(ResultMissing):
        store.get(KEY)
    store.put(KEY, sample())
    (store.path_for(KEY) / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ResultCorrupt, match="not valid JSON"):
        store.get(KEY)
    other = "cd" * 32
    store.put(other, sample())
    os.remove(store.path_for(other) / TENSOR_FILE)
    with pytest.raises(ResultCorrupt, match="missing"):
        store.get(other)


def test_second_put_keeps_the_first_result(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    store.put(KEY, {"x": torch.zeros(3)})
    store.put(KEY, {"x": torch.ones(3)})
    assert torch.equal(store.get(KEY).values["x"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_failed_write_leaves_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    with pytest.raises(StoreError, match="cannot be stored"):
        store.put(KEY, {"x": torch.zeros(3), "bad": object()})
    assert not store.exists(KEY)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_manifest_holds_no_pickle_and_a_checksum(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path)
    store.put(KEY, sample())
    manifest = json.loads((store.path_for(KEY) / MANIFEST_FILE).read_text())
    assert len(manifest["files"][TENSOR_FILE]["sha256"]) == 64
    assert b"\x80\x04" not in (store.path_for(KEY) / TENSOR_FILE).read_bytes()[:16]  # no pickle header


tensors = st.builds(
    lambda shape, dtype, seed: (torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) * 100).to(dtype),
    st.lists(st.integers(0, 5), min_size=0, max_size=3),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]),
    st.integers(0, 1000),
)
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.floats(allow_nan=False), st.text(max_size=20), tensors),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text("abcxyz_.~", min_size=1, max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@hsettings(max_examples=60, deadline=None)
@given(result=st.dictionaries(st.text("abcdefgh.~", min_size=1, max_size=8), values, min_size=1, max_size=5))
def test_round_trip_property(tmp_path_factory, result) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path_factory.mktemp("prop"))
    store.put(KEY, result)
    got = store.get(KEY, verify=True).values

    def same(a, b) -> bool:  # type: ignore[no-untyped-def]
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    assert same(result, got)


def test_values_read_as_numpy_arrays_give_the_same_json_as_torch_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`results --json` reads a result as numpy arrays (it starts without torch): every dtype,
    bfloat16 and float8 (numpy has neither) and the non-finite floats included, prints the same."""
    from ndif_jobs.store.codec import to_jsonable

    store = ResultStore(tmp_path)
    store.put(KEY, {
        **sample(),
        "f16": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
        "nonfinite": torch.tensor([1.0, float("nan"), float("inf"), float("-inf")]),
        "bf16_nan": torch.tensor([[float("nan"), 0.1], [3.0e38, -1e-38]], dtype=torch.bfloat16),
        "f8": torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn),
        "f8_empty": torch.zeros(0, 2).to(torch.float8_e4m3fn),
        "u8": torch.arange(3, dtype=torch.uint8),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "f64": torch.tensor([1 / 3], dtype=torch.float64),
    })
    as_numpy = store.get(KEY, arrays="numpy")
    assert {type(t).__module__ for t in as_numpy.tensors.values()} == {"numpy"}
    printed = json.dumps(to_jsonable(as_numpy.values), allow_nan=False)
    assert printed == json.dumps(to_jsonable(store.get(KEY).values), allow_nan=False)
    assert json.loads(printed)["nonfinite"] == [1.0, None, None, None]
    assert json.loads(printed)["f8"] == [0.5, -1.0, 448.0]


# -- writing from the tensors' memory ------------------------------------------------------


def test_strided_and_expanded_tensors_are_written_in_pieces(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.store import safetensors_io

    monkeypatch.setattr(safetensors_io, "_COPY_CHUNK", 64)  # many pieces, and rows bigger than a piece
    monkeypatch.setattr(safetensors_io, "_CHUNK", 96)
    base = torch.arange(40 * 30, dtype=torch.float32).reshape(40, 30)
    data = {
        "t": base.t(),  # strided: rows of 160 bytes, more than a piece
        "cols": base[:, ::3],
        "wide": torch.arange(2 * 3 * 50, dtype=torch.int16).reshape(2, 3, 50).transpose(0, 2),
        "expanded": torch.tensor([1.5, -2.0]).expand(7, 2),
        "flat": torch.arange(100, dtype=torch.int64)[::7],
        "contiguous": torch.randn(50, 3),
        "grad": torch.ones(5, 5, requires_grad=True),
    }
    store = ResultStore(tmp_path)
    store.put(KEY, data)
    got = store.get(KEY, verify=True).values
    on_disk = load_file(store.path_for(KEY) / TENSOR_FILE)
    for name, t in data.items():
        assert torch.equal(got[name], t.detach()) and got[name].shape == t.shape
        assert torch.equal(on_disk[name], t.detach())


def test_peak_extra_memory_of_a_put_is_under_a_tenth_of_the_result(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """256 MiB, half of it strided (copied a few MiB at a time), stored in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO)!r})
from ndif_jobs.store import ResultStore
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
data = {{
    "a": torch.empty(8192, 4096).normal_(),               # 128 MiB, written from its own memory
    "b": torch.empty(4096, 8192).normal_().t(),           # 128 MiB, strided: copied in pieces
}}
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
ResultStore({str(tmp_path)!r}).put("{KEY}", data)
print(json.dumps({{"before": before, "peak": rss("VmHWM:")}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    size = 256 << 20
    assert m["peak"] - m["before"] < size // 10, f"peak extra {(m['peak'] - m['before']) >> 20} MiB"


# -- trusting a stat, and when not to ------------------------------------------------------


def test_unchanged_file_is_trusted_without_rehashing(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ndif_jobs.store.store as store_module

    store = ResultStore(tmp_path)
    store.put(KEY, sample())
    calls = []
    real = store_module._sha256_fd
    monkeypatch.setattr(store_module, "_sha256_fd", lambda fd, size: calls.append(size) or real(fd, size))
    store.get(KEY)
    assert calls == []
    store.get(KEY, verify=True)
    assert len(calls) == 1


def test_in_place_rewrite_with_its_mtime_put_back_is_caught(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Same size, same inode, same mtime (as rsync -t or touch -r would leave it): ctime still moves."""
    store = ResultStore(tmp_path)
    store.put(KEY, {"x": torch.zeros(1000)})
    path = store.path_for(KEY) / TENSOR_FILE
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")  # the last float becomes 1.0
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    with pytest.raises(ResultCorrupt, match="does not match its checksum"):
        store.get(KEY)


def test_stamp_waits_for_the_file_clock_to_move_on() -> None:
    """A change in the same clock tick as the write would keep mtime and ctime (racy stamp)."""
    import ndif_jobs.store.store as store_module

    now = store_module._fs_now_ns()
    fake = os.stat_result((0o100600, 7, 0, 1, 0, 0, 100, 0, 0, 0, 0.0, 0.0, 0.0, now, now + 1, now))
    stamp = store_module._settled_stamp(fake)
    assert stamp == {"size": 100, "ino": 7, "mtime_ns": now + 1, "ctime_ns": now}
    assert store_module._fs_now_ns() > now + 1  # any later change gets a later time
    whole = (now // 10**9) * 10**9
    coarse = os.stat_result((0o100600, 7, 0, 1, 0, 0, 100, 0, 0, 0, 0.0, 0.0, 0.0, whole, whole, whole))
    assert store_module._settled_stamp(coarse) is None  # whole-second times: never trusted
    future = os.stat_result((0o100600, 7, 0, 1, 0, 0, 100, 0, 0, 0, 0.0, 0.0, 0.0, now + 10**12, now + 10**12 + 1, now + 10**12 + 1))
    assert store_module._settled_stamp(future, wait_s=0.01) is None  # a clock behind the file's: never trusted


def test_stamp_without_ctime_from_an_older_manifest_means_rehash(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ndif_jobs.store.store as store_module
    from ndif_jobs.store.codec import CHECKSUM_FIELD

    store = ResultStore(tmp_path)
    store.put(KEY, sample())
    mpath = store.path_for(KEY) / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    del manifest["files"][TENSOR_FILE]["stat"]["ctime_ns"]
    del manifest[CHECKSUM_FIELD]
    manifest["format"] = 1  # stamps without ctime were written by format 1 only
    mpath.write_text(json.dumps(manifest))
    calls = []
    real = store_module._sha256_fd
    monkeypatch.setattr(store_module, "_sha256_fd", lambda fd, size: calls.append(size) or real(fd, size))
    assert torch.equal(store.get(KEY).values["norms"], sample()["norms"])
    assert len(calls) == 1


def test_get_maps_the_very_file_it_checked(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A file swapped in between the check and the mapping is not what get returns."""
    import ndif_jobs.store.store as store_module

    store = ResultStore(tmp_path)
    store.put(KEY, {"x": torch.zeros(64)})
    other = ResultStore(tmp_path / "other")
    other.put(KEY, {"x": torch.ones(64)})  # same size, valid, but not this result's bytes
    path = store.path_for(KEY) / TENSOR_FILE
    real = store_module.map_safetensors

    def swap_then_map(f, p, *arrays):  # type: ignore[no-untyped-def]
        os.replace(other.path_for(KEY) / TENSOR_FILE, path)
        return real(f, p, *arrays)

    monkeypatch.setattr(store_module, "map_safetensors", swap_then_map)
    assert torch.equal(store.get(KEY).values["x"], torch.zeros(64))


def test_bad_manifest_entries_and_headers_are_corrupt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.store.codec import CHECKSUM_FIELD, manifest_digest
    from ndif_jobs.store.safetensors_io import read_safetensors

    def sealed(manifest: dict) -> str:
        """A bad manifest with a matching checksum: the checks behind the checksum must catch it."""
        return json.dumps({**manifest, CHECKSUM_FIELD: manifest_digest(manifest)})

    store = ResultStore(tmp_path)
    store.put(KEY, sample())
    mpath = store.path_for(KEY) / MANIFEST_FILE
    good = json.loads(mpath.read_text())
    no_tensors = dict(good, files={})
    mpath.write_text(sealed(no_tensors))
    with pytest.raises(ResultCorrupt, match="no checksum"):
        store.get(KEY)
    outside = dict(good, files={**good["files"], "../../secret": {"sha256": "0" * 64, "bytes": 1}})
    mpath.write_text(sealed(outside))
    with pytest.raises(ResultCorrupt, match="bad file"):
        store.check(KEY)
    # a header whose offsets disagree with the shape
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ResultCorrupt, match="bad header entry"):
        read_safetensors(bad)
