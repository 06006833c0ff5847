"""distill --loss: each loss against a hand computation, the top-k decisions, students of several losses in one run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_distill import BATCH, DATA, SEQ, eval_batches, small_cfg, teacher_and_text, tiny_teacher, train_batches  # noqa: F401 (a fixture)

from kdtool import formats
from kdtool.distill import loop as distill
from kdtool.distill.features import FeaturePlan
from kdtool.distill.losses import divergence_per_token, teacher_target
from kdtool.distill.matching import hidden_term, relative_mse, rms_normalise
from kdtool.distill.objectives import StudentKey, parse_losses, student_name
from kdtool.errors import BadInput
from kdtool.sae import stats as sae_stats
from kdtool.sae.layouts import load_sae
from kdtool.sae.writers import saelens_cfg, save_kdtool
from kdtool.theory import theorem

pytestmark = pytest.mark.usefixtures("one_thread")

T = 2.0


def probs(logits: torch.Tensor) -> np.ndarray:
    """softmax(logits / T) in float64 numpy: the hand side of every comparison."""
    x = logits.double().numpy() / T
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 7, generator=g) * 3, torch.randn(2, 3, 7, generator=g)  # teacher, student [B, S, V]


# ------------------------------------------------------------------------------------------ names


def test_loss_names_labels_and_folders():
    specs = parse_losses("kl, reverse-kl,JSD, jsd:0.90, tvd,hidden,features")
    assert [s.label for s in specs] == ["kl", "reverse-kl", "jsd:0.5", "jsd:0.9", "tvd", "hidden", "features"]
    assert [s.divergence for s in specs] == ["kl", "reverse-kl", "jsd", "jsd", "tvd", "kl", "kl"]
    assert [student_name(StudentKey(64, s.label)) for s in specs] == [
        "width64",  # kl keeps today's folder name
        "width64-reverse-kl",
        "width64-jsd0.5",
        "width64-jsd0.9",
        "width64-tvd",
        "width64-hidden",
        "width64-features",
    ]
    for bad, message in (("kld", "unknown loss"), ("jsd:2", r"\[0, 1\]"), ("jsd:x", "bad beta"), ("kl:1", "no param")):
        with pytest.raises(BadInput, match=message):
            parse_losses(bad)
    with pytest.raises(BadInput, match="jsd:0.5 given twice"):
        parse_losses("jsd,jsd:0.5")


# ------------------------------------------------------------------------------------------ divergences by hand


def test_each_divergence_matches_its_formula(pair):
    t, s = pair
    p, q = probs(t), probs(s)
    target = teacher_target(t, T)

    def got(name, beta=0.0):
        return divergence_per_token(name, s, target, T, beta).double().numpy()

    np.testing.assert_allclose(got("kl"), (p * np.log(p / q)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(got("reverse-kl"), (q * np.log(q / p)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(got("tvd"), 0.5 * np.abs(p - q).sum(-1), rtol=1e-5)
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        want = beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)
        np.testing.assert_allclose(got("jsd", beta), want, rtol=1e-5)
    # TRL's endpoints: beta 0 is forward KL, 1 is reverse KL, exactly
    assert np.array_equal(got("jsd", 0.0), got("kl")) and np.array_equal(got("jsd", 1.0), got("reverse-kl"))
    # JSD(0.5) is symmetric and at most ln 2; TVD at most 1
    swapped = divergence_per_token("jsd", t, teacher_target(s, T), T, 0.5).double().numpy()
    np.testing.assert_allclose(got("jsd", 0.5), swapped, rtol=1e-5)
    assert got("jsd", 0.5).max() <= math.log(2) and got("tvd").max() <= 1
    for name in ("kl", "reverse-kl", "tvd"):  # zero when the student is the teacher
        assert np.abs(divergence_per_token(name, t, target, T).numpy()).max() < 1e-5


def test_topk_tail_bucket_for_kl_and_tvd_and_refusal_for_the_rest(pair):
    t, s = pair
    p, q = probs(t), probs(s)
    k = 3
    top = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    p_k, q_k = np.take_along_axis(p, top, -1), np.take_along_axis(q, top, -1)
    r_p, r_q = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    target = teacher_target(t, T, topk=k)
    tvd_k = divergence_per_token("tvd", s, target, T).double().numpy()
    np.testing.assert_allclose(tvd_k, 0.5 * (np.abs(p_k - q_k).sum(-1) + np.abs(r_p - r_q)), rtol=1e-5)
    kl_k = (p_k * np.log(p_k / q_k)).sum(-1) + r_p * np.log(r_p / r_q)
    np.testing.assert_allclose(divergence_per_token("kl", s, target, T).double().numpy(), kl_k, rtol=1e-5)
    assert np.array_equal(
        divergence_per_token("jsd", s, target, T, 0.0).numpy(), divergence_per_token("kl", s, target, T).numpy()
    )
    full_tvd = divergence_per_token("tvd", s, teacher_target(t, T), T).numpy()
    assert np.all(tvd_k <= full_tvd + 1e-6)  # coarsening: a lower bound (data processing)
    exact = divergence_per_token("tvd", s, teacher_target(t, T, topk=6), T).numpy()  # k = V-1: one-token tail
    np.testing.assert_allclose(exact, full_tvd, rtol=1e-5, atol=1e-7)
    for name, beta in (("reverse-kl", 0.0), ("jsd", 0.5), ("jsd", 1.0)):
        with pytest.raises(ValueError, match="full distribution"):
            divergence_per_token(name, s, target, T, beta)
    for loss in ("reverse-kl", "jsd", "hidden", "features"):
        with pytest.raises(BadInput, match=f"--loss {loss}.*--teacher-cache"):
            small_cfg(losses=[loss], topk=4, sae="x", stats="y") if loss == "features" else small_cfg(
                losses=[loss], topk=4
            )
    assert small_cfg(losses=["kl", "tvd", "jsd:0"], topk=4).losses == ["kl", "tvd", "jsd:0"]


def test_hidden_term_by_hand():
    g = torch.Generator().manual_seed(0)
    mapped = {1: torch.randn(2, 3, 5, generator=g), 2: torch.randn(2, 3, 5, generator=g)}
    teacher = {1: torch.randn(2, 3, 5, generator=g) * 10, 2: torch.randn(2, 3, 5, generator=g)}
    a, b = mapped[1].double().numpy(), teacher[1].double().numpy()
    unit = b / np.sqrt((b**2).mean(-1, keepdims=True))  # the teacher's stream at unit RMS per position
    np.testing.assert_allclose(relative_mse(mapped[1], teacher[1]), ((a - unit) ** 2).mean(-1), rtol=1e-5)
    both = hidden_term(mapped, teacher, [1, 2])
    torch.testing.assert_close(both, (relative_mse(mapped[1], teacher[1]) + relative_mse(mapped[2], teacher[2])) / 2)
    torch.testing.assert_close(relative_mse(torch.zeros(2, 3, 5), teacher[1]), torch.ones(2, 3))  # zero costs 1
    assert relative_mse(rms_normalise(teacher[2]), 7 * teacher[2]).abs().max() < 1e-6  # the norm per token is free
    # the student's stream is normalised before its map: a student 1000x larger maps to the same thing
    from tiny_models import tiny_lm

    from kdtool.distill.matching import Student

    lm = tiny_lm("llama", vocab=11, layers=2, width=8, heads=2)
    student = Student(lm, [1], 12)
    assert torch.all(student(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))[1][1] == 0)
    torch.nn.init.normal_(student.maps["1"].weight)  # the map starts at zero; give it something to apply
    ids = torch.randint(0, 11, (2, 4), generator=g)
    logits, maps = student(ids, torch.ones(2, 4, dtype=torch.bool))
    h = lm(input_ids=ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(maps[1], student.maps["1"](h / h.square().mean(-1, keepdim=True).sqrt()))
    torch.testing.assert_close(logits, lm(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------ the features term


def make_sae_and_stats(root, teacher, layer=1, n_features=64, seed=0):
    """A random ReLU SAE on the teacher's layer (unit decoder rows) and its stats over the training batches."""
    d = teacher.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(n_features, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    tensors = {"W_enc": w_dec.t().contiguous(), "b_enc": -2.0 * torch.ones(n_features), "W_dec": w_dec}
    tensors["b_dec"] = torch.zeros(d)
    sae_dir = save_kdtool(root / "sae", tensors, cfg=saelens_cfg(d, n_features, layer=layer), kdtool={"layer": layer},
                          provenance=None)  # fmt: skip
    with torch.no_grad():
        acts = [{layer: teacher(input_ids=b, output_hidden_states=True).hidden_states[layer].reshape(-1, d)}
                for b in DATA[:16]]  # fmt: skip
    source = sae_stats.Activations(iter(acts), d, [], {}, None)
    result = sae_stats.measure(sae_stats.StatsConfig(), [load_sae(sae_dir)], source)
    formats.write_parquet(root / "stats.parquet", result.columns, kind="kdtool.stats", summary=result.summary)
    return sae_dir, root / "stats.parquet"


def test_feature_plan_chooses_the_most_important_and_the_term_matches_by_hand(tmp_path):
    _, teacher = tiny_teacher()
    sae_dir, stats = make_sae_and_stats(tmp_path, teacher)
    cols = formats.read_table(stats)
    alive = cols["alive"]
    summary = formats.parquet_metadata(stats)["summary"]["layers"]["1"]
    plan = FeaturePlan.load(sae_dir, stats, [2, 4], "auto", "importance")
    g = theorem.g(1 - summary["L0"] / alive.sum())
    assert plan.budgets == {w: min(int(math.floor(w * g)), int(alive.sum())) for w in (2, 4)}
    order = [int(i) for i in np.argsort(-np.where(alive, cols["importance"], -1), kind="stable")]
    assert plan.ids.tolist() == order[: max(plan.budgets.values())]  # most important alive first
    assert plan.layer == 1 and plan.scale is None  # unit decoder rows: nothing to fold
    # the term, by hand
    sae = load_sae(sae_dir)
    gen = torch.Generator().manual_seed(1)
    h_t, mapped = torch.randn(2, 3, 48, generator=gen), torch.randn(2, 3, 48, generator=gen)
    z = plan.latents(h_t)
    full_z = sae.encode(h_t.reshape(-1, 48)).reshape(2, 3, -1)
    torch.testing.assert_close(z, full_z[..., plan.ids])
    k = plan.budgets[2]
    ids = plan.ids[:k]
    x = mapped * h_t.square().mean(-1, keepdim=True).sqrt()  # the mapped stream at the teacher's RMS
    u = ((x.reshape(-1, 48) - sae.b_dec) @ sae.W_enc + sae.b_enc).reshape(2, 3, -1)[..., ids]
    zk = full_z[..., ids]
    err = torch.where(zk > 0, u - zk, u.clamp_min(0))
    imp = plan.importance[:k]
    torch.testing.assert_close(plan.term(mapped, z, h_t, 2), (err**2 * imp).sum(-1) / (imp * imp).sum())
    uniform = FeaturePlan.load(sae_dir, stats, [2], "3", "uniform")
    assert uniform.budgets == {2: 3}
    e3 = err[..., :3]
    torch.testing.assert_close(uniform.term(mapped, z, h_t, 2), (e3**2).sum(-1) / imp[:3].sum())
    assert plan.term(rms_normalise(h_t), z, h_t, 2).abs().max() < 1e-8  # the teacher's own stream: every latent
    with pytest.raises(BadInput, match="feature-budget"):
        small_cfg(losses=["features"], sae="s", stats="t", feature_budget="some")
    with pytest.raises(BadInput, match="--sae and --stats are read by --loss features only"):
        small_cfg(sae="s")


# ------------------------------------------------------------------------------------------ training


def run(cfg, out=None, **kw):
    tc, teacher = tiny_teacher()
    return distill.run(
        cfg,
        teacher_config=tc,
        teacher=teacher,
        train_batches=train_batches,
        eval_batches=eval_batches,
        out_dir=out,
        **kw,
    )


def rows_of(result, key: StudentKey) -> dict:
    c = result.curves
    sel = [i for i in range(len(c["width"])) if c["width"][i] == key.width and c["loss"][i] == key.loss]
    return {k: [v[i] for i in sel] for k, v in c.items()}


def test_students_of_several_losses_in_one_run_equal_each_trained_alone(tmp_path):
    common = dict(steps=6, eval_every=3, micro_batch=2)
    together = run(small_cfg(widths=[8, 16], losses=["kl", "jsd", "hidden"], **common), tmp_path / "all")
    assert together.floors["loss"] == ["kl", "jsd:0.5", "hidden"] * 2
    assert together.floors["width"] == [8, 8, 8, 16, 16, 16]
    for width, loss in ((8, "jsd:0.5"), (16, "hidden"), (16, "kl")):
        alone = run(small_cfg(widths=[width], losses=[loss], **common), tmp_path / f"{width}{loss}")
        key = StudentKey(width, loss)
        i = list(zip(together.floors["width"], together.floors["loss"], strict=True)).index(key)
        assert alone.floors["floor"][0] == together.floors["floor"][i]  # bit for bit on CPU
        a, b = rows_of(alone, key), rows_of(together, key)
        for col in ("train_loss", "train_aux", "eval_kl", "grad_norm"):
            np.testing.assert_array_equal(a[col], b[col])
        name = student_name(key)
        wa, wb = (load_file(tmp_path / d / name / "model.safetensors") for d in (f"{width}{loss}", "all"))
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
    # every loss starts from the same weights at a width: the step-0 evaluations agree
    c = together.curves
    at0 = {(c["width"][i], c["loss"][i]): c["eval_kl"][i] for i in range(len(c["step"])) if c["step"][i] == 0}
    assert at0[(8, "kl")] == at0[(8, "jsd:0.5")] == at0[(8, "hidden")]
    # the floors table and folders say which loss; train_kl only where the loss computes it
    jsd = rows_of(together, StudentKey(8, "jsd:0.5"))
    assert all(math.isnan(v) for v in jsd["train_kl"]) and all(v > 0 for v in jsd["train_loss"][1:])
    kl = rows_of(together, StudentKey(8, "kl"))
    assert kl["train_loss"][1:] == kl["train_kl"][1:] and all(math.isnan(v) for v in kl["train_aux"])
    maps = load_file(tmp_path / "all" / "width16-hidden" / "residual_map.safetensors")
    assert maps["layer1.weight"].shape == (48, 16) and maps["layer1.bias"].shape == (48,)
    assert not (tmp_path / "all" / "width16" / "residual_map.safetensors").exists()
    info = formats.read_json(tmp_path / "all" / "width16-hidden" / "kdtool.json")
    assert info["objective"]["loss"] == "hidden" and info["objective"]["layers"] == [1]
    assert formats.read_table(tmp_path / "all" / "floors.parquet")["loss"].tolist() == together.floors["loss"]
    from kdtool import info, kinds

    run_floors = info.describe(tmp_path / "all")["summary"]["floors"]
    assert set(run_floors) == {"8", "8/jsd:0.5", "8/hidden", "16", "16/jsd:0.5", "16/hidden"}
    assert (
        kinds.kind_of(tmp_path / "all" / "width16-hidden" / "residual_map.safetensors") == "kdtool.distill.residual_map"
    )
    assert kinds.kind_of(tmp_path / "all" / "width16-hidden" / "model.safetensors") == "kdtool.distill.student.weights"


def test_the_hidden_and_features_terms_decrease(tmp_path):
    _, teacher = tiny_teacher()
    sae_dir, stats = make_sae_and_stats(tmp_path, teacher)
    cfg = small_cfg(
        widths=[16], losses=["hidden", "features"], sae=str(sae_dir), stats=str(stats), steps=24, eval_every=12, lr=1e-2
    )
    r = run(cfg, tmp_path / "out")
    hidden, features = (rows_of(r, StudentKey(16, loss))["train_aux"][1:] for loss in ("hidden", "features"))
    assert hidden[0] == 1.0  # the map starts at zero: "predicting zero" costs exactly 1
    assert np.mean(hidden[-4:]) < 0.85 and np.mean(features[-4:]) < 0.6 * features[0], (hidden, features)
    info = formats.read_json(tmp_path / "out" / "width16-features" / "kdtool.json")["objective"]["features"]
    assert info["kept"] == len(info["features"]) > 0 and info["layer"] == 1 and info["budget"] == "auto"


def test_resume_with_several_losses_is_exact(tmp_path):
    cfg = small_cfg(steps=6, save_every=3, eval_every=2, losses=["kl", "hidden", "tvd"])
    whole = run(cfg, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_at_4(event):
        if event.get("event") == "step" and event["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        run(cfg, tmp_path / "cut", callback=kill_at_4)
    resumed = run(cfg, tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 3 and resumed.floors["floor"] == whole.floors["floor"]
    for name in ("width32-hidden", "width8-tvd"):
        for f in ("model.safetensors", "residual_map.safetensors") if "hidden" in name else ("model.safetensors",):
            a, b = load_file(tmp_path / "whole" / name / f), load_file(tmp_path / "cut" / name / f)
            assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(BadInput, match="other settings.*losses"):
        run(small_cfg(steps=6, save_every=3, eval_every=2, losses=["kl", "tvd"]), tmp_path / "cut", resume=True)


def test_cached_training_with_tvd_uses_the_tail_bucket(tmp_path):
    """A top-k cache trains tvd on the k+1 bins; with k = V-1 the bins are the vocabulary and nothing changes."""
    from kdtool.distill.teacher_cache import TeacherCache

    k = 95  # VOCAB - 1
    cache = TeacherCache(tmp_path / "c", key={"t": 1}, topk=k, temperature=T)
    cached = run(small_cfg(steps=4, topk=k, losses=["tvd"]), cache=cache)
    full = run(small_cfg(steps=4, losses=["tvd"]))
    np.testing.assert_allclose(cached.floors["floor"], full.floors["floor"], rtol=1e-4)
    assert cached.floors["topk"] == [k, k] and BATCH * SEQ == cached.floors["tokens"][0] // 4


# ------------------------------------------------------------------------------------------ CLI


def test_cli_trains_several_losses_and_refuses_contradictions_before_loading(cli, tmp_path, teacher_and_text):  # noqa: F811
    import json

    from test_distill import TINY_ARGS

    model, text = teacher_and_text
    args = ("--model", model, "--dataset", text, *TINY_ARGS)
    r = cli("--json", "distill", *args, "--widths", "8", "--loss", "kl,tvd", "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [(row["width"], row["loss"]) for row in rows] == [(8, "kl"), (8, "tvd")]
    assert (tmp_path / "s" / "width8").is_dir() and (tmp_path / "s" / "width8-tvd").is_dir()
    assert "w8/tvd" in r.stderr  # the log names the student by width and loss
    floors = formats.read_table(tmp_path / "s" / "floors.parquet")
    assert floors["loss"].tolist() == ["kl", "tvd"] and floors["seed"].tolist() == [0, 0]
    bad = [
        (("--loss", "kl,nope"), "--loss: unknown loss 'nope'"),
        (("--loss", "reverse-kl", "--teacher-cache", tmp_path / "tc"), "--loss reverse-kl cannot train from"),
        (("--loss", "features"), "--loss features needs the teacher's SAE (--sae)"),
        (("--sae", tmp_path), "--sae and --stats are read by --loss features only"),
        (("--loss", "features", "--sae", tmp_path / "s" / "floors.parquet", "--stats", text), "--sae wants"),
        (("--loss", "hidden", "--hidden-layers", "7"), "--hidden-layers: layer(s) [7] out of range"),
        (("--loss", "hidden", "--hidden-weight", "-1"), "--hidden-weight must be a positive number"),
    ]
    for extra, message in bad:
        r = cli("distill", *args, *extra, "-o", tmp_path / "x")
        assert r.exit_code == 2 and message in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 or "loading" in r.stderr  # one line (the layer check: after)
        assert not (tmp_path / "x" / "floors.parquet").exists()


def test_calibrate_fits_one_loss_or_the_pooled_floors(cli, tmp_path):
    import json

    path = tmp_path / "floors.parquet"
    widths = [64, 128, 256, 512]
    formats.write_parquet(
        path,
        {
            "width": widths * 2,
            "loss": ["kl"] * 4 + ["tvd"] * 4,
            "floor": [1.3, 1.0, 0.75, 0.65, 1.2, 0.9, 0.7, 0.6],
            "predicted": [0.08, 0.04, 0.011, 0.0016] * 2,
        },
        kind="kdtool.distill.floors",
    )

    def points(*extra):
        r = cli("--json", "calibrate", path, "--bootstrap", "0", *extra)
        assert r.exit_code == 0, r.output
        obj = json.loads(r.stdout)
        return obj["inputs"]["loss"], [(p["width"], p["observed"]) for p in obj["points"]], r.stderr

    used, pts, err = points()
    assert used == "kl" and pts == list(zip(widths, [1.3, 1.0, 0.75, 0.65], strict=True))
    assert "has floors of kl, tvd: calibrating kl" in err
    assert points("--loss", "tvd")[1] == list(zip(widths, [1.2, 0.9, 0.7, 0.6], strict=True))
    used, pts, _ = points("--loss", "pooled")
    assert used == "pooled" and len(pts) == 8
    r = cli("calibrate", path, "--loss", "jsd:0.5")
    assert r.exit_code == 2 and "--loss jsd:0.5" in r.stderr and "kl, tvd only" in r.stderr


def test_features_term_leaves_out_position_0_and_massive_norms():
    """As cache-acts keeps positions for the SAEs: position 0 and norms above 50x the sequence median do not count."""
    from kdtool.distill.features import kept_positions

    h = torch.ones(2, 6, 4)
    h[0, 3] *= 51  # a massive activation inside a sequence
    h[1, 2] *= 49  # large, but under the ratio
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False  # padding never counts
    assert kept_positions(h, mask).tolist() == [
        [False, True, True, False, True, True],
        [False, True, True, True, True, False],
    ]
    # per sequence: a row's mask does not depend on the other rows (micro-batches give the same mask)
    assert kept_positions(h[1:], mask[1:]).tolist() == kept_positions(h, mask)[1:].tolist()
