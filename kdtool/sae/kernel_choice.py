"""`--kernel auto`: run whichever of the two step kernels is faster for this SAE on this machine, by measurement.

Why measure: the crossover density below which the sparse kernel wins depends on the machine,
the shapes and the device. A constant measured on one machine was wrong on the next (the 2-core
CPU's old 5% threshold sent auto to the dense kernel at 10% density, where sparse was 1.4x
faster), and a GPU's ratio of matmul speed to gather speed is another story again.

How: once per SAE, on a real batch at the first step whose density could make sparse worth it,
`calibrate` times each kernel with its encoder product - the dense kernel once, the sparse
kernel at three densities made by shifting the encoder bias (1/256, 1/64, 1/16 of the pairs
active, the bias restored exactly afterwards) - three interleaved rounds,
keeping each case's fastest time (load from other processes only ever adds time). The dense
kernel's cost does not depend on the density; the sparse kernel's grows linearly with the number
of active pairs, so a least-squares line through its three times meets the dense time at the
crossover density. Each later step runs sparse iff the previous step's density is below the
crossover (the density changes slowly; the first step, on a fresh SAE with about half its latents
active, is dense). Never above MAX_SPARSE_DENSITY, where the pair lists would take more memory
than the dense blocks.

The sparse kernel may find its active pairs with a bf16 screen instead of the fp32 product
(kdtool/sae/screen.py, CPU only; train-sae --bf16-screen). `screens` checks once per SAE that the
screen's error bound holds on a real batch against the fp32 product, then (auto) times both ways
at the same three densities: the screen's cost grows faster with the density (its candidates are
recomputed in fp32), so the two lines cross, and each step screens iff the previous step's density
is below that crossing. A run's density falls as its SAE sparsifies, so a decision made once at
the first sparse step (often near 10%, where the screen loses) would be wrong for the rest of it.
The kernel calibration's sparse times use the screen at the densities where it would run.

Tiny problems (fewer than MIN_ELEMENTS [B, F] elements) take milliseconds either way: auto runs
the dense kernel there without measuring, which also keeps them bit-for-bit reproducible across
fresh runs. Above that, two fresh runs may pick differently and differ by float rounding (use
--kernel dense, or sparse with --bf16-screen on or off, to rule that out); a resumed run continues
with the checkpoint's crossovers, screen check and density (`state`), so resume stays exact. The
calibrations cost about 8 s once per SAE (d=576, F=4608, batch 4096 on the 2-core CPU: some 60 sparse steps); the
benchmarks' warm-up steps run them, so their timings exclude it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from kdtool.sae import screen
from kdtool.sae.kernels import active_pairs, dense_grads, encoder_product, release_workspace, sparse_grads

if TYPE_CHECKING:  # pragma: no cover
    from kdtool.sae.model import SparseAutoencoder

#: Below this many [B, F] elements (batch x latents) auto runs dense and never measures.
MIN_ELEMENTS = 1 << 20
#: Densities (fraction of active pairs) at which the sparse kernel is timed.
CALIBRATION_DENSITIES = (1 / 256, 1 / 64, 1 / 16)
#: auto never runs sparse above this density (about 50 bytes per active pair against 12 per element dense).
MAX_SPARSE_DENSITY = 0.25
#: interleaved timing rounds; each case keeps its fastest
ROUNDS = 3
#: rounds for the screen's crossing: its two lines meet at a shallow angle (about 4-5% here), so 3 rounds
#: put it anywhere from 2.8% to 5.7% on this shared VM
SCREEN_ROUNDS = 5

Timer = Callable[[Callable[[], object]], float]


def wall_timer(device: torch.device) -> Timer:
    """Seconds one call takes, with the device synchronised around it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return timed


def _density_shifts(pre: torch.Tensor) -> dict[float, float]:
    """For each of CALIBRATION_DENSITIES, how much lower b_enc must be for about that fraction of `pre` > 0."""
    pick = torch.randint(pre.numel(), (1 << 16,), generator=torch.Generator().manual_seed(0))  # [65536]
    sample = pre.reshape(-1)[pick.to(pre.device)].cpu()  # a sample of the pre-activations
    return {rho: float(torch.quantile(sample, 1 - rho)) for rho in CALIBRATION_DENSITIES}


