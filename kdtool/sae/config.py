"""What decides what `kdtool train-sae` computes: TrainConfig (stored in cfg.json and the checkpoint).

A leaf module: the loop (kdtool/sae/training.py) and the checkpoint files (kdtool/sae/checkpoint.py)
both read it, and it reads neither.

Several SAEs of one layer can train side by side on the same batches (`--expansion 4,8,16`,
several `--l1` or `--init-seed`): one SAE per combination of the listed widths, lambdas and
initialisation seeds, per layer (`SAESpec`, `TrainConfig.specs`). Each is exactly the SAE a
run of that one combination would train (same batches, same initialisation, its own optimizer
and controller), so a single `--seed` decides the data order for all of them. `run_name` names
each SAE's folder.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Literal

from kdtool.errors import BadInput
from kdtool.parsing import short_float
from kdtool.sae.model import Kernel, L1Controller, Screen

#: Default lambda: the paper's 8e-4 as written, in the form it writes (sum over features, mean over
#: tokens), like the rest of this loss. The authors' code took a mean instead, so the runs behind
#: the paper's Table 1 had an effective sum-form lambda of about 8e-4 / 32 = 2.5e-5 (field notes);
#: --l1 2.5e-5 mimics them. A fixed lambda's effect scales with the activations (MSE ~ ||x||^2, the
#: L1 term ~ ||x||): on the embedded SmolLM2 (residual norms ~140 at layer 12) 8e-5 left L0 near
#: 45% of the latents after 100 steps. --target-l0 is the scale-free way to set sparsity.
DEFAULT_L1 = 8e-4

Normalize = Literal["none", "expected-norm"]
NORMALIZE = ("none", "expected-norm")


@dataclass(frozen=True)
class SAESpec:
    """One SAE of a layer among those trained side by side: what may differ between them."""

    d_sae: int  # latents
    l1: float  # lambda (fixed), or the controller's starting value
    init_seed: int  # initialisation; the SAE of layer L draws from generator_seed(L)

    def as_dict(self) -> dict:
        return asdict(self)

    def generator_seed(self, layer: int) -> int:
        """The seed the SAE of `layer` is initialised from (training uses it, cfg.json records it)."""
        return self.init_seed * 1000 + layer


@dataclass
class TrainConfig:
    """Everything that decides what `train-sae` computes (stored in cfg.json and the checkpoint)."""

    layers: list[int]  # residual-stream layers (hidden_states index), one SAE each
    d_in: int  # activation width
    d_sae: int | list[int]  # latents per SAE (--features, or --expansion * d_in); a list: one SAE per width
    l1: float | list[float] = DEFAULT_L1  # lambda (fixed), or the controller's start; a list: one SAE per value
    target_l0: float | None = None  # adapt lambda toward this L0 (paper's trial C)
    l1_rate: float = 0.01  # controller gain: log lambda += rate * log(running L0 / target_l0) per step after warmup
    l1_warmup: int = 0  # steps of linear lambda ramp from 0
    lr: float = 3e-4  # Adam learning rate (constant)
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm per SAE
    batch_tokens: int = 4096  # tokens per step (paper: 32 x 1024)
    tokens: int | None = None  # stop after this many tokens; None: one pass over the source
    checkpoint_every: int = 0  # tokens between checkpoints; 0: only the final one
    log_every: int = 10  # steps per train_log row (averaged over those steps)
    seed: int = 0  # data order (shuffling), and the initialisation unless init_seed says otherwise
    device: str = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: big matmuls in bf16 (GPU), fp32 master weights
    kernel: Kernel = "auto"  # dense or sparse gradient kernels (see kdtool/sae/model.py)
    bf16_screen: Screen = "auto"  # sparse kernel on CPU: active pairs from a bf16 screen (kdtool/sae/screen.py)
    alive_window: int = 1_000_000  # a feature is alive in the log if it fired within this many tokens
    normalize: Normalize = "none"  # expected-norm: train on x / s, s = mean ||x|| / sqrt(d_in) (folded at save)
    init_seed: int | list[int] | None = None  # SAE initialisation seed(s); None: seed; a list: one SAE per seed

    def __post_init__(self):
        # one value is stored as a scalar, so a one-SAE run's config (cfg.json, checkpoints) reads as before
        self.d_sae = _one_or_list(self.d_sae, int, "--features/--expansion")
        self.l1 = _one_or_list(self.l1, float, "--l1")
        if self.init_seed is not None:
            self.init_seed = _one_or_list(self.init_seed, int, "--init-seed")
        if not self.layers:
            raise BadInput("--layer: no layers to train")
        if len(set(self.layers)) != len(self.layers):
            raise BadInput(f"--layer: repeated layers in {self.layers}")
        if min(_as_list(self.d_sae)) < 1 or self.d_in < 1:
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
            raise BadInput(
                "--precision bf16 needs a CUDA --device (on CPU, --bf16-screen uses bf16 where it keeps fp32 results)"
            )
        try:
            for lam in _as_list(self.l1):
                self.controller(lam)
        except ValueError as exc:
            raise BadInput(str(exc)) from None

    def controller(self, l1: float | None = None) -> L1Controller:
        """A fresh lambda controller starting at `l1` (default: the only --l1); each SAE has its own."""
        start = _as_list(self.l1)[0] if l1 is None else l1
        return L1Controller(l1=start, target_l0=self.target_l0, rate=self.l1_rate, warmup_steps=self.l1_warmup)

    def specs(self) -> list[SAESpec]:
        """The SAEs each layer trains: every combination of width x lambda x initialisation seed, in that order."""
        seeds = _as_list(self.seed if self.init_seed is None else self.init_seed)
        return [SAESpec(F, lam, s) for F, lam, s in itertools.product(_as_list(self.d_sae), _as_list(self.l1), seeds)]

    def runs(self) -> list[tuple[str, int, SAESpec]]:
        """(folder name, layer, spec) of every SAE of the run, layer by layer (see `run_name`)."""
        specs = self.specs()
        return [(run_name(L, s, specs, self.d_in), L, s) for L in self.layers for s in specs]

    def as_dict(self) -> dict:
        return asdict(self)


def sae_width(d_in: int, *, features: int | None, expansion: float) -> int:
    """Latents per SAE: --features if given, else round(--expansion x d_in)."""
    if features is not None:
        return features
    if not expansion > 0:
        raise BadInput(f"--expansion must be > 0, got {expansion}")
    return int(round(expansion * d_in))


def sae_widths(d_in: int, *, features: list[int] | None, expansion: list[float]) -> int | list[int]:
    """--features (a list) if given, else each --expansion x d_in; one width as an int, several as a list."""
    widths = list(features) if features else [sae_width(d_in, features=None, expansion=e) for e in expansion]
    return widths[0] if len(widths) == 1 else widths


def run_name(layer: int, spec: SAESpec, specs: list[SAESpec], d_in: int) -> str:
    """The folder of one SAE: layer{L} when it is its layer's only SAE, else layer{L} plus what sets it
    apart from its side-by-side siblings, e.g. layer12-x8, layer12-lambda3e-4, layer12-x4-seed1.

    Only the settings that vary are in the name (cfg.json records all of them); a width is written as
    an expansion (x8 = 8 x d_in) when it is one with at most two decimals, else as f{latents}.
    """
    if len(specs) == 1:
        return f"layer{layer}"
    parts = [f"layer{layer}"]
    if len({s.d_sae for s in specs}) > 1:
        ratio = spec.d_sae / d_in
        parts.append(f"x{ratio:g}" if round(ratio, 2) == ratio else f"f{spec.d_sae}")
    if len({s.l1 for s in specs}) > 1:
        parts.append(f"lambda{short_float(spec.l1)}")
    if len({s.init_seed for s in specs}) > 1:
        parts.append(f"seed{spec.init_seed}")
    return "-".join(parts)


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _one_or_list(v, typ, option: str):
    """A scalar, or a list of several distinct values (a one-element list becomes its value)."""
    values = [typ(x) for x in _as_list(v)]
    if not values:
        raise BadInput(f"{option}: no value")
    if len(set(values)) != len(values):
        raise BadInput(f"{option}: repeated values in {values}")
    return values[0] if len(values) == 1 else values


def check_processes(batch_tokens: int, world: int) -> None:
    """Every one of `world` processes steps on an equal share of each batch."""
    if batch_tokens % world:
        raise BadInput(f"--batch-tokens {batch_tokens} must be divisible by the {world} processes")
