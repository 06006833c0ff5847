"""The bf16 screen (kdtool/sae/screen.py) finds every active pair, with fp32 values, used only where its bound holds."""

from __future__ import annotations

import json

import pytest
import torch

from kdtool.sae import kernel_choice, screen
from kdtool.sae.kernel_choice import KernelChoice
from kdtool.sae.kernels import active_pairs, encoder_product
from kdtool.sae.model import SparseAutoencoder, forward_backward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_autograd():  # the kernels write into scratch tensors (out=), which autograd refuses
    with torch.no_grad():
        yield


def _bf16_matmul_works() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


needs_bf16 = pytest.mark.skipif(not _bf16_matmul_works(), reason="no bf16 matmul in this torch build")


def planted(d, F, B, density, seed=0, scale=3.0):
    """An SAE whose b_enc puts about `density` of the batch's pairs above zero (the truth: the fp32 product)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * scale + 0.5
    sae = SparseAutoencoder.initialise(d, F, seed=seed + 1, b_pre=x.mean(0))
    with torch.no_grad():
        pre = ((x - sae.b_pre) @ sae.W_enc).flatten()
        sae.b_enc.fill_(-float(pre.kthvalue(int(pre.numel() * (1 - density))).values))
    return sae, x - sae.b_pre


def assert_same_pairs(sae, xc):
    """The screen's pairs are the fp32 product's, except pairs within rounding of zero; z agrees to fp32 rounding."""
    pre = encoder_product(sae, xc, None).clone()
    want_idx, want_z = active_pairs(pre.clone())
    (idx, z), n_cand = screen.screened_pairs(sae, xc)
    assert n_cand >= idx.numel()
    scale = torch.linalg.vector_norm(xc, dim=1)[:, None] * torch.linalg.vector_norm(sae.W_enc, dim=0)[None, :]
    near_zero = (pre.abs() <= 1e-5 * scale).view(-1)
    flipped = torch.cat([want_idx[~torch.isin(want_idx, idx)], idx[~torch.isin(idx, want_idx)]])
    assert bool(near_zero[flipped].all()), f"{flipped.numel()} pairs differ, not all near zero"
    both = torch.isin(idx, want_idx)
    got = dict(zip(idx[both].tolist(), z[both].tolist(), strict=True))
    common = want_idx[torch.isin(want_idx, idx)]
    mine = torch.tensor([got[i] for i in common.tolist()])
    # both are fp32 dot products in different orders: they agree to rounding of the terms' size, N M
    err = (mine - want_z[torch.isin(want_idx, idx)]).abs()
    assert bool((err <= 1e-5 * scale.view(-1)[common] + 1e-6).all()), float(err.max())
    return n_cand, want_idx.numel()


@needs_bf16
@pytest.mark.parametrize(
    "d,F,B,density",
    [(64, 1024, 512, 0.01), (24, 515, 333, 0.02), (100, 777, 301, 0.2), (16, 256, 64, 0.0005)],
)
def test_screened_pairs_are_the_active_pairs_of_the_fp32_product(d, F, B, density):
    sae, xc = planted(d, F, B, density)
    n_cand, n_active = assert_same_pairs(sae, xc)
    assert n_cand <= 2 * n_active + 64  # a screen, not everything


@needs_bf16
def test_the_screen_holds_at_the_edges_zero_rows_huge_biases_and_large_scales():
    sae, xc = planted(32, 640, 256, 0.02, scale=1e3)
    with torch.no_grad():
        xc[5] = 0.0  # a token whose row is zero: only the bias decides
        xc[6] *= 1e-6  # and one whose row is tiny next to the biases
        sae.b_enc[3] = 1e4  # always on
        sae.b_enc[4] = -1e4  # never on
        sae.b_enc[7] = 0.0
    assert_same_pairs(sae, xc)
    pre = encoder_product(sae, xc, None)
    assert screen.check(sae, xc, pre) is None


@needs_bf16
def test_check_refuses_a_backend_that_breaks_the_bound(monkeypatch):
    """A bf16 product that summed in bf16 (or anything off by more than the bound) is caught before use."""
    sae, xc = planted(64, 2048, 512, 0.01)
    true_product = screen.screen_product

    def coarse(*args, **kw):  # the right product with an error of 0.02 (four times the margin) on every pair
        q = true_product(*args, **kw)
        return (q.float() - 0.02).to(torch.bfloat16)

    monkeypatch.setattr(screen, "screen_product", coarse)
    why = screen.check(sae, xc, encoder_product(sae, xc, None))
    assert why is not None and "bound" in why
    choice = KernelChoice(density=0.01)
    assert choice.screens(sae, xc) is False and choice.measured["screen"].startswith("off: ")


@needs_bf16
def test_sparse_step_with_the_screen_gives_the_dense_gradients():
    """On data whose products are exact in fp32 (small integers and eighths), no pair lies within rounding of
    zero, so the screened step's active set is exactly the dense one's and the gradients agree to rounding."""
    g = torch.Generator().manual_seed(3)
    d, F, B = 64, 2048, 1024  # B * F = 2^21: large enough for the screen
    x = torch.randint(-8, 9, (B, d), generator=g).float()
    sae = SparseAutoencoder.initialise(d, F, seed=4)
    sae.W_enc.copy_(torch.randint(-8, 9, (d, F), generator=g).float() / 8)
    sae.b_pre.zero_()
    sae.b_enc.fill_(-40.5)  # pre is a multiple of 1/8 plus a half: never zero; about 2% active
    grads = {}
    for kernel, screened in (("dense", None), ("sparse", True), ("sparse", False)):
        sae.kernel_choice = KernelChoice(screen_holds=screened, screen_crossover=1.0, density=0.02)
        st = forward_backward(sae, x, 0.01, kernel=kernel)
        assert st.screened == bool(screened)
        grads[kernel, screened] = ({n: p.grad.clone() for n, p in sae.named_parameters()}, st)
    dense, sd = grads["dense", None]
    assert 0.005 < int(sd.nnz) / (B * F) < 0.05
    for key in (("sparse", True), ("sparse", False)):
        g, st = grads[key]
        assert st.sparse and torch.equal(st.fires, sd.fires) and float(st.l1_sum) == float(sd.l1_sum)
        for name in dense:
            torch.testing.assert_close(g[name], dense[name], rtol=1e-4, atol=1e-5 * float(dense[name].abs().max()))


def test_the_decision_is_saved_with_the_kernel_choice_and_made_once():
    sae, xc = planted(16, 256, 64, 0.01)  # below MIN_ELEMENTS: off without checking
    choice = KernelChoice(density=0.01)
    assert choice.screens(sae, xc) is False and choice.screen_holds is None and "screen" not in choice.measured
    sae, xc = planted(64, 4096, 512, 0.01)
    saved = KernelChoice(density=0.01, screen_holds=True, screen_crossover=0.05)
    again = KernelChoice.from_state(saved.state())  # what a resumed run loads: no new measurement
    assert again.screens(sae, xc) is True and again.measured == {}
    again.density = 0.08  # the SAE got denser: above the screen's crossover
    assert again.screens(sae, xc) is False
    assert KernelChoice.from_state({"crossover": 0.1}).screen_holds is None  # checkpoints from before the screen
    assert KernelChoice(density=None).screens(sae, xc) is False  # the first step: no density yet


@needs_bf16
def test_calibration_finds_where_the_screen_stops_paying():
    """Fake times: the fp32 path 100 ms + 100 ms per unit density, the screen 60 ms + 1000 ms per unit density:
    the lines cross at 4/90 (about 4.4%); the screen runs below it."""
    sae, xc = planted(64, 4096, 512, 0.01)
    choice = KernelChoice(density=0.01)

    def fake_timer(fn):
        out = fn()
        (idx, _), *rest = out if isinstance(out[0], tuple) else (out,)
        rho = idx.numel() / (512 * 4096)
        return 0.060 + 1.0 * rho if rest else 0.100 + 0.1 * rho

    choice.screen_holds = True
    choice.calibrate_screen(sae, xc, timer=fake_timer)
    assert choice.screen_crossover == pytest.approx(0.04 / 0.9, rel=0.05)
    assert choice.screens(sae, xc) is True
    choice.density = 0.06
    assert choice.screens(sae, xc) is False
    assert choice.measured["screen"] == f"below {100 * choice.screen_crossover:.2g}% active"


@needs_bf16
def test_modes_off_never_screens_on_screens_without_timing():
    sae, xc = planted(64, 4096, 512, 0.01)
    assert KernelChoice(density=0.01).screens(sae, xc, "off") is False
    choice = KernelChoice(density=0.5)  # dense enough that auto would time it; on does not
    assert choice.screens(sae, xc, "on") is True and "screen_ms" not in choice.measured
    assert choice.measured["screen"] == "its bound holds"


@needs_bf16
def test_measured_decision_on_a_real_size_records_its_timings():
    sae, xc = planted(64, 4096, 512, 0.01)  # 2^21 pairs
    choice = KernelChoice(density=0.01)
    on = choice.screens(sae, xc)
    assert choice.screen_holds is True and 0.0 <= choice.screen_crossover <= 1.0
    assert on == (0.01 < choice.screen_crossover)
    assert set(choice.measured["screen_ms"]) == {f"{rho:.5f}" for rho in kernel_choice.CALIBRATION_DENSITIES}
    x = xc + sae.b_pre.detach()
    b_enc = sae.b_enc.clone()
    choice.calibrate(sae, x, 0.01)  # keeps the screen's record; each kernel timed with its encoder
    assert torch.equal(sae.b_enc, b_enc)  # the calibrations' density shifts are undone exactly
    assert "bf16 screen: below" in choice.describe()


def test_train_sae_takes_bf16_screen_and_a_resume_may_change_it(cli, tmp_path):
    from synthetic_acts import write_random

    write_random(tmp_path / "acts", d=16, n=4096)
    base = ["train-sae", "--acts", tmp_path / "acts", "--layer", "3", "--expansion", "2", "--batch-tokens", "512"]
    r = cli(*base, "--tokens", "1024", "--bf16-screen", "off", "--checkpoint-every", "512", "-o", tmp_path / "saes")
    assert r.exit_code == 0, r.output
    assert '"bf16_screen": "off"' in json.dumps(json.loads((tmp_path / "saes" / "layer3" / "cfg.json").read_text()))
    r = cli(*base, "--tokens", "2048", "--bf16-screen", "on", "--resume", "-o", tmp_path / "saes")
    assert r.exit_code == 0, r.output  # like --kernel, the screen may change on --resume
    r = cli(*base, "--bf16-screen", "maybe", "-o", tmp_path / "other")
    assert r.exit_code == 2 and "--bf16-screen" in r.output
