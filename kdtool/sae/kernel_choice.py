"""`--kernel auto`: run whichever of the two step kernels is faster for this SAE on this machine, by measurement.

Why measure: the crossover density below which the sparse kernel wins depends on the machine,
the shapes and the device. A constant measured on one machine was wrong on the next (the 2-core
CPU's old 5% threshold sent auto to the dense kernel at 10% density, where sparse was 1.4x
faster), and a GPU's ratio of matmul speed to gather speed is another story again.

How: once per SAE, on a real batch at the first step whose density could make sparse worth it,
`calibrate` times the part of the step that differs between the kernels (everything after the
shared encoder product) - the dense kernel once, the sparse kernel at three densities made by
shifting the encoder bias (1/256, 1/64, 1/16 of the pairs active) - three interleaved rounds,
keeping each case's fastest time (load from other processes only ever adds time). The dense
kernel's cost does not depend on the density; the sparse kernel's grows linearly with the number
of active pairs, so a least-squares line through its three times meets the dense time at the
crossover density. Each later step runs sparse iff the previous step's density is below the
crossover (the density changes slowly; the first step, on a fresh SAE with about half its latents
active, is dense). Never above MAX_SPARSE_DENSITY, where the pair lists would take more memory
than the dense blocks.

The sparse kernel may find its active pairs with a bf16 screen instead of the fp32 product
(kdtool/sae/screen.py, CPU only): `screens` decides that once per SAE, before the calibration,
by checking the screen's error bound on the batch and timing both ways. When it screens, the
calibration times each kernel with its own encoder product (the fp32 one for dense), since they
no longer share it.

Tiny problems (fewer than MIN_ELEMENTS [B, F] elements) take milliseconds either way: auto runs
the dense kernel there without measuring, which also keeps them bit-for-bit reproducible across
fresh runs. Above that, two fresh runs may pick differently and differ by float rounding (use
--kernel dense or sparse to rule that out); a resumed run continues with the checkpoint's
crossover and density (`state`), so resume stays exact. The calibration costs about eight steps'
worth of work once per run: the first step's timing in the benchmarks excludes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from kdtool.sae import screen
from kdtool.sae.kernels import active_pairs, dense_grads, encoder_product, sparse_grads

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


def crossover_density(dense_s: float, sparse_s: dict[float, float]) -> float:
    """Where a least-squares line through the sparse times (seconds by density) meets the dense time.

    0.0: sparse is slower even at the lowest density; 1.0: faster at any density.
    """
    xs, ys = list(sparse_s), list(sparse_s.values())
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    if slope <= 0:  # flat within noise: one kernel wins everywhere
        return 1.0 if my < dense_s else 0.0
    return min(1.0, max(0.0, (dense_s - intercept) / slope))


@dataclass
class KernelChoice:
    """auto's state for one SAE: the measured crossover and the latest density (saved in checkpoints)."""

    crossover: float | None = None  # sparse below this density; None = not measured yet
    density: float | None = None  # the latest step's fraction of active pairs: it decides the next step
    device: str | None = None  # where the crossover was measured (another device is measured again)
    measured: dict = field(default_factory=dict)  # the calibration's timings, for reports
    screen: bool | None = None  # sparse kernel: active pairs from the bf16 screen (True) or the fp32 product

    def decide(self, sae: SparseAutoencoder, x: torch.Tensor, l1: float, **how) -> bool:
        """True: run the sparse kernel on this batch. Calibrates first (`how`: calibrate's options) when it matters."""
        B, F = x.shape[0], sae.d_sae
        if self.density is None or B * F < MIN_ELEMENTS or self.density >= MAX_SPARSE_DENSITY:
            return False
        if self.crossover is None or self.device != x.device.type:
            self.calibrate(sae, x, l1, **how)
        return self.density < self.crossover

    def screens(self, sae: SparseAutoencoder, xc: torch.Tensor) -> bool:
        """True: the sparse kernel finds its active pairs with kdtool/sae/screen.py. Decided once (saved).

        Only on a CPU, for problems of MIN_ELEMENTS or more, when the screen's bound holds on this
        batch against the fp32 product (`screen.check`) and the screen is faster than the fp32
        product and its scan (fastest of ROUNDS interleaved timings of each).
        """
        if xc.device.type != "cpu":
            return False
        if self.screen is None:
            self.screen = self._measure_screen(sae, xc)
        return self.screen

    def _measure_screen(self, sae: SparseAutoencoder, xc: torch.Tensor) -> bool:
        if xc.shape[0] * sae.d_sae < MIN_ELEMENTS:
            return False
        with torch.no_grad():
            try:
                why = screen.check(sae, xc, encoder_product(sae, xc, None))
            except RuntimeError as e:  # no bf16 matmul on this build
                why = f"bf16 matmul failed ({e})"
            if why is not None:
                self.measured["screen"] = f"off: {why}"
                return False
            timer = wall_timer(xc.device)
            fp32, bf16 = [], []
            for _ in range(ROUNDS):
                fp32.append(timer(lambda: active_pairs(encoder_product(sae, xc, None))))
                bf16.append(timer(lambda: screen.screened_pairs(sae, xc)))
        self.measured["screen_ms"] = {
            "fp32 product": round(1000 * min(fp32), 3),
            "bf16 screen": round(1000 * min(bf16), 3),
        }
        on = min(bf16) < min(fp32)
        self.measured["screen"] = "on" if on else "off: slower than the fp32 product here"
        return on

    def calibrate(
        self,
        sae: SparseAutoencoder,
        x: torch.Tensor,
        l1: float,
        *,
        matmul_dtype: torch.dtype | None = None,
        timer: Timer | None = None,
    ) -> None:
        """Time both kernels on this batch (see the module docstring); sets `crossover` and `measured`."""
        timer = timer or wall_timer(x.device)
        B, F = x.shape[0], sae.d_sae
        with torch.no_grad():
            xc = x - sae.b_pre  # [B, d]
            # screened: the sparse kernel skips the fp32 product, so both kernels are timed with their encoders
            screened = matmul_dtype is None and self.screens(sae, xc)
            pre = encoder_product(sae, xc, None).clone()  # [B, F] = xc W_enc + b_enc
            pick = torch.randint(pre.numel(), (1 << 16,), generator=torch.Generator().manual_seed(0))  # [65536]
            sample = pre.view(-1)[pick.to(pre.device)].cpu()  # a sample of the pre-activations
            shifts = {rho: float(torch.quantile(sample, 1 - rho)) for rho in CALIBRATION_DENSITIES}
            work = torch.empty_like(pre)
            b_enc = sae.b_enc.detach().clone()
            dense, sparse, actual = [], {rho: [] for rho in shifts}, {}

            def run_dense():
                if screened:
                    return dense_grads(sae, x, xc, encoder_product(sae, xc, matmul_dtype), l1, matmul_dtype)
                return dense_grads(sae, x, xc, work, l1, matmul_dtype)

            def run_sparse():
                pairs = screen.screened_pairs(sae, xc)[0] if screened else active_pairs(work)
                st = sparse_grads(sae, x, xc, pairs, l1)
                actual[rho] = int(st.nnz) / (B * F)
                return st

            for _ in range(ROUNDS):
                work.copy_(pre)
                dense.append(timer(run_dense))
                for rho, shift in shifts.items():
                    torch.sub(pre, shift, out=work)  # as if b_enc were lower by `shift`
                    if screened:  # the screen computes its own product: lower b_enc itself, then restore it
                        sae.b_enc.sub_(shift)
                    sparse[rho].append(timer(run_sparse))
                    sae.b_enc.copy_(b_enc)
            for p in sae.parameters():
                p.grad = None
        best = {actual[rho]: min(ts) for rho, ts in sparse.items()}
        self.crossover = crossover_density(min(dense), best)
        self.device = x.device.type
        self.measured = {
            **{k: v for k, v in self.measured.items() if k.startswith("screen")},  # `screens`' own record
            "timed": "each with its encoder product" if screened else "after the shared encoder product",
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
            f"dense {m.get('dense_ms', float('nan')):.1f} ms, sparse {sparse} "
            f"({m.get('timed', 'after the shared encoder product')}): "
            f"sparse below {100 * self.crossover:.2g}% active{self._screen_note()}"
        )

    def _screen_note(self) -> str:
        m = self.measured
        if "screen" not in m:
            return ""
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in m.get("screen_ms", {}).items())
        return f"; bf16 screen {m['screen']}" + (f" ({times})" if times else "")

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> KernelChoice:
        return cls(**state) if state else cls()
