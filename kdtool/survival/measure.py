"""Per-feature survival: the teacher SAE's code of a student's (mapped) activation vs of the teacher's own.

On the measurement tokens t, for each SAE feature i, with z_ti the teacher's latent (the SAE encoding
of the teacher's activation y_t) and zh_ti the latent of the mapped student activation x_t W + b:

    r2_i             = 1 - sum_t (zh_ti - z_ti)^2 / sum_t (z_ti - mean_t z_ti)^2
    fire_recall_i    = #{t: z_ti > e and zh_ti > e} / #{t: z_ti > e}
    fire_precision_i = #{t: z_ti > e and zh_ti > e} / #{t: zh_ti > e}

r2 is the share of the feature's variance over tokens that the student reproduces (1: all of it; 0: no
better than the feature's mean; negative: worse). It is undefined (NaN) for a feature that is constant
on these tokens (never fires), recall for one that never fires, precision for one the student never
fires. e is the firing threshold: `fire_threshold` (default 1e-3) times the teacher's RMS residual norm
sqrt(mean_t ||y_t||^2) at that layer. Not 0 (the paper's "fires iff z > 0"): a mapped activation carries
small errors in every direction, and a ReLU latent turns each into a tiny positive value, so with e = 0
precision would count noise at a millionth of a feature's size as firing. A latent of residual-stream
size 1e-3 ||y|| is about 1% of a typical firing value at L0 ~ 100 (z ~ ||y|| / sqrt(L0)). `fires` (the
`measured` rule) and importance keep the paper's z > 0. Latents are in residual-stream units like
`kdtool stats` (z_i x ||W_dec[i]||), which changes importance but none of the three ratios.

Accumulators are float64 sums over tokens ([F] vectors), so memory is flat in the number of tokens.
`TeacherFeatures` holds what depends on the teacher alone (shared by every model at a layer);
`FeatureMatch` what one model adds. The map's own fit, r2 of the activation vectors
(1 - sum ||y_hat - y||^2 / sum ||y - mean y||^2), is kept beside: a low value says the linear map,
not the student, may be what loses features.
"""

from __future__ import annotations

import numpy as np
import torch

#: A feature is alive iff its firing frequency on the measurement tokens is above this (kdtool stats' rule).
ALIVE_THRESHOLD = 1e-5


class TeacherFeatures:
    """The teacher's latents at one layer over the measurement tokens: fires, sums of z and z^2, and of y."""

    def __init__(self, d_sae: int, d_in: int, device="cpu"):
        self.n = 0
        self.fires = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [F] #{z > 0}
        self.fires_above = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [F] #{z > e}
        self.sum_z = torch.zeros(d_sae, dtype=torch.float64, device=device)  # [F]
        self.sum_z2 = torch.zeros(d_sae, dtype=torch.float64, device=device)  # [F]
        self.sum_y = torch.zeros(d_in, dtype=torch.float64, device=device)  # [d_T]
        self.sum_y2 = 0.0

    def update(self, z, y, e: float) -> None:
        """z [n, F]: the teacher's latents; y [n, d_T]: its activations; e: the firing threshold."""
        self.n += int(z.shape[0])
        self.fires += (z > 0).sum(dim=0)
        self.fires_above += (z > e).sum(dim=0)
        self.sum_z += z.sum(dim=0, dtype=torch.float64)
        self.sum_z2 += z.square().sum(dim=0, dtype=torch.float64)
        self.sum_y += y.sum(dim=0, dtype=torch.float64)
        self.sum_y2 += float(y.square().sum(dtype=torch.float64))

    def sst(self) -> np.ndarray:
        """[F] sum_t (z_ti - mean z_i)^2."""
        return (self.sum_z2 - self.sum_z.square() / max(self.n, 1)).clamp(min=0).cpu().numpy()

    def importance(self) -> dict:
        """The paper's measurements on these tokens (section 5.2): importance E[z^2], alive, L0, alpha."""
        n = max(self.n, 1)
        fires = self.fires.cpu().numpy()
        alive = fires / n > ALIVE_THRESHOLD
        l0 = float(fires.sum()) / n
        F = int(alive.sum())
        return {
            "importance": (self.sum_z2.cpu().numpy() / n).astype(np.float64),
            "alive": alive,
            "L0": l0,
            "F": F,
            "alpha": 1.0 - l0 / F if F > 0 else None,
        }


class FeatureMatch:
    """One model's latents against the teacher's at one layer: squared error, firing agreement, map error."""

    def __init__(self, d_sae: int, device="cpu"):
        self.sse = torch.zeros(d_sae, dtype=torch.float64, device=device)  # [F] sum_t (zh - z)^2
        self.fires_hat = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [F] #{zh > e}
        self.both = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [F] #{z > e and zh > e}
        self.act_sse = 0.0  # sum_t ||y_hat - y||^2

    def update(self, z, zh, y, y_hat, e: float) -> None:
        """z, zh [n, F]: teacher's and model's latents; y, y_hat [n, d_T]: what they encode; e: firing threshold."""
        fired_hat = zh > e
        self.sse += (zh - z).square().sum(dim=0, dtype=torch.float64)
        self.fires_hat += fired_hat.sum(dim=0)
        self.both += (fired_hat & (z > e)).sum(dim=0)
        self.act_sse += float((y_hat - y).square().sum(dtype=torch.float64))

    def result(self, teacher: TeacherFeatures) -> dict:
        """Per-feature r2, fire_recall, fire_precision ([F] float64, NaN where undefined) and the map's r2."""
        sst = teacher.sst()
        sse = self.sse.cpu().numpy()
        fires = teacher.fires_above.cpu().numpy().astype(np.float64)
        fires_hat = self.fires_hat.cpu().numpy().astype(np.float64)
        both = self.both.cpu().numpy().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(sst > 0, 1.0 - sse / sst, np.nan)
            recall = np.where(fires > 0, both / fires, np.nan)
            precision = np.where(fires_hat > 0, both / fires_hat, np.nan)
        n = max(teacher.n, 1)
        act_sst = teacher.sum_y2 - float(teacher.sum_y.square().sum()) / n
        return {
            "r2": r2,
            "fire_recall": recall,
            "fire_precision": precision,
            "map_r2": 1.0 - self.act_sse / act_sst if act_sst > 0 else None,
        }
