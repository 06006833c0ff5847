"""What the distillation loop reads: [B, S] token batches, a cursor over them, and the text epoch policy.

A data source is a function: train_batches(skip) yields the global training batches after `skip`
of them, eval_batches() the held-out ones; both must be deterministic (the same call yields the
same batches), which is what makes --resume and torchrun exact. `text_streams` builds the two from
a kdtool.text.tokens.DataSpec: when the training text runs out, the next epoch repeats it
reshuffled (shuffle seed + epoch); the held-out side of the document split is never trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from kdtool.distill.config import DistillConfig
from kdtool.errors import RuntimeFailure
from kdtool.text.tokens import DataSpec, token_batches

TrainBatches = Callable[[int], Iterator]  # skip -> the global training batches after `skip` of them
EvalBatches = Callable[[], Iterator]  # () -> the held-out batches, the same ones every call


def as_batch(x):
    """Normalise what a data source yields to (tokens LongTensor[B,S], mask BoolTensor[B,S])."""
    if isinstance(x, dict):
        ids = x["input_ids"]
        mask = x.get("attention_mask")
    elif isinstance(x, (tuple, list)):
        ids, mask = x[0], (x[1] if len(x) > 1 else None)
    else:
        ids, mask = x, None
    ids = torch.as_tensor(ids).long()
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    return ids, mask


def check_shape(batch, cfg: DistillConfig, what: str):
    """The batch itself, or RuntimeFailure when it is not [batch_size, seq_len]."""
    ids, mask = batch
    if tuple(ids.shape) != (cfg.batch_size, cfg.seq_len) or ids.shape != mask.shape:
        raise RuntimeFailure(f"{what} batch has shape {tuple(ids.shape)}, expected ({cfg.batch_size}, {cfg.seq_len})")
    return ids, mask


class Cursor:
    """The training stream, positioned at a batch index; reopened with skip_batches when it jumps."""

    def __init__(self, open_fn: TrainBatches, cfg: DistillConfig):
        self.open_fn, self.cfg = open_fn, cfg
        self.it, self.pos = None, -1

    def get(self, index: int):
        if self.it is None or self.pos != index:
            self.it, self.pos = iter(self.open_fn(index)), index
        try:
            x = next(self.it)
        except StopIteration:
            raise RuntimeFailure(
                f"training data ran out after {index} batches of {self.cfg.batch_size}x{self.cfg.seq_len}; "
                "use a bigger dataset or fewer --steps"
            ) from None
        self.pos += 1
        return check_shape(as_batch(x), self.cfg, "training")


def repeating(
    open_epoch: Callable[[int, int], Iterator], on_new_epoch: Callable[[int, int], None] | None = None
) -> TrainBatches:
    """train_batches(skip) over a finite corpus: when epoch e ends, epoch e+1 starts (reshuffled by the caller).

    open_epoch(epoch, skip) yields epoch `epoch`'s batches after `skip` of them; every epoch has the
    same number of batches (the same documents packed in another order). on_new_epoch(epoch, at_batch)
    is told when the data starts repeating.
    """
    length: list[int] = []  # batches per epoch, once known

    def count(epoch: int) -> int:
        if not length:
            length.append(sum(1 for _ in open_epoch(epoch, 0)))
        return length[0]

    def train_batches(skip: int) -> Iterator:
        epoch, s = divmod(skip, length[0]) if length and length[0] else (0, skip)
        position = skip
        while True:
            n = 0
            for batch in open_epoch(epoch, s):
                n += 1
                position += 1
                yield batch
            if n == 0 and s > 0 and not length:  # skipped past the end: learn the epoch length, then jump
                per = count(epoch)
                if per == 0:
                    return
                epoch, s = divmod(skip, per)
                continue
            if n + s == 0:
                return  # no data at all
            if not length:
                length.append(n + s)
            epoch, s = epoch + 1, 0
            if on_new_epoch is not None:
                on_new_epoch(epoch, position)

    return train_batches


def text_streams(
    data: DataSpec, tokenizer, batch_size: int, *, on_new_epoch: Callable[[int, int], None] | None = None
) -> tuple[TrainBatches, EvalBatches]:
    """(train_batches, eval_batches) of packed text: the distill epoch policy.

    Training reads the train side of the document split; epoch e shuffles its documents with seed
    `data.seed + e`, so a repeated corpus is packed into other sequences each time. The held-out
    stream is the eval side (`holdout="eval"`), in its own fixed order. Incomplete batches are dropped.
    """

    def open_epoch(epoch: int, skip: int):
        spec = dataclasses.replace(data, seed=data.seed + epoch)
        return token_batches(spec, tokenizer, batch_size, skip_batches=skip, drop_last=True)

    def held_out():
        spec = dataclasses.replace(data, holdout="eval")
        return token_batches(spec, tokenizer, batch_size, drop_last=True)

    return repeating(open_epoch, on_new_epoch), held_out
