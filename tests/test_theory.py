"""The minimum-width theorem's numbers (paper Tables 1, 2, 7) and its invariants (hypothesis)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdtool.errors import BadInput
from kdtool.formats import write_parquet
from kdtool.theory import importance as imp
from kdtool.theory import theorem as theory

# Paper Table 2: d_S -> (F_S, dropped) for F = 28,665 and g = 26.922.
TABLE2 = {128: (3446, 25219), 256: (6892, 21773), 512: (13784, 14881), 768: (20676, 7989), 1024: (27568, 1097)}


@pytest.mark.parametrize(
    "alpha,printed,digits",
    [(0.50, 2.9, 1), (0.80, 3.1, 1), (0.90, 4.3, 1), (0.95, 6.7, 1), (0.99, 21.7, 1), (0.999, 145, 0)],
)
def test_table7_values(alpha, printed, digits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", theory.NonMonotoneCapacity)
        assert round(theory.g(alpha), digits) == printed


def test_table7_row_0992_is_the_measured_alpha_not_0992():
    # Eq. 1 at exactly 0.992 gives 25.9; the printed 27.0 is g at the measured alpha ~ 0.9924
    # (layer 8: 1 - 234.9/31006 = 0.99242 -> 27.03; layer 12's 0.99238 gives 26.92).
    assert round(theory.g(0.992), 1) == 25.9
    assert round(theory.g(imp.alpha_from_l0(31006, 234.9)), 1) == 27.0


def test_table1_layer12():
    a = imp.alpha_from_l0(28665, 218.3)
    assert round(a, 5) == 0.99238
    assert round(theory.g(a), 2) == 26.92
    assert round(theory.critical_width(28665, a)) == 1065


@pytest.mark.parametrize("F,l0,g_paper,d_star", [(31006, 234.9, 27.04, 1147), (29169, 249.0, 24.60, 1186)])
def test_table1_other_layers(F, l0, g_paper, d_star):
    # The paper's L0 is printed to 0.1, so g agrees to ~0.01 and d* to the integer.
    a = imp.alpha_from_l0(F, l0)
    assert abs(theory.g(a) - g_paper) < 0.02
    assert round(theory.critical_width(F, a)) == d_star


def test_table2_features_kept_and_dropped_exactly():
    model = theory.FloorModel.from_weights(theory.zipf_weights(28665), 0.99238, g_value=26.922)
    widths = np.array(sorted(TABLE2))
    kept = model.kept(widths)
    assert kept.tolist() == [TABLE2[w][0] for w in widths]
    assert (28665 - kept).tolist() == [TABLE2[w][1] for w in widths]


def test_table2_needs_the_printed_g():
    # With g(1 - 218.3/28665) = 26.9213 instead of the rounded 26.922, F_S(128) is 3445, not 3446.
    g_exact = theory.g(imp.alpha_from_l0(28665, 218.3))
    assert theory.features_kept(128, g_exact, 28665) == 3445


def test_g_vectorised_and_naive():
    a = np.array([0.9, 0.99, 0.999])
    assert np.allclose(theory.g(a), [4.342945, 21.714724, 144.764827], rtol=1e-6)
    assert np.all(theory.g(a, "naive") == 1.0)


def test_warning_below_one_minus_one_over_e():
    with pytest.warns(theory.NonMonotoneCapacity):
        theory.g(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theory.g(0.64)  # just above 1 - 1/e = 0.6321: no warning


def test_g_at_zero_is_infinite_not_one():
    with pytest.warns(theory.NonMonotoneCapacity):
        assert math.isinf(theory.g(0.0))
    with pytest.raises(BadInput, match="convention"):
        imp.capacity_g(0.0)
    assert imp.capacity_g(0.0, "naive") == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_error_outside_unit_interval(bad):
    with pytest.raises(BadInput):
        theory.g(bad)


weights_st = st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=200)
alpha_st = st.floats(0.64, 0.9999)


@settings(max_examples=60, deadline=None)
@given(weights=weights_st, alpha=alpha_st, widths=st.lists(st.integers(1, 500), min_size=1, max_size=20))
def test_floor_non_increasing_and_kept_at_most_F(weights, alpha, widths):
    model = theory.FloorModel.from_weights(weights, alpha)
    ws = np.array(sorted(widths))
    floors = model.floor(ws)
    kept = model.kept(ws)
    assert np.all(np.diff(floors) <= 1e-12 * max(1.0, floors.max()))
    assert np.all(kept <= model.n_features) and np.all(kept >= 0)
    assert np.all(kept == np.minimum(np.floor(ws * model.g + 1e-9 * np.maximum(1, ws * model.g)), model.n_features))
    # Eq. 2 directly: the mass beyond rank F_S of the sorted weights
    w = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    for d, f, k in zip(ws, floors, kept, strict=True):
        assert f == pytest.approx(w[k:].sum(), rel=1e-9, abs=1e-9), d


@settings(max_examples=60, deadline=None)
@given(weights=weights_st, alpha=alpha_st, frac=st.floats(0.0, 1.0))
def test_min_width_matches_brute_force(weights, alpha, frac):
    model = theory.FloorModel.from_weights(weights, alpha)
    target = frac * float(np.sum(weights))
    found = model.min_width(target)
    top = math.ceil(model.n_features / model.g) + 2
    brute = next(d for d in range(1, top + 1) if model.floor(d) <= target)
    assert found == brute


@settings(max_examples=40, deadline=None)
@given(weights=weights_st, alpha=alpha_st, c=st.floats(0.1, 50), b=st.floats(0.0, 2.0), frac=st.floats(0.0, 1.5))
def test_calibrated_target_width(weights, alpha, c, b, frac):
    model = theory.FloorModel.from_weights(weights, alpha)
    target = b + frac * c * float(np.sum(weights)) - 1e-3 * (frac == 0)
    d, why = theory.target_width(model, target, scale=c, baseline=b, calibrated=True)
    if target <= b:
        assert d is None and "baseline" in why
    else:
        assert c * model.floor(d) + b <= target + 1e-12
        assert d == 1 or c * model.floor(d - 1) + b > target


def test_uncalibrated_target_below_zero_unreachable():
    model = theory.FloorModel.from_weights([3.0, 2.0, 1.0], 0.9)
    d, why = theory.target_width(model, -1.0)
    assert d is None and "never < 0" in why
    d, _ = theory.target_width(model, 0.0)  # L* = 0 once every feature is kept
    assert model.floor(d) == 0 and model.floor(d - 1) > 0


def test_parametric_default_sq_activation():
    lay = imp.parametric(10, alpha=0.97, importance="zipf:2")
    assert lay.weights[0] == pytest.approx(0.01)  # I_1 = 1, E[x^2] = (1 - 0.97) / 3
    assert lay.weights[1] == pytest.approx(0.01 / 4)
    assert imp.parse_importance_spec("uniform") == 0.0
    with pytest.raises(BadInput):
        imp.parse_importance_spec("zipf:x")


def _stats_file(tmp_path, *, summary=True):
    rng = np.random.default_rng(0)
    cols = {k: [] for k in ("layer", "feature", "fires", "freq", "mean_act", "importance", "max_act", "alive")}
    info = {}
    for layer, n in ((8, 60), (12, 40)):
        freq = rng.uniform(0, 0.02, n)
        freq[:5] = 0.0  # dead
        imp_ = rng.pareto(2.0, n) * (freq > 0)
        for i in range(n):
            cols["layer"].append(layer)
            cols["feature"].append(i)
            cols["fires"].append(int(freq[i] * 1e6))
            cols["freq"].append(float(freq[i]))
            cols["mean_act"].append(float(np.sqrt(imp_[i])))
            cols["importance"].append(float(imp_[i]))
            cols["max_act"].append(1.0)
            cols["alive"].append(bool(freq[i] > 1e-5))
        F = int((freq > 1e-5).sum())
        info[str(layer)] = {"F": F, "L0": 0.5, "alpha": 1 - 0.5 / F}
    path = tmp_path / "stats.parquet"
    write_parquet(path, cols, kind="kdtool.stats", summary={"layers": info} if summary else None)
    return path, cols, info


def test_from_stats_uses_summary_alpha_and_alive(tmp_path):
    path, cols, info = _stats_file(tmp_path)
    layers = imp.from_stats(path)
    assert [lay.layer for lay in layers] == [8, 12]
    for lay in layers:
        assert lay.alpha == pytest.approx(info[str(lay.layer)]["alpha"])
        assert lay.n_features == info[str(lay.layer)]["F"]
        assert np.all(np.diff(lay.weights) <= 0)
    assert [lay.layer for lay in imp.from_stats(path, layers=[12])] == [12]
    with pytest.raises(BadInput, match="--layer"):
        imp.from_stats(path, layers=[3])


def test_from_stats_recomputes_alpha_from_freq(tmp_path):
    path, cols, _ = _stats_file(tmp_path, summary=False)
    lay = imp.from_stats(path, layers=[12])[0]
    rows = np.array(cols["layer"]) == 12
    l0 = np.array(cols["freq"])[rows].sum()
    assert lay.alpha == pytest.approx(1 - l0 / lay.n_features)
