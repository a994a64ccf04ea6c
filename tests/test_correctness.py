"""Each built-in's numbers equal a plain transformers computation with forward hooks.

The built-ins run exactly as the worker runs them: all in one `run_jobs` call, their forward
passes packed into shared traces (prompts of different lengths left-padded together). The
reference (tests/reference.py) runs each prompt alone, without nnsight.
"""

from __future__ import annotations

import pytest
import torch

from ndif_jobs.experiments import builtin
from ndif_jobs.experiments.runtime import Failure, run_jobs

from . import reference as ref

pytestmark = pytest.mark.slow

ATOL = 2e-4  # logits are O(10); float32 batched vs unbatched matmuls differ by ~1e-5

PROMPT = "The capital of France is"
PATCH = {
    "clean_prompt": "The Eiffel Tower is in the city of",
    "corrupted_prompt": "The Colosseum is in the city of",
    "answer": " Paris",
    "wrong_answer": " Rome",
}
STEER = {
    "positive_prompt": "I love this movie, it's wonderful",
    "negative_prompt": "I hate this movie, it's terrible",
    "prompt": "This restaurant is",
}


@pytest.fixture(scope="module")
def hf(embedded_folder):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded_folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(embedded_folder)


@pytest.fixture(scope="module")
def packed(embedded):  # type: ignore[no-untyped-def]
    """Every built-in in ONE run_jobs call, as one bundle of the worker runs them."""
    jobs = [
        ("act", builtin.activations, {"prompt": PROMPT, "layers": None, "top_k": 5}),
        ("patch", builtin.patching, {**PATCH, "layers": [0, 3, 9, 15, 22, 29], "position": -1}),
        ("patch_all", builtin.patching, {"clean_prompt": "The cat sat down", "corrupted_prompt": "The dog sat down",
                                         "answer": " on", "wrong_answer": " in", "layers": [2, 7], "position": "all"}),
        ("cross", builtin.cross_prompt, {"source_prompt": "The cat sat on the mat", "target_prompt": "The dog ran through the park",
                                         "layer": 6, "position": -1, "top_k": 5}),
        ("steer", builtin.steering, {**STEER, "layer": 6, "coefficient": 3.0, "top_k": 5}),
        ("lens", builtin.logit_lens, {"prompt": "The quick brown fox jumps over the lazy", "layers": None, "top_k": 5, "position": -1}),
        ("lens_mid", builtin.logit_lens, {"prompt": PROMPT, "layers": [4, 20], "top_k": 3, "position": 2}),
        ("gen", builtin.generate, {"prompt": PROMPT, "max_new_tokens": 6, "steering": None}),
        ("gen_steer", builtin.generate, {"prompt": PROMPT, "max_new_tokens": 4,
                                         "steering": {"positive_prompt": "I love", "negative_prompt": "I hate", "layer": 6, "coefficient": 4.0}}),
    ]
    with torch.no_grad():
        out = run_jobs(embedded, jobs)
    failures = {k: v for k, v in out.items() if isinstance(v, Failure)}
    assert not failures, failures
    return out


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4)


def test_activations_put_paris_first(packed, embedded) -> None:  # type: ignore[no-untyped-def]
    result = packed["act"]
    assert result["top_tokens"][0] == " Paris"
    assert result["top_probs"][0] > 0.5
    assert result["norms"].shape == (30,) and result["norms"].dtype == torch.float32


def test_activations_match_hooks(packed, hf) -> None:  # type: ignore[no-untyped-def]
    expected = ref.activations(*hf, PROMPT, list(range(30)), 5)
    close(packed["act"]["norms"], expected["norms"], atol=1e-2)  # norms are O(100)
    assert packed["act"]["top_ids"].tolist() == expected["top_ids"].tolist()
    close(packed["act"]["top_probs"], expected["top_probs"], atol=1e-5)


