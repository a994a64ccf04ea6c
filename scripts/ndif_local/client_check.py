"""Drive a running local NDIF with the stock nnsight client (a smoke test of the whole stack).

    eval "$(scripts/ndif-local env)"
    .venv/bin/python scripts/ndif_local/client_check.py [--quick]

Checks, printing one line each and exiting non-zero on the first wrong answer:
  1. a blocking trace: top next token after "The capital of France is" is " Paris";
  2. an intervention changes the logits;
  3. a non-blocking session of two traces (`blocking=False`, then polling the backend);
  4. an exception raised inside the trace comes back as RemoteError with its message;
  5. nnsight.ndif.status() lists the model as RUNNING.
--quick runs only 1. Needs NDIF_HOST, HF_HOME=<root>/hf_home and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import sys
import time

REPO_ID = "local/smollm2"


def main() -> int:
    import nnsight
    import nnsight.modeling.huggingface as hf
    import torch
    from nnsight.intervention.backends.remote import RemoteError
    from transformers import AutoTokenizer

    quick = "--quick" in sys.argv
    # The client canonicalises a repo id through the Hub; offline, tell it the answer.
    hf._ID_CACHE[REPO_ID] = REPO_ID
    tok = AutoTokenizer.from_pretrained(REPO_ID)
    model = nnsight.LanguageModel(REPO_ID, tokenizer=tok)
    print(f"host {nnsight.CONFIG.API.HOST}  key {model.to_model_key()}")

    started = time.time()
    with model.trace("The capital of France is", remote=True):
        logits = model.output.logits.save()
    top = tok.decode(logits[0, -1].argmax())
    print(f"1. blocking trace: top token {top!r} in {time.time() - started:.2f}s")
    if top != " Paris":
        return 1
    if quick:
        return 0

    with model.trace("The capital of France is", remote=True):
        model.model.layers[5].mlp.output[:] = 0
        changed = model.output.logits.save()
    print(f"2. intervention changes logits: {not torch.allclose(changed, logits)}")
    if torch.allclose(changed, logits):
        return 1

    started = time.time()
    with model.session(remote=True, blocking=False) as session:
        with model.trace("The Eiffel Tower is in"):
            a = model.output.logits[0, -1].argmax().save()  # noqa: F841 - the result is keyed by the name
        with model.trace("The capital of Japan is"):
            b = model.output.logits[0, -1].argmax().save()  # noqa: F841 - the result is keyed by the name
    backend = session.backend
    result, polls = None, 0
    while result is None and time.time() - started < 120:
        time.sleep(0.2)
        polls += 1
        result = backend()
    if not result:
        print(f"3. non-blocking session: no result after {polls} polls ({backend.status})")
        return 1
    print(f"3. non-blocking session {backend.job_id}: {tok.decode(result['a'])!r} {tok.decode(result['b'])!r} "
          f"after {polls} polls, {time.time() - started:.2f}s")

    try:
        with model.trace("boom", remote=True):
            _ = model.model.layers[0].output
            raise ValueError("raised inside the trace")
        print("4. exception inside trace: nothing raised")
        return 1
    except RemoteError as err:
        ok = "raised inside the trace" in str(err)
        print(f"4. exception inside trace -> RemoteError, message kept: {ok}")
        if not ok:
            print(str(err))
            return 1

    status = nnsight.ndif.status(raw=True)
    states = [d.get("application_state") for d in status.get("deployments", {}).values()
              if d.get("repo_id") == REPO_ID]
    print(f"5. nnsight.ndif.status(): {states}")
    return 0 if "RUNNING" in states else 1


if __name__ == "__main__":
    if not os.environ.get("NDIF_HOST"):
        print("set NDIF_HOST (eval \"$(scripts/ndif-local env)\")", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
