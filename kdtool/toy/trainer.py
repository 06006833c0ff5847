"""Training toy models many at a time: the batched hand-written trainer, and the plain one it is checked against.

Speed: every model of a chunk of configurations is one computation with a leading model axis.
Models that share a data stream (a teacher and its students: same n, d_T, alpha, seed) share x,
so the encoder is one bmm per stream: [S, B, n] @ [S, n, K*d]. Students are trained in groups of
consecutive widths (`width_groups`), each zero-padded to its widest; padded rows of W get exactly
zero gradient, so they stay zero and the padded model is the narrow model. Gradients are written
by hand (no autograd graph) and the importance weights are folded into the small [d, n] gradient
tensors instead of the big [S, K, B, n] residual.

`train_reference` trains ONE model plainly (autograd + torch.optim) on the same draws
(kdtool.toy.model's keyed generators): tests/test_toy.py checks the batched trainer against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kdtool.errors import BadInput, RuntimeFailure
from kdtool.toy.config import TrainConfig
from kdtool.toy.model import data_stream, forward, sparsify_, weighted_sq

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
EVAL_CHUNK = 1024  # eval samples per forward, to bound memory at [S, K, EVAL_CHUNK, n]


# Cost model of one training step for a group of models padded to width d (measured on this machine's
# CPU with one thread, S = 20 streams, B = 256, n = 10..40): each model costs ~ S*B*n*(4 + d) * 0.3 ns
# (the [B, n] decoder passes plus d-proportional matmul work), each group a fixed ~120 us of op overhead.
_COST_PER_ELEMENT_NS = 0.3
_COST_WIDTH_OFFSET = 4
_COST_PER_GROUP_NS = 120_000


def width_groups(widths, n: int, streams: int, batch: int) -> list[list[int]]:
    """Split student widths into groups of consecutive widths, each trained padded to its widest.

    Padding every student to d_T wastes ~45% of the matmul work at d_T = 10; one group per width
    multiplies the per-op overhead. Exact dynamic programme over the sorted widths on the cost model above.
    """
    ws = sorted(set(int(w) for w in widths))
    unit = streams * batch * n * _COST_PER_ELEMENT_NS

    def cost(i: int, j: int) -> float:  # widths ws[i..j] padded to ws[j]
        return (j - i + 1) * (_COST_WIDTH_OFFSET + ws[j]) * unit + _COST_PER_GROUP_NS

    best = [0.0] + [math.inf] * len(ws)
    cut = [0] * (len(ws) + 1)
    for j in range(1, len(ws) + 1):
        for i in range(j):
            c = best[i] + cost(i, j - 1)
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(ws)
    while j > 0:
        groups.append(ws[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass
class TrainResult:
    """Trained weights and held-out floors of a batch of models [S, K]."""

    W: object  # [S, K, d, n] (None after concat: groups differ in d)
    b: object  # [S, K, n]
    floor_target: object  # [S, K] held-out loss against the training target, mean over eval points
    floor_data: object  # [S, K] held-out loss against the data: sum_i I_i feature_mse_i
    feature_mse: object  # [S, K, n] float64 held-out mean squared error of each feature against the data
    floor_distill: object | None  # [S, K] held-out loss against the teacher's x_hat (when a teacher is given)
    final_train_loss: object  # [S, K] training objective on the last batch
    curves: dict = field(default_factory=dict)  # step -> (objective [S,K], data loss [S,K]) on the training batch

    @staticmethod
    def concat(results: list[TrainResult]) -> TrainResult:
        """Results of groups of the same streams side by side along the model axis K (weights dropped)."""

        def cat(name):
            parts = [getattr(r, name) for r in results]
            return None if parts[0] is None else torch.cat(parts, dim=1)

        curves = {
            step: tuple(torch.cat([r.curves[step][i] for r in results], dim=1) for i in range(2))
            for step in results[0].curves
        }
        return TrainResult(
            W=None,
            b=None,
            floor_target=cat("floor_target"),
            floor_data=cat("floor_data"),
            feature_mse=cat("feature_mse"),
            floor_distill=cat("floor_distill"),
            final_train_loss=cat("final_train_loss"),
            curves=curves,
        )


class _Adam:
    """torch.optim.Adam's update (foreach=False path), elementwise so a batch of models == each alone."""

    def __init__(self, params):
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads, lr: float):
        self.t += 1
        b1, b2 = ADAM_BETAS
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(ADAM_EPS)
            p.addcdiv_(m, denom, value=-lr / bc1)


