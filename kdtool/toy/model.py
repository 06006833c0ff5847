"""The paper's toy model (section 4, Experiment 1): data, a batched trainer, floors and predictions.

Toy model (Elhage et al. 2022): x in R^n with x_i = 0 w.p. alpha, else U[0,1];
    h = W x (W: [d, n]);  x_hat = ReLU(W^T h + b);  loss = sum_i I_i (x_i - x_hat_i)^2, batch mean,
with I_i = i^-s (Zipf). A teacher of width d_T is trained on the data; students of every width
d_S = 1..d_T are then distilled from it (target = teacher x_hat) or trained on the data.

Speed: every model of a chunk of configurations is one computation with a leading model axis.
Models that share a data stream (a teacher and its students: same n, d_T, alpha, seed) share x,
so the encoder is one bmm per stream: [S, B, n] @ [S, n, K*d]. Students are trained in groups of
consecutive widths (`width_groups`), each zero-padded to its widest; padded rows of W get exactly
zero gradient, so they stay zero and the padded model is the narrow model. Gradients are written
by hand (no autograd graph) and the importance weights are folded into the small [d, n] gradient
tensors instead of the big [S, K, B, n] residual.

Determinism: every random draw comes from a generator keyed by (base seed, n, d_T, alpha,
seed, purpose, width), never by a model's position in a batch, so a model trains identically
alone (`train_reference`, plain autograd + torch.optim) or in any batch or group (`train_groups`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from kdtool.errors import BadInput, RuntimeFailure
from kdtool.theory import theorem as theory

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["constant", "cosine", "linear"]
Target = Literal["teacher", "data"]

_PURPOSE = {"teacher-data": 1, "student-data": 2, "eval": 3, "init": 4}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
EVAL_CHUNK = 1024  # eval samples per forward, to bound memory at [S, K, EVAL_CHUNK, n]


@dataclass(frozen=True)
class TrainConfig:
    """How every toy model (teacher and student) is trained and measured."""

    steps: int = 3000  # optimiser steps per model (teachers and students alike)
    batch_size: int = 256  # fresh samples per step
    lr: float = 2e-2  # peak learning rate: the smallest of 1e-2, 2e-2, 3e-2 that passes the convergence check
    optimizer: Optimizer = "adam"  # adam (torch.optim.Adam defaults) or sgd (momentum 0.9)
    schedule: Schedule = "cosine"  # lr schedule over the steps: constant, cosine or linear decay to 0
    target: Target = "teacher"  # students learn the teacher's x_hat (distillation) or the data
    zipf_exponent: float = 1.0  # I_i = i^-s
    eval_samples: int = 4096  # held-out samples per (n, d_T, alpha, seed), drawn once
    floor_fraction: float = 0.1  # the floor averages held-out loss over this final fraction of steps
    eval_points: int = 10  # held-out evaluations inside that final window
    curve_points: int = 0  # >0: log this many training-loss points per model (--log-curves)
    base_seed: int = 0  # --seed: offsets every generator

    def __post_init__(self):
        checks = [
            (self.steps >= 10, f"--steps must be >= 10, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.optimizer in ("adam", "sgd"), f"--optimizer must be adam or sgd, got {self.optimizer!r}"),
            (
                self.schedule in ("constant", "cosine", "linear"),
                f"--schedule must be constant, cosine or linear, got {self.schedule!r}",
            ),
            (self.target in ("teacher", "data"), f"--target must be teacher or data, got {self.target!r}"),
            (
                math.isfinite(self.zipf_exponent) and self.zipf_exponent >= 0,
                f"--zipf-exponent must be >= 0, got {self.zipf_exponent}",
            ),
            (self.eval_samples >= 1, f"--eval-samples must be >= 1, got {self.eval_samples}"),
            (0 < self.floor_fraction <= 1, f"--floor-fraction must be in (0, 1], got {self.floor_fraction}"),
            (self.eval_points >= 1, f"--eval-points must be >= 1, got {self.eval_points}"),
            (self.curve_points >= 0, f"curve points must be >= 0, got {self.curve_points}"),
            (self.base_seed >= 0, f"--seed must be >= 0, got {self.base_seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        if self.eval_points > self.window:
            raise BadInput(
                f"--eval-points {self.eval_points} exceeds the {self.window} steps of the final "
                f"{self.floor_fraction:g} of training (--steps {self.steps})"
            )

    @property
    def window(self) -> int:
        """Number of final steps the floor averages over."""
        return max(1, math.ceil(self.steps * self.floor_fraction))

    def eval_steps(self) -> list[int]:
        """0-based step indices after which the held-out loss is measured (evenly spread, last = final step)."""
        start = self.steps - self.window
        points = range(self.eval_points)
        return sorted({start + math.ceil((k + 1) * self.window / self.eval_points) - 1 for k in points})

    def curve_steps(self) -> list[int]:
        if self.curve_points <= 0:
            return []
        return sorted(
            {
                min(self.steps - 1, round(k * (self.steps - 1) / max(1, self.curve_points - 1)))
                for k in range(self.curve_points)
            }
        )

    def lr_at(self, step: int) -> float:
        frac = step / self.steps
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, order=True)
class ToyConfigKey:
    """One configuration of the sweep: a teacher width and students 1..d_T, for each seed."""

    n: int
    d_teacher: int
    alpha: float

    @property
    def label(self) -> str:
        return f"n={self.n} d_T={self.d_teacher} alpha={self.alpha:g}"

    @property
    def slug(self) -> str:
        return f"n{self.n}-dT{self.d_teacher}-a{self.alpha:.6f}"


def generator_seed(base_seed: int, key: ToyConfigKey, seed: int, purpose: str, width: int = 0) -> int:
    """A 63-bit torch seed from everything that identifies a draw (never a batch position)."""
    alpha_key = int(round(key.alpha * 1_000_000_000))
    ss = np.random.SeedSequence([base_seed, key.n, key.d_teacher, alpha_key, seed, _PURPOSE[purpose], width])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def importance(n: int, exponent: float = 1.0):
    """I_i = i^-s as a float32 torch tensor [n]."""
    import torch

    return torch.from_numpy(theory.zipf_weights(n, exponent)).float()


def data_stream(seed: int) -> np.random.Generator:
    """The generator of one data stream (numpy PCG64: half the cost per float of torch's CPU mt19937, measured)."""
    return np.random.Generator(np.random.PCG64(int(seed)))


def sparsify_(u, inv_keep):
    """Uniforms -> toy data in place: x = u / (1-alpha) where u < 1-alpha, else 0.

    One uniform per entry: P(u < p) = p = 1-alpha, and u/p given u < p is U[0,1).
    `inv_keep` is 1/(1-alpha) as float32 (a scalar tensor or [S, 1, 1]). Done as scale by -1/p,
    threshold at -1, negate: no boolean mask, 9x faster than multiplying by one (measured); dropped
    entries come out as -0.0, which every later product and sum treats as 0.
    """
    import torch.nn.functional as F

    u.mul_(-inv_keep)
    F.threshold_(u, -1.0, 0.0)
    return u.neg_()


def sample(rng: np.random.Generator, batch: int, n: int, alpha: float):
    """One fresh batch [batch, n] of toy data from a data stream (`data_stream`)."""
    import torch

    u = torch.from_numpy(rng.random((batch, n), dtype=np.float32))
    return sparsify_(u, torch.tensor(1.0 / (1.0 - alpha), dtype=torch.float32))


def init_weights(d: int, n: int, seed: int):
    """Xavier-normal W [d, n] (std sqrt(2/(n+d))) from its own generator; b = 0 [n]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d, n, generator=gen) * math.sqrt(2.0 / (n + d))
    return W, torch.zeros(n)


def forward(W, b, x):
    """Reference forward for one model: W [d, n], b [n], x [B, n] -> x_hat [B, n]."""
    import torch

    return torch.relu((x @ W.T) @ W + b)


def weighted_sq(imp, y, t):
    """Mean over the batch of sum_i I_i (y_i - t_i)^2 (last two dims [B, n])."""
    return ((y - t).square() * imp).sum(-1).mean(-1)


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
    floor_data: object  # [S, K] held-out loss against the data
    floor_distill: object | None  # [S, K] held-out loss against the teacher's x_hat (when a teacher is given)
    final_train_loss: object  # [S, K] training objective on the last batch
    curves: dict = field(default_factory=dict)  # step -> (objective [S,K], data loss [S,K]) on the training batch

    @staticmethod
    def concat(results: list[TrainResult]) -> TrainResult:
        """Results of groups of the same streams side by side along the model axis K (weights dropped)."""
        import torch

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
            floor_distill=cat("floor_distill"),
            final_train_loss=cat("final_train_loss"),
            curves=curves,
        )


class _Adam:
    """torch.optim.Adam's update (foreach=False path), elementwise so a batch of models == each alone."""

    def __init__(self, params):
        import torch

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
    import torch

    S, K, d, n = W.shape
    B = x.shape[1]
    hT = torch.bmm(W.reshape(S, K * d, n), x.transpose(1, 2)).view(S * K, d, B)  # [S*K, d, B]
    z = torch.baddbmm(b.reshape(S * K, 1, n), hT.transpose(1, 2), W.reshape(S * K, d, n))  # [S*K, B, n]
    return hT, z.view(S, K, B, n)


def _weighted_sq_sum(diff, imp):
    """sum over samples and features of I_i diff^2 for diff [S, K, B, n] (overwritten) -> [S, K] float64."""
    import torch

    S, K, B, n = diff.shape
    return (diff.square_().view(-1, n) @ imp).view(S, K, B).sum(-1, dtype=torch.float64)


def _eval_chunk(S: int, K: int, n: int) -> int:
    """Held-out samples per forward: keep [S, K, chunk, n] near 2 MB so every pass stays in cache."""
    return max(16, min(EVAL_CHUNK, (512 * 1024) // max(1, S * K * n)))


def _eval_losses(W, b, imp, eval_x, eval_t):
    """Held-out losses [S, K] against the data and (if eval_t) against the teacher, in chunks."""
    import torch

    S, K, _, n = W.shape
    E = eval_x.shape[1]
    data = torch.zeros(S, K, dtype=torch.float64)
    dist = torch.zeros(S, K, dtype=torch.float64) if eval_t is not None else None
    step = _eval_chunk(S, K, n)
    for lo in range(0, E, step):
        xc = eval_x[:, lo : lo + step]
        _, z = _batched_forward(W, b, xc)
        y = z.clamp_min_(0)  # [S, K, Bc, n]
        diff = torch.empty_like(y)
        data += _weighted_sq_sum(torch.sub(y, xc.unsqueeze(1), out=diff), imp)
        if eval_t is not None:
            dist += _weighted_sq_sum(torch.sub(y, eval_t[:, lo : lo + step].unsqueeze(1), out=diff), imp)
    return data / E, (dist / E if dist is not None else None)


class _Group:
    """Models of one padded width d trained on the shared streams: weights, optimiser, buffers, running floors.

    Buffers are reused every step: on CPU, fresh multi-MB tensors cost page faults (measured: ~25% of a step).
    """

    def __init__(self, W0, b0, cfg: TrainConfig, with_distill: bool):
        import torch

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
        self.acc_data = torch.zeros(S, K, dtype=torch.float64)
        self.acc_dist = torch.zeros(S, K, dtype=torch.float64) if with_distill else None
        self.curves: dict[int, tuple] = {}
        self.final_train = None

    def grads(self, x, t, c):
        """Hand-written gradients of the toy loss for every model at once: (dL/dW [S, K, d, n], dL/db [S, K, n]).

        x [S, B, n] data, t [S, B, n] target, c [n] = 2 I_i / B. No autograd graph; the importance
        weights multiply the small [d, n] results, not the [S, K, B, n] residual.
        """
        import torch

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
        data_l, dist_l = _eval_losses(self.W, self.b, imp, eval_x, eval_t)
        self.acc_data += data_l
        if self.acc_dist is not None:
            self.acc_dist += dist_l
        self.acc_target += dist_l if train_on_teacher else data_l

    def result(self, evals: int, lr: float) -> TrainResult:
        import torch

        if not torch.isfinite(self.W).all():
            raise RuntimeFailure(f"toy training diverged (non-finite weights); lower --lr (now {lr:g})")
        return TrainResult(
            W=self.W,
            b=self.b,
            floor_target=self.acc_target / evals,
            floor_data=self.acc_data / evals,
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
    import torch

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
    return [g.result(len(evals), cfg.lr) for g in state]


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
    import torch

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
            floors["data"] += data_l
            floors["distill"] += dist_l
            floors["target"] += dist_l if train_on_teacher else data_l
    m = len(evals)
    return {"W": W.detach(), "b": b.detach(), **{f"floor_{k}": v / m for k, v in floors.items()}}


# ----------------------------------------------------------------------------------------------
# Predictions (paper Eq. 2 with the toy's weights w_i = I_i (1-alpha)/3)
# ----------------------------------------------------------------------------------------------


def floor_model(
    n: int, alpha: float, zipf_exponent: float = 1.0, capacity: theory.Capacity = "paper", g_value: float | None = None
) -> theory.FloorModel:
    """Eq. 2 for the toy: weights I_i * E[x_i^2] with E[x_i^2] = (1-alpha)/3."""
    weights = theory.zipf_weights(n, zipf_exponent, (1.0 - alpha) / 3.0)
    return theory.FloorModel.from_weights(weights, alpha, capacity, g_value=g_value)


def predictions(n: int, alpha: float, widths, zipf_exponent: float = 1.0) -> dict[str, np.ndarray | float]:
    """Refined (g(alpha)) and naive (g = 1) floors at each width, plus g, d* and F_S."""
    refined = floor_model(n, alpha, zipf_exponent, "paper")
    naive = floor_model(n, alpha, zipf_exponent, "naive")
    widths = np.asarray(widths)
    return {
        "pred_refined": refined.floor(widths),
        "pred_naive": naive.floor(widths),
        "g": refined.g,
        "d_star": refined.d_star,
        "features_kept": refined.kept(widths),
        "total_mass": float(refined.tail[0]),
    }
