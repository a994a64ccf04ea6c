#!/usr/bin/env python3
"""Local backend benchmark: N experiments of each built-in, plain nnsight loop vs ndif-jobs.

The baseline is what a researcher writes from the tutorials: one `model.trace` per experiment
(per layer, for a patching sweep) in a Python loop, results kept in memory. ndif-jobs does the
whole job: submit N jobs, run the worker until the queue is empty (passes packed into shared
traces), and store every result on disk. Both run in the same process on the same model, one
after the other, each repeated; medians and ratios are printed.

    .venv/bin/python scripts/bench_local.py                         # embedded 135M model, CPU
    .venv/bin/python scripts/bench_local.py --model random-1b --device cuda   # GPU check
    .venv/bin/python scripts/bench_local.py --model random-tiny --n 8         # smoke test

`random-1b` / `random-tiny` are Llama models with random weights built from a config, with a
word-level tokenizer made here: no network, no download.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import nnsight  # noqa: E402
import torch  # noqa: E402

WORDS = ("the cat dog sat ran on in of a mat park city tower is was france paris rome capital "
         "love hate movie restaurant wonderful terrible quick brown fox jumps over lazy eiffel "
         "colosseum meaning life what it this i".split())


def prompts(n: int, seed: int = 0) -> list[str]:
    """Short prompts of varied lengths (4 to 12 words), like a real sweep over a dataset."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() for _ in range(n)]


# -- models --------------------------------------------------------------------------------------