class _SGD:
    """torch.optim.SGD with momentum 0.9 (dampening 0, no nesterov)."""

    def __init__(self, params):
        self.params = params
        self.buf = [None for _ in params]

    def step(self, grads, lr: float):
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if self.buf[i] is None:
                self.buf[i] = g.clone()
            else:
                self.buf[i].mul_(SGD_MOMENTUM).add_(g)
            p.add_(self.buf[i], alpha=-lr)


def _batched_forward(W, b, x):
    """W [S, K, d, n], b [S, K, n], x [S, B, n] -> (h^T [S*K, d, B], z [S, K, B, n]) pre-activation.

    The encoder output is kept transposed ([S, K*d, B] = [S*K, d, B], contiguous) so that no
    step of the forward or backward pass needs a copy: bmm takes transposed views directly.
    """
    S, K, d, n = W.shape
    B = x.shape[1]
    hT = torch.bmm(W.reshape(S, K * d, n), x.transpose(1, 2)).view(S * K, d, B)  # [S*K, d, B]
    z = torch.baddbmm(b.reshape(S * K, 1, n), hT.transpose(1, 2), W.reshape(S * K, d, n))  # [S*K, B, n]
    return hT, z.view(S, K, B, n)


def _weighted_sq_sum(diff, imp):
    """sum over samples and features of I_i diff^2 for diff [S, K, B, n] (overwritten) -> [S, K] float64."""
    S, K, B, n = diff.shape
    return (diff.square_().view(-1, n) @ imp).view(S, K, B).sum(-1, dtype=torch.float64)


