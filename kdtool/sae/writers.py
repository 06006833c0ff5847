"""Writing SAE folders: kdtool's own layout (train-sae's output) and the foreign ones (SAELens, sparsify,
dictionary_learning), for exports and tests. The layouts and their reader: kdtool/sae/layouts.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdtool import formats
from kdtool.atomic import atomic_path
from kdtool.sae.layouts import CFG, DL_CONFIG, DL_WEIGHTS, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, layer_to_hook

KIND = "kdtool.sae"
FORMAT_VERSION = 1


def saelens_cfg(
    d_in: int,
    d_sae: int,
    *,
    layer: int | None,
    model_name: str | None = None,
    context_size: int | None = None,
    dataset_path: str | None = None,
) -> dict:
    """The SAELens part of cfg.json (standard ReLU architecture, b_dec subtracted from the input).

    The hook fields are written both in "metadata" (SAELens >= 6) and at the top level: a cfg
    without a sae_lens_version is read by SAELens's pre-6.0 path, which takes them from there
    (checked with sae-lens 6.54: it loads the folder as a StandardSAE with the same encode).
    """
    meta = {
        "model_name": model_name,
        "hook_name": layer_to_hook(layer) if layer is not None else None,
        "hook_layer": (layer - 1 if layer else 0) if layer is not None else None,
        "context_size": context_size,
        "dataset_path": dataset_path,
    }
    return {
        "architecture": "standard",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **meta,
        "metadata": meta,
    }


def save_kdtool(folder: str | Path, tensors: dict, *, cfg: dict, kdtool: dict, provenance: dict | None) -> Path:
    """kdtool's layout = SAELens's, plus a "kdtool" section in cfg.json and provenance.

    The weights are written first and cfg.json last, both atomically, so a folder with a cfg.json
    always has its weights.
    """
    folder = Path(folder)
    extra = {"layer": str(kdtool.get("layer"))}
    norm = kdtool.get("normalize") or {}
    if norm.get("method", "none") != "none":  # train-sae --normalize: the scale already folded into b_enc, b_dec
        extra |= {"normalize": str(norm["method"]), "activation_scale": repr(float(norm["scale"]))}
    formats.save_safetensors(
        folder / SAELENS_WEIGHTS,
        {k: tensors[k].float().contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
        kind=KIND,
        provenance=provenance,
        extra=extra,
    )
    formats.write_json(folder / CFG, {**cfg, "kdtool": {"format": FORMAT_VERSION, **kdtool}, "provenance": provenance})
    return folder


def save_saelens(folder: str | Path, tensors: dict, *, cfg: dict) -> Path:
    """Plain SAELens layout (no kdtool section)."""
    folder = Path(folder)
    formats.save_safetensors(
        folder / SAELENS_WEIGHTS,
        {k: tensors[k].float().contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
        kind=KIND,
    )
    formats.write_json(folder / CFG, cfg)
    return folder


def save_sparsify(folder: str | Path, tensors: dict) -> Path:
    """sparsify layout. A ReLU SAE is sparsify's TopK with k = d_sae (the top-k of all latents is all of them)."""
    folder = Path(folder)
    d_in, d_sae = tensors["W_enc"].shape
    formats.save_safetensors(
        folder / SPARSIFY_WEIGHTS,
        {
            "encoder.weight": tensors["W_enc"].t().contiguous(),
            "encoder.bias": tensors["b_enc"],
            "W_dec": tensors["W_dec"].contiguous(),
            "b_dec": tensors["b_dec"],
        },
        kind=KIND,
    )
    formats.write_json(
        folder / CFG,
        {
            "activation": "topk",
            "expansion_factor": max(1, d_sae // d_in),
            "normalize_decoder": True,
            "num_latents": int(d_sae),
            "k": int(d_sae),
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": int(d_in),
        },
    )
    return folder


def save_dictionary_learning(folder: str | Path, tensors: dict, *, layer: int | None = None) -> Path:
    """dictionary_learning AutoEncoder layout: ae.pt (a plain state dict) + config.json."""
    folder = Path(folder)
    d_in, d_sae = tensors["W_enc"].shape
    state = {
        "bias": tensors["b_dec"].contiguous(),
        "encoder.weight": tensors["W_enc"].t().contiguous(),
        "encoder.bias": tensors["b_enc"].contiguous(),
        "decoder.weight": tensors["W_dec"].t().contiguous(),
    }
    with atomic_path(folder / DL_WEIGHTS) as tmp:
        torch.save(state, str(tmp))
    trainer = {"dict_class": "AutoEncoder", "activation_dim": int(d_in), "dict_size": int(d_sae)}
    if layer is not None:
        trainer["layer"] = int(layer) - 1  # dictionary_learning counts the block whose output it reads
    formats.write_json(folder / DL_CONFIG, {"trainer": trainer})
    return folder


EXPORTERS = {"saelens": save_saelens, "sparsify": save_sparsify, "dictionary_learning": save_dictionary_learning}
