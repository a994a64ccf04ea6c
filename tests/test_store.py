"""The result store: atomic, checksummed, valid safetensors, never unpickled."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from safetensors.torch import load_file

from ndif_jobs.errors import ResultCorrupt, ResultMissing, StoreError
from ndif_jobs.results import MANIFEST_FILE, TENSOR_FILE, ResultStore

KEY = "ab" * 32


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
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    assert same(result, got)
