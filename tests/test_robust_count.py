"""The robust feature count (kdtool/sae/robust.py) on planted activations, where the true K is known.

Default suite: the estimator's parts by hand, and SAEs built the way wide trained SAEs look (split
copies, near-dead latents) at widths 1.25x, 4x and 16x K. Slow (`scripts/test --slow`, or
`.venv/bin/python -m pytest -m slow tests/test_robust_count.py`, about 9 min on 2 shared cores):
SAEs trained by train-sae on planted activations at 1.25x-16x K, for two K and both firing-rate profiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_acts import oracle_sae

from kdtool.sae import planted
from kdtool.sae.accumulate import collect
from kdtool.sae.robust import BINS, GroupStats, RobustConfig, _above, dedup_groups

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (1.25, 2, 4, 8, 16)


def test_dedup_groups_are_connected_components_of_similar_decoder_rows():
    a, b, c = torch.eye(3)
    close = torch.tensor([0.99, 0.141, 0.0])  # cosine 0.99 with a
    chain = torch.tensor([0.95, 0.312, 0.0])  # 0.95 with a, 0.99 with `close`: one group by single linkage
    w = torch.stack([a, b, close, c, torch.zeros(3), chain, -a])
    groups = dedup_groups(w, 0.9, block=2)
    assert groups.tolist() == [0, 1, 0, 2, 3, 0, 4]  # zero row and the opposite direction stay alone
    assert dedup_groups(w, 0.999).tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_group_stats_by_hand():
    # three latents, the first two one feature; 10 tokens
    z = torch.zeros(10, 3)
    z[:4, 0] = 1.0  # feature A: 1.0 on tokens 0-3 ...
    z[:4, 1] = 1.0  # ... split over two latents: h_A = 2 there
    z[4:6, 0] = 0.1  # weak interference firings of A: h_A = 0.1 (below 0.2 x its size)
    z[6, 2] = 0.2  # feature B: one token
    gs = GroupStats(np.array([0, 0, 1]), "cpu")
    gs.update(z[:5])
    gs.update(z[5:])
    cols, s = gs.result(RobustConfig(mass=0.99, theta=0.2))
    e_a, e_b = (4 * 4 + 2 * 0.01) / 10, 0.04 / 10  # E[h^2]: A carries 99.75% of the importance
    assert cols["group"].tolist() == [0, 0, 1] and cols["group_importance"] == pytest.approx([e_a, e_a, e_b])
    assert s["F_robust"] == 1 and cols["counted"].tolist() == [True, True, False]
    assert s["L0_robust"] == pytest.approx(0.4)  # A active on 4 of 10 tokens; its 0.1 firings do not count
    assert s["alpha_robust"] == pytest.approx(0.6) and s["duplicates"] == 1 and s["groups"] == 2
    cols, s = gs.result(RobustConfig(mass=1.0, theta=0.0))
    assert s["F_robust"] == 2 and s["L0_robust"] == pytest.approx(0.7)  # theta 0: every firing, as the paper's L0


def test_threshold_count_from_the_histogram_is_the_exact_count():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(5000, 1, generator=g).exp_() - 1  # [0, 1.72], continuous
    gs = GroupStats(np.array([0]), "cpu")
    gs.update(h)
    hist = gs.hist.view(1, BINS).numpy()
    for t in (0.05, 0.3, 1.0):
        exact = int((h > t).sum())
        assert _above(hist, np.array([t]))[0] == pytest.approx(exact, rel=0.02)
    assert _above(hist, np.array([0.0]))[0] == int((h > 0).sum())


def _measure(spec, sae, tokens):
    x = planted.batches(spec, tokens, batch=10_000)
    (_, acc), = collect([(1, sae)], ({1: b} for b in x), robust=RobustConfig())  # fmt: skip
    return acc.result(1)[1]


@pytest.mark.parametrize("profile", ["uniform", "zipf"])
def test_robust_count_of_split_and_near_dead_latents_stays_at_k(profile):
    """Split copies and near-dead latents (tests/synthetic_acts.oracle_sae) at 1.25x, 4x and 16x K: the robust
    numbers do not move, the paper's F and d* grow with the width."""
    k = 100
    spec = planted.PlantedSpec(d=64, k=k, l0=3.0, profile=profile)
    truth = spec.truth()
    found = {m: _measure(spec, oracle_sae(spec, int(m * k)), 10_000) for m in (1.25, 4, 16)}
    for m, s in found.items():
        assert abs(s["F_robust"] - k) <= 0.15 * k, (m, s["F_robust"])
        assert s["d_star_robust"] == pytest.approx(truth["d_star"], rel=0.30), (m, s)
        assert s["d_star_robust"] == pytest.approx(found[1.25]["d_star_robust"], rel=0.02)
    assert found[16]["F"] > 4 * found[1.25]["F"] and found[16]["d_star"] > 4 * found[1.25]["d_star"]


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["uniform", "zipf"])
@pytest.mark.parametrize("k", [100, 200])
def test_robust_count_of_trained_saes_stays_at_k(tmp_path, k, profile):
    """train-sae (lambda 0.3, lr 1e-2, 5 passes over 80K planted tokens) at every width: robust F within 15% of K,
    d*_robust within 30% of K / g(alpha), the paper's F growing."""
    from kdtool.sae.config import TrainConfig
    from kdtool.sae.layouts import load_sae
    from kdtool.sae.sources import CacheSource
    from kdtool.sae.training import train

    spec = planted.PlantedSpec(d=64, k=k, l0=3.0, profile=profile)
    truth = spec.truth()
    planted.write_cache(spec, tmp_path / "acts", 80_000, layer=1)
    found = {}
    for m in WIDTHS:
        cfg = TrainConfig(layers=[1], d_in=64, d_sae=int(m * k), l1=0.3, lr=1e-2, batch_tokens=1024,
                          tokens=400_000, seed=0)  # fmt: skip
        train(cfg, CacheSource(tmp_path / "acts"), tmp_path / f"saes{m}", force=True)
        found[m] = _measure(spec, load_sae(tmp_path / f"saes{m}" / "layer1"), 80_000)
    for m, s in found.items():
        assert abs(s["F_robust"] - k) <= 0.15 * k, (m, s["F_robust"])
        assert s["d_star_robust"] == pytest.approx(truth["d_star"], rel=0.30), (m, s)
    assert found[16]["F"] > 2 * found[1.25]["F"]


