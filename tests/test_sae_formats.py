"""SAE interop: the same SAE in the SAELens, sparsify and dictionary_learning layouts gives the same stats.

The foreign layouts are written here by hand from known tensors (not with kdtool's exporters),
following each library's own files: SAELens cfg.json + sae_weights.safetensors, sparsify
cfg.json + sae.safetensors (encoder.weight [N, d]), dictionary_learning ae.pt (decoder.weight [d, F]).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kdtool import formats
from kdtool.acts import store as activations
from kdtool.errors import BadInput
from kdtool.sae.layouts import detect_layout, find_saes, hook_to_layer, load_sae
from kdtool.sae.writers import EXPORTERS, saelens_cfg, save_kdtool

D, F, LAYER = 8, 24, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def known():
    g = torch.Generator().manual_seed(11)
    w_dec = torch.randn(F, D, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    b_enc = -0.3 + 0.1 * torch.randn(F, generator=g)
    b_enc[-4:] = -100.0  # four latents that never fire
    return {
        "W_enc": torch.randn(D, F, generator=g) * 0.5,
        "b_enc": b_enc,
        "W_dec": w_dec,
        "b_dec": 0.2 * torch.randn(D, generator=g),
    }


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts") / "acts"
    g = torch.Generator().manual_seed(5)
    w = activations.ShardWriter(
        root, layers=[LAYER], d_model=D, dtype="float32", shard_tokens=1000, info={}, provenance={}
    )
    w.add({LAYER: torch.randn(3500, D, generator=g)})
    w.close()
    return root


def write_saelens(folder, t, **cfg_extra):
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(folder / "sae_weights.safetensors"))
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "model_name": "m",
            "hook_name": f"blocks.{LAYER - 1}.hook_resid_post",
            "sae_lens_version": "6.5.0",
        },
        **cfg_extra,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_sparsify(folder, t, k=F):
    folder.mkdir(parents=True)
    save_file(
        {
            "encoder.weight": t["W_enc"].t().contiguous(),
            "encoder.bias": t["b_enc"],
            "W_dec": t["W_dec"].contiguous(),
            "b_dec": t["b_dec"],
        },
        str(folder / "sae.safetensors"),
    )
    cfg = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": 0, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_dictionary_learning(folder, t, topk=None):
    folder.mkdir(parents=True)
    state = {
        "encoder.weight": t["W_enc"].t().contiguous(),
        "encoder.bias": t["b_enc"],
        "decoder.weight": t["W_dec"].t().contiguous(),
    }
    if topk is None:
        state["bias"] = t["b_dec"]
    else:
        state.update({"b_dec": t["b_dec"], "k": torch.tensor(topk, dtype=torch.int), "threshold": torch.tensor(-1.0)})
    torch.save(state, folder / "ae.pt")
    trainer = {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F, "layer": LAYER - 1}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    return folder


def _stats(cli, sae, acts, out, *extra):
    r = cli("--json", "stats", "--sae", sae, "--acts", acts, "-o", out, *extra)
    assert r.exit_code == 0, r.output
    return formats.read_table(out), json.loads(r.stdout)["summary"]["layers"][str(LAYER)]


def test_all_layouts_give_the_same_stats(cli, tmp_path, known, acts):
    kd = save_kdtool(tmp_path / "kdtool", known, cfg=saelens_cfg(D, F, layer=LAYER), kdtool={"layer": LAYER},
                     provenance=None)  # fmt: skip
    folders = {
        "kdtool": kd,
        "saelens": write_saelens(tmp_path / "saelens", known),
        "sparsify": write_sparsify(tmp_path / "sparsify" / f"layers.{LAYER - 1}", known),
        "dictionary_learning": write_dictionary_learning(tmp_path / "dl", known),
    }
    ref_cols, ref_sum = _stats(cli, folders["kdtool"], acts, tmp_path / "kdtool.parquet")
    assert ref_sum["F"] == F - 4 and ref_sum["dead"] == 4 and ref_sum["L0"] > 0  # some latents fire, some never do
    for layout, folder in folders.items():
        assert detect_layout(folder) == layout
        sae = load_sae(folder)
        assert sae.layer == LAYER, (layout, sae.layer_source)
        cols, summary = _stats(cli, folder, acts, tmp_path / f"{layout}.parquet")
        for c in ("layer", "feature", "fires", "alive"):
            np.testing.assert_array_equal(cols[c], ref_cols[c], err_msg=f"{layout}: {c}")
        for c in ("freq", "mean_act", "importance", "max_act"):
            np.testing.assert_allclose(cols[c], ref_cols[c], rtol=1e-5, atol=1e-7, err_msg=f"{layout}: {c}")
        for k in ("F", "L0", "alpha", "g", "d_star", "dead"):
            assert summary[k] == pytest.approx(ref_sum[k], rel=1e-9), (layout, k)
        assert summary["mse"] == pytest.approx(ref_sum["mse"], rel=1e-5)
        assert summary["layout"] == layout


def test_stats_match_a_direct_computation(cli, tmp_path, known, acts):
    folder = write_saelens(tmp_path / "s", known)
    cols, summary = _stats(cli, folder, acts, tmp_path / "s.parquet")
    x = torch.cat([s[LAYER] for s in activations.ActivationStore(acts).iter_shards([LAYER])]).double()
    t = {k: v.double() for k, v in known.items()}
    z = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    x_hat = z @ t["W_dec"] + t["b_dec"]
    n = x.shape[0]
    np.testing.assert_array_equal(cols["fires"], (z > 0).sum(0).numpy())
    np.testing.assert_allclose(cols["importance"], (z**2).mean(0).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(cols["mean_act"], z.mean(0).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(cols["max_act"], z.max(0).values.numpy(), rtol=1e-5)
    alive = (z > 0).sum(0) / n > 1e-5
    l0 = float((z > 0).sum()) / n
    assert summary["F"] == int(alive.sum()) and summary["dead"] == F - int(alive.sum())
    assert summary["L0"] == pytest.approx(l0) and summary["alpha"] == pytest.approx(1 - l0 / int(alive.sum()))
    assert summary["mse"] == pytest.approx(float(((x - x_hat) ** 2).sum(1).mean()), rel=1e-5)
    ev = 1 - float(((x - x_hat) ** 2).sum()) / float(((x - x.mean(0)) ** 2).sum())
    assert summary["explained_variance"] == pytest.approx(ev, rel=1e-5)


def test_topk_and_jumprelu_activations(tmp_path, known):
    x = torch.randn(50, D)
    pre = torch.relu((x - known["b_dec"]) @ known["W_enc"] + known["b_enc"])
    top = pre.topk(3, dim=1)
    want = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
    for folder in (
        write_sparsify(tmp_path / "sp", known, k=3),
        write_dictionary_learning(tmp_path / "dl", known, topk=3),
        write_saelens(tmp_path / "sl", known, architecture="topk", k=3),
    ):
        torch.testing.assert_close(load_sae(folder).encode(x), want)
    thr = torch.full((F,), 0.2)
    write_saelens(tmp_path / "jr", known | {"threshold": thr}, architecture="jumprelu")
    raw = (x - known["b_dec"]) @ known["W_enc"] + known["b_enc"]
    torch.testing.assert_close(load_sae(tmp_path / "jr").encode(x), raw * (raw > 0.2))


def test_exporters_round_trip(tmp_path, known):
    x = torch.randn(40, D)
    z_ref = torch.relu((x - known["b_dec"]) @ known["W_enc"] + known["b_enc"])
    for name, export in EXPORTERS.items():
        folder = tmp_path / name
        if name == "saelens":
            export(folder, known, cfg=saelens_cfg(D, F, layer=LAYER))
        elif name == "dictionary_learning":
            export(folder, known, layer=LAYER)
        else:
            export(folder, known)
        sae = load_sae(folder)
        assert sae.layout == name
        torch.testing.assert_close(sae.encode(x), z_ref)
        torch.testing.assert_close(sae.decode(z_ref), z_ref @ known["W_dec"] + known["b_dec"])


def test_folder_of_saes_expands_and_hooks_map_to_layers(tmp_path, known):
    root = tmp_path / "run"
    for i in (10, 2):
        write_sparsify(root / f"layers.{i}", known)
    (root / "notes").mkdir()
    assert [p.name for p in find_saes(root)] == ["layers.2", "layers.10"]
    assert [load_sae(p).layer for p in find_saes(root)] == [3, 11]
    assert hook_to_layer("blocks.11.hook_resid_post") == 12
    assert hook_to_layer("blocks.11.hook_resid_pre") == 11
    assert hook_to_layer("gpt_neox.layers.5") == 6
    assert hook_to_layer("blocks.3.attn.hook_z") is None


class Evil:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("pwned",))


def test_unsafe_or_unknown_files_are_refused(cli, tmp_path, known, acts):
    (tmp_path / "evil").mkdir()
    torch.save({"bias": Evil()}, tmp_path / "evil" / "ae.pt")
    refused = r"holds Python objects, not only tensors \(Unsupported global: GLOBAL print\).*never unpickles"
    with pytest.raises(BadInput, match=refused) as err:
        load_sae(tmp_path / "evil")
    assert "weights_only" not in str(err.value)  # PyTorch's advice to turn it off is never passed on
    r = cli("stats", "--sae", tmp_path / "evil", "--acts", acts, "-o", tmp_path / "s.parquet")
    assert r.exit_code == 2 and "pwned" not in r.output and "weights_only" not in r.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 16)
    r = cli("stats", "--sae", tmp_path / "junk", "--acts", acts, "-o", tmp_path / "s.parquet")
    assert r.exit_code == 2 and "not an SAE folder" in r.stderr
    write_saelens(tmp_path / "gated", known, architecture="gated")
    r = cli("stats", "--sae", tmp_path / "gated", "--acts", acts, "-o", tmp_path / "s.parquet")
    assert r.exit_code == 2 and "architecture 'gated'" in r.stderr and "not supported" in r.stderr
    bad = dict(known, W_dec=known["W_dec"][:, :5])
    write_saelens(tmp_path / "shape", bad)
    r = cli("stats", "--sae", tmp_path / "shape", "--acts", acts, "-o", tmp_path / "s.parquet")
    assert r.exit_code == 2 and "W_dec has shape [24, 5]" in r.stderr
