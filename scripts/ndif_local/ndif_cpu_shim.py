"""Two small subclasses that let the stock NDIF 0.1.2 server run on a machine with no GPU.

They are plugged in through NDIF's own settings, so nothing inside the installed `ndif`
package is edited:

    NDIF_MODEL_IMPORT_PATH=ndif_cpu_shim.CPUModelActor
    NDIF_CONTROLLER_IMPORT_PATH=ndif_cpu_shim.OfflineControllerActor

`scripts/ndif-local start` sets both and puts this folder on the services' PYTHONPATH
(Ray workers inherit it from the Ray head).

CPUModelActor
    NDIF's stock model actor (`ndif.services.ray.deployments.modeling.base.ModelActor`)
    assumes CUDA in exactly four methods: loading (`torch.cuda.set_device`, per-process
    memory caps, `device=<gpu index>`, a placement check that rejects any tensor not on a
    CUDA device), parking weights HOT->WARM and back, and the per-request cleanup
    (`torch.cuda.synchronize`). This subclass replaces those four and nothing else: queueing,
    deserialising the request, running it, timeouts, uploading results and publishing
    statuses are the stock code.

    On a machine with a GPU this class is not needed: leave NDIF_MODEL_IMPORT_PATH unset
    (`ndif-local start --gpu` does) and the stock actor serves as is.

OfflineControllerActor
    ndif 0.1.2's model evaluator calls `Remotable.describe_checkpoint(key, dtype,
    trust_remote_code=...)` and `Remotable.max_tp_size(key, trust_remote_code=...)`;
    nnsight 0.8.1 accepts neither keyword, and sizes a Hugging Face model from the Hub's
    parameter count, which needs the network. Without an answer the controller can still
    place a model given an explicit size, but `/status` then leaves out the model's key and
    state (`nnsight.ndif.status()` reports the service "Down") and a request for a model
    that is not deployed cannot deploy it. The subclass accepts the keyword and, when the
    Hub is out of reach, counts the parameters from the local safetensors headers. It is
    needed with or without a GPU as long as the server runs ndif 0.1.2 with nnsight 0.8.1.

CPUSandboxModelActor
    The same CPU changes on NDIF's sandboxed actor (user code runs in a separate runner
    process); only used by `ndif-local start --sandbox`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import struct

import ray
from ndif.services.ray.deployments.controller.controller import _ControllerActor
from ndif.services.ray.deployments.modeling.base import KILL_REASON_PREEMPTED, BaseModelDeployment
from ndif.services.ray.sandbox.model import SandboxModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

logger = logging.getLogger("ndif.modeling")


# --------------------------------------------------------------------------- model actor
class _CPUMethods:
    """The four CUDA-bound methods of BaseModelDeployment, for a model held in CPU memory."""

    def load_from_disk(self) -> HuggingFaceModel:
        # The controller still hands us a (logical) GPU allocation; it is simply not used.
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, device="cpu", **self.kwargs
        )
        model._module.requires_grad_(False)
        logger.info("Loaded %s on the CPU as %s", self.model_key, self.dtype_name)
        return model

    async def to_cache(self) -> None:
        # HOT -> WARM: the weights already live in CPU memory, so parking only stops the
        # request in flight (flagged PREEMPTED so the queue re-queues it) and sets the flag.
        await self.cancel(KILL_REASON_PREEMPTED)
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id) -> None:
        # WARM -> HOT: nothing to move.
        self.gpu_mem_bytes_by_id = gpu_mem_bytes_by_id
        self.cached = False

    def _reset_after_request(self) -> None:
        # The stock cleanup() minus torch.cuda.synchronize()/empty_cache().
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


class CPUModelDeployment(_CPUMethods, BaseModelDeployment):
    def cleanup(self) -> None:
        self._reset_after_request()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    """NDIF's model actor, loading and serving on the CPU."""


class CPUSandboxModelDeployment(_CPUMethods, SandboxModelDeployment):
    def cleanup(self) -> None:
        self.discard_sandbox()  # what the sandboxed actor adds to cleanup
        self._reset_after_request()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUSandboxModelActor(CPUSandboxModelDeployment):
    """NDIF's sandboxed model actor, loading and serving on the CPU."""


# --------------------------------------------------------------------------- controller
def _safetensors_parameter_count(folder: str) -> int:
    """Elements in every *.safetensors file of `folder`, read from the file headers only."""
    total = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def _describe_offline(model_key: str, dtype: str):
    """CheckpointInfo for a key whose repo is a local folder or sits in the local HF cache."""
    from huggingface_hub import snapshot_download
    from nnsight.modeling.mixins.remotable import CheckpointInfo, bytes_per_element
    from transformers import AutoConfig

    spec = json.loads(model_key.split(":", 1)[1])
    repo, revision = spec["repo_id"], spec.get("revision")
    folder = repo if os.path.isdir(repo) else snapshot_download(repo, revision=revision, local_files_only=True)
    n_params = _safetensors_parameter_count(folder)
    # Read through the repo id (not the folder) so the config, and /status, keep that name.
    config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=bool(spec.get("trust_remote_code")))
    return CheckpointInfo(
        size_bytes=math.ceil(n_params * bytes_per_element(dtype)),
        n_params=n_params,
        config=config,
        revision=revision,
    )


def _adapt_remotable() -> None:
    """Make nnsight 0.8.1's Remotable answer the calls ndif 0.1.2's evaluator makes."""
    from nnsight.modeling.mixins.remotable import Remotable

    if getattr(Remotable, "_ndif_local_adapted", False):
        return
    stock_describe = Remotable.describe_checkpoint.__func__
    stock_max_tp = Remotable.max_tp_size.__func__

    def describe_checkpoint(cls, model_key, dtype, trust_remote_code=False, **_ignored):
        try:
            return stock_describe(cls, model_key, dtype)
        except Exception as error:  # the Hub is unreachable (HF_HUB_OFFLINE=1) or knows nothing
            logger.info("describing %s from local files (%s)", model_key, type(error).__name__)
            return _describe_offline(model_key, dtype)

    def max_tp_size(cls, model_key, trust_remote_code=False, **_ignored):
        return stock_max_tp(cls, model_key)

    Remotable.describe_checkpoint = classmethod(describe_checkpoint)
    Remotable.max_tp_size = classmethod(max_tp_size)
    Remotable._ndif_local_adapted = True


class _OfflineController(_ControllerActor):
    def __init__(self, *args, **kwargs):
        _adapt_remotable()  # in the controller's own Ray worker process, before it evaluates
        super().__init__(*args, **kwargs)


# Same decorator as ndif's ControllerActor: pinned to the head node, no GPU.
@ray.remote(num_cpus=1, num_gpus=0, max_restarts=-1, resources={"head": 1})
class OfflineControllerActor(_OfflineController):
    """NDIF's controller, able to size a model from local files."""