def _eval_chunk(S: int, K: int, n: int) -> int:
    """Held-out samples per forward: keep [S, K, chunk, n] near 2 MB so every pass stays in cache."""
    return max(16, min(EVAL_CHUNK, (512 * 1024) // max(1, S * K * n)))


def _eval_losses(W, b, imp, eval_x, eval_t):
    """Held-out errors: per-feature mean squared error against the data [S, K, n] (float64, unweighted) and
    the loss against the teacher [S, K] (if eval_t), in chunks.

    The data loss is sum_i I_i * per-feature error (`_data_loss`): kept per feature so that each feature's
    share of the floor and whether the model keeps it (kdtool.toy.survival) come from the same evaluations.
    """
    S, K, _, n = W.shape
    E = eval_x.shape[1]
    feat = torch.zeros(S, K, n, dtype=torch.float64)
    dist = torch.zeros(S, K, dtype=torch.float64) if eval_t is not None else None
    step = _eval_chunk(S, K, n)
    for lo in range(0, E, step):
        xc = eval_x[:, lo : lo + step]
        _, z = _batched_forward(W, b, xc)
        y = z.clamp_min_(0)  # [S, K, Bc, n]
        diff = torch.empty_like(y)
        if eval_t is not None:
            dist += _weighted_sq_sum(torch.sub(y, eval_t[:, lo : lo + step].unsqueeze(1), out=diff), imp)
        feat += torch.sub(y, xc.unsqueeze(1), out=diff).square_().sum(2)  # float32 over <= 1024 samples, then float64
    return feat / E, (dist / E if dist is not None else None)


def _data_loss(feature_mse, imp):
    """sum_i I_i * feature_mse_i: [S, K, n] float64 -> [S, K] float64."""
    return feature_mse @ imp.to(torch.float64)


class _Group:
    """Models of one padded width d trained on the shared streams: weights, optimiser, buffers, running floors.

    Buffers are reused every step: on CPU, fresh multi-MB tensors cost page faults (measured: ~25% of a step).
    """

    def __init__(self, W0, b0, cfg: TrainConfig, with_distill: bool):
        S, K, d, n = W0.shape
        B = cfg.batch_size
        self.W, self.b = W0.clone(), b0.clone()
        self.opt = _Adam([self.W, self.b]) if cfg.optimizer == "adam" else _SGD([self.W, self.b])
        self.hT = torch.empty(S, K * d, B)  # encoder output, transposed: [S*K, d, B]
        self.z = torch.empty(S * K, B, n)  # decoder pre-activation
        self.r = torch.empty(S * K, B, n)  # residual on the ReLU's active set
        self.g_dec = torch.empty(S * K, d, n)
        self.g_enc = torch.empty(S, K * d, n)
        self.dhT = torch.empty(S * K, d, B)
        self.Wc = torch.empty(S * K, d, n)
        self.gb = torch.empty(S * K, n)
        self.acc_target = torch.zeros(S, K, dtype=torch.float64)
        self.acc_feature = torch.zeros(S, K, n, dtype=torch.float64)  # per-feature error vs the data, summed over evals
        self.acc_dist = torch.zeros(S, K, dtype=torch.float64) if with_distill else None
        self.curves: dict[int, tuple] = {}
        self.final_train = None

    def grads(self, x, t, c):
        """Hand-written gradients of the toy loss for every model at once: (dL/dW [S, K, d, n], dL/db [S, K, n]).

        x [S, B, n] data, t [S, B, n] target, c [n] = 2 I_i / B. No autograd graph; the importance
        weights multiply the small [d, n] results, not the [S, K, B, n] residual.
        """
        W, b = self.W, self.b
        S, K, d, n = W.shape
        B = x.shape[1]
        torch.bmm(W.view(S, K * d, n), x.transpose(1, 2), out=self.hT)  # [S, K*d, B]
        hT = self.hT.view(S * K, d, B)
        torch.baddbmm(b.view(S * K, 1, n), hT.transpose(1, 2), W.view(S * K, d, n), out=self.z)  # [S*K, B, n]
        z, r = self.z.view(S, K, B * n), self.r.view(S, K, B * n)
        # r = (dL/dy) / c on the ReLU's active set, 0 elsewhere; threshold_backward is ReLU's backward in one pass
        torch.sub(z, t.reshape(S, 1, B * n), out=r)
        torch.ops.aten.threshold_backward.grad_input(r, z, 0.0, grad_input=r)
        r = self.r  # [S*K, B, n]
        torch.bmm(hT, r, out=self.g_dec).mul_(c)  # [S*K, d, n]: decoder side, h^T dz
        torch.mul(W.view(S * K, d, n), c, out=self.Wc)
        torch.bmm(self.Wc, r.transpose(1, 2), out=self.dhT)  # [S*K, d, B] = (dz W^T)^T
        torch.bmm(self.dhT.view(S, K * d, B), x, out=self.g_enc)  # encoder side, dh^T x
        gW = self.g_dec.add_(self.g_enc.view(S * K, d, n)).view(S, K, d, n)
        torch.sum(r, 1, out=self.gb).mul_(c)
        return gW, self.gb.view(S, K, n)

    def record(self, step: int, x, t, imp, train_on_teacher: bool, keep_curve: bool):
        """Training objective (and data loss) on this step's batch, before the update."""
        _, z = _batched_forward(self.W, self.b, x)
        y = z.clamp_min_(0)  # [S, K, B, n]
        objective = ((y - t.unsqueeze(1)).square_() * imp).sum(-1).mean(-1)
        data_loss = ((y - x.unsqueeze(1)).square_() * imp).sum(-1).mean(-1) if train_on_teacher else objective
        if keep_curve:
            self.curves[step] = (objective, data_loss)
        self.final_train = objective

    def evaluate(self, imp, eval_x, eval_t, train_on_teacher: bool):
        feat, dist_l = _eval_losses(self.W, self.b, imp, eval_x, eval_t)
        self.acc_feature += feat
        if self.acc_dist is not None:
            self.acc_dist += dist_l
        self.acc_target += dist_l if train_on_teacher else _data_loss(feat, imp)

    def result(self, evals: int, lr: float, imp) -> TrainResult:
        if not torch.isfinite(self.W).all():
            raise RuntimeFailure(f"toy training diverged (non-finite weights); lower --lr (now {lr:g})")
        feature_mse = self.acc_feature / evals
        return TrainResult(
            W=self.W,
            b=self.b,
            floor_target=self.acc_target / evals,
            floor_data=_data_loss(feature_mse, imp),
            feature_mse=feature_mse,
            floor_distill=self.acc_dist / evals if self.acc_dist is not None else None,
            final_train_loss=self.final_train,
            curves=self.curves,
        )


def train_groups(
    groups,
    *,
    alphas,
    data_seeds,
    imp,
    cfg: TrainConfig,
    eval_x,
    teacher=None,
    eval_t=None,
    train_on_teacher: bool = False,
) -> list[TrainResult]:
    """Train groups of toy models that share S data streams; each group is one batched computation.

    groups: [(W0 [S, K, d, n], b0 [S, K, n]), ...] (zero rows = narrower models; d may differ per
    group); alphas and data_seeds: one per stream; imp [n]; eval_x [S, E, n] held-out data;
    teacher = (Wt [S, dT, n], bt [S, n]) frozen, eval_t [S, E, n] its held-out output. With
    train_on_teacher the target is the teacher's x_hat on each fresh batch, otherwise the batch itself.
    Every group sees the same batches, so the data and the teacher's output are made once per step.
    """
    S, n, B = len(data_seeds), imp.shape[0], cfg.batch_size
    if train_on_teacher and teacher is None:
        raise BadInput("distillation needs a teacher")
    rngs = [data_stream(s) for s in data_seeds]
    inv_keep = torch.tensor([1.0 / (1.0 - a) for a in alphas], dtype=torch.float32).view(S, 1, 1)
    c = imp * (2.0 / B)  # dL/dy = 2 I_i (y - t) / B, applied on the small [d, n] side
    state = [_Group(W0, b0, cfg, eval_t is not None) for W0, b0 in groups]
    evals, curve_at = set(cfg.eval_steps()), set(cfg.curve_steps())
    x = torch.empty(S, B, n)
    x_np = x.numpy()
    if train_on_teacher:
        Wt, bt = teacher
        th, t = torch.empty(S, B, Wt.shape[1]), torch.empty(S, B, n)
    last = cfg.steps - 1
    for step in range(cfg.steps):
        for s, rng in enumerate(rngs):
            rng.random(dtype=np.float32, out=x_np[s])
        sparsify_(x, inv_keep)  # [S, B, n]
        if train_on_teacher:  # frozen teachers' x_hat on this batch
            torch.bmm(x, Wt.transpose(1, 2), out=th)
            torch.baddbmm(bt.unsqueeze(1), th, Wt, out=t).clamp_min_(0)
        else:
            t = x
        lr = cfg.lr_at(step)
        for g in state:
            if step in curve_at or step == last:
                g.record(step, x, t, imp, train_on_teacher, step in curve_at)
            g.opt.step(g.grads(x, t, c), lr)
            if step in evals:
                g.evaluate(imp, eval_x, eval_t, train_on_teacher)
    return [g.result(len(evals), cfg.lr, imp) for g in state]


def train_batch(W0, b0, **kwargs) -> TrainResult:
    """Train S*K toy models at once (S data streams, K models per stream): one group of `train_groups`."""
    return train_groups([(W0, b0)], **kwargs)[0]


def train_reference(
    W0,
    b0,
    *,
    alpha: float,
    data_seed: int,
    imp,
    cfg: TrainConfig,
    eval_x,
    teacher=None,
    eval_t=None,
    train_on_teacher: bool = False,
) -> dict:
    """The same training for ONE model, written plainly (autograd + torch.optim); the batched trainer's check.

    W0 [d, n], b0 [n], eval_x [E, n], teacher = (Wt [dT, n], bt [n]). Returns floats and weights.
    """
    W = W0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam([W, b], lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=False)
    else:
        opt = torch.optim.SGD([W, b], lr=cfg.lr, momentum=SGD_MOMENTUM, foreach=False)
    rng = data_stream(data_seed)
    inv_keep = torch.tensor(1.0 / (1.0 - alpha), dtype=torch.float32)
    evals = set(cfg.eval_steps())
    floors = {"target": 0.0, "data": 0.0, "distill": 0.0}
    feature_mse = torch.zeros(W0.shape[1], dtype=torch.float64)
    for step in range(cfg.steps):
        x = sparsify_(torch.from_numpy(rng.random((cfg.batch_size, W0.shape[1]), dtype=np.float32)), inv_keep)
        with torch.no_grad():
            t = forward(teacher[0], teacher[1], x) if train_on_teacher else x
        loss = weighted_sq(imp, forward(W, b, x), t)
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in evals:
            with torch.no_grad():
                y = forward(W, b, eval_x)
                data_l = float(weighted_sq(imp, y, eval_x))
                dist_l = float(weighted_sq(imp, y, eval_t)) if eval_t is not None else 0.0
                feature_mse += (y - eval_x).double().square().mean(0)
            floors["data"] += data_l
            floors["distill"] += dist_l
            floors["target"] += dist_l if train_on_teacher else data_l
    m = len(evals)
    return {
        "W": W.detach(),
        "b": b.detach(),
        "feature_mse": feature_mse / m,
        **{f"floor_{k}": v / m for k, v in floors.items()},
    }
