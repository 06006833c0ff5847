"""`--teacher-cache DIR`: the teacher's top-k log-probs per batch, so reruns skip the teacher.

Layout (kind ``kdtool.teacher_cache``):
    DIR/manifest.json                     kind, key (what must match to reuse), topk, temperature,
                                          vocab_size, provenance
    DIR/teacher/                          the teacher's config.json and tokenizer files, so a run
                                          whose batches are all cached never loads the teacher
    DIR/train/{i//1000:04d}/{i:07d}.r{lo}-{hi}.safetensors   training batch i, rows lo..hi:
        tokens   int32   [b, S]     the batch's token ids (rows lo..hi of the global batch)
        mask     uint8   [b, S]     1 = real token
        ids      int32   [b, S, k]  the teacher's k most likely next tokens at T
        logp     float32 [b, S, k]  their log-probs at temperature T (softmax over the full vocabulary)
        log_rest float32 [b, S]     log of the mass outside the top k (exact logsumexp, not 1 - sum)
    DIR/eval/{j//1000:04d}/{j:07d}.r{lo}-{hi}.safetensors    held-out batch j, in full:
        tokens, mask as above; logp_full float32 [b, S, V]   log-probs at T over the whole vocabulary

The approximation, for training only: the student learns from the KL over k+1 bins (the top k
and "the rest"), a lower bound of the full-vocabulary KL (data-processing inequality; the gap is
r_p * KL(p_tail || q_tail)). The held-out batches are kept whole so the floor is always the
full-vocabulary KL: at T=2 the teacher's tail outside its top 64 can hold most of the mass
(SmolLM2: 79%), and a top-k floor would read about half the real one. Log-probs are stored at the
run's T (renormalising at another T needs the whole vocabulary), so T is part of the key.
Size: about k x 8 + 9 bytes per training token (k=64: 8.4 MB per 32x512 batch) and V x 4 bytes
per held-out token (Pythia: 26 GB for 8 held-out batches of 32x512; lower --eval-batches to shrink).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from kdtool import formats
from kdtool.atomic import rename
from kdtool.distill.losses import FullTarget, TopKTarget
from kdtool.errors import BadInput

KIND = "kdtool.teacher_cache"
FORMAT_VERSION = 2


class TeacherCache:
    """A folder of cached teacher batches; `key` says which run they belong to."""

    def __init__(
        self,
        root: str | Path,
        *,
        key: dict[str, Any],
        topk: int,
        temperature: float,
        vocab_size: int | None = None,
        provenance: dict | None = None,
        create: bool = True,
    ):
        self.root = Path(root)
        self.topk = int(topk)
        self.temperature = float(temperature)
        want = {
            "format": FORMAT_VERSION,
            "topk": self.topk,
            "temperature": self.temperature,
            **json.loads(json.dumps(key, default=str)),
        }
        manifest = self.root / "manifest.json"
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"--teacher-cache {self.root}: exists and is not a folder")
        if manifest.exists():
            got = formats.read_json(manifest)
            if got.get("kind") != KIND:
                raise BadInput(f"--teacher-cache {self.root}: manifest.json is not a kdtool teacher cache")
            have, now = _flat(got.get("key", {})), _flat(want)
            diff = sorted(k for k in set(now) | set(have) if now.get(k) != have.get(k))
            if diff:
                shown = ", ".join(f"{k}={have.get(k)!r} (this run: {now.get(k)!r})" for k in diff[:3])
                raise BadInput(f"--teacher-cache {self.root}: made for another run: {shown}; use another folder")
            self.vocab_size = got.get("vocab_size")
        elif create:
            self.vocab_size = vocab_size
            formats.write_json(
                manifest,
                {
                    "kind": KIND,
                    "key": want,
                    "topk": self.topk,
                    "temperature": self.temperature,
                    "vocab_size": vocab_size,
                    "provenance": provenance,
                },
            )
        else:
            raise BadInput(f"--teacher-cache {self.root}: no manifest.json")
        self.key = want

    # -- teacher description ---------------------------------------------------------------
    @property
    def teacher_dir(self) -> Path:
        return self.root / "teacher"

    def has_teacher(self) -> bool:
        return (self.teacher_dir / "config.json").exists()

    def save_teacher(self, config, tokenizer=None) -> None:
        """Keep the teacher's config (and tokenizer) so a fully cached rerun needs no teacher."""
        if self.has_teacher():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".teacher.", suffix=".tmp", dir=self.root))
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            rename(tmp, self.teacher_dir)
        except OSError:  # another rank (or run sharing the cache) got there first
            shutil.rmtree(tmp, ignore_errors=True)

    def load_teacher_config(self):
        return AutoConfig.from_pretrained(self.teacher_dir)

    def load_tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(self.teacher_dir)
        except Exception:
            return None

    # -- batches ---------------------------------------------------------------------------
    def path(self, split: str, index: int, rows: tuple[int, int]) -> Path:
        lo, hi = rows
        return self.root / split / f"{index // 1000:04d}" / f"{index:07d}.r{lo}-{hi}.safetensors"

    def has(self, split: str, index: int, rows: tuple[int, int]) -> bool:
        return self.path(split, index, rows).exists()

    def covers(self, steps: int, eval_batches: int, rows: tuple[int, int]) -> bool:
        """True when every batch a run needs is cached (and the teacher's config is kept)."""
        if not self.has_teacher():
            return False
        return all(self.has("train", i, rows) for i in range(steps)) and all(
            self.has("eval", j, rows) for j in range(eval_batches)
        )

    def save(self, split: str, index: int, rows: tuple[int, int], tokens, mask, target) -> None:
        """Store a batch with its TopKTarget (training) or FullTarget (held-out)."""
        tensors = {"tokens": tokens.to(torch.int32).cpu(), "mask": mask.to(torch.uint8).cpu()}
        if isinstance(target, FullTarget):
            tensors["logp_full"] = target.logp.float().cpu()
        else:
            tensors |= {
                "ids": target.ids.to(torch.int32).cpu(),
                "logp": target.logp.float().cpu(),
                "log_rest": target.log_rest.float().cpu(),
            }
        formats.save_safetensors(
            self.path(split, index, rows),
            tensors,
            kind=f"{KIND}.batch",
            extra={"temperature": repr(self.temperature), "topk": str(self.topk)},
        )

    def load(self, split: str, index: int, rows: tuple[int, int]):
        """(tokens int64 [b,S], mask bool [b,S], TopKTarget or FullTarget) or None when not cached."""
        p = self.path(split, index, rows)
        if not p.exists():
            return None
        try:
            t = load_file(str(p))
        except Exception as exc:
            raise BadInput(f"--teacher-cache: {p} is unreadable ({exc}); delete it to recompute") from exc
        if "logp_full" in t:
            target = FullTarget(t["logp_full"].float())
        else:
            target = TopKTarget(t["ids"].long(), t["logp"].float(), t["log_rest"].float())
        return t["tokens"].long(), t["mask"].bool(), target


def _flat(d: dict, prefix: str = "") -> dict:
    """{'run': {'teacher': x}} -> {'run.teacher': x}: mismatches are reported by leaf."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
