"""The training loop of `kdtool train-sae`: one SAE per layer from one stream of batches.

Output folder (default saes/):
    saes/checkpoint.json                              the latest complete checkpoint (written last)
    saes/layer{L}/cfg.json + sae_weights.safetensors  the final SAE (kdtool = SAELens layout + "kdtool")
    saes/layer{L}/train_log.parquet                   step, tokens, mse, l1_term, loss, l0, ...
    saes/layer{L}/checkpoints/tokens-{N:012d}/        an SAE folder at each token milestone, plus
        optimizer.safetensors + state.json            (Adam moments, controller, counters: latest only)

Resume is exact on CPU: the checkpoint holds the weights, Adam's moments and step, the L1
controller, the alive counters, the partial log interval and the reader's Position, and the
reader's shuffles depend only on (seed, position). Nothing else is random after initialisation.

Activation normalisation (`normalize="expected-norm"`, SAELens's expected_average_only_in):
before training, one scalar per layer s = mean ||x|| / sqrt(d_in) over the first
ceil(NORM_TOKENS / batch_tokens) training batches, and the SAE trains on x / s. Saved SAE
folders have s folded in (b_enc and b_dec multiplied by s; W_enc, W_dec unchanged), so they read
raw activations and their latents are s times the training latents (`fold_scale`); the
unfolded biases the run continues from are kept in the checkpoint's optimizer file. The log's
mse, l1_term and loss are in raw-activation units: s^2 times the normalised objective, i.e.
the paper's loss on raw x with lambda_raw = lambda * s. With "none", s = 1 and nothing changes.

Under torchrun (kdtool/distributed.py: NCCL on GPU, gloo on CPU) every rank reads the same global
batch and steps on rows rank::world of it; the gradients (each a mean over its rank's rows) are
summed and divided by world, and the statistics the controller and the log use (squared error,
L1 sum, per-feature fire counts) are summed, so every rank applies the same update and lambda and
W processes follow the one-process run up to float rounding. Only rank 0 writes files.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from kdtool import formats
from kdtool.distributed import Dist, all_reduce, barrier
from kdtool.errors import BadInput, RuntimeFailure
from kdtool.sae.model import Kernel, L1Controller, SparseAutoencoder, forward_backward
from kdtool.sae.writers import saelens_cfg, save_kdtool

#: Default lambda: the paper's 8e-4 as written, in the form it writes (sum over features, mean over
#: tokens), like the rest of this loss. The authors' code took a mean instead, so the runs behind
#: the paper's Table 1 had an effective sum-form lambda of about 8e-4 / 32 = 2.5e-5 (field notes);
#: --l1 2.5e-5 mimics them. A fixed lambda's effect scales with the activations (MSE ~ ||x||^2, the
#: L1 term ~ ||x||): on the embedded SmolLM2 (residual norms ~140 at layer 12) 8e-5 left L0 near
#: 45% of the latents after 100 steps. --target-l0 is the scale-free way to set sparsity.
DEFAULT_L1 = 8e-4

LOG_COLUMNS = (
    "layer",
    "step",
    "tokens",
    "mse",
    "l1_term",
    "loss",
    "l0",
    "alive_fraction",
    "explained_variance",
    "lambda",
    "lr",
    "elapsed_s",
)
LOG_KIND = "kdtool.sae.train_log"  # checkpoint copies: LOG_KIND + ".checkpoint" (not picked up as a run's log)
CHECKPOINT = "checkpoint.json"
CHECKPOINT_KIND = "kdtool.sae.checkpoint"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
#: config fields that may change between a run and its --resume
RESUME_MAY_CHANGE = ("tokens", "checkpoint_every", "log_every", "device", "kernel")
#: config fields added after the first checkpoints were written: their value for an older checkpoint
LEGACY_CONFIG = {"normalize": "none"}

Normalize = Literal["none", "expected-norm"]
NORMALIZE = ("none", "expected-norm")
#: expected-norm: s is estimated on at least this many tokens, the first whole training batches
#: (all of them if the data is shorter). 32K tokens put the mean norm within a fraction of a
#: percent; the estimate's batches are then trained on as usual.
NORM_TOKENS = 32_768


@dataclass
class TrainConfig:
    """Everything that decides what `train-sae` computes (stored in cfg.json and the checkpoint)."""

    layers: list[int]  # residual-stream layers (hidden_states index), one SAE each
    d_in: int  # activation width
    d_sae: int  # latents per SAE (--features, or --expansion * d_in)
    l1: float = DEFAULT_L1  # lambda (fixed), or the controller's starting value
    target_l0: float | None = None  # adapt lambda toward this L0 (paper's trial C)
    l1_rate: float = 0.01  # controller gain: log lambda += rate * relative L0 error, per step
    l1_warmup: int = 0  # steps of linear lambda ramp from 0
    lr: float = 3e-4  # Adam learning rate (constant)
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm per SAE
    batch_tokens: int = 4096  # tokens per step (paper: 32 x 1024)
    tokens: int | None = None  # stop after this many tokens; None: one pass over the source
    checkpoint_every: int = 0  # tokens between checkpoints; 0: only the final one
    log_every: int = 10  # steps per train_log row (averaged over those steps)
    seed: int = 0  # initialisation and shuffling
    device: str = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: big matmuls in bf16 (GPU), fp32 master weights
    kernel: Kernel = "auto"  # dense or sparse gradient kernels (see kdtool/sae/model.py)
    alive_window: int = 1_000_000  # a feature is alive in the log if it fired within this many tokens
    normalize: Normalize = "none"  # expected-norm: train on x / s, s = mean ||x|| / sqrt(d_in) (folded at save)

    def __post_init__(self):
        if not self.layers:
            raise BadInput("--layer: no layers to train")
        if len(set(self.layers)) != len(self.layers):
            raise BadInput(f"--layer: repeated layers in {self.layers}")
        if self.d_sae < 1 or self.d_in < 1:
            raise BadInput(f"--features/--expansion: need at least one latent (d_in={self.d_in}, d_sae={self.d_sae})")
        if self.batch_tokens < 2:
            raise BadInput(f"--batch-tokens must be >= 2, got {self.batch_tokens}")
        if self.tokens is not None and self.tokens < self.batch_tokens:
            raise BadInput(f"--tokens {self.tokens} is less than one batch (--batch-tokens {self.batch_tokens})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInput(f"--lr must be > 0, got {self.lr}")
        if not (self.grad_clip > 0):
            raise BadInput(f"--grad-clip must be > 0, got {self.grad_clip}")
        if self.l1_rate < 0 or self.l1_warmup < 0 or self.checkpoint_every < 0 or self.log_every < 1:
            raise BadInput("--l1-rate, --l1-warmup and --checkpoint-every must be >= 0, --log-every >= 1")
        if self.normalize not in NORMALIZE:
            raise BadInput(f"--normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if self.precision == "bf16" and not str(self.device).startswith("cuda"):
            raise BadInput("--precision bf16 needs a CUDA --device (bf16 matmuls are slower than fp32 on CPU)")
        try:
            self.controller()
        except ValueError as exc:
            raise BadInput(str(exc)) from None

    def controller(self) -> L1Controller:
        return L1Controller(l1=self.l1, target_l0=self.target_l0, rate=self.l1_rate, warmup_steps=self.l1_warmup)

    def as_dict(self) -> dict:
        return asdict(self)


class BatchSource(Protocol):
    """Where activations come from: the cache, or a model streamed through a shuffle buffer."""

    d_in: int
    info: dict  # model, dataset, seq_len, ... for cfg.json
    inputs: list  # paths for provenance

    def batches(
        self, layers: list[int], batch_tokens: int, *, seed: int, start: dict | None, one_pass: bool
    ) -> Iterator[tuple[dict, dict]]:
        """({layer: [batch_tokens, d_in] float32}, position after the batch as a JSON dict)."""
        ...

    def approx_tokens(self) -> int | None:
        """Tokens in one pass (for progress), if known."""
        ...


class CacheSource:
    """Batches from an activation cache written by `kdtool cache-acts` (shuffled, resumable)."""

    def __init__(self, root: str | Path, *, buffer_shards: int = 4):
        from kdtool.acts.store import ActivationStore

        self.store = ActivationStore(root)
        self.buffer_shards = int(buffer_shards)
        self.d_in = self.store.d_model
        m = self.store.manifest
        self.info = {k: m.get(k) for k in ("model", "revision", "dataset", "seq_len", "dtype")} | {
            "acts": str(root),
            "source": "cache",
        }
        self.inputs = [Path(root) / "manifest.json"]

    def batches(self, layers, batch_tokens, *, seed, start, one_pass):
        from kdtool.acts.store import Position

        pos = Position(**start) if start else None
        for batch, after in self.store.iter_batches(
            layers, batch_tokens, seed=seed, buffer_shards=self.buffer_shards, start=pos, epochs=1 if one_pass else None
        ):
            yield batch, after.as_dict()

    def approx_tokens(self):
        return self.store.n_tokens


class ModelSource:
    """Activations straight from a teacher's forward pass through a shuffle buffer (no disk cache).

    Blocks of `block_batches` model batches (about `buffer_tokens` token positions) are run,
    their rows (all requested layers aligned) permuted with rng(seed, block) and cut into
    training batches; the rows of a block that do not fill a batch are dropped. The position is
    {"block", "offset"}: a resume re-runs only the current block's model batches (earlier ones
    are skipped by the tokenizer, without the model).
    """

    def __init__(self, teacher, data, *, buffer_tokens: int = 262_144, batch_size: int = 8, drop_first: bool = True):
        self.teacher, self.data = teacher, data
        self.batch_size = int(batch_size)
        self.first = 1 if drop_first else 0
        self.per_seq = data.seq_len - self.first
        if self.per_seq < 1:
            raise BadInput("--seq-len must be >= 2 with --drop-first")
        self.block_batches = max(1, math.ceil(buffer_tokens / (self.batch_size * self.per_seq)))
        self.d_in = teacher.d_model
        self.info = {
            "model": teacher.name,
            "revision": teacher.revision,
            "dataset": data.describe()["dataset"],
            "seq_len": data.seq_len,
            "source": "stream",
            "drop_first": drop_first,
            "buffer_tokens": self.block_batches * self.batch_size * self.per_seq,
        }
        self.inputs = [p for p in (teacher.path,) if p] + data.local_inputs()

    def model_rows(self, layers: list[int], *, skip_batches: int = 0) -> Iterator[dict]:
        """{layer: [n, d] float32} per model batch, in data order (also used by `stats`)."""
        import torch

        from kdtool.models import residual_stream
        from kdtool.text.tokens import token_batches

        for ids in token_batches(self.data, self.teacher.tokenizer, self.batch_size, skip_batches=skip_batches):
            with torch.no_grad():  # not inference_mode: its flag would leak into the trainer across yields
                hidden = residual_stream(self.teacher.model, ids.to(self.teacher.device), None, layers)
            yield {L: hidden[L][:, self.first :, :].reshape(-1, self.d_in).float() for L in layers}

    def batches(self, layers, batch_tokens, *, seed, start, one_pass):
        import itertools

        import numpy as np
        import torch

        block = int(start["block"]) if start else 0
        offset = int(start["offset"]) if start else 0
        rows_iter = self.model_rows(layers, skip_batches=block * self.block_batches)
        while True:
            parts = list(itertools.islice(rows_iter, self.block_batches))
            if not parts:
                return
            data = {L: torch.cat([p[L] for p in parts]) for L in layers}
            rows = data[layers[0]].shape[0]
            perm = torch.from_numpy(np.random.default_rng([seed, block, 2]).permutation(rows)).to(
                data[layers[0]].device
            )
            while offset + batch_tokens <= rows:
                sel = perm[offset : offset + batch_tokens]
                offset += batch_tokens
                yield {L: data[L][sel] for L in layers}, {"block": block, "offset": offset}
            block, offset = block + 1, 0
            if len(parts) < self.block_batches:
                return  # the data ran out

    def approx_tokens(self):
        return None


@dataclass
class _Interval:
    """Sums over the steps since the last log row, in raw-activation units (s^2 x the normalised sums)."""

    steps: int = 0
    tokens: int = 0
    sse: float = 0.0
    sst: float = 0.0
    l1_term: float = 0.0  # sum over tokens of s^2 * lambda * sum_j z_j (= lambda * s * sum_j of raw latents)
    nnz: int = 0
    lam: float = 0.0  # lambda applied at the latest step


@dataclass
class LayerRun:
    """One layer's SAE, optimizer, controller, counters and log."""

    layer: int
    sae: SparseAutoencoder
    opt: Any
    controller: L1Controller
    last_fired: Any  # [F] int64: tokens seen when each feature last fired
    rows: list = field(default_factory=list)
    interval: _Interval = field(default_factory=_Interval)
    last: dict = field(default_factory=dict)  # the latest log row
    scale: float = 1.0  # s: the SAE trains on x / s (1.0 without normalisation)


