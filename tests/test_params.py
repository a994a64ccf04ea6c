"""Parameter parsing: what users type becomes exactly the params they meant, or a clear error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ndif_jobs import experiments
from ndif_jobs.errors import BadInput, InvalidParams
from ndif_jobs.params_input import parse_pairs

ACT = experiments.get("activations")
PATCH = experiments.get("patching")

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200)


@settings(max_examples=200, deadline=None)
@given(prompt=text, layers=st.lists(st.integers(-30, 29), max_size=8), top_k=st.integers(1, 1000))
def test_pairs_round_trip(prompt: str, layers: list[int], top_k: int) -> None:
    raw = parse_pairs(ACT.params, [f"prompt={prompt}", f"layers={json.dumps(layers)}", f"top_k={top_k}"])
    assert raw == {"prompt": prompt, "layers": layers, "top_k": top_k}  # text stays text, even "42" or "[1]"
    assert ACT.validate(raw) == {"prompt": prompt, "layers": layers, "top_k": top_k}


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.text(max_size=30), max_size=5))
def test_anything_typed_is_params_or_a_bad_input(pairs: list[str]) -> None:
    try:
        raw = parse_pairs(ACT.params, pairs)
        ACT.validate(raw)
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize(("value", "expected"), [("0:4", [0, 1, 2, 3]), ("1,5, 9", [1, 5, 9]), ("7", [7]), ("[2,3]", [2, 3])])
def test_layer_shorthands(value: str, expected: list[int]) -> None:
    assert ACT.validate(parse_pairs(ACT.params, ["prompt=x", f"layers={value}"]))["layers"] == expected


def test_position_all_or_int() -> None:
    base = ["clean_prompt=a", "corrupted_prompt=b", "answer=x", "wrong_answer=y"]
    assert PATCH.validate(parse_pairs(PATCH.params, [*base, "position=all"]))["position"] == "all"
    assert PATCH.validate(parse_pairs(PATCH.params, [*base, "position=-2"]))["position"] == -2
    with pytest.raises(InvalidParams, match="position"):
        PATCH.validate(parse_pairs(PATCH.params, [*base, "position=1.5"]))


def test_cache_key_is_canonical() -> None:
    from ndif_jobs.keys import cache_key

    a = cache_key("m", None, "activations", "h", {"prompt": "x", "layers": [1], "top_k": 5})
    b = cache_key("m", None, "activations", "h", {"top_k": 5, "layers": [1], "prompt": "x"})
    assert a == b and len(a) == 64
    assert a != cache_key("m", "rev2", "activations", "h", {"prompt": "x", "layers": [1], "top_k": 5})
    assert a != cache_key("m", None, "activations", "h2", {"prompt": "x", "layers": [1], "top_k": 5})