def _above_one_group_at_a_time(hist, thresholds):
    """The per-group loop `_above` replaced (a Python loop over every group: slow at 131K latents)."""
    from kdtool.sae.robust import BIN_OFFSET, BIN_WIDTH

    with np.errstate(divide="ignore"):
        pos = np.log2(np.maximum(thresholds, 0)) / BIN_WIDTH + BIN_OFFSET
    k = np.clip(np.floor(pos), -1, BINS).astype(np.int64)
    above_bins = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros(hist.shape[0])
    for i, (ki, pi) in enumerate(zip(k, pos, strict=True)):
        if ki < 0:
            out[i] = above_bins[i, 0]
        elif ki < BINS:
            higher = above_bins[i, ki + 1] if ki + 1 < BINS else 0
            out[i] = higher + hist[i, ki] * (1.0 - (pi - ki))
    return out


def test_vectorised_threshold_count_matches_the_per_group_loop():
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 50, size=(300, BINS)).astype(float)
    hist[::7] = 0  # empty groups
    # thresholds below every bin (0, tiny), inside the bins, in the last bin and above every bin
    thresholds = np.concatenate([[0.0, 1e-30, 1e30, 2.0**31.9], 10.0 ** rng.uniform(-6, 4, size=296)])
    np.testing.assert_array_equal(_above(hist, thresholds), _above_one_group_at_a_time(hist, thresholds))
