"""The SAE step's two kernels agree, and `--kernel auto` runs the one measured to be faster."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from kdtool.sae import kernel_choice, kernels
from kdtool.sae.kernel_choice import KernelChoice, crossover_density
from kdtool.sae.model import SparseAutoencoder, forward_backward

pytestmark = pytest.mark.usefixtures("one_thread")


def sae_at_density(d: int, F: int, x: torch.Tensor, density: float, seed: int = 1) -> SparseAutoencoder:
    """An SAE whose b_enc is shifted so that about `density` of the batch's (token, latent) pairs are active."""
    sae = SparseAutoencoder.initialise(d, F, seed=seed, b_pre=x.mean(0))
    with torch.no_grad():
        pre = ((x - sae.b_pre) @ sae.W_enc).flatten()
        sae.b_enc.fill_(-float(pre.kthvalue(int(pre.numel() * (1 - density))).values))
    return sae


def grads(sae, x, kernel, l1=0.01):
    st = forward_backward(sae, x, l1, kernel=kernel)
    return {n: p.grad.clone() for n, p in sae.named_parameters()}, st


@pytest.mark.parametrize(
    "d,F,B,density",
    [
        (24, 515, 333, 0.02),  # odd sizes: the byte mask is padded to whole words; many tokens fire nothing
        (16, 256, 512, 0.0),  # nothing active at all
        (32, 1024, 700, 0.2),
    ],
)
def test_sparse_kernel_equals_dense_within_float_rounding(d, F, B, density):
    """Stated tolerance: rtol 1e-4, atol 1e-6 + 1e-5 of the largest entry on every gradient; fire counts and the L1
    sum exactly equal."""
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(B)) * 2 + 0.3
    sae = sae_at_density(d, F, x, density) if density else SparseAutoencoder.initialise(d, F, seed=1)
    if not density:
        with torch.no_grad():
            sae.b_enc.fill_(-1e4)
    gd, sd = grads(sae, x, "dense")
    gs, ss = grads(sae, x, "sparse")
    assert ss.sparse and not sd.sparse
    assert torch.equal(sd.fires, ss.fires) and int(ss.nnz) == pytest.approx(density * B * F, rel=0.05, abs=2)
    for name in gd:  # b_pre's gradient is a difference of two sums: its rounding scales with the largest entry
        torch.testing.assert_close(gs[name], gd[name], rtol=1e-4, atol=1e-6 + 1e-5 * float(gd[name].abs().max()))
    for key in ("sse", "sst", "l1_sum"):
        torch.testing.assert_close(getattr(ss, key), getattr(sd, key), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_active_pairs_are_exactly_the_positive_entries_in_order(n):
    """The two-level mask scan finds every entry > 0 once, ascending; 0, -0.0 and NaN are not active."""
    torch.manual_seed(n)
    flat = torch.randn(n).where(torch.rand(n) < 0.3, torch.tensor(0.0))
    flat[torch.rand(n) < 0.05] = -0.0
    flat[torch.rand(n) < 0.02] = float("nan")
    kernels._positive(torch.ones(3 * n + 5))  # a larger mask left in the workspace: the smaller one reuses its start
    idx, vals = kernels.active_pairs(flat.view(1, n))
    want = (flat > 0).nonzero().squeeze(1)
    assert torch.equal(idx, want) and torch.equal(vals, flat[want])


def test_cpu_transpose_in_tiles_is_the_transpose():
    t = torch.randn(2 * kernels.TRANSPOSE_TILE + 3, 5)
    out = kernels.transposed(t)
    assert out.is_contiguous() and torch.equal(out, t.t())


def test_crossover_is_where_the_sparse_line_meets_the_dense_time():
    # sparse = 10 ms + 200 ms per unit density; dense 30 ms -> crossover at 0.1
    assert crossover_density(0.030, {0.01: 0.012, 0.02: 0.014, 0.05: 0.020}) == pytest.approx(0.1)
    assert crossover_density(0.005, {0.01: 0.012, 0.05: 0.020}) == 0.0  # sparse never wins
    assert crossover_density(9.0, {0.01: 0.012, 0.05: 0.020}) == 1.0  # sparse always wins
    assert crossover_density(0.030, {0.01: 0.020, 0.05: 0.020}) == 1.0  # flat within noise, below dense


def test_auto_decides_from_the_previous_density_and_the_calibration():
    d, F, B = 16, 1024, 1024  # B * F = MIN_ELEMENTS: large enough to be measured
    x = torch.randn(B, d)
    sae = sae_at_density(d, F, x, 0.01)
    choice = sae.kernel_choice
    calls = []

    def fake_timer(fn):  # dense "costs" 30 ms; sparse 10 ms + 200 ms per unit density -> crossover 0.1
        st = fn()  # the kernel's StepStats
        calls.append(st.sparse)
        return 0.010 + 0.2 * int(st.nnz) / (B * F) if st.sparse else 0.030

    st = forward_backward(sae, x, 0.01)  # first step: density unknown -> dense, no calibration
    assert not st.sparse and choice.crossover is None and choice.density == pytest.approx(0.01, rel=0.05)
    assert choice.decide(sae, x, 0.01, timer=fake_timer) is True  # 1% < the measured crossover
    assert choice.crossover == pytest.approx(0.1, rel=1e-6) and choice.device == "cpu"
    assert sorted(calls) == [False] * kernel_choice.ROUNDS + [True] * kernel_choice.ROUNDS * 3
    assert "sparse below 10% active" in choice.describe()
    choice.density = 0.15
    assert choice.decide(sae, x, 0.01) is False  # above the crossover; no new calibration
    choice.density = 0.3
    assert choice.decide(sae, x, 0.01) is False  # above MAX_SPARSE_DENSITY
    # the state survives a checkpoint (JSON) and decides the same way
    again = KernelChoice.from_state(choice.state())
    again.density = 0.05
    assert again.decide(sae, x, 0.01) is True and again.crossover == choice.crossover
    # tiny problems: dense without measuring
    small = SparseAutoencoder.initialise(8, 64, seed=0)
    small.kernel_choice.density = 0.01
    assert small.kernel_choice.decide(small, torch.randn(128, 8), 0.01) is False
    assert small.kernel_choice.crossover is None


def _median_step(sae, x, kernel, n=5):
    forward_backward(sae, x, 0.01, kernel=kernel)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        forward_backward(sae, x, 0.01, kernel=kernel)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("density", [0.005, 0.2])
def test_auto_picks_the_faster_kernel_on_measured_data(density):
    """Real timings on this machine: where one kernel is clearly (1.5x) faster, auto runs that one."""
    d, F, B = 64, 4096, 1024
    x = torch.randn(B, d) * 2
    sae = sae_at_density(d, F, x, density)
    dense, sparse = _median_step(sae, x, "dense"), _median_step(sae, x, "sparse")
    forward_backward(sae, x, 0.01)  # sets the density
    st = forward_backward(sae, x, 0.01)  # calibrates, then decides
    assert sae.kernel_choice.crossover is not None, sae.kernel_choice.describe()
    if max(dense, sparse) < 1.5 * min(dense, sparse):
        pytest.skip(f"no clear winner at {density:.1%} here (dense {dense * 1e3:.1f} ms, sparse {sparse * 1e3:.1f} ms)")
    assert st.sparse == (sparse < dense), (dense, sparse, sae.kernel_choice.describe())


@pytest.mark.gpu
def test_kernels_agree_on_cuda_and_auto_measures_there():
    """On a GPU: sparse == dense within the stated tolerance, and auto calibrates on CUDA (its decision is printed)."""
    d, F, B = 256, 8192, 4096
    x = (torch.randn(B, d) * 2).cuda()
    sae = sae_at_density(d, F, x.cpu(), 0.01).cuda()
    sae.kernel_choice = KernelChoice()
    gd, sd = grads(sae, x, "dense")
    gs, ss = grads(sae, x, "sparse")
    assert torch.equal(sd.fires, ss.fires)
    for name in gd:
        torch.testing.assert_close(gs[name], gd[name], rtol=1e-4, atol=1e-5)
    forward_backward(sae, x, 0.01)  # density
    forward_backward(sae, x, 0.01)  # calibration on CUDA, then the decision
    assert sae.kernel_choice.device == "cuda" and sae.kernel_choice.crossover is not None
    print(sae.kernel_choice.describe())


@pytest.mark.parametrize("fused", [True, False])
def test_an_optimizer_step_after_either_kernel_moves_the_sae_alike(fused):
    """The gradients' layout matters, not only their values: fused Adam reads a grad with its parameter's
    strides, and a transposed W_enc grad from the sparse kernel once trained every SAE on scrambled gradients
    (the gradient test above could not see it)."""
    x = torch.randn(256, 24) * 2 + 0.3
    after = {}
    for kernel in ("dense", "sparse"):
        sae = sae_at_density(24, 300, x, 0.05)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=fused)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            forward_backward(sae, x, 0.01, kernel=kernel)
            opt.step()
        after[kernel] = {n: p.detach().clone() for n, p in sae.named_parameters()}
    for name, value in after["dense"].items():
        torch.testing.assert_close(after["sparse"][name], value, rtol=1e-4, atol=1e-5)
