"""Narrower students of a teacher (paper section 6.1 and Table 8).

A student keeps the teacher's architecture, depth, vocabulary (embedding rows, which for
Pythia is 50,304, not the tokenizer's 50,277) and positional encoding; only the hidden width
changes, and with it the heads, the FFN and the initialisation scale.

Policies (recorded in each student's config under ``kdtool_student``):
- heads ``head-dim:64`` (default): width / 64 heads, so each head keeps the teacher's usual
  head size and the rotary part of a head never collapses (GPT-NeoX rotates only
  partial_rotary_factor x head_dim dims: 16 heads at width 128 leave 2 rotary dims).
  ``paper``: Table 8, 8 heads at width <= 128 and 16 above. ``count:N``: N heads.
  Llama's grouped-query attention keeps the teacher's query/KV group size where it divides
  the student's heads, else falls back to one KV head per query head.
- FFN: ``ffn_ratio`` x width (default 4, Table 8); ``teacher`` keeps the teacher's ratio.
- init std: ``teacher`` (default) = the teacher config's ``initializer_range`` (0.02 for Pythia
  and SmolLM2), i.e. what `from_config` on the copied config does; ``small-init`` =
  sqrt(2 / (5 width)) (Nguyen & Salazar 2019, GPT-NeoX's small_init), which grows as the
  width shrinks; or a number.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from kdtool.errors import BadInput

#: model_type -> names of the config fields we rewrite
SUPPORTED = {
    "gpt_neox": {"width": "hidden_size", "heads": "num_attention_heads", "ffn": "intermediate_size"},
    "llama": {"width": "hidden_size", "heads": "num_attention_heads", "ffn": "intermediate_size"},
}


@dataclass(frozen=True)
class StudentPolicy:
    """How a teacher config is narrowed (see module docstring)."""

    heads: str = "head-dim:64"  # head-dim:N | paper | count:N
    ffn_ratio: str = "4"  # a number (FFN = ratio x width) or "teacher"
    init_std: str = "teacher"  # teacher | small-init | a number

    def __post_init__(self):
        parse_heads_policy(self.heads)
        if self.ffn_ratio != "teacher":
            _positive("--ffn-ratio", self.ffn_ratio, "a number or 'teacher'")
        if self.init_std not in ("teacher", "small-init"):
            _positive("--init-std", self.init_std, "teacher, small-init or a number")


def _positive(option: str, text: str, choices: str) -> None:
    """BadInput unless `text` is a finite number > 0 (the words of a policy are checked by the caller)."""
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"{option} must be {choices}, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{option} must be > 0, got {text!r}")


def parse_heads_policy(text: str) -> tuple[str, int]:
    """'head-dim:64' -> ('head-dim', 64); 'paper' -> ('paper', 0); 'count:8' -> ('count', 8)."""
    t = str(text).strip()
    if t == "paper":
        return "paper", 0
    m = re.fullmatch(r"(head-dim|count):([0-9]+)", t)
    if not m or int(m.group(2)) <= 0:
        raise BadInput(f"--heads must be head-dim:N, count:N or paper, got {text!r}")
    return m.group(1), int(m.group(2))


def student_heads(width: int, policy: str) -> int:
    """Number of attention heads for a student of this width."""
    kind, n = parse_heads_policy(policy)
    if kind == "paper":
        heads = 8 if width <= 128 else 16
    elif kind == "count":
        heads = n
    else:
        if width % n:
            raise BadInput(f"--heads head-dim:{n}: width {width} is not a multiple of {n} (pick widths or head-dim)")
        heads = width // n
    if width % heads:
        raise BadInput(f"--heads {policy}: width {width} is not divisible by {heads} heads")
    return heads


def _model_type(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        raise BadInput(
            f"cannot narrow a {mt!r} model: kdtool knows how to narrow {', '.join(sorted(SUPPORTED))} "
            "(GPT-NeoX/Pythia and Llama/SmolLM2)"
        )
    return mt


def teacher_width(config) -> int:
    return int(config.hidden_size)


def narrow_config(teacher_config, width: int, policy: StudentPolicy = StudentPolicy()):
    """A copy of the teacher's HF config with the hidden width replaced (same depth, vocab, positions)."""
    mt = _model_type(teacher_config)
    if width <= 0:
        raise BadInput(f"--widths: width must be > 0, got {width}")
    t_width = teacher_width(teacher_config)
    t_heads = int(teacher_config.num_attention_heads)
    cfg = copy.deepcopy(teacher_config)
    heads = student_heads(width, policy.heads)
    head_dim = width // heads
    cfg.hidden_size = width
    cfg.num_attention_heads = heads
    if policy.ffn_ratio == "teacher":
        ratio = float(teacher_config.intermediate_size) / t_width
    else:
        ratio = float(policy.ffn_ratio)
    cfg.intermediate_size = max(1, int(round(ratio * width)))
    kv_heads = None
    if mt == "llama":
        t_kv = int(getattr(teacher_config, "num_key_value_heads", None) or t_heads)
        group = t_heads // t_kv if t_kv and t_heads % t_kv == 0 else 1
        kv_heads = heads // group if heads % group == 0 else heads
        cfg.num_key_value_heads = kv_heads
        cfg.head_dim = head_dim
    if mt == "gpt_neox":
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        factor = float(rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0)))
        if int(head_dim * factor) < 2:
            raise BadInput(
                f"--heads {policy.heads}: head size {head_dim} at width {width} leaves "
                f"{int(head_dim * factor)} rotary dims (partial_rotary_factor {factor}); use fewer heads"
            )
    if policy.init_std == "teacher":
        std = float(getattr(teacher_config, "initializer_range", 0.02))
    elif policy.init_std == "small-init":
        std = math.sqrt(2.0 / (5.0 * width))
    else:
        std = float(policy.init_std)
    cfg.initializer_range = std
    # drop anything describing the teacher's weights on disk (GGUF/bnb quantisation)
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            pass
    cfg.architectures = list(getattr(teacher_config, "architectures", None) or []) or None
    cfg.kdtool_student = {
        "width": width,
        "teacher_width": t_width,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "ffn": cfg.intermediate_size,
        "init_std": std,
        "policy": asdict(policy),
    }
    return cfg