def test_patching_matches_hooks(packed, hf) -> None:  # type: ignore[no-untyped-def]
    model, tok = hf
    answer, wrong = tok(" Paris", add_special_tokens=False)["input_ids"][0], tok(" Rome", add_special_tokens=False)["input_ids"][0]
    expected = ref.patching(model, tok, PATCH["clean_prompt"], PATCH["corrupted_prompt"], answer, wrong, [0, 3, 9, 15, 22, 29], -1)
    got = packed["patch"]
    assert got["clean_logit_diff"] == pytest.approx(expected["clean_logit_diff"], abs=ATOL)
    assert got["corrupted_logit_diff"] == pytest.approx(expected["corrupted_logit_diff"], abs=ATOL)
    close(got["logit_diff"], expected["logit_diff"])
    # Patching the last layer at the last position restores the clean answer exactly.
    assert got["logit_diff"][-1].item() == pytest.approx(got["clean_logit_diff"], abs=ATOL)


def test_patching_all_positions_matches_hooks(packed, hf) -> None:  # type: ignore[no-untyped-def]
    model, tok = hf
    answer, wrong = tok(" on", add_special_tokens=False)["input_ids"][0], tok(" in", add_special_tokens=False)["input_ids"][0]
    seen, _ = ref.capture(model, tok, "The cat sat down", [2, 7])
    diffs = []
    for layer in (2, 7):
        with ref.hook(ref.blocks(model)[layer], lambda h, layer=layer: seen[layer].clone()):
            logits = ref.last_logits(model, tok, "The dog sat down")
        diffs.append(logits[answer] - logits[wrong])
    close(packed["patch_all"]["logit_diff"], torch.stack(diffs))


def test_cross_prompt_matches_hooks(packed, hf) -> None:  # type: ignore[no-untyped-def]
    expected = ref.cross_prompt(*hf, "The cat sat on the mat", "The dog ran through the park", 6, -1)
    close(packed["cross"]["logits_before"], expected["logits_before"])
    close(packed["cross"]["logits_after"], expected["logits_after"])
    assert not torch.allclose(packed["cross"]["logits_before"], packed["cross"]["logits_after"])


def test_steering_matches_hooks(packed, hf) -> None:  # type: ignore[no-untyped-def]
    expected = ref.steering(*hf, STEER["positive_prompt"], STEER["negative_prompt"], STEER["prompt"], 6, 3.0, 5)
    got = packed["steer"]
    close(got["steering_vector"], expected["steering_vector"], atol=1e-4)
    assert got["top_ids"].tolist() == expected["top_ids"].tolist()
    assert got["steered_top_ids"].tolist() == expected["steered_top_ids"].tolist()
    close(got["top_probs"], expected["top_probs"], atol=1e-5)
    close(got["steered_top_probs"], expected["steered_top_probs"], atol=1e-5)


def test_logit_lens_matches_hooks_and_last_layer_is_the_prediction(packed, hf) -> None:  # type: ignore[no-untyped-def]
    prompt = "The quick brown fox jumps over the lazy"
    expected = ref.logit_lens(*hf, prompt, list(range(30)), 5, -1)
    got = packed["lens"]
    assert got["top_ids"].shape == (30, 5)
    assert got["top_ids"].tolist() == expected["top_ids"].tolist()
    close(got["top_probs"], expected["top_probs"], atol=1e-5)
    # The last layer through the final norm and unembedding IS the model's own prediction.
    model_top = ref.last_logits(*hf, prompt).softmax(-1).topk(5)
    assert got["top_ids"][-1].tolist() == model_top.indices.tolist()
    close(got["top_probs"][-1], model_top.values, atol=1e-5)


def test_logit_lens_at_a_position_matches_hooks(packed, hf) -> None:  # type: ignore[no-untyped-def]
    expected = ref.logit_lens(*hf, PROMPT, [4, 20], 3, 2)
    assert packed["lens_mid"]["top_ids"].tolist() == expected["top_ids"].tolist()
    close(packed["lens_mid"]["top_probs"], expected["top_probs"], atol=1e-5)


