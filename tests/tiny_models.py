"""Tiny causal LMs and a tiny tokenizer built in-process (offline, < 1 s), saved like hub models.

`make_model_dir(path, arch)` writes a folder that `kdtool ... --model PATH` loads: a byte-level
BPE tokenizer trained on a few standard-library docstrings plus a randomly initialised GPT-NeoX
or Llama with 4 blocks of width 32.
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


def make_tokenizer(path: Path, vocab_size: int = 320):
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
    tok.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def make_model(arch: str, vocab_size: int, n_layers: int = 4, d: int = 32, seed: int = 0):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config).eval()
    if arch == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=512,
        )
        return GPTNeoXForCausalLM(config).eval()
    raise ValueError(arch)


def make_model_dir(path: Path, arch: str = "llama", n_layers: int = 4) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    make_model(arch, len(tok), n_layers=n_layers).save_pretrained(path)
    return path
