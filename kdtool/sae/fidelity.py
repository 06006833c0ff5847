"""SAE fidelity in the model (`kdtool stats --fidelity`): the teacher's loss with the SAE's reconstruction spliced in.

Why: explained variance says how well an SAE reconstructs activations, not whether the model still
works on the reconstruction; a d* computed from an SAE that breaks the model describes the SAE.
What practitioners check first (SAELens `sae_lens/evals.py` get_recons_loss and
get_downstream_reconstruction_metrics; SAEBench's core evaluation runs the same code) is the
model's next-token loss with layer L's activations replaced by the SAE's output.

Per batch of held-out sequences (the eval side of the text's deterministic hold-out split,
kdtool.text.tokens) the teacher runs

    clean      unchanged                                   -> logits_clean
    spliced    hidden_states[L] := SAE(hidden_states[L])   -> one per SAE of layer L
    zero       hidden_states[L] := 0                       -> the ablation baseline (SAELens)
    mean       hidden_states[L] := mean activation         -> a gentler baseline (the mean over the
                                                              stats pass's tokens)

at the positions the SAE was trained on: position 0 (with drop_first) and "massive activation"
positions (norm > max_norm_ratio x the batch median at layer L) keep their clean value, as cache-acts
left them out and SAELens keeps masked tokens clean. Scored: the predictions from position `first`
to S-2 (predicting tokens first+1 .. S-1). Per token, averaged over the scored tokens:

    CE_x        -log p_x(next token)                           x = clean, spliced, zero, mean
    KL_x        sum_v p_clean(v) (log p_clean(v) - log p_x(v))  KL(clean || x), nats
    ce_loss_score   (CE_zero - CE_spliced) / (CE_zero - CE_clean)    SAELens's ce_loss_score
    kl_div_score    (KL_zero - KL_spliced) / KL_zero                 SAELens's kl_div_score
    (and both with the mean ablation as the baseline: *_mean)

plus the explained variance of the reconstruction on the held-out tokens, relative to their mean:
1 - sum ||x - x_hat||^2 / (sum ||x||^2 - n ||mean x||^2).

Cost: the forwards after the clean one start at layer L (blocks before it are replaced by stubs
that hand the spliced value on), so each costs about (n_layers - L) / n_layers of a forward plus
the LM head; `cost_ratio` records the measured time over the clean forwards' time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kdtool.acts.caching import outlier_mask
from kdtool.errors import BadInput
from kdtool.models import LoadedModel, decoder_container, decoder_layers
from kdtool.sae.layouts import LoadedSAE
from kdtool.text.tokens import DataSpec, token_batches

DEFAULT_TOKENS = 65_536
ABLATIONS = ("zero", "mean")


@dataclass(frozen=True)
class FidelityConfig:
    """How `stats --fidelity` runs the teacher (its --fidelity-* options)."""

    tokens: int = DEFAULT_TOKENS  # held-out tokens to score (whole sequences, at least one)
    batch_size: int = 2  # sequences per forward (memory: a few [batch, seq, vocab] float32 logits)
    drop_first: bool = True  # keep position 0 clean and unscored (cache-acts' --drop-first)
    max_norm_ratio: float = 50.0  # keep positions with norm > this x the median clean (0: splice all)

    def __post_init__(self):
        if self.tokens < 1 or self.batch_size < 1:
            raise BadInput("--fidelity-tokens and --fidelity-batch-size must be >= 1")


class _Sums:
    """float64 sums over scored tokens (CE, KL) and spliced positions (reconstruction)."""

    def __init__(self):
        self.ce = self.kl = self.sse = self.sum_x2 = 0.0  # sum CE, sum KL, sum ||x - x_hat||^2, sum ||x||^2
        self.sum_x: torch.Tensor | None = None  # [d] float64
        self.positions = 0  # spliced positions (reconstruction), or scored tokens (the clean run)

    def add_reconstruction(self, x, x_hat) -> None:
        """x, x_hat: [m, d] at the spliced positions."""
        x64 = x.double()
        self.sse += float((x64 - x_hat.double()).square().sum())
        self.sum_x2 += float(x64.square().sum())
        s = x64.sum(dim=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.positions += x.shape[0]


@dataclass
class FidelityResult:
    """Per SAE key: its metrics; per layer: the ablation baselines; and what was run."""

    saes: dict[str, dict]
    info: dict
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class _Stub(nn.Module):
    """Stands in for block i < L in a spliced forward: hands on its input, or (block L-1) the splice value.

    The output is shaped like the real block's (a tensor, or a tuple whose tail is the clean tail);
    attributes the model's loop reads from a block (e.g. attention_type) come from the real one.
    """

    def __init__(self, block: nn.Module, value, tail: tuple | None):
        super().__init__()
        object.__setattr__(self, "_real", block)  # not a submodule: the stub owns no parameters
        self.value, self.tail = value, tail

    def forward(self, *args, **kwargs):
        out = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return out if self.tail is None else (out, *self.tail)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)


def _final_is_normed(model, layer: int, n: int) -> bool:
    tie_last = getattr(model.config, "tie_last_hidden_states", None)
    return layer == n and (tie_last is None or bool(tie_last))


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def clean_forward(model, ids, layers: list[int]) -> tuple[torch.Tensor, dict, dict]:
    """(logits [B, S, V], {L: hidden_states[L] [B, S, d]}, {L: the tail of block L-1's tuple output or None})."""
    blocks = decoder_layers(model)
    n = len(blocks)
    hidden, tails, handles = {}, {}, []

    def after(layer):
        def hook(module, args, output):
            hidden[layer] = output[0] if isinstance(output, (tuple, list)) else output
            tails[layer] = tuple(output[1:]) if isinstance(output, (tuple, list)) else None

        return hook

    def before(layer):
        def hook(module, args, kwargs):
            hidden[layer] = args[0] if args else kwargs["hidden_states"]

        return hook

    for L in layers:
        if L == 0:
            handles.append(blocks[0].register_forward_pre_hook(before(0), with_kwargs=True))
        elif _final_is_normed(model, L, n):
            handles.append(model.get_output_embeddings().register_forward_pre_hook(before(L), with_kwargs=True))
        else:
            handles.append(blocks[L - 1].register_forward_hook(after(L)))
    with _hooks(handles):
        logits = model(input_ids=ids, use_cache=False).logits
    return logits, hidden, tails


def spliced_forward(model, ids, layer: int, value, tail=None) -> torch.Tensor:
    """Logits [B, S, V] of the model with hidden_states[layer] replaced by `value` [B, S, d].

    Blocks before `layer` are not run (stubs hand `value` on); equal to a full forward with a hook
    that replaces the hidden state (tests/test_fidelity.py checks it).
    """
    container = decoder_container(model)
    n = len(container)
    handles, swapped = [], []
    if layer == 0:

        def replace_input(module, args, kwargs):
            return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})

        handles.append(container[0].register_forward_pre_hook(replace_input, with_kwargs=True))
    else:
        normed = _final_is_normed(model, layer, n)
        last = n if normed else layer
        for i in range(last):
            swapped.append((i, container[i]))
            container[i] = _Stub(container[i], value if (i == layer - 1 and not normed) else None, tail)
        if normed:
            head = model.get_output_embeddings()
            handles.append(head.register_forward_pre_hook(lambda module, args: (value, *args[1:])))
    try:
        with _hooks(handles):
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for i, block in swapped:
            container[i] = block