def crossover_density(dense_s: float, sparse_s: dict[float, float]) -> float:
    """Where a least-squares line through the sparse times (seconds by density) meets the dense time.

    0.0: sparse is slower even at the lowest density; 1.0: faster at any density.
    """
    intercept, slope = _line(sparse_s)
    if slope <= 0:  # flat within noise: one kernel wins everywhere
        return 1.0 if sum(sparse_s.values()) / len(sparse_s) < dense_s else 0.0
    return min(1.0, max(0.0, (dense_s - intercept) / slope))


def lines_cross(flat: dict[float, float], steep: dict[float, float]) -> float:
    """Density where a least-squares line through `steep`'s times (seconds by density) meets one through `flat`'s.

    Below it `steep` is the faster. 0.0: `steep` is slower at every density; 1.0: faster at every one.
    """
    (a0, a1), (b0, b1) = _line(flat), _line(steep)
    if b1 <= a1:  # not steeper within noise: one wins everywhere
        return 1.0 if b0 + b1 * 0.5 < a0 + a1 * 0.5 else 0.0
    return min(1.0, max(0.0, (a0 - b0) / (b1 - a1)))


def _line(points: dict[float, float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through {x: y} (slope 0 when all x are equal)."""
    xs, ys = list(points), list(points.values())
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    return my - slope * mx, slope


@dataclass
class KernelChoice:
    """auto's state for one SAE: the measured crossover and the latest density (saved in checkpoints)."""

    crossover: float | None = None  # sparse below this density; None = not measured yet
    density: float | None = None  # the latest step's fraction of active pairs: it decides the next step
    device: str | None = None  # where the crossover was measured (another device is measured again)
    measured: dict = field(default_factory=dict)  # the calibration's timings, for reports
    screen_holds: bool | None = None  # the bf16 screen's bound held on a real batch (None: not checked)
    screen_crossover: float | None = None  # the screen runs below this density (None: not measured)

    def decide(self, sae: SparseAutoencoder, x: torch.Tensor, l1: float, **how) -> bool:
        """True: run the sparse kernel on this batch. Calibrates first (`how`: calibrate's options) when it matters."""
        B, F = x.shape[0], sae.d_sae
        if self.density is None or B * F < MIN_ELEMENTS or self.density >= MAX_SPARSE_DENSITY:
            return False
        if self.crossover is None or self.device != x.device.type:
            self.calibrate(sae, x, l1, **how)
        return self.density < self.crossover

    def screens(self, sae: SparseAutoencoder, xc: torch.Tensor, mode: str = "auto") -> bool:
        """True: the sparse kernel finds this batch's active pairs with kdtool/sae/screen.py.

        mode (train-sae --bf16-screen): off never screens; on screens whenever the screen's bound
        held on a real batch against the fp32 product (`screen.check`, once per SAE); auto also asks
        that the previous step's density be below the measured crossing (`calibrate_screen`). Never
        on a GPU, below MIN_ELEMENTS [B, F] elements, or before the first step's density is known.
        """
        if mode == "off" or xc.device.type != "cpu" or self.density is None:
            return False
        if xc.shape[0] * sae.d_sae < MIN_ELEMENTS:
            return False
        if self.screen_holds is None:
            self.screen_holds = self._check_screen(sae, xc)
        if not self.screen_holds:
            return False
        if mode == "on":
            return True
        if self.screen_crossover is None:
            self.calibrate_screen(sae, xc)
        return self.density < self.screen_crossover

    def _check_screen(self, sae: SparseAutoencoder, xc: torch.Tensor) -> bool:
        with torch.no_grad():
            try:
                why = screen.check(sae, xc, encoder_product(sae, xc, None))
            except RuntimeError as e:  # no bf16 matmul on this build
                why = f"bf16 matmul failed ({e})"
        release_workspace()  # the fp32 product's block: the kernel that runs next rebuilds what it uses
        self.measured["screen"] = "its bound holds" if why is None else f"off: {why}"
        return why is None

    def calibrate_screen(self, sae: SparseAutoencoder, xc: torch.Tensor, timer: Timer | None = None) -> None:
        """Time the active pairs from the fp32 product and from the screen at CALIBRATION_DENSITIES (b_enc
        shifted, then restored exactly), SCREEN_ROUNDS interleaved, fastest of each; sets `screen_crossover`."""
        timer = timer or wall_timer(xc.device)
        fp32 = {rho: [] for rho in CALIBRATION_DENSITIES}
        bf16 = {rho: [] for rho in CALIBRATION_DENSITIES}
        with torch.no_grad():
            shifts = _density_shifts(encoder_product(sae, xc, None))
            b_enc = sae.b_enc.detach().clone()
            for _ in range(SCREEN_ROUNDS):
                for rho, shift in shifts.items():
                    sae.b_enc.sub_(shift)
                    fp32[rho].append(timer(lambda: active_pairs(encoder_product(sae, xc, None))))
                    bf16[rho].append(timer(lambda: screen.screened_pairs(sae, xc)))
                    sae.b_enc.copy_(b_enc)
        release_workspace()  # both ways' blocks: the kernel that runs next rebuilds what it uses
        flat = {rho: min(ts) for rho, ts in fp32.items()}
        steep = {rho: min(ts) for rho, ts in bf16.items()}
        self.screen_crossover = lines_cross(flat, steep)
        self.measured["screen_ms"] = {
            f"{rho:.5f}": {"fp32 product": round(1000 * flat[rho], 3), "bf16 screen": round(1000 * steep[rho], 3)}
            for rho in flat
        }
        self.measured["screen"] = f"below {100 * self.screen_crossover:.2g}% active"

    def calibrate(
        self,
        sae: SparseAutoencoder,
        x: torch.Tensor,
        l1: float,
        *,
        matmul_dtype: torch.dtype | None = None,
        timer: Timer | None = None,
        screen_mode: str = "auto",
    ) -> None:
        """Time both kernels on this batch (see the module docstring); sets `crossover` and `measured`."""
        timer = timer or wall_timer(x.device)
        B, F = x.shape[0], sae.d_sae
        with torch.no_grad():
            xc = x - sae.b_pre  # [B, d]
            if matmul_dtype is None:
                self.screens(sae, xc, screen_mode)  # settles the screen's check and crossover first
            can_screen = matmul_dtype is None and screen_mode != "off" and bool(self.screen_holds)
            shifts = _density_shifts(encoder_product(sae, xc, None))
            b_enc = sae.b_enc.detach().clone()
            dense, sparse, actual = [], {rho: [] for rho in shifts}, {}

            def run_dense():
                return dense_grads(sae, x, xc, encoder_product(sae, xc, matmul_dtype), l1, matmul_dtype)

            def run_sparse():
                uses_screen = can_screen and (screen_mode == "on" or rho < (self.screen_crossover or 0.0))
                pairs = (
                    screen.screened_pairs(sae, xc)[0] if uses_screen else active_pairs(encoder_product(sae, xc, None))
                )
                st = sparse_grads(sae, x, xc, pairs, l1)
                actual[rho] = int(st.nnz) / (B * F)
                return st

            for _ in range(ROUNDS):
                dense.append(timer(run_dense))
                for rho, shift in shifts.items():
                    sae.b_enc.sub_(shift)  # as if the SAE were sparser: about rho of the pairs active
                    sparse[rho].append(timer(run_sparse))
                    sae.b_enc.copy_(b_enc)
            for p in sae.parameters():
                p.grad = None
        release_workspace()  # both kernels' [B, F] blocks (GBs at paper scale): the chosen one rebuilds its own
        best = {actual[rho]: min(ts) for rho, ts in sparse.items()}
        self.crossover = crossover_density(min(dense), best)
        self.device = x.device.type
        self.measured = {
            **{k: v for k, v in self.measured.items() if k.startswith("screen")},  # `screens`' own record
            "batch": B,
            "d_in": sae.d_in,
            "d_sae": F,
            "device": self.device,
            "dense_ms": round(1000 * min(dense), 3),
            "sparse_ms": {f"{rho:.5f}": round(1000 * t, 3) for rho, t in best.items()},
            "crossover": round(self.crossover, 5),
        }

    def describe(self) -> str:
        """One line for logs: what was measured and what it decided."""
        if self.crossover is None:
            return "kernel auto: not calibrated (dense: the batch is small, or never sparse enough)"
        m = self.measured
        sparse = ", ".join(f"{100 * float(rho):.2g}% {t:.1f} ms" for rho, t in m.get("sparse_ms", {}).items())
        return (
            f"kernel auto on {m.get('device')} (batch {m.get('batch')}, d {m.get('d_in')}, F {m.get('d_sae')}): "
            f"dense {m.get('dense_ms', float('nan')):.1f} ms, sparse {sparse} (each with its encoder product): "
            f"sparse below {100 * self.crossover:.2g}% active{self._screen_note()}"
        )

    def _screen_note(self) -> str:
        m = self.measured
        return f"; bf16 screen: {m['screen']}" if "screen" in m else ""

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> KernelChoice:
        return cls(**state) if state else cls()
