"""Narrowing a teacher: architecture, heads, FFN, init and parameter counts (paper Table 8)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from kdtool.distill import students as st
from kdtool.errors import BadInput

pytestmark = pytest.mark.usefixtures("one_thread")


def pythia_410m_config():
    return GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def smollm_config():
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        tie_word_embeddings=True,
    )


@pytest.mark.parametrize("width,paper_params", [(128, 18e6), (256, 45e6), (512, 127e6), (768, 247e6), (1024, 405e6)])
def test_pythia_students_match_table8(width, paper_params):
    """Table 8: heads 8/16, FFN 4x, and the parameter counts (within rounding of the paper's 'M')."""
    cfg = st.narrow_config(pythia_410m_config(), width, st.StudentPolicy(heads="paper"))
    assert cfg.num_attention_heads == (8 if width == 128 else 16)
    assert cfg.intermediate_size == 4 * width
    assert cfg.num_hidden_layers == 24 and cfg.vocab_size == 50304
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    counts = st.param_counts(model)
    assert abs(counts["params"] - paper_params) / paper_params < 0.03
    # embeddings: 50304 x width, input and (untied) output
    assert counts["params"] - counts["non_embedding_params"] == 2 * 50304 * width


def test_head_dim_policy_keeps_rotary_dims():
    t = pythia_410m_config()
    for width in (128, 256, 512):
        cfg = st.narrow_config(t, width)  # default head-dim:64
        assert cfg.num_attention_heads == width // 64
        assert cfg.hidden_size // cfg.num_attention_heads == 64
        assert cfg.rope_parameters["partial_rotary_factor"] == t.rope_parameters["partial_rotary_factor"]
        assert cfg.kdtool_student["policy"]["heads"] == "head-dim:64"
    # 16 heads at width 128 leave 8 x 0.25 = 2 rotary dims: allowed; 32 heads leave 1: refused
    assert st.narrow_config(t, 128, st.StudentPolicy(heads="count:16")).num_attention_heads == 16
    with pytest.raises(BadInput, match="rotary"):
        st.narrow_config(t, 128, st.StudentPolicy(heads="count:32"))


def test_llama_keeps_gqa_group_and_ties_embeddings():
    t = smollm_config()  # 9 query heads over 3 KV heads: groups of 3
    cfg = st.narrow_config(t, 192, st.StudentPolicy(heads="head-dim:32"))
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (6, 2, 32)
    # 4 heads do not split into groups of 3: one KV head per query head
    cfg4 = st.narrow_config(t, 128, st.StudentPolicy(heads="head-dim:32"))
    assert (cfg4.num_attention_heads, cfg4.num_key_value_heads) == (4, 4)
    assert cfg.tie_word_embeddings and cfg.vocab_size == t.vocab_size and cfg.num_hidden_layers == 30
    tiny = tiny_config("llama", vocab=200, layers=2, width=64, heads=4, kv_heads=2, ffn=128, positions=2048)
    model = st.build_student(tiny, 32, st.StudentPolicy(heads="head-dim:16"), seed=0)
    counts = st.param_counts(model)
    assert counts["params"] - counts["non_embedding_params"] == 200 * 32  # tied: counted once
    logits = model(input_ids=torch.randint(0, 200, (2, 8))).logits
    assert logits.shape == (2, 8, 200)


def test_ffn_ratio_options():
    t = smollm_config()
    assert st.narrow_config(t, 128, st.StudentPolicy(heads="head-dim:64")).intermediate_size == 512
    assert st.narrow_config(t, 128, st.StudentPolicy(heads="head-dim:64", ffn_ratio="2.5")).intermediate_size == 320
    teacher_ratio = st.narrow_config(t, 192, st.StudentPolicy(heads="head-dim:64", ffn_ratio="teacher"))
    assert teacher_ratio.intermediate_size == round(1536 / 576 * 192)


def test_init_std_policies_and_seeding():
    t = tiny_config("gpt_neox", vocab=300, layers=2, width=64, heads=4, ffn=256, positions=2048, init_std=0.02)
    small = st.build_student(t, 256, st.StudentPolicy(heads="head-dim:64", init_std="small-init"), seed=0)
    w = small.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    assert abs(w.std().item() - math.sqrt(2 / (5 * 256))) < 0.1 * math.sqrt(2 / (5 * 256))
    fixed = st.build_student(t, 64, st.StudentPolicy(heads="head-dim:16", init_std="0.1"), seed=0)
    assert abs(fixed.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.std().item() - 0.1) < 0.01
    a = st.build_student(t, 32, st.StudentPolicy(heads="head-dim:16"), seed=3)
    b = st.build_student(t, 32, st.StudentPolicy(heads="head-dim:16"), seed=3)
    c = st.build_student(t, 32, st.StudentPolicy(heads="head-dim:16"), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["gpt_neox.embed_in.weight"], sc["gpt_neox.embed_in.weight"])


@pytest.mark.parametrize(
    "policy,message",
    [
        (dict(heads="head-dim:48"), "multiple of 48"),
        (dict(heads="heads:4"), "--heads"),
        (dict(ffn_ratio="four"), "--ffn-ratio"),
        (dict(ffn_ratio="-1"), "--ffn-ratio"),
        (dict(init_std="wide"), "--init-std"),
    ],
)
def test_bad_policies_name_the_option(policy, message):
    with pytest.raises(BadInput, match=message):
        st.narrow_config(pythia_410m_config(), 128, st.StudentPolicy(**policy))


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(BadInput, match="cannot narrow a 'gpt2' model.*gpt_neox, llama"):
        st.narrow_config(GPT2Config(), 128)
