"""SAE folders in the layouts people already have, read into one LoadedSAE (layout auto-detected).

    layout               files                                   tensors
    kdtool               cfg.json (with a "kdtool" section)      SAELens names (below)
                         + sae_weights.safetensors
    saelens              cfg.json + sae_weights.safetensors      W_enc [d_in, d_sae], W_dec [d_sae, d_in],
                                                                 b_enc, b_dec (+ threshold: jumprelu)
    sparsify             cfg.json + sae.safetensors              encoder.weight [N, d_in], encoder.bias [N],
                         (one folder per hookpoint)              W_dec [N, d_in], b_dec [d_in]
    dictionary_learning  ae.pt (+ config.json)                   bias, encoder.weight [F, d], encoder.bias,
                                                                 decoder.weight [d, F]  (TopK: b_dec, k)

Every layout is turned into one `LoadedSAE`: z = act((x - b_dec) @ W_enc + b_enc) and
x_hat = z @ W_dec + b_dec (b_dec not subtracted when a SAELens cfg says
apply_b_dec_to_input = false). act is ReLU, TopK of ReLU (sparsify, SAELens topk,
dictionary_learning AutoEncoderTopK), groupmax (sparsify) or JumpReLU (SAELens).

A .pt file is a pickle: it is only ever read with torch.load(weights_only=True), which refuses
anything but tensors and plain containers.

Layers follow kdtool's convention: layer L is hidden_states[L], the output of block L (1-based;
0 is the embeddings). Foreign hook names are mapped to it: TransformerLens
blocks.{i}.hook_resid_post -> i+1, blocks.{i}.hook_resid_pre -> i; a sparsify hookpoint
"...layers.{i}" (a block's output) -> i+1; a dictionary_learning config's trainer.layer i (the
block's output) -> i+1. When the mapping is unknown, `stats --layer` gives it.

The writers of these layouts (kdtool's own is train-sae's output): kdtool/sae/writers.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdtool import formats
from kdtool.errors import BadInput, UnknownFormat

Layout = Literal["kdtool", "saelens", "sparsify", "dictionary_learning"]
Activation = Literal["relu", "topk", "groupmax", "jumprelu"]

CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
DL_WEIGHTS = "ae.pt"
DL_CONFIG = "config.json"


@dataclass
class LoadedSAE:
    """An SAE from any supported layout, as float32 tensors in one orientation."""

    path: Path
    layout: Layout
    W_enc: Any  # [d_in, d_sae]
    b_enc: Any  # [d_sae]
    W_dec: Any  # [d_sae, d_in]
    b_dec: Any  # [d_in]
    activation: Activation = "relu"
    apply_b_dec_to_input: bool = True
    k: int | None = None  # topk / groupmax
    threshold: Any = None  # [d_sae] jumprelu
    layer: int | None = None
    layer_source: str = "unknown"
    cfg: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device) -> LoadedSAE:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def encode(self, x):
        """x [n, d_in] -> z [n, d_sae] (dense)."""
        xin = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = torch.addmm(self.b_enc, xin, self.W_enc)  # [n, F]
        if self.activation == "relu":
            return pre.relu_()
        if self.activation == "jumprelu":
            return pre.mul_(pre > self.threshold).relu_()
        pre.relu_()
        if self.activation == "topk":
            vals, idx = pre.topk(self.k, dim=1, sorted=False)
            return torch.zeros_like(pre).scatter_(1, idx, vals)
        # groupmax: the max of each of k equal groups of latents
        n, F = pre.shape
        vals, idx = pre.view(n, self.k, F // self.k).max(dim=2)
        idx = idx + torch.arange(0, F, F // self.k, device=pre.device)
        return torch.zeros_like(pre).scatter_(1, idx, vals)

    def decode(self, z):
        """z [n, d_sae] -> x_hat [n, d_in]."""
        return torch.addmm(self.b_dec, z, self.W_dec)

    def describe(self) -> str:
        act = self.activation + (f"(k={self.k})" if self.k else "")
        return f"{self.path} [{self.layout}, {act}, d_in={self.d_in}, d_sae={self.d_sae}, layer={self.layer}]"


# ---- detection ------------------------------------------------------------------------------


def detect_layout(path: str | Path) -> Layout | None:
    """Which layout a folder (or an ae.pt file) holds; None if it is none of them."""
    p = Path(path)
    if p.is_file():
        return "dictionary_learning" if p.suffix == ".pt" else None
    if (p / CFG).is_file() and (p / SAELENS_WEIGHTS).is_file():
        try:
            cfg = json.loads((p / CFG).read_text())
        except (OSError, json.JSONDecodeError):
            return "saelens"
        return "kdtool" if isinstance(cfg, dict) and "kdtool" in cfg else "saelens"
    if (p / CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (p / DL_WEIGHTS).is_file():
        return "dictionary_learning"
    return None


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def find_saes(path: str | Path) -> list[Path]:
    """An SAE folder as itself; a folder of SAE folders (kdtool's saes/, a sparsify run) as its members."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"--sae {p}: no such file or folder")
    if detect_layout(p) is not None:
        return [p]
    if p.is_dir():
        subs = sorted((s for s in p.iterdir() if s.is_dir() and detect_layout(s) is not None), key=_natural_key)
        if subs:
            return subs
    raise UnknownFormat(
        f"--sae {p}: not an SAE folder (expected cfg.json + sae_weights.safetensors [kdtool/SAELens], "
        f"cfg.json + sae.safetensors [sparsify], or ae.pt [dictionary_learning])"
    )


# ---- loading --------------------------------------------------------------------------------


def _read_cfg(path: Path) -> dict:
    cfg = formats.read_json(path)
    return cfg


def _load_safetensors(path: Path) -> dict:
    return {k: v.float() for k, v in formats.load_safetensors(path).items()}


def _need(tensors: dict, names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UnknownFormat(f"{where}: missing tensor(s) {', '.join(missing)} (has: {', '.join(sorted(tensors))})")


def _check_shapes(sae: LoadedSAE) -> LoadedSAE:
    d, F = sae.W_enc.shape
    shapes = {"W_dec": (F, d), "b_enc": (F,), "b_dec": (d,)}
    for name, want in shapes.items():
        got = tuple(getattr(sae, name).shape)
        if got != want:
            raise BadInput(f"{sae.path}: {name} has shape {list(got)}, expected {list(want)} for W_enc {[d, F]}")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        t = getattr(sae, name)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise BadInput(f"{sae.path}: {name} holds NaN or infinite values (a diverged or damaged SAE)")
    if sae.threshold is not None and tuple(sae.threshold.shape) not in ((F,), ()):
        raise BadInput(f"{sae.path}: threshold has shape {list(sae.threshold.shape)}, expected [{F}]")
    if sae.activation in ("topk", "groupmax"):
        if not sae.k or sae.k < 1 or sae.k > F:
            raise BadInput(f"{sae.path}: {sae.activation} needs 1 <= k <= d_sae, got k={sae.k}")
        if sae.activation == "groupmax" and F % sae.k:
            raise BadInput(f"{sae.path}: groupmax needs d_sae divisible by k ({F} % {sae.k} != 0)")
    return sae


def hook_to_layer(hook: str | None) -> int | None:
    """TransformerLens / HF module names -> kdtool's hidden_states index (None if unknown)."""
    if not hook:
        return None
    m = re.search(r"blocks\.(\d+)\.hook_resid_post$", hook)
    if m:
        return int(m.group(1)) + 1
    m = re.search(r"blocks\.(\d+)\.hook_resid_pre$", hook)
    if m:
        return int(m.group(1))
    m = re.search(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)$", hook)
    if m:
        return int(m.group(1)) + 1
    m = re.fullmatch(r"resid_post_layer_(\d+)", hook)
    if m:
        return int(m.group(1)) + 1
    return None


def layer_to_hook(layer: int) -> str:
    """kdtool layer L (hidden_states[L]) as a TransformerLens hook name."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def _load_saelens(p: Path, layout: Layout) -> LoadedSAE:
    cfg = _read_cfg(p / CFG)
    t = _load_safetensors(p / SAELENS_WEIGHTS)
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec"), p / SAELENS_WEIGHTS)
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise UnknownFormat(
            f"{p / CFG}: normalize_activations={norm!r} is not supported (fold the scaling factor "
            "into the weights first, e.g. SAELens fold_activation_norm_scaling_factor)"
        )
    if cfg.get("finetuning_scaling_factor") or "scaling_factor" in t:
        if "scaling_factor" in t and not bool((t["scaling_factor"] == 1).all()):
            raise UnknownFormat(f"{p}: a finetuning scaling_factor is not supported")
    activation: Activation = "relu"
    k = None
    threshold = None
    fn = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch == "standard" and fn == "relu":
        activation = "relu"
    elif arch == "topk" or (arch == "standard" and fn == "topk"):
        activation = "topk"
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise UnknownFormat(f"{p / CFG}: rescale_acts_by_decoder_norm=true is not supported")
    elif arch == "jumprelu":
        activation = "jumprelu"
        if "threshold" in t:
            threshold = t["threshold"]
        elif "log_threshold" in t:
            threshold = t["log_threshold"].exp()
        else:
            raise UnknownFormat(f"{p / SAELENS_WEIGHTS}: jumprelu SAE without a threshold tensor")
    else:
        raise UnknownFormat(
            f"{p / CFG}: SAELens architecture {arch!r} (activation {fn!r}) is not supported "
            "(supported: standard relu, topk, jumprelu)"
        )
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    kd = cfg.get("kdtool") if layout == "kdtool" else None
    if kd and kd.get("layer") is not None:
        layer, source = int(kd["layer"]), "cfg.json kdtool.layer"
    else:
        hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        layer, source = hook_to_layer(hook), f"hook {hook}"
    sae = LoadedSAE(
        path=p,
        layout=layout,
        W_enc=t["W_enc"],
        b_enc=t["b_enc"],
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        activation=activation,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        k=int(k) if k else None,
        threshold=threshold,
        layer=layer,
        layer_source=source,
        cfg=cfg,
    )
    return _check_shapes(sae)


def _load_sparsify(p: Path) -> LoadedSAE:
    cfg = _read_cfg(p / CFG)
    t = _load_safetensors(p / SPARSIFY_WEIGHTS)
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), p / SPARSIFY_WEIGHTS)
    if cfg.get("transcode"):
        raise UnknownFormat(f"{p / CFG}: a sparsify transcoder is not an autoencoder of one layer's activations")
    if "W_skip" in t or cfg.get("skip_connection"):
        raise UnknownFormat(f"{p}: sparsify skip connections are not supported")
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise UnknownFormat(f"{p / CFG}: sparsify activation {activation!r} is not supported (topk, groupmax)")
    k = cfg.get("k")
    if k is None:
        raise UnknownFormat(f"{p / CFG}: sparsify cfg without k")
    sae = LoadedSAE(
        path=p,
        layout="sparsify",
        W_enc=t["encoder.weight"].t().contiguous(),
        b_enc=t["encoder.bias"],
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        activation=activation,
        k=int(k),
        layer=hook_to_layer(p.name),
        layer_source=f"hookpoint folder {p.name!r}",
        cfg=cfg,
    )
    return _check_shapes(sae)


def _torch_load_weights_only(path: Path) -> dict:
    obj = formats.load_torch(path)  # weights_only=True: tensors, never code
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnknownFormat(f"{path}: expected a state dict of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def _load_dictionary_learning(p: Path) -> LoadedSAE:
    folder, weights = (p.parent, p) if p.is_file() else (p, p / DL_WEIGHTS)
    t = _torch_load_weights_only(weights)
    config = _read_cfg(folder / DL_CONFIG) if (folder / DL_CONFIG).is_file() else {}
    trainer = config.get("trainer", {}) if isinstance(config.get("trainer"), dict) else {}
    if {"encoder.weight", "encoder.bias", "decoder.weight", "bias"} <= set(t):
        kw = {"b_dec": t["bias"], "activation": "relu", "k": None}
    elif {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"} <= set(t):
        kw = {"b_dec": t["b_dec"], "activation": "topk", "k": int(t["k"])}
    else:
        raise UnknownFormat(
            f"{weights}: dictionary_learning state dict with keys {sorted(t)} is not supported "
            "(AutoEncoder: bias, encoder.*, decoder.weight; AutoEncoderTopK: b_dec, k, ...)"
        )
    layer, source = None, "unknown"
    if trainer.get("layer") is not None:
        layer, source = int(trainer["layer"]) + 1, f"config.json trainer.layer={trainer['layer']} (block output)"
    if trainer.get("submodule_name"):
        mapped = hook_to_layer(trainer["submodule_name"])
        if mapped is not None:
            layer, source = mapped, f"config.json submodule {trainer['submodule_name']}"
    sae = LoadedSAE(
        path=p,
        layout="dictionary_learning",
        W_enc=t["encoder.weight"].t().contiguous(),
        b_enc=t["encoder.bias"],
        W_dec=t["decoder.weight"].t().contiguous(),
        layer=layer,
        layer_source=source,
        cfg=config,
        **kw,
    )
    return _check_shapes(sae)


def load_sae(path: str | Path) -> LoadedSAE:
    """Load one SAE folder (or ae.pt), detecting its layout."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"--sae {p}: no such file or folder")
    layout = detect_layout(p)
    if layout in ("kdtool", "saelens"):
        return _load_saelens(p, layout)
    if layout == "sparsify":
        return _load_sparsify(p)
    if layout == "dictionary_learning":
        return _load_dictionary_learning(p)
    find_saes(p)  # raises the explanatory UnknownFormat
    raise UnknownFormat(f"--sae {p}: a folder of SAEs; give one of them")