def _score(clean: tuple, logits, ids, first: int) -> tuple[float, float]:
    """(sum CE, sum KL(clean || x)) over the scored predictions: positions first .. S-2.

    clean: (log p_clean, p_clean), each [B, S-1-first, V], computed once per batch. KL is summed
    per position as p (log p_clean - log p) in place (no cancellation between two large sums).
    """
    logp_clean, p_clean = clean
    logp = torch.log_softmax(logits[:, first:-1].float(), dim=-1)  # [B, S-1-first, V]
    target = ids[:, first + 1 :]  # [B, S-1-first]
    ce = -logp.gather(-1, target.unsqueeze(-1)).sum(dtype=torch.float64)
    kl = logp.neg_().add_(logp_clean).mul_(p_clean).sum(dtype=torch.float64)
    return float(ce), float(kl)


def measure_fidelity(
    teacher: LoadedModel,
    data: DataSpec,
    targets: list[tuple[str, LoadedSAE]],
    means: dict[int, torch.Tensor],
    cfg: FidelityConfig,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> FidelityResult:
    """Run the teacher clean, spliced (each SAE of `targets`, at its layer) and ablated on held-out text.

    targets: (key, SAE) pairs; means: {layer: [d] mean activation} for the mean ablation.
    """
    if data.holdout != "eval":
        raise BadInput("fidelity is measured on held-out text: give a DataSpec with holdout='eval'")
    model, dev = teacher.model, teacher.device
    layers = sorted({s.layer for _, s in targets})
    first = 1 if cfg.drop_first else 0
    if data.seq_len - first < 2:
        raise BadInput("--seq-len too short to score a next-token prediction")
    per_sae = {key: _Sums() for key, _ in targets}
    base = {(L, a): _Sums() for L in layers for a in ABLATIONS}
    clean = _Sums()
    sequences, skipped = 0, 0
    start, clean_seconds = time.perf_counter(), 0.0
    with torch.no_grad():
        for ids in token_batches(data, teacher.tokenizer, cfg.batch_size):
            ids = ids.to(dev)
            t0 = time.perf_counter()
            logits, hidden, tails = clean_forward(model, ids, layers)
            logp_clean = torch.log_softmax(logits[:, first:-1].float(), dim=-1)  # [B, S-1-first, V]
            clean.ce += float(-logp_clean.gather(-1, ids[:, first + 1 :].unsqueeze(-1)).sum())
            clean_seconds += time.perf_counter() - t0
            scored = logp_clean.shape[0] * logp_clean.shape[1]
            ref = (logp_clean, logp_clean.exp())
            del logits
            clean.positions += scored
            for L in layers:
                h = hidden[L]  # [B, S, d]
                mask = torch.zeros(h.shape[:2], dtype=torch.bool, device=dev)  # [B, S] spliced positions
                keep = outlier_mask({L: h}, first, cfg.max_norm_ratio) if cfg.max_norm_ratio > 0 else None
                mask[:, first:] = True if keep is None else keep
                skipped += int(h.shape[0] * (h.shape[1] - first) - mask.sum())
                m3 = mask.unsqueeze(-1)  # [B, S, 1]
                for name, value in (("zero", torch.zeros_like(h)), ("mean", means[L].to(dev, h.dtype).expand_as(h))):
                    out = spliced_forward(model, ids, L, torch.where(m3, value, h), tails.get(L))
                    ce, kl = _score(ref, out, ids, first)
                    base[(L, name)].ce += ce
                    base[(L, name)].kl += kl
                x = h[mask].float()  # [m, d]
                for key, sae in targets:
                    if sae.layer != L:
                        continue
                    x_hat = sae.decode(sae.encode(x.to(sae.W_enc.device))).to(dev)  # [m, d]
                    per_sae[key].add_reconstruction(x, x_hat)
                    value = h.clone()
                    value[mask] = x_hat.to(h.dtype)
                    ce, kl = _score(ref, spliced_forward(model, ids, L, value, tails.get(L)), ids, first)
                    per_sae[key].ce += ce
                    per_sae[key].kl += kl
            sequences += ids.shape[0]
            if on_progress is not None:
                on_progress(clean.positions)
            if clean.positions >= cfg.tokens:
                break
    if clean.positions == 0:
        raise BadInput(f"{data.describe()['dataset']}: no held-out sequence of {data.seq_len} tokens to score")
    seconds = time.perf_counter() - start
    n = clean.positions
    out = {}
    for key, sae in targets:
        out[key] = _metrics(per_sae[key], clean, base[(sae.layer, "zero")], base[(sae.layer, "mean")], n)
    info = {
        "data": data.describe(),
        "model": teacher.name,
        "tokens": n,
        "sequences": sequences,
        "skipped_positions": skipped,
        "drop_first": cfg.drop_first,
        "max_norm_ratio": cfg.max_norm_ratio,
        "seconds": seconds,
        "clean_seconds": clean_seconds,
        "cost_ratio": seconds / clean_seconds if clean_seconds > 0 else None,
        "definitions": "SAELens evals.py: ce_loss_score = (CE_zero - CE_spliced) / (CE_zero - CE_clean), "
        "kl_div_score = (KL_zero - KL_spliced) / KL_zero, per token over held-out text; *_mean: mean ablation",
    }
    return FidelityResult(out, info, seconds)


def _metrics(s: _Sums, clean: _Sums, zero: _Sums, mean: _Sums, n: int) -> dict:
    ce_clean, ce_sae, ce_zero, ce_mean = clean.ce / n, s.ce / n, zero.ce / n, mean.ce / n
    kl_sae, kl_zero, kl_mean = s.kl / n, zero.kl / n, mean.kl / n

    def ratio(a, b):
        return a / b if b != 0 else None

    ev = None
    if s.positions:
        mu = s.sum_x / s.positions
        sst = s.sum_x2 - s.positions * float(mu @ mu)
        ev = 1.0 - s.sse / sst if sst > 0 else None
    return {
        "tokens": n,
        "spliced_positions": s.positions,
        "kl": kl_sae,
        "ce_clean": ce_clean,
        "ce_spliced": ce_sae,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
        "kl_zero": kl_zero,
        "kl_mean": kl_mean,
        "ce_loss_score": ratio(ce_zero - ce_sae, ce_zero - ce_clean),
        "ce_loss_score_mean": ratio(ce_mean - ce_sae, ce_mean - ce_clean),
        "kl_div_score": ratio(kl_zero - kl_sae, kl_zero),
        "kl_div_score_mean": ratio(kl_mean - kl_sae, kl_mean),
        "explained_variance": ev,
    }