def build_student(teacher_config, width: int, policy: StudentPolicy = StudentPolicy(), *, seed: int = 0):
    """A freshly initialised student (fp32). Seeded per (seed, width): adding a width changes no other student."""
    cfg = narrow_config(teacher_config, width, policy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(student_seed(seed, width))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model


def student_seed(seed: int, width: int) -> int:
    return (int(seed) * 1_000_003 + int(width)) % (2**63 - 1)


def param_counts(model) -> dict[str, int]:
    """{'params': all unique parameters (tied counted once), 'non_embedding_params': without the
    input embedding and (if untied) the output head (Kaplan et al.'s N)."""
    seen: dict[int, Any] = {}
    for p in model.parameters():
        seen[id(p)] = p
    total = sum(p.numel() for p in seen.values())
    emb_ids = set()
    inp = model.get_input_embeddings()
    if inp is not None:
        emb_ids.add(id(inp.weight))
    out = model.get_output_embeddings()
    if out is not None:
        emb_ids.add(id(out.weight))
    emb = sum(seen[i].numel() for i in emb_ids if i in seen)
    return {"params": int(total), "non_embedding_params": int(total - emb)}


def describe(config) -> dict[str, Any]:
    """Architecture summary of a (student) config for tables and logs."""
    return {
        "model_type": config.model_type,
        "layers": int(config.num_hidden_layers),
        "width": int(config.hidden_size),
        "heads": int(config.num_attention_heads),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        "ffn": int(config.intermediate_size),
        "vocab": int(config.vocab_size),
        "init_std": float(config.initializer_range),
    }