def test_generate_matches_transformers(packed, hf) -> None:  # type: ignore[no-untyped-def]
    expected = ref.generate(*hf, PROMPT, 6)
    assert packed["gen"]["token_ids"].tolist() == expected.tolist()
    assert packed["gen"]["text"] == hf[1].decode(expected)


def test_steered_generate_matches_hooks(packed, hf) -> None:  # type: ignore[no-untyped-def]
    steer = {"positive_prompt": "I love", "negative_prompt": "I hate", "layer": 6, "coefficient": 4.0}
    expected = ref.generate(*hf, PROMPT, 4, steer)
    assert packed["gen_steer"]["token_ids"].tolist() == expected.tolist()
    assert packed["gen_steer"]["token_ids"].tolist() != packed["gen"]["token_ids"][:4].tolist()


def test_packed_equals_one_by_one(packed, embedded) -> None:  # type: ignore[no-untyped-def]
    """Packing many jobs' passes into shared traces changes no number (beyond float rounding)."""
    jobs = [
        ("act", builtin.activations, {"prompt": PROMPT, "layers": None, "top_k": 5}),
        ("patch", builtin.patching, {**PATCH, "layers": [0, 3, 9, 15, 22, 29], "position": -1}),
        ("steer", builtin.steering, {**STEER, "layer": 6, "coefficient": 3.0, "top_k": 5}),
        ("lens", builtin.logit_lens, {"prompt": "The quick brown fox jumps over the lazy", "layers": None, "top_k": 5, "position": -1}),
    ]
    with torch.no_grad():
        alone = {job[0]: run_jobs(embedded, [job], pack=False)[job[0]] for job in jobs}
    for name, result in alone.items():
        for field, value in result.items():
            other = packed[name][field]
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                close(other, value, atol=1e-4)
            elif isinstance(value, torch.Tensor):
                assert other.tolist() == value.tolist(), (name, field)
            elif isinstance(value, float):
                assert other == pytest.approx(value, abs=1e-4)
            else:
                assert other == value, (name, field)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_builtins_run_across_architectures(arch, request) -> None:  # type: ignore[no-untyped-def]
    """GPT-2 (`transformer.h`, absolute positions) and Llama (`model.layers`, rotary) alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ndif_jobs.model_refs import load_local_model, resolve_model

    folder = request.getfixturevalue(arch)
    model = load_local_model(resolve_model(str(folder)), folder, device="cpu")
    jobs = [
        ("act", builtin.activations, {"prompt": PROMPT, "layers": None, "top_k": 3}),
        ("act2", builtin.activations, {"prompt": "A much longer prompt that needs padding beside the short one", "layers": None, "top_k": 3}),
        ("lens", builtin.logit_lens, {"prompt": PROMPT, "layers": None, "top_k": 3, "position": -1}),
        ("patch", builtin.patching, {**PATCH, "layers": None, "position": -1}),
        ("steer", builtin.steering, {**STEER, "layer": 1, "coefficient": 3.0, "top_k": 3}),
        ("cross", builtin.cross_prompt, {"source_prompt": "The cat", "target_prompt": "The dog ran", "layer": 1, "position": -1}),
    ]
    with torch.no_grad():
        out = run_jobs(model, jobs)
    assert not [v for v in out.values() if isinstance(v, Failure)]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for name, prompt in (("act", PROMPT), ("act2", "A much longer prompt that needs padding beside the short one")):
        expected = ref.activations(hf, tok, prompt, [0, 1, 2], 3)
        close(out[name]["norms"], expected["norms"], atol=1e-3)
        close(out[name]["top_probs"], expected["top_probs"], atol=1e-5)
    lens = ref.logit_lens(hf, tok, PROMPT, [0, 1, 2], 3, -1)
    close(out["lens"]["top_probs"], lens["top_probs"], atol=1e-5)
    answer = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    wrong = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    patch = ref.patching(hf, tok, PATCH["clean_prompt"], PATCH["corrupted_prompt"], answer, wrong, [0, 1, 2], -1)
    close(out["patch"]["logit_diff"], patch["logit_diff"])
