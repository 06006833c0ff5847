"""Tiny causal LMs and a tiny tokenizer built in-process (offline, < 1 s), saved like hub models.

One factory for every tiny model the tests build: `tiny_config(arch, vocab=..., layers, width,
heads, kv_heads, ffn, positions, init_std, tied)` for a GPT-NeoX or Llama config, `tiny_lm(...)` for
a seeded, randomly initialised model of it. The shapes the tests use:

- `make_model` / `make_model_dir(path, arch)`: 4 blocks of width 32 (4 heads, Llama with 2 KV heads
  and tied embeddings) and a byte-level BPE tokenizer trained on a few standard-library docstrings,
  a folder that `kdtool ... --model PATH` loads (cache-acts, stats, shuffle, e2e, ...);
- tests/test_distill.py's teachers: 2 blocks, init std 0.3 (in memory) or 0.2 (saved), so that a
  narrow student cannot copy them;
- tests/test_probe.py's models: 4 blocks, 2 heads, over a word-level vocabulary.
"""

from __future__ import annotations

from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Return the number of items in a container. Raise ValueError if the value is not present.",
    "def add(a, b):\n    return a + b\n",
    "Open file and return a stream. Raise OSError upon failure.",
]


def make_tokenizer(path: Path, vocab_size: int = 320, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer (EOS <|endoftext|>) trained on `corpus` (default: TEXTS x 4), saved to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 4 if corpus is None else corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def tiny_config(
    arch: str = "llama",
    *,
    vocab: int,
    layers: int = 4,
    width: int = 32,
    heads: int = 4,
    kv_heads: int | None = None,
    ffn: int | None = None,
    positions: int = 512,
    init_std: float | None = None,
    tied: bool | None = None,
    **extra,
):
    """A transformers config of a tiny GPT-NeoX or Llama.

    kv_heads: Llama's key/value heads (default: one per query head; GPT-NeoX has no such setting and
    ignores it). ffn: default 2 x width. init_std: the config's initializer_range (default 0.02).
    tied: tie input and output embeddings (default: Llama ties, like SmolLM2; GPT-NeoX does not, like
    Pythia). extra: any other config field (e.g. eos_token_id).
    """
    from transformers import GPTNeoXConfig, LlamaConfig

    kw = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width if ffn is None else ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        tie_word_embeddings=(arch == "llama") if tied is None else tied,
        **extra,
    )
    if init_std is not None:
        kw["initializer_range"] = init_std
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=heads if kv_heads is None else kv_heads, **kw)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**kw)
    raise ValueError(f"tiny_config: unknown arch {arch!r} (gpt_neox or llama)")


def tiny_lm(arch: str = "llama", *, seed: int = 0, config=None, **config_kw):
    """A randomly initialised tiny causal LM in eval mode: of `config`, or of tiny_config(arch, **config_kw).

    The initialisation draws from torch's global generator after torch.manual_seed(seed).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config or tiny_config(arch, **config_kw)).eval()


def make_model(arch: str, vocab_size: int, n_layers: int = 4, d: int = 32, seed: int = 0):
    """make_model_dir's model without the folder: n_layers blocks of width d, 4 heads (Llama: 2 KV heads)."""
    return tiny_lm(arch, seed=seed, vocab=vocab_size, layers=n_layers, width=d, heads=4, kv_heads=2)


def make_model_dir(path: Path, arch: str = "llama", n_layers: int = 4, seed: int = 0) -> Path:
    """A folder with make_tokenizer's tokenizer and make_model's model, as save_pretrained writes them.

    Another seed gives the same architecture and files of the same sizes with other weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    make_model(arch, len(tok), n_layers=n_layers, seed=seed).save_pretrained(path)
    return path
