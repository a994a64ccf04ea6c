"""The README's own-experiment example, as written there: the staged API (`Pass`, `Window`) and a
typed parameter, imported from the top of `ndif_jobs`, queued, packed with another job by the
worker, and equal to plain transformers with a forward hook."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from .reference import blocks, hook

pytestmark = pytest.mark.slow

# The README's example, word for word.
README_EXAMPLE = '''
from ndif_jobs import Layer, Params, Pass, Prompt, Window, experiment
from ndif_jobs.experiments.access import blocks, logits


class AblateParams(Params):
    prompt: Prompt
    layer: Layer = 0  # a block index: checked against the model at submit


@experiment("mlp-ablate", params=AblateParams)
def mlp_ablate(model, p):
    """How one layer's MLP moves the next-token logits."""

    def plain(m, w: Window):
        return {"logits": logits(m)[0, w.index(-1)]}

    def ablated(m, w: Window):
        blocks(m)[p["layer"]].mlp.output[:] = 0
        return {"logits": logits(m)[0, w.index(-1)]}

    base, cut = yield [Pass(p["prompt"], plain), Pass(p["prompt"], ablated)]
    return {"logit_change": cut["logits"] - base["logits"]}
'''

PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]


def test_the_readme_staged_example_runs_packed_and_matches_hooks(service, tmp_path, embedded_folder, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ndif_jobs.errors import InvalidParams
    from ndif_jobs.service import Submission
    from ndif_jobs.worker import Worker

    (tmp_path / "readme_mlp_ablate.py").write_text(README_EXAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("readme_mlp_ablate")
    try:
        with pytest.raises(InvalidParams, match="layer 30 is out of range: the model has 30 layers"):
            service.submit(Submission("mlp-ablate", {"prompt": PROMPTS[0], "layer": 30}))
        jobs = service.submit_many([Submission("mlp-ablate", {"prompt": p, "layer": -27}) for p in PROMPTS])
        assert [service.job(j.id).params for j in jobs] == [{"prompt": p, "layer": 3} for p in PROMPTS]
        Worker(service).run(until_empty=True)
        results = [service.load_result(j.id) for j in jobs]
        (bundle,) = {service.job(j.id).bundle_id for j in jobs}  # both jobs ran in one bundle
        assert bundle is not None
    finally:
        sys.modules.pop("readme_mlp_ablate", None)

    model = AutoModelForCausalLM.from_pretrained(embedded_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_folder)
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base = model(ids).logits[0, -1]
            with hook(blocks(model)[3].mlp, torch.zeros_like):
                cut = model(ids).logits[0, -1]
        torch.testing.assert_close(result["logit_change"].float(), cut - base, atol=1e-4, rtol=1e-4)
