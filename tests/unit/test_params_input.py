"""From what a user types to an experiment's params: `-p NAME=VALUE` pairs, params files, and
the parameter types of the built-ins. Each bad input is one clear line (`BadInput`), never a
traceback; tests/test_bad_input.py checks the same through the CLI's exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ndif_jobs import experiments
from ndif_jobs.errors import BadInput, InvalidParams
from ndif_jobs.experiments.params import ActivationsParams, PatchingParams, type_text
from ndif_jobs.params_input import MAX_DEPTH, parse_pairs, read_params_file

ACT = experiments.get("activations")


# -- -p NAME=VALUE --------------------------------------------------------------------------------


def test_a_text_parameter_is_kept_exactly_as_typed() -> None:
    raw = parse_pairs(ActivationsParams, ["prompt=[1, 2]", "layers=[0,4]", "top_k=10"])
    assert raw == {"prompt": "[1, 2]", "layers": [0, 4], "top_k": 10}
    assert parse_pairs(ActivationsParams, ["prompt=a=b"]) == {"prompt": "a=b"}  # only the first `=` splits


def test_a_value_that_is_not_json_is_handed_on_as_text() -> None:
    assert parse_pairs(ActivationsParams, ["layers=0:4"]) == {"layers": "0:4"}
    assert parse_pairs(ActivationsParams, ["unknown={not json"]) == {"unknown": "{not json"}


@pytest.mark.parametrize(("pairs", "says"), [
    (["prompt"], "expected NAME=VALUE"),
    (["=x"], "expected NAME=VALUE"),
    (["top_k=1", " top_k=2"], "given twice"),
])
def test_a_malformed_pair_is_a_bad_input(pairs: list[str], says: str) -> None:
    with pytest.raises(BadInput, match=says):
        parse_pairs(ActivationsParams, pairs)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_json_nested_too_deep_is_a_bad_input_not_a_crash(depth: int) -> None:
    with pytest.raises(BadInput, match=f"nested deeper than {MAX_DEPTH}"):
        parse_pairs(ActivationsParams, ["layers=" + "[" * depth + "]" * depth])


def test_json_nested_to_the_limit_is_accepted() -> None:
    value = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_pairs(ActivationsParams, [f"layers={value}"])["layers"] == json.loads(value)


# -- params files ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "params.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_a_params_file_holds_one_job_or_a_list_of_jobs(tmp_path: Path) -> None:
    assert read_params_file(write(tmp_path, '{"prompt": "a"}'), max_jobs=10) == [{"prompt": "a"}]
    assert read_params_file(write(tmp_path, '[{"prompt": "a"}, {"prompt": "b"}]'), max_jobs=10) == [
        {"prompt": "a"}, {"prompt": "b"}]


@pytest.mark.parametrize(("text", "says"), [
    ('{"prompt": "a",\n "top_k": }', "not valid JSON: Expecting value at line 2 column 11"),
    ("[]", "must hold a JSON object or a non-empty list of objects"),
    ('[{"prompt": "a"}, 3]', "must hold a JSON object or a non-empty list of objects"),
    ("42", "must hold a JSON object or a non-empty list of objects"),
    ("[" * 200 + "]" * 200, f"nested deeper than {MAX_DEPTH}"),
    (b"\xff\xfe{", "cannot read params file"),
])
def test_a_bad_params_file_is_one_line_saying_what_is_wrong(tmp_path: Path, text: str | bytes, says: str) -> None:
    with pytest.raises(BadInput, match=says) as caught:
        read_params_file(write(tmp_path, text), max_jobs=10)
    assert "\n" not in str(caught.value)


def test_a_missing_params_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        read_params_file(str(tmp_path / "nope.json"), max_jobs=10)


def test_a_params_file_of_more_jobs_than_allowed_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps([{"prompt": "a"}] * 11))
    with pytest.raises(BadInput, match="holds 11 jobs; one submission may hold at most 10"):
        read_params_file(path, max_jobs=10)
    assert len(read_params_file(path, max_jobs=11)) == 11


# -- the built-ins' parameter types ---------------------------------------------------------------


@pytest.mark.parametrize(("layers", "expected"), [
    ("0:3", [0, 1, 2]), (":2", [0, 1]), ("4, 1,9", [4, 1, 9]), (2, [2]), ([3, 1], [3, 1]), (None, None),
])
def test_layers_are_read_from_every_shorthand(layers: object, expected: object) -> None:
    assert ACT.validate({"prompt": "x", "layers": layers})["layers"] == expected


@pytest.mark.parametrize(("raw", "says"), [
    ({"prompt": "x", "layers": "a:b"}, "a range is START:STOP"),
    ({"prompt": "x", "layers": "one,two"}, "expected integers"),
    ({"prompt": "x", "top_k": 0}, "top_k"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "top_kk": 3}, "unknown parameter (did you mean 'top_k'?)"),
    ({}, "prompt: missing required parameter"),
])
def test_invalid_params_are_one_line_naming_the_parameter(raw: dict, says: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        ACT.validate(raw)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_position_is_an_int_or_all_even_when_typed_as_text() -> None:
    base = {"clean_prompt": "a", "corrupted_prompt": "b", "answer": " x", "wrong_answer": " y"}
    patching = experiments.get("patching")
    assert patching.validate({**base, "position": "-2"})["position"] == -2
    assert patching.validate({**base, "position": "all"})["position"] == "all"
    with pytest.raises(InvalidParams, match="position"):
        patching.validate({**base, "position": "last"})


def test_parameter_types_are_shown_as_a_user_writes_them() -> None:
    fields = PatchingParams.model_fields
    assert type_text(fields["layers"].annotation, fields["layers"].metadata) == "Layers"
    assert type_text(fields["answer"].annotation, fields["answer"].metadata) == "Token"
    assert type_text(ActivationsParams.model_fields["top_k"].annotation) == "int"
