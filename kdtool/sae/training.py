"""The training loop of `kdtool train-sae`: SAEs of every layer from one stream of batches.

`train(cfg, source, out)` clears or resumes `out` (kdtool/sae/checkpoint.py), runs the Trainer
over the source's batches (kdtool/sae/sources.py) and writes the SAEs, their train_log and the
checkpoints. With `normalize="expected-norm"` the first batches also give each layer's activation
scale (kdtool/sae/normalise.py).

Each layer may have several SAEs (cfg.specs(): widths x lambdas x initialisation seeds). They are
trained side by side: one read of the cache or one teacher forward per batch, then each SAE takes
its own step on that layer's batch with its own optimizer, controller and counters. Nothing is
shared between them but the batch (normalised once per layer), so each SAE is bit for bit the one
a run of it alone would train (tests/test_sae_multi.py); the saving is the data pass.

Under torchrun (kdtool/distributed.py: NCCL on GPU, gloo on CPU) every rank reads the same global
batch and steps on rows rank::world of it; the gradients (each a mean over its rank's rows) are
summed and divided by world, and the statistics the controller and the log use (squared error,
L1 sum, per-feature fire counts) are summed, so every rank applies the same update and lambda and
W processes follow the one-process run up to float rounding. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kdtool import locks
from kdtool.distributed import Dist, all_reduce, barrier
from kdtool.errors import BadInput, RuntimeFailure
from kdtool.formats import finite_or_none
from kdtool.models import resolve_device
from kdtool.sae.checkpoint import CHECKPOINT, Counters, Interval, LayerRun, RunFiles, adam, prepare_output
from kdtool.sae.config import SAESpec, TrainConfig, check_processes
from kdtool.sae.model import SparseAutoencoder, apply_gradients, forward_backward
from kdtool.sae.normalise import NORM_TOKENS, estimate_scale, normalised
from kdtool.sae.sources import BatchSource

#: train_log.parquet's columns: one row per --log-every steps, averaged over them (`Trainer._log_row`)
LOG_COLUMNS = (
    "layer",
    "step",
    "tokens",
    "mse",
    "l1_term",
    "loss",
    "l0",
    "alive_fraction",
    "explained_variance",
    "lambda",
    "lr",
    "elapsed_s",
)
#: the columns of train-sae's summary table: one row per layer, from its last log row
#: (d_sae, l1 = the starting lambda, init_seed: what sets apart SAEs trained side by side on one layer)
SUMMARY_COLUMNS = (
    "layer",
    "tokens",
    "steps",
    "mse",
    "explained_variance",
    "l0",
    "alive_fraction",
    "lambda",
    "d_sae",
    "l1",
    "init_seed",
    "sae",
)


def _new_run(name: str, layer: int, spec: SAESpec, cfg: TrainConfig, first_batch, device, scale: float) -> LayerRun:
    # b_pre starts at the mean of the first (normalised) batch: the SAE begins by reconstructing the centre
    b_pre = (first_batch if scale == 1.0 else first_batch.float() / scale).mean(dim=0).cpu()
    seed = spec.generator_seed(layer)
    sae = SparseAutoencoder.initialise(cfg.d_in, spec.d_sae, seed=seed, device=device, b_pre=b_pre)
    return LayerRun(
        name=name,
        layer=layer,
        spec=spec,
        sae=sae,
        opt=adam(sae, cfg),
        controller=cfg.controller(spec.l1),
        last_fired=torch.zeros(spec.d_sae, dtype=torch.int64, device=device),
        scale=scale,
    )


class Trainer:
    """Runs the loop; the CLI gives it callbacks for progress and messages."""

    def __init__(
        self,
        cfg: TrainConfig,
        source: BatchSource,
        out: str | Path,
        *,
        provenance: dict | None = None,
        on_step: Callable[[int, int, dict], None] | None = None,
        on_message: Callable[[str], None] | None = None,
        stop_after_steps: int | None = None,
        dist: Dist | None = None,
    ):
        self.cfg, self.source, self.out = cfg, source, Path(out)
        self.dist = dist or Dist()
        check_processes(cfg.batch_tokens, self.dist.world)
        self.files = RunFiles(out, cfg, source.info, provenance)
        self.on_step = on_step or (lambda tokens, step, row: None)
        quiet = not self.dist.main  # one voice: rank 0 reports
        self.on_message = (on_message if not quiet else None) or (lambda msg: None)
        self.stop_after_steps = stop_after_steps  # tests: simulate a killed run
        self.runs: dict[str, LayerRun] = {}  # by folder name, in cfg.runs() order (layer by layer)
        self.at = Counters()
        self.outcome = "not run"  # set by run(): trained, finished or repaired
        self.step_seconds = 0.0  # this process: the SAE steps (gradients, optimizer, statistics)
        self.source_seconds = 0.0  # this process: waiting for batches (a streamed teacher's forward, or reading)
        d = self.dist
        self.device = resolve_device(cfg.device, local_rank=d.local_rank if d.world > 1 else None)
        self.matmul_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        if source.d_in != cfg.d_in:
            raise BadInput(f"activations have d={source.d_in} but the config says d_in={cfg.d_in}")
        source.check_batch(cfg.batch_tokens)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, LayerRun]:
        """Train until the budget (or the one pass) is done; a resumed run that already is, only its files.

        Whether a step is left is checked before the first one and after each (`finished`), so no run,
        fresh or resumed, steps past --tokens.
        `outcome` says what happened: "trained", "finished" (left as it was) or "repaired" (the final
        SAE folders rewritten from the last checkpoint, after a kill during their write).
        """
        cfg, at = self.cfg, self.at
        if self.runs and self.finished():
            return self._finish_files()
        at.finished = False  # a finished run given a larger --tokens trains on
        start = time.perf_counter() - at.elapsed
        next_ckpt = self._next_milestone()
        # the batches this run will still take: a streamed teacher forwards no more than that
        limit = None if cfg.tokens is None else cfg.tokens // cfg.batch_tokens - at.step
        stream = self.source.batches(
            cfg.layers, cfg.batch_tokens, seed=cfg.seed, start=at.position, one_pass=cfg.tokens is None, limit=limit
        )
        waited = time.perf_counter()
        if not self.runs:
            stream = self._start(stream)  # reads the first batches (and builds the SAEs) now
        ran = 0
        by_layer = {L: [r for r in self.runs.values() if r.layer == L] for L in cfg.layers}
        for batch, position in stream:
            stepping = time.perf_counter()
            self.source_seconds += stepping - waited
            for L, runs in by_layer.items():
                # every SAE of a layer shares its scale s: the batch is moved and divided once for all of them
                x = normalised(batch[L].to(self.device, torch.float32, non_blocking=True), runs[0].scale)
                for r in runs:
                    self._step(r, x)
            waited = time.perf_counter()
            self.step_seconds += waited - stepping
            at.step += 1
            at.tokens += cfg.batch_tokens
            at.position = position
            ran += 1
            at.elapsed = time.perf_counter() - start
            if at.step % cfg.log_every == 0:
                for r in self.runs.values():
                    self._log_row(r)
            self.on_step(at.tokens, at.step, next(iter(self.runs.values())).last)
            if self.finished():
                break  # the final checkpoint follows
            if next_ckpt is not None and at.tokens >= next_ckpt:
                self.save_checkpoint()
                next_ckpt = self._next_milestone()
            if self.stop_after_steps is not None and ran >= self.stop_after_steps:
                return self.runs  # simulated kill: no final files
        if not self.runs:
            raise RuntimeFailure("no complete batch in the activations: use a smaller --batch-tokens or cache more")
        for r in self.runs.values():
            if r.interval.steps:
                self._log_row(r)
        at.finished = True
        self.save_checkpoint()
        self.save_final()
        self.outcome = "trained"
        return self.runs

    def finished(self) -> bool:
        """No step is left: the next batch would pass --tokens, or (no --tokens) the checkpoint ended the pass."""
        if self.cfg.tokens is None:
            return self.at.finished
        return self.at.tokens + self.cfg.batch_tokens > self.cfg.tokens

    def _finish_files(self) -> dict[str, LayerRun]:
        """A resumed run with nothing left to train: leave its final folders, or rewrite them if a kill cut them."""
        at = self.at
        if self.files.final_complete(at):
            self.outcome = "finished"
            self.on_message(f"{self.out}: already trained on {at.tokens:,} tokens (step {at.step}); left as it is")
        else:
            if self.dist.main:
                self.files.save_final(self.runs, at, self._logs())
            self.outcome = "repaired"
            self.on_message(
                f"{self.out}: trained on {at.tokens:,} tokens but its final SAE files were cut short; "
                "rewrote them from the last checkpoint"
            )
        return self.runs

    def _start(self, stream: Iterator) -> Iterator:
        """A fresh run: estimate each layer's scale on the first batches, build the SAEs, then replay them."""
        cfg = self.cfg
        n = math.ceil(NORM_TOKENS / cfg.batch_tokens) if cfg.normalize != "none" else 1
        head = []
        for item in stream:
            head.append(item)
            if len(head) >= n:
                break
        if not head:
            return iter(())
        self.at.scale_tokens = len(head) * cfg.batch_tokens if cfg.normalize != "none" else 0
        for L in cfg.layers:
            scale = estimate_scale([b[L] for b, _ in head], cfg.d_in) if cfg.normalize != "none" else 1.0
            for name, layer, spec in cfg.runs():
                if layer == L:
                    self.runs[name] = _new_run(name, L, spec, cfg, head[0][0][L], self.device, scale)
            if cfg.normalize != "none":
                self.on_message(
                    f"layer {L}: activation scale s = {scale:.5g} (mean ||x|| {scale * math.sqrt(cfg.d_in):.5g} "
                    f"over the first {self.at.scale_tokens:,} tokens); training on x / s"
                )

        def replay():
            while head:  # popped, so the estimate's batches are freed as they are trained on
                yield head.pop(0)
            yield from stream

        return replay()

    def _next_milestone(self) -> int | None:
        every = self.cfg.checkpoint_every
        return None if not every else (self.at.tokens // every + 1) * every

    def _step(self, r: LayerRun, x) -> None:
        cfg = self.cfg
        lam = r.controller.value(self.at.step)
        for p in r.sae.parameters():
            p.grad = None
        d = self.dist
        mine = x[d.rank :: d.world] if d.world > 1 else x
        st = forward_backward(
            r.sae, mine, lam, kernel=cfg.kernel, matmul_dtype=self.matmul_dtype, screen=cfg.bf16_screen
        )
        if d.world > 1:
            self._reduce(r, st, x)
        apply_gradients(r.sae, r.opt, cfg.grad_clip)
        nnz = int(st.nnz)
        B = st.tokens  # the global batch (all ranks' rows) after _reduce
        r.controller.update(nnz / B, self.at.step)
        r.last_fired[st.fires > 0] = self.at.tokens + B
        iv = r.interval
        s2 = r.scale * r.scale  # the log is in raw-activation units: s^2 times the normalised sums
        iv.steps += 1
        iv.tokens += B
        iv.sse += float(st.sse) * s2
        iv.sst += float(st.sst) * s2
        iv.l1_term += lam * float(st.l1_sum) * s2
        iv.nnz += nnz
        iv.lam = lam
        if not math.isfinite(iv.sse):
            raise RuntimeFailure(
                f"layer {r.layer}: the loss diverged (non-finite) at step {self.at.step}; try a smaller --lr"
            )

    def _reduce(self, r: LayerRun, st, x) -> None:
        """Average the ranks' gradients and sum their statistics (in place), so every rank agrees."""
        d = self.dist
        params = list(r.sae.parameters())
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        all_reduce(flat, d).div_(d.world)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n
        # sums over tokens: squared error, L1 and fire counts (exact in float64 for any batch)
        stats = torch.cat([torch.stack([st.sse, st.l1_sum]).double(), st.fires.double()])
        all_reduce(stats, d)
        st.sse, st.l1_sum = stats[0], stats[1]
        st.fires = stats[2:].round().to(torch.int64)
        st.sst = (x - x.mean(dim=0)).pow(2).sum()  # every rank holds the global batch
        st.tokens = x.shape[0]
        self._agree_on_kernel(r, st, flat.device)

    def _agree_on_kernel(self, r: LayerRun, st, device) -> None:
        """Every rank decides its next kernel from the global batch's density and rank 0's measurements.

        Why: each rank measured its own crossover and bf16 screen decision on its own shard, and a
        resumed run loads rank 0's into every rank; with one density and one measurement everywhere,
        the ranks choose alike before and after a resume (so resume stays exact).
        """
        choice = r.sae.kernel_choice
        choice.density = int(st.nnz) / (st.tokens * r.sae.d_sae)
        measured = [choice.crossover, choice.screen_crossover, choice.screen_holds]
        codes = [-1.0 if v is None else float(v) for v in measured]  # None -> -1 (all are >= 0 otherwise)
        mine = codes if self.dist.rank == 0 else [0.0] * len(codes)
        agreed = all_reduce(torch.tensor(mine, dtype=torch.float64, device=device), self.dist).tolist()
        choice.crossover, choice.screen_crossover = (None if v < 0 else v for v in agreed[:2])
        choice.screen_holds = None if agreed[2] < 0 else bool(agreed[2])

    def _log_row(self, r: LayerRun) -> None:
        at, iv = self.at, r.interval
        n = max(iv.tokens, 1)
        mse = iv.sse / n
        l1_term = iv.l1_term / n
        alive = float(((at.tokens - r.last_fired) < self.cfg.alive_window).float().mean())
        row = {
            "layer": r.layer,
            "step": at.step,
            "tokens": at.tokens,
            "mse": mse,
            "l1_term": l1_term,
            "loss": mse + l1_term,
            "l0": iv.nnz / n,
            "alive_fraction": alive,
            "explained_variance": 1.0 - iv.sse / iv.sst if iv.sst > 0 else float("nan"),
            "lambda": iv.lam,
            "lr": self.cfg.lr,
            "elapsed_s": at.elapsed,
        }
        r.rows.append(row)
        r.last = row
        r.interval = Interval()

    # ---- files (rank 0) ---------------------------------------------------------------------
    def _logs(self) -> dict[str, dict]:
        return {name: {c: [row[c] for row in r.rows] for c in LOG_COLUMNS} for name, r in self.runs.items()}

    def save_checkpoint(self) -> None:
        if not self.dist.main:
            return
        self.files.save_checkpoint(self.runs, self.at, self._logs(), finished=self.at.finished)
        self.on_message(f"checkpoint at {self.at.tokens:,} tokens (step {self.at.step})")

    def save_final(self) -> None:
        if self.dist.main:
            self.files.save_final(self.runs, self.at, self._logs())

    def resume(self) -> None:
        """Continue from the latest checkpoint in `out` (kdtool/sae/checkpoint.py refuses a changed config)."""
        self.at, self.runs = self.files.load(self.device)
        self.on_message(f"resuming at {self.at.tokens:,} tokens (step {self.at.step}) from {self.out / CHECKPOINT}")

    def summary(self) -> dict[str, list]:
        """train-sae's table: per SAE its width, lambda and seed, the run's totals, its last log row and its folder."""
        rows: dict[str, list] = {k: [] for k in SUMMARY_COLUMNS}
        for name, run in self.runs.items():
            rows["layer"].append(run.layer)
            rows["d_sae"].append(run.spec.d_sae)
            rows["l1"].append(run.spec.l1)
            rows["init_seed"].append(run.spec.init_seed)
            rows["tokens"].append(self.at.tokens)
            rows["steps"].append(self.at.step)
            for k in ("mse", "explained_variance", "l0", "alive_fraction", "lambda"):
                rows[k].append(finite_or_none(run.last.get(k)))
            rows["sae"].append(str(self.out / name))
        return rows


def train(
    cfg: TrainConfig,
    source: BatchSource,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    provenance: dict | None = None,
    on_step=None,
    on_message=None,
    stop_after_steps: int | None = None,
    dist: Dist | None = None,
) -> Trainer:
    """Train (or continue) the SAEs of every layer side by side and write saes/ (rank 0); returns the finished Trainer.

    `dist`: the torchrun process group (kdtool.distributed.dist_init), None for one process.
    """
    dist = dist or Dist()
    source.check_batch(cfg.batch_tokens)  # before anything in `out` is touched (--overwrite removes the old run)
    owner = locks.claim(out, command=(provenance or {}).get("command")) if dist.main else contextlib.nullcontext()
    with owner:  # rank 0 is `out`'s only writer (kdtool/locks.py), and clears what a killed run left
        continues = prepare_output(
            out, [name for name, _, _ in cfg.runs()], resume=resume, force=force, remove=dist.main
        )
        barrier(dist)  # no rank starts before rank 0 has cleared an --overwrite'd run
        trainer = Trainer(
            cfg,
            source,
            out,
            provenance=provenance,
            on_step=on_step,
            on_message=on_message,
            stop_after_steps=stop_after_steps,
            dist=dist,
        )
        if continues:
            trainer.resume()
        elif resume:
            trainer.on_message(f"--resume: no checkpoint in {out}; starting from the beginning")
        trainer.run()
        barrier(dist)  # the other ranks wait for rank 0's files
    return trainer