def _adam(sae: SparseAutoencoder, cfg: TrainConfig):
    import torch

    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def _new_layer(layer: int, cfg: TrainConfig, first_batch, device, scale: float = 1.0) -> LayerRun:
    import torch

    # b_pre starts at the mean of the first (normalised) batch: the SAE begins by reconstructing the centre
    b_pre = (first_batch if scale == 1.0 else first_batch.float() / scale).mean(dim=0).cpu()
    sae = SparseAutoencoder.initialise(cfg.d_in, cfg.d_sae, seed=cfg.seed * 1000 + layer, device=device, b_pre=b_pre)
    return LayerRun(
        layer=layer,
        sae=sae,
        opt=_adam(sae, cfg),
        controller=cfg.controller(),
        last_fired=torch.zeros(cfg.d_sae, dtype=torch.int64, device=device),
        scale=scale,
    )


def _normalised(x, scale: float):
    """x / s (x itself when s = 1: no copy, and bit-identical to a run without normalisation)."""
    return x if scale == 1.0 else x / scale


def estimate_scale(batches, d_in: int) -> float:
    """s = mean over tokens of ||x||_2 / sqrt(d_in), from [n, d_in] batches (SAELens's expected-norm factor).

    Accumulated in float64 on the CPU, so every process and device gets the same number; rounded
    to float32 so the value stored in JSON is exactly the one the run divides by.
    """
    import torch

    total, count = 0.0, 0
    for x in batches:
        x = x.detach().to("cpu", torch.float64)
        total += float(x.norm(dim=1).sum())
        count += x.shape[0]
    s = total / max(count, 1) / math.sqrt(d_in)
    if not (s > 0 and math.isfinite(s)):
        raise RuntimeFailure(f"--normalize expected-norm: the activations' mean norm is {s * math.sqrt(d_in)!r}")
    return float(torch.tensor(s, dtype=torch.float32))


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


