"""Activation normalisation for train-sae (`normalize="expected-norm"`, SAELens's expected_average_only_in).

Before training, one scalar per layer s = mean ||x|| / sqrt(d_in) over the first
ceil(NORM_TOKENS / batch_tokens) training batches (`estimate_scale`), and the SAE trains on x / s
(`normalised`). Saved SAE folders have s folded in (b_enc and b_dec multiplied by s; W_enc, W_dec
unchanged: `fold_scale`), so they read raw activations and their latents are s times the training
latents; the unfolded biases the run continues from are kept in the checkpoint's optimizer file
(kdtool/sae/checkpoint.py). The log's mse, l1_term and loss are in raw-activation units: s^2 times
the normalised objective, i.e. the paper's loss on raw x with lambda_raw = lambda * s. With "none",
s = 1 and nothing changes.
"""

from __future__ import annotations

import math

import torch

from kdtool.errors import RuntimeFailure

#: expected-norm: s is estimated on at least this many tokens, the first whole training batches
#: (all of them if the data is shorter). 32K tokens put the mean norm within a fraction of a
#: percent; the estimate's batches are then trained on as usual.
NORM_TOKENS = 32_768


def estimate_scale(batches, d_in: int) -> float:
    """s = mean over tokens of ||x||_2 / sqrt(d_in), from [n, d_in] batches (SAELens's expected-norm factor).

    Accumulated in float64 on the CPU, so every process and device gets the same number; rounded
    to float32 so the value stored in JSON is exactly the one the run divides by.
    """
    total, count = 0.0, 0
    for x in batches:
        x = x.detach().to("cpu", torch.float64)
        total += float(x.norm(dim=1).sum())
        count += x.shape[0]
    s = total / max(count, 1) / math.sqrt(d_in)
    if not (s > 0 and math.isfinite(s)):
        raise RuntimeFailure(f"--normalize expected-norm: the activations' mean norm is {s * math.sqrt(d_in)!r}")
    return float(torch.tensor(s, dtype=torch.float32))


def normalised(x, scale: float):
    """x / s (x itself when s = 1: no copy, and bit-identical to a run without normalisation)."""
    return x if scale == 1.0 else x / scale


def fold_scale(tensors: dict, scale: float) -> dict:
    """SAELens tensors of an SAE trained on x / s -> the same SAE on raw x.

    With x_n = x / s, z = ReLU((x_n - b_pre) W_enc + b_enc) and x_hat = s (z W_dec + b_pre):
    b_enc' = s b_enc and b_dec' = s b_pre give ReLU((x - b_dec') W_enc + b_enc') = s z and
    (s z) W_dec + b_dec' = x_hat, so W_enc and the unit-norm W_dec rows are unchanged and the
    folded latents are s z (importances E[z^2] in raw units).
    """
    if scale == 1.0:
        return dict(tensors)
    return {**tensors, "b_enc": tensors["b_enc"] * scale, "b_dec": tensors["b_dec"] * scale}