def make_random_model(size: str, device: str, folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for word in WORDS:
        for variant in (word, word.capitalize(), " " + word):
            vocab.setdefault(variant, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    if size == "1b":  # ~1.2B parameters, Llama-3.2-1B-like shape
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=512)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        dtype = torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- the baseline: tutorial-style nnsight, one trace per experiment --------------------------------


def _blocks(model: Any) -> Any:
    return model.model.layers


def base_activations(model: Any, p: dict) -> dict:
    with model.trace(p["prompt"]):
        hs = nnsight.save([_blocks(model)[i].output for i in range(len(_blocks(model)))])
        logits = model.output.logits.save()
    norms = torch.stack([h.norm() for h in hs])
    top = torch.softmax(logits[0, -1], dim=-1).topk(p["top_k"])
    return {"norms": norms, "top": top.indices}


def base_logit_lens(model: Any, p: dict) -> dict:
    with model.trace(p["prompt"]):
        hs = nnsight.save([_blocks(model)[i].output[0, -1] for i in range(len(_blocks(model)))])
    with torch.no_grad():
        lens = model.lm_head(model.model.norm(torch.stack(hs)))
    return {"top": lens.softmax(-1).topk(p["top_k"]).indices}


def _first(model: Any, text: str) -> int:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"][0]


def base_patching(model: Any, p: dict) -> dict:
    a, b = _first(model, p["answer"]), _first(model, p["wrong_answer"])
    diffs = []
    n_layers = len(_blocks(model))
    # One clean trace for every layer (the tutorial re-runs it per layer), then one patched trace per layer.
    with model.trace(p["clean_prompt"]):
        cleans = nnsight.save([_blocks(model)[layer].output[:, -1] for layer in range(n_layers)])
    for layer in range(n_layers):
        clean = cleans[layer]
        with model.trace(p["corrupted_prompt"]):
            _blocks(model)[layer].output[:, -1] = clean
            logits = model.output.logits[0, -1].save()
        diffs.append(logits[a] - logits[b])
    return {"logit_diff": torch.stack(diffs)}


def base_steering(model: Any, p: dict) -> dict:
    layer = p["layer"]
    with model.trace(p["positive_prompt"]):
        pos = _blocks(model)[layer].output.save()
    with model.trace(p["negative_prompt"]):
        neg = _blocks(model)[layer].output.save()
    vector = pos.mean(dim=1) - neg.mean(dim=1)
    with model.trace(p["prompt"]):
        normal = model.output.logits[0, -1].save()
    with model.trace(p["prompt"]):
        _blocks(model)[layer].output[:] += p["coefficient"] * vector
        steered = model.output.logits[0, -1].save()
    return {"normal": normal.argmax(), "steered": steered.argmax()}


def base_cross_prompt(model: Any, p: dict) -> dict:
    layer = p["layer"]
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(p["source_prompt"]):
            src = _blocks(model)[layer].output[:, -1].clone()
            barrier()
        with tracer.invoke(p["target_prompt"]):
            barrier()
            _blocks(model)[layer].output[:, -1] = src
            after = model.output.logits[0, -1].save()
    return {"after": after.argmax()}


def base_generate(model: Any, p: dict) -> dict:
    with model.generate(p["prompt"], max_new_tokens=p["max_new_tokens"], do_sample=False,
                        pad_token_id=model.tokenizer.pad_token_id or model.tokenizer.eos_token_id) as tracer:
        out = tracer.result.save()
    return {"ids": out}


def experiment_params(n: int, n_layers: int) -> dict[str, tuple[Callable[..., dict], list[dict]]]:
    ps = prompts(4 * n)
    mid = n_layers // 2
    return {
        "activations": (base_activations, [{"prompt": ps[i], "top_k": 5} for i in range(n)]),
        "logit-lens": (base_logit_lens, [{"prompt": ps[n + i], "top_k": 5} for i in range(n)]),
        "patching": (base_patching, [{"clean_prompt": ps[i] + " paris", "corrupted_prompt": ps[i] + " rome",
                                      "answer": " paris", "wrong_answer": " rome"} for i in range(n)]),
        "steering": (base_steering, [{"positive_prompt": "I love this movie", "negative_prompt": "I hate this movie",
                                      "prompt": ps[2 * n + i], "layer": mid, "coefficient": 3.0} for i in range(n)]),
        "cross-prompt": (base_cross_prompt, [{"source_prompt": ps[3 * n + i], "target_prompt": ps[i], "layer": mid}
                                             for i in range(n)]),
        "generate": (base_generate, [{"prompt": ps[i], "max_new_tokens": 8} for i in range(max(1, n // 8))]),
    }


# -- ndif-jobs --------------------------------------------------------------------------------------


def run_ndif_jobs(model_spec: str, experiment: str, params: list[dict], device: str, home: Path,
                  max_invokes: int) -> float:
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service, Submission
    from ndif_jobs.settings import Settings
    from ndif_jobs.worker import Worker

    settings = Settings(home=home, models_cache=REPO / ".cache" / "models", device=device, max_bundle=len(params) + 1,
                        max_invokes=max_invokes, log_level="warning", log_format="json")
    service = Service(settings)
    t = time.perf_counter()
    service.submit_many([Submission(experiment, p, model=model_spec, force=True) for p in params])
    Worker(service).run(until_empty=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    done = service.queue.counts()["completed"]
    dispose_engines()
    if done != len(params):
        raise SystemExit(f"ndif-jobs completed {done} of {len(params)} {experiment} jobs")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, random-1b, random-tiny, or a folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=64, help="experiments of each built-in")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-invokes", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated experiments (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from ndif_jobs.model_refs import load_local_model, local_folder, quiet_transformers, resolve_model

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    spec = args.model
    if spec.startswith("random-"):
        spec = str(make_random_model(spec.removeprefix("random-"), args.device, work / "model"))
    ref = resolve_model(spec)
    model = load_local_model(ref, REPO / ".cache" / "models", device=args.device)
    local_folder(ref, REPO / ".cache" / "models")
    n_layers = len(model.model.layers)
    chosen = [x for x in args.only.split(",") if x] or None
    rows = []
    with torch.no_grad():
        base_activations(model, {"prompt": "warm up", "top_k": 1})  # first-trace costs out of the timings
        for name, (baseline, params) in experiment_params(args.n, n_layers).items():
            if chosen and name not in chosen:
                continue
            base_times, ours = [], []
            for rep in range(args.repeats):
                t = time.perf_counter()
                for p in params:
                    baseline(model, p)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                base_times.append(time.perf_counter() - t)
                every_layer = {"layers": None} if name in ("activations", "logit-lens", "patching") else {}
                full = [dict(p, **every_layer) for p in params]
                ours.append(run_ndif_jobs(spec, name, full, args.device, work / f"home-{name}-{rep}", args.max_invokes))
            b, o = statistics.median(base_times), statistics.median(ours)
            rows.append({"experiment": name, "jobs": len(params), "plain_nnsight_s": round(b, 3),
                         "ndif_jobs_s": round(o, 3), "speedup": round(b / o, 2)})
    total_b = sum(r["plain_nnsight_s"] for r in rows)
    total_o = sum(r["ndif_jobs_s"] for r in rows)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    summary = {"model": args.model, "device": device_name, "rows": rows,
               "total": {"plain_nnsight_s": round(total_b, 3), "ndif_jobs_s": round(total_o, 3),
                         "speedup": round(total_b / total_o, 2)}}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"local backend: {args.n} experiments of each built-in on {args.model}, {device_name},"
          f" median of {args.repeats}")
    print(f"{'experiment':<14}{'jobs':>6}{'plain nnsight s':>17}{'ndif-jobs s':>13}{'speedup':>9}")
    for r in rows:
        print(f"{r['experiment']:<14}{r['jobs']:>6}{r['plain_nnsight_s']:>17.3f}{r['ndif_jobs_s']:>13.3f}{r['speedup']:>8.2f}x")
    print(f"{'total':<14}{'':>6}{total_b:>17.3f}{total_o:>13.3f}{total_b / total_o:>8.2f}x")


if __name__ == "__main__":
    main()