class Trainer:
    """Runs the loop; the CLI gives it callbacks for progress and messages."""

    def __init__(
        self,
        cfg: TrainConfig,
        source: BatchSource,
        out: str | Path,
        *,
        provenance: dict | None = None,
        on_step: Callable[[int, int, dict], None] | None = None,
        on_message: Callable[[str], None] | None = None,
        stop_after_steps: int | None = None,
        dist: Dist | None = None,
    ):
        self.cfg, self.source, self.out = cfg, source, Path(out)
        self.dist = dist or Dist()
        if cfg.batch_tokens % self.dist.world:
            raise BadInput(f"--batch-tokens {cfg.batch_tokens} must be divisible by the {self.dist.world} processes")
        self.provenance = provenance
        self.on_step = on_step or (lambda tokens, step, row: None)
        quiet = not self.dist.main  # one voice: rank 0 reports
        self.on_message = (on_message if not quiet else None) or (lambda msg: None)
        self.stop_after_steps = stop_after_steps  # tests: simulate a killed run
        self.runs: dict[int, LayerRun] = {}
        self.step = 0
        self.tokens = 0
        self.position: dict | None = None
        self.elapsed = 0.0
        self.scale_tokens = 0  # tokens s was estimated on (0 without normalisation)
        import torch

        d = self.dist
        self.device = torch.device(
            f"cuda:{d.local_rank}" if d.world > 1 and str(cfg.device).startswith("cuda") else cfg.device
        )
        self.matmul_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        if source.d_in != cfg.d_in:
            raise BadInput(f"activations have d={source.d_in} but the config says d_in={cfg.d_in}")

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[int, LayerRun]:
        import torch

        cfg = self.cfg
        if cfg.tokens is not None and self.tokens >= cfg.tokens:
            raise BadInput(
                f"--tokens {cfg.tokens}: the checkpoint already has {self.tokens} tokens; "
                "give a larger --tokens to continue"
            )
        start = time.perf_counter() - self.elapsed
        next_ckpt = self._next_milestone()
        stream = self.source.batches(
            cfg.layers, cfg.batch_tokens, seed=cfg.seed, start=self.position, one_pass=cfg.tokens is None
        )
        if not self.runs:
            stream = self._start(stream)
        ran = 0
        for batch, position in stream:
            for L in cfg.layers:
                r = self.runs[L]
                self._step(r, _normalised(batch[L].to(self.device, torch.float32, non_blocking=True), r.scale))
            self.step += 1
            self.tokens += cfg.batch_tokens
            self.position = position
            ran += 1
            self.elapsed = time.perf_counter() - start
            if self.step % cfg.log_every == 0:
                for r in self.runs.values():
                    self._log_row(r)
            self.on_step(self.tokens, self.step, self.runs[cfg.layers[0]].last)
            done = cfg.tokens is not None and self.tokens + cfg.batch_tokens > cfg.tokens
            if next_ckpt is not None and self.tokens >= next_ckpt and not done:
                self.save_checkpoint()
                next_ckpt = self._next_milestone()
            if done:
                break
            if self.stop_after_steps is not None and ran >= self.stop_after_steps:
                return self.runs  # simulated kill: no final files
        if not self.runs:
            raise RuntimeFailure("no complete batch in the activations: use a smaller --batch-tokens or cache more")
        for r in self.runs.values():
            if r.interval.steps:
                self._log_row(r)
        self.save_checkpoint()
        self.save_final()
        return self.runs

    def _start(self, stream: Iterator) -> Iterator:
        """A fresh run: estimate each layer's scale on the first batches, build the SAEs, then replay them."""
        cfg = self.cfg
        n = math.ceil(NORM_TOKENS / cfg.batch_tokens) if cfg.normalize != "none" else 1
        head = []
        for item in stream:
            head.append(item)
            if len(head) >= n:
                break
        if not head:
            return iter(())
        self.scale_tokens = len(head) * cfg.batch_tokens if cfg.normalize != "none" else 0
        for L in cfg.layers:
            scale = estimate_scale([b[L] for b, _ in head], cfg.d_in) if cfg.normalize != "none" else 1.0
            self.runs[L] = _new_layer(L, cfg, head[0][0][L], self.device, scale)
            if cfg.normalize != "none":
                self.on_message(
                    f"layer {L}: activation scale s = {scale:.5g} (mean ||x|| {scale * math.sqrt(cfg.d_in):.5g} "
                    f"over the first {self.scale_tokens:,} tokens); training on x / s"
                )

        def replay():
            while head:  # popped, so the estimate's batches are freed as they are trained on
                yield head.pop(0)
            yield from stream

        return replay()

    def _next_milestone(self) -> int | None:
        every = self.cfg.checkpoint_every
        return None if not every else (self.tokens // every + 1) * every

    def _step(self, r: LayerRun, x) -> None:
        import torch

        cfg = self.cfg
        lam = r.controller.value(self.step)
        for p in r.sae.parameters():
            p.grad = None
        d = self.dist
        mine = x[d.rank :: d.world] if d.world > 1 else x
        st = forward_backward(r.sae, mine, lam, kernel=cfg.kernel, matmul_dtype=self.matmul_dtype)
        if d.world > 1:
            self._reduce(r, st, x)
        r.sae.project_decoder_grad()
        torch.nn.utils.clip_grad_norm_(list(r.sae.parameters()), cfg.grad_clip)
        r.opt.step()
        r.sae.normalise_decoder()
        nnz = int(st.nnz)
        B = st.tokens  # the global batch (all ranks' rows) after _reduce
        r.controller.update(nnz / B, self.step)
        r.last_fired[st.fires > 0] = self.tokens + B
        iv = r.interval
        s2 = r.scale * r.scale  # the log is in raw-activation units: s^2 times the normalised sums
        iv.steps += 1
        iv.tokens += B
        iv.sse += float(st.sse) * s2
        iv.sst += float(st.sst) * s2
        iv.l1_term += lam * float(st.l1_sum) * s2
        iv.nnz += nnz
        iv.lam = lam
        if not math.isfinite(iv.sse):
            raise RuntimeFailure(
                f"layer {r.layer}: the loss diverged (non-finite) at step {self.step}; try a smaller --lr"
            )

    def _reduce(self, r: LayerRun, st, x) -> None:
        """Average the ranks' gradients and sum their statistics (in place), so every rank agrees."""
        import torch

        d = self.dist
        params = list(r.sae.parameters())
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        all_reduce(flat, d).div_(d.world)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n
        # sums over tokens: squared error, L1 and fire counts (exact in float64 for any batch)
        stats = torch.cat([torch.stack([st.sse, st.l1_sum]).double(), st.fires.double()])
        all_reduce(stats, d)
        st.sse, st.l1_sum = stats[0], stats[1]
        st.fires = stats[2:].round().to(torch.int64)
        st.sst = (x - x.mean(dim=0)).pow(2).sum()  # every rank holds the global batch
        st.tokens = x.shape[0]

    def _log_row(self, r: LayerRun) -> None:
        iv = r.interval
        n = max(iv.tokens, 1)
        mse = iv.sse / n
        l1_term = iv.l1_term / n
        alive = float(((self.tokens - r.last_fired) < self.cfg.alive_window).float().mean())
        row = {
            "layer": r.layer,
            "step": self.step,
            "tokens": self.tokens,
            "mse": mse,
            "l1_term": l1_term,
            "loss": mse + l1_term,
            "l0": iv.nnz / n,
            "alive_fraction": alive,
            "explained_variance": 1.0 - iv.sse / iv.sst if iv.sst > 0 else float("nan"),
            "lambda": iv.lam,
            "lr": self.cfg.lr,
            "elapsed_s": self.elapsed,
        }
        r.rows.append(row)
        r.last = row
        r.interval = _Interval()

    # ---- files ------------------------------------------------------------------------------
    def _cfg_json(self, r: LayerRun, *, checkpoint: bool) -> tuple[dict, dict]:
        info = self.source.info
        cfg = saelens_cfg(
            self.cfg.d_in,
            self.cfg.d_sae,
            layer=r.layer,
            model_name=info.get("model"),
            context_size=info.get("seq_len"),
            dataset_path=info.get("dataset"),
        )
        kd = {
            "layer": r.layer,
            "hidden_states_index": r.layer,
            "tokens": self.tokens,
            "steps": self.step,
            "l1": self.cfg.l1,
            "l1_final": r.controller.l1,
            "controller": {
                "target_l0": self.cfg.target_l0,
                "rate": self.cfg.l1_rate,
                "warmup_steps": self.cfg.l1_warmup,
                "l0_running": r.controller.l0_running,
            },
            "loss": "mean_b ||x - x_hat||^2 + lambda * sum_j z_j (sum over features, mean over batch)",
            "decoder": "unit-norm rows of W_dec; b_dec is the pre-encoder bias (subtracted before encoding)",
            "normalize": self._normalize_info(r),
            "checkpoint": checkpoint,
            "last_log": r.last,
            "source": info,
            "config": self.cfg.as_dict(),
        }
        return cfg, kd

    def _normalize_info(self, r: LayerRun) -> dict:
        """cfg.json's record of the activation scaling (the saved weights already have it folded in)."""
        info = {"method": self.cfg.normalize, "scale": r.scale}
        if self.cfg.normalize != "none":
            info |= {
                "definition": "s = mean ||x|| / sqrt(d_in); trained on x / s",
                "estimated_on_tokens": self.scale_tokens,
                "folded": "saved b_enc, b_dec = s x the trained ones: the SAE reads raw activations, latents = s z",
                "l1_raw_equivalent": r.controller.l1 * r.scale,
                "log_units": "mse, l1_term, loss in raw-activation units (s^2 x the normalised objective)",
            }
        return info

    def _write_log(self, r: LayerRun, path: Path, *, kind: str = LOG_KIND) -> None:
        cols = {c: [row[c] for row in r.rows] for c in LOG_COLUMNS}
        formats.write_parquet(
            path,
            cols,
            kind=kind,
            provenance=self.provenance,
            summary={
                "layer": r.layer,
                "tokens": self.tokens,
                "steps": self.step,
                "config": self.cfg.as_dict(),
                "normalize": self.cfg.normalize,
                "activation_scale": r.scale,
            },
        )

    def checkpoint_dir(self, layer: int, tokens: int | None = None) -> Path:
        return self.out / f"layer{layer}" / "checkpoints" / f"tokens-{(self.tokens if tokens is None else tokens):012d}"

    def save_checkpoint(self) -> None:
        """Per layer: an SAE folder + optimizer state; then checkpoint.json (written last). Rank 0 only."""
        if not self.dist.main:
            return
        previous = self._read_pointer()
        for r in self.runs.values():
            ck = self.checkpoint_dir(r.layer)
            cfg, kd = self._cfg_json(r, checkpoint=True)
            trained = r.sae.tensors()
            save_kdtool(ck, fold_scale(trained, r.scale), cfg=cfg, kdtool=kd, provenance=self.provenance)
            opt_tensors = {"last_fired": r.last_fired.cpu()}
            if r.scale != 1.0:  # the unfolded biases the run continues from (s * b / s need not give b back)
                opt_tensors |= {"train.b_enc": trained["b_enc"], "train.b_dec": trained["b_dec"]}
            adam_steps = {}
            for name, p in r.sae.named_parameters():
                s = r.opt.state.get(p, {})
                if s:
                    opt_tensors[f"{name}.exp_avg"] = s["exp_avg"].detach().cpu()
                    opt_tensors[f"{name}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu()
                    adam_steps[name] = float(s["step"])
            formats.save_safetensors(
                ck / OPTIMIZER, opt_tensors, kind="kdtool.sae.optimizer", provenance=self.provenance
            )
            self._write_log(r, ck / "train_log.parquet", kind=LOG_KIND + ".checkpoint")
            formats.write_json(
                ck / STATE,
                {
                    "kind": "kdtool.sae.train_state",
                    "layer": r.layer,
                    "step": self.step,
                    "tokens": self.tokens,
                    "adam_steps": adam_steps,
                    "controller": r.controller.state(),
                    "interval": asdict(r.interval),
                    "log_rows": len(r.rows),
                    "activation_scale": r.scale,
                    "scale_tokens": self.scale_tokens,
                },
            )
        formats.write_json(
            self.out / CHECKPOINT,
            {
                "kind": CHECKPOINT_KIND,
                "step": self.step,
                "tokens": self.tokens,
                "position": self.position,
                "elapsed_s": self.elapsed,
                "layers": self.cfg.layers,
                "dir": f"tokens-{self.tokens:012d}",
                "config": self.cfg.as_dict(),
                "source": self.source.info,
                "provenance": self.provenance,
            },
        )
        # only the latest checkpoint keeps its optimizer state (3x the weights); older ones keep the SAE
        if previous and previous.get("tokens") != self.tokens:
            for L in previous.get("layers", []):
                old = self.checkpoint_dir(L, previous["tokens"]) / OPTIMIZER
                if old.exists():
                    old.unlink()
        self.on_message(f"checkpoint at {self.tokens:,} tokens (step {self.step})")

    def save_final(self) -> None:
        if not self.dist.main:
            return
        for r in self.runs.values():
            folder = self.out / f"layer{r.layer}"
            cfg, kd = self._cfg_json(r, checkpoint=False)
            self._write_log(r, folder / "train_log.parquet")
            save_kdtool(folder, fold_scale(r.sae.tensors(), r.scale), cfg=cfg, kdtool=kd, provenance=self.provenance)

    def _read_pointer(self) -> dict | None:
        path = self.out / CHECKPOINT
        return formats.read_json(path) if path.exists() else None

    # ---- resume -----------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the latest checkpoint; refuse if the config changed in a way that changes the result."""
        import torch
        from safetensors.torch import load_file

        from kdtool.sae.layouts import SAELENS_WEIGHTS

        pointer = self._read_pointer()
        if pointer is None or pointer.get("kind") != CHECKPOINT_KIND:
            raise BadInput(f"--resume: no checkpoint in {self.out} (no {CHECKPOINT}); run without --resume first")
        old = pointer["config"]
        old = {**LEGACY_CONFIG, **old}
        changed = [k for k, v in self.cfg.as_dict().items() if k not in RESUME_MAY_CHANGE and old.get(k) != v]
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in changed)
            raise BadInput(
                f"--resume: options differ from the checkpointed run ({diffs}); "
                "use the same options, or --force to start over"
            )
        self.step, self.tokens = int(pointer["step"]), int(pointer["tokens"])
        self.position, self.elapsed = pointer["position"], float(pointer.get("elapsed_s", 0.0))
        for L in self.cfg.layers:
            ck = self.checkpoint_dir(L)
            try:
                state = formats.read_json(ck / STATE)
                weights = load_file(str(ck / SAELENS_WEIGHTS))
                opt_t = load_file(str(ck / OPTIMIZER))
            except (OSError, BadInput) as exc:
                raise BadInput(f"--resume: checkpoint {ck} is incomplete ({exc})") from None
            scale = float(state.get("activation_scale", 1.0))
            self.scale_tokens = int(state.get("scale_tokens", 0))
            if "train.b_enc" in opt_t:  # the SAE folder's biases have s folded in
                weights |= {"b_enc": opt_t["train.b_enc"], "b_dec": opt_t["train.b_dec"]}
            elif scale != 1.0:
                raise BadInput(f"--resume: checkpoint {ck} has no unfolded biases ({OPTIMIZER} train.b_enc)")
            sae = SparseAutoencoder(self.cfg.d_in, self.cfg.d_sae, device=self.device)
            sae.load_tensors({k: v.to(self.device) for k, v in weights.items()})
            opt = _adam(sae, self.cfg)
            sd = opt.state_dict()
            sd["state"] = {}
            for i, (name, _) in enumerate(sae.named_parameters()):
                if name in state["adam_steps"]:
                    sd["state"][i] = {
                        "step": torch.tensor(state["adam_steps"][name]),
                        "exp_avg": opt_t[f"{name}.exp_avg"].to(self.device),
                        "exp_avg_sq": opt_t[f"{name}.exp_avg_sq"].to(self.device),
                    }
            opt.load_state_dict(sd)
            log_path = ck / "train_log.parquet"
            rows = []
            if log_path.exists():
                cols = formats.read_table(log_path) if state["log_rows"] else {}
                rows = [{c: _py(cols[c][i]) for c in LOG_COLUMNS} for i in range(state["log_rows"])] if cols else []
            run = LayerRun(
                layer=L,
                sae=sae,
                opt=opt,
                controller=L1Controller.from_state(state["controller"]),
                last_fired=opt_t["last_fired"].to(self.device),
                rows=rows,
                interval=_Interval(**state["interval"]),
                last=rows[-1] if rows else {},
                scale=scale,
            )
            self.runs[L] = run
        self.on_message(f"resuming at {self.tokens:,} tokens (step {self.step}) from {self.out / CHECKPOINT}")


def _py(v):
    return v.item() if hasattr(v, "item") else v


def prepare_output(out: str | Path, layers: list[int], *, resume: bool, force: bool, remove: bool = True) -> None:
    """Refuse to overwrite a previous run unless --force; --force clears the old run's files for these layers.

    remove=False (ranks other than 0) only checks.
    """
    out = Path(out)
    existing = [out / f"layer{L}" for L in layers if (out / f"layer{L}").exists()]
    pointer = out / CHECKPOINT
    if resume:
        return
    if (existing or pointer.exists()) and not force:
        what = ", ".join(str(p) for p in existing) or str(pointer)
        raise BadInput(f"{what} already exists: use --resume to continue that run or --force to replace it")
    if force and remove:
        for folder in existing:
            shutil.rmtree(folder)
        if pointer.exists():
            pointer.unlink()


def train(
    cfg: TrainConfig,
    source: BatchSource,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    provenance: dict | None = None,
    on_step=None,
    on_message=None,
    stop_after_steps: int | None = None,
    dist: Dist | None = None,
) -> Trainer:
    """Train (or continue) one SAE per layer and write saes/ (rank 0); returns the finished Trainer.

    `dist`: the torchrun process group (kdtool.distributed.dist_init), None for one process.
    """
    dist = dist or Dist()
    prepare_output(out, cfg.layers, resume=resume, force=force, remove=dist.main)
    barrier(dist)  # no rank starts before rank 0 has cleared a --force'd run
    trainer = Trainer(
        cfg,
        source,
        out,
        provenance=provenance,
        on_step=on_step,
        on_message=on_message,
        stop_after_steps=stop_after_steps,
        dist=dist,
    )
    if resume:
        trainer.resume()
    trainer.run()
    barrier(dist)  # the other ranks wait for rank 0's files
    return trainer
