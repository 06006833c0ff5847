"""A train-sae run's state (one LayerRun per SAE) and its files: saving, resuming, refusing to overwrite.

Output folder (default saes/), one folder per SAE:
    saes/checkpoint.json                              the latest complete checkpoint (written last)
    saes/layer{L}/cfg.json + sae_weights.safetensors  the final SAE (kdtool = SAELens layout + "kdtool")
    saes/layer{L}/train_log.parquet                   step, tokens, mse, l1_term, loss, l0, ...
    saes/layer{L}/checkpoints/tokens-{N:012d}/        an SAE folder at each token milestone, plus
        optimizer.safetensors + state.json            (Adam moments, controller, counters: latest only)
With several SAEs per layer (trained side by side) each has such a folder, named by what sets it
apart: saes/layer{L}-x8/, saes/layer{L}-lambda3e-4/, ... (kdtool/sae/config.py run_name); cfg.json
records its width, lambda and seed.

Resume is exact on CPU: the checkpoint holds the weights, Adam's moments and step, the L1
controller, the alive counters, the partial log interval and the reader's position, and the
reader's shuffles depend only on (seed, position). Nothing else is random after initialisation.
Saved SAE folders have the activation scale folded in (kdtool/sae/normalise.py); the unfolded
biases a normalised run continues from are in the optimizer file. Only rank 0 writes files.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.identity import describe
from kdtool.sae.config import SAESpec, TrainConfig
from kdtool.sae.kernel_choice import KernelChoice
from kdtool.sae.layouts import CFG, SAELENS_WEIGHTS
from kdtool.sae.model import L1Controller, SparseAutoencoder
from kdtool.sae.normalise import fold_scale
from kdtool.sae.writers import saelens_cfg, save_kdtool

LOG_KIND = "kdtool.sae.train_log"  # checkpoint copies: LOG_KIND + ".checkpoint" (not picked up as a run's log)
LOG_FILE = "train_log.parquet"
CHECKPOINT = "checkpoint.json"
CHECKPOINT_KIND = "kdtool.sae.checkpoint"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
#: config fields that may change between a run and its --resume
RESUME_MAY_CHANGE = ("tokens", "checkpoint_every", "log_every", "device", "kernel", "bf16_screen")
#: source keys (kdtool/sae/sources.py `info`) that say where the activations are, not what they are
SOURCE_MAY_CHANGE = ("acts",)
#: config fields added after the first checkpoints were written: their value for an older checkpoint
LEGACY_CONFIG = {"normalize": "none", "init_seed": None, "bf16_screen": "auto"}


@dataclass
class Counters:
    """Where the run stands: what checkpoint.json and each state.json record besides the layers."""

    step: int = 0
    tokens: int = 0
    position: dict | None = None  # the source's position after the latest batch
    elapsed: float = 0.0  # seconds of training, over all resumes
    scale_tokens: int = 0  # tokens s was estimated on (0 without normalisation)
    finished: bool = False  # the checkpoint is the run's last one (its final SAEs follow it)


@dataclass
class Interval:
    """Sums over the steps since the last log row, in raw-activation units (s^2 x the normalised sums)."""

    steps: int = 0
    tokens: int = 0
    sse: float = 0.0
    sst: float = 0.0
    l1_term: float = 0.0  # sum over tokens of s^2 * lambda * sum_j z_j (= lambda * s * sum_j of raw latents)
    nnz: int = 0
    lam: float = 0.0  # lambda applied at the latest step


@dataclass
class LayerRun:
    """One SAE's run: the SAE, its optimizer, controller, counters and log (several per layer side by side)."""

    name: str  # its folder in the output: layer{L}, or layer{L}-x8 etc. beside siblings
    layer: int
    spec: SAESpec  # width, lambda, initialisation seed
    sae: SparseAutoencoder
    opt: Any
    controller: L1Controller
    last_fired: Any  # [F] int64: tokens seen when each feature last fired
    rows: list = field(default_factory=list)
    interval: Interval = field(default_factory=Interval)
    last: dict = field(default_factory=dict)  # the latest log row
    scale: float = 1.0  # s: the SAE trains on x / s (1.0 without normalisation)


def adam(sae: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with the fused kernel: one pass over each tensor instead of a dozen (on one CPU thread, measured
    122 -> 16 ms per step for the 5.3M parameters of d=576, F=4608); the same update up to float rounding."""
    fused = sae.W_enc.device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


class RunFiles:
    """The files of one run in `out`; `logs` hand in each SAE's train_log columns (the loop owns their schema)."""

    def __init__(self, out: str | Path, cfg: TrainConfig, source_info: dict, provenance: dict | None):
        self.out, self.cfg, self.source_info, self.provenance = Path(out), cfg, source_info, provenance

    def checkpoint_dir(self, name: str, tokens: int) -> Path:
        return self.out / name / "checkpoints" / f"tokens-{tokens:012d}"

    def read_pointer(self) -> dict | None:
        path = self.out / CHECKPOINT
        return formats.read_json(path) if path.exists() else None

    # ---- writing ----------------------------------------------------------------------------
    def save_checkpoint(
        self, runs: dict[str, LayerRun], at: Counters, logs: dict[str, dict], *, finished: bool = False
    ) -> None:
        """Per SAE: an SAE folder + optimizer state + log + state.json; then checkpoint.json (written last).

        finished=True marks the run's last checkpoint (written just before the final SAE folders):
        a --resume that finds it only checks, or repairs, the final folders (`final_complete`).
        """
        previous = self.read_pointer()
        for r in runs.values():
            ck = self.checkpoint_dir(r.name, at.tokens)
            cfg, kd = self._cfg_json(r, at, checkpoint=True)
            trained = r.sae.tensors()
            save_kdtool(ck, fold_scale(trained, r.scale), cfg=cfg, kdtool=kd, provenance=self.provenance)
            opt_tensors = {"last_fired": r.last_fired.cpu()}
            if r.scale != 1.0:  # the unfolded biases the run continues from (s * b / s need not give b back)
                opt_tensors |= {"train.b_enc": trained["b_enc"], "train.b_dec": trained["b_dec"]}
            adam_steps = {}
            for pname, p in r.sae.named_parameters():
                s = r.opt.state.get(p, {})
                if s:
                    opt_tensors[f"{pname}.exp_avg"] = s["exp_avg"].detach().cpu()
                    opt_tensors[f"{pname}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu()
                    adam_steps[pname] = float(s["step"])
            formats.save_safetensors(
                ck / OPTIMIZER, opt_tensors, kind="kdtool.sae.optimizer", provenance=self.provenance
            )
            self._write_log(r, at, logs[r.name], ck / LOG_FILE, kind=LOG_KIND + ".checkpoint")
            formats.write_json(
                ck / STATE,
                {
                    "kind": "kdtool.sae.train_state",
                    "layer": r.layer,
                    "name": r.name,
                    "sae": r.spec.as_dict(),
                    "step": at.step,
                    "tokens": at.tokens,
                    "adam_steps": adam_steps,
                    "controller": r.controller.state(),
                    "interval": asdict(r.interval),
                    "log_rows": len(r.rows),
                    "activation_scale": r.scale,
                    "scale_tokens": at.scale_tokens,
                    "kernel_choice": r.sae.kernel_choice.state(),  # --kernel auto's crossover: resume stays exact
                },
            )
        formats.write_json(
            self.out / CHECKPOINT,
            {
                "kind": CHECKPOINT_KIND,
                "step": at.step,
                "tokens": at.tokens,
                "position": at.position,
                "elapsed_s": at.elapsed,
                "layers": self.cfg.layers,
                "saes": list(runs),
                "dir": f"tokens-{at.tokens:012d}",
                "finished": finished,
                "config": self.cfg.as_dict(),
                "source": self.source_info,
                "provenance": self.provenance,
            },
        )
        # only the latest checkpoint keeps its optimizer state (3x the weights); older ones keep the SAE
        if previous and previous.get("tokens") != at.tokens:
            for name in _pointer_saes(previous):
                old = self.checkpoint_dir(name, previous["tokens"]) / OPTIMIZER
                if old.exists():
                    old.unlink()

    def save_final(self, runs: dict[str, LayerRun], at: Counters, logs: dict[str, dict]) -> None:
        """saes/{name}/: each SAE (scale folded in) and its train_log."""
        for r in runs.values():
            folder = self.out / r.name
            cfg, kd = self._cfg_json(r, at, checkpoint=False)
            self._write_log(r, at, logs[r.name], folder / LOG_FILE)
            save_kdtool(folder, fold_scale(r.sae.tensors(), r.scale), cfg=cfg, kdtool=kd, provenance=self.provenance)

    def final_complete(self, at: Counters) -> bool:
        """Whether every SAE's final folder was written whole at `at` (cfg.json, written last, says so)."""
        for name, _, _ in self.cfg.runs():
            folder = self.out / name
            try:
                kd = formats.read_json(folder / CFG).get("kdtool") or {}
            except BadInput:
                return False
            same = kd.get("tokens") == at.tokens and kd.get("steps") == at.step and not kd.get("checkpoint")
            if not (same and (folder / SAELENS_WEIGHTS).is_file() and (folder / LOG_FILE).is_file()):
                return False
        return True

    def _cfg_json(self, r: LayerRun, at: Counters, *, checkpoint: bool) -> tuple[dict, dict]:
        info = self.source_info
        cfg = saelens_cfg(
            self.cfg.d_in,
            r.spec.d_sae,
            layer=r.layer,
            model_name=info.get("model"),
            context_size=info.get("seq_len"),
            dataset_path=info.get("dataset"),
        )
        kd = {
            "layer": r.layer,
            "hidden_states_index": r.layer,
            "tokens": at.tokens,
            "steps": at.step,
            "l1": r.spec.l1,
            "l1_final": r.controller.l1,
            "sae": self._sae_info(r),
            "controller": {
                "target_l0": self.cfg.target_l0,
                "rate": self.cfg.l1_rate,
                "warmup_steps": self.cfg.l1_warmup,
                "l0_running": r.controller.l0_running,
            },
            "loss": "mean_b ||x - x_hat||^2 + lambda * sum_j z_j (sum over features, mean over batch)",
            "decoder": "unit-norm rows of W_dec; b_dec is the pre-encoder bias (subtracted before encoding)",
            "normalize": self._normalize_info(r, at),
            "checkpoint": checkpoint,
            "last_log": r.last,
            "source": info,
            "config": self.cfg.as_dict(),
        }
        return cfg, kd

    def _sae_info(self, r: LayerRun) -> dict:
        """What sets this SAE apart from the others the run trained beside it on the same batches."""
        siblings = [name for name, L, _ in self.cfg.runs() if L == r.layer and name != r.name]
        return {
            "name": r.name,
            "d_sae": r.spec.d_sae,
            "expansion": r.spec.d_sae / self.cfg.d_in,
            "l1": r.spec.l1,
            "init_seed": r.spec.init_seed,
            "seed": r.spec.generator_seed(r.layer),  # the generator seed of its initialisation
            "data_seed": self.cfg.seed,  # the batches' order, shared by every SAE of the run
            "trained_beside": siblings,
        }

    def _normalize_info(self, r: LayerRun, at: Counters) -> dict:
        """cfg.json's record of the activation scaling (the saved weights already have it folded in)."""
        info = {"method": self.cfg.normalize, "scale": r.scale}
        if self.cfg.normalize != "none":
            info |= {
                "definition": "s = mean ||x|| / sqrt(d_in); trained on x / s",
                "estimated_on_tokens": at.scale_tokens,
                "folded": "saved b_enc, b_dec = s x the trained ones: the SAE reads raw activations, latents = s z",
                "l1_raw_equivalent": r.controller.l1 * r.scale,
                "log_units": "mse, l1_term, loss in raw-activation units (s^2 x the normalised objective)",
            }
        return info

    def _write_log(self, r: LayerRun, at: Counters, columns: dict, path: Path, *, kind: str = LOG_KIND) -> None:
        formats.write_parquet(
            path,
            columns,
            kind=kind,
            provenance=self.provenance,
            summary={
                "layer": r.layer,
                "sae": r.name,
                "tokens": at.tokens,
                "steps": at.step,
                "config": self.cfg.as_dict(),
                "normalize": self.cfg.normalize,
                "activation_scale": r.scale,
                "source": self.source_info,  # the teacher and text: the report combines files of one model
            },
        )

    # ---- reading ----------------------------------------------------------------------------
    def load(self, device: torch.device) -> tuple[Counters, dict[str, LayerRun]]:
        """The latest checkpoint; refuse if the config changed in a way that changes the result."""
        pointer = self.read_pointer()
        if pointer is None or pointer.get("kind") != CHECKPOINT_KIND:
            raise BadInput(f"{self.out / CHECKPOINT}: not a train-sae checkpoint; use --overwrite to start over")
        wanted, held = [name for name, _, _ in self.cfg.runs()], _pointer_saes(pointer)
        if wanted != held:
            raise BadInput(
                f"--resume: the checkpoint in {self.out} holds the SAEs {', '.join(held)}, this run asks for "
                f"{', '.join(wanted)}; resume with the same --layer, --expansion/--features, --l1 and --init-seed, "
                "or --overwrite to start over"
            )
        self._check_source(pointer.get("source") or {})
        old = {**LEGACY_CONFIG, **pointer["config"]}
        changed = [k for k, v in self.cfg.as_dict().items() if k not in RESUME_MAY_CHANGE and old.get(k) != v]
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in changed)
            raise BadInput(
                f"--resume: options differ from the checkpointed run ({diffs}); "
                "use the same options, or --overwrite to start over"
            )
        at = Counters(
            step=int(pointer["step"]),
            tokens=int(pointer["tokens"]),
            position=pointer["position"],
            elapsed=float(pointer.get("elapsed_s", 0.0)),
            finished=bool(pointer.get("finished", False)),
        )
        runs = {}
        for name, L, spec in self.cfg.runs():
            runs[name], at.scale_tokens = self._load_sae(self.checkpoint_dir(name, at.tokens), name, L, spec, device)
        return at, runs

    def _check_source(self, old: dict) -> None:
        """Refuse to continue on other activations: the source's identity, not its path, must match.

        Compared: every key the checkpoint recorded except where the source lives (SOURCE_MAY_CHANGE), so
        a cache moved or named another way resumes, and a cache rebuilt with another model, text or
        seq_len (or grown: other shards) is refused with both values.
        """
        now = self.source_info
        by_name = {"model": "model_identity", "dataset": "data_identity"}  # as typed; skipped when identified
        skip = {*SOURCE_MAY_CHANGE, *(name for name, ident in by_name.items() if old.get(ident))}
        diffs = [k for k in old if k not in skip and _comparable(old.get(k)) != _comparable(now.get(k))]
        if diffs:
            shown = "; ".join(f"{k}: checkpoint {_shown(old.get(k))}, now {_shown(now.get(k))}" for k in diffs[:3])
            raise BadInput(
                f"--resume: the activations are not those of the checkpointed run in {self.out} ({shown}); "
                "resume with the same source, or use --overwrite to start over"
            )

    def _load_sae(self, ck: Path, name: str, layer: int, spec: SAESpec, device) -> tuple[LayerRun, int]:
        try:
            state = formats.read_json(ck / STATE)
            weights = formats.load_safetensors(ck / SAELENS_WEIGHTS)
            opt_t = formats.load_safetensors(ck / OPTIMIZER)
        except BadInput as exc:  # names the file: missing, cut short, not what it should be
            raise BadInput(f"--resume: {exc}; use --overwrite to start over") from None
        scale = float(state.get("activation_scale", 1.0))
        if "train.b_enc" in opt_t:  # the SAE folder's biases have s folded in
            weights |= {"b_enc": opt_t["train.b_enc"], "b_dec": opt_t["train.b_dec"]}
        elif scale != 1.0:
            raise BadInput(f"--resume: checkpoint {ck} has no unfolded biases ({OPTIMIZER} train.b_enc)")
        sae = SparseAutoencoder(self.cfg.d_in, spec.d_sae, device=device)
        sae.load_tensors({k: v.to(device) for k, v in weights.items()})
        sae.kernel_choice = KernelChoice.from_state(state.get("kernel_choice"))
        opt = adam(sae, self.cfg)
        sd = opt.state_dict()
        sd["state"] = {}
        for i, (pname, _) in enumerate(sae.named_parameters()):
            if pname in state["adam_steps"]:
                sd["state"][i] = {
                    "step": torch.tensor(state["adam_steps"][pname]),
                    "exp_avg": opt_t[f"{pname}.exp_avg"].to(device),
                    "exp_avg_sq": opt_t[f"{pname}.exp_avg_sq"].to(device),
                }
        opt.load_state_dict(sd)
        rows = []
        if (ck / LOG_FILE).exists() and state["log_rows"]:
            cols = formats.read_table(ck / LOG_FILE)
            rows = [{c: _py(v[i]) for c, v in cols.items()} for i in range(state["log_rows"])]
        run = LayerRun(
            name=name,
            layer=layer,
            spec=spec,
            sae=sae,
            opt=opt,
            controller=L1Controller.from_state(state["controller"]),
            last_fired=opt_t["last_fired"].to(device),
            rows=rows,
            interval=Interval(**state["interval"]),
            last=rows[-1] if rows else {},
            scale=scale,
        )
        return run, int(state.get("scale_tokens", 0))


def _comparable(v):
    """An identity compares by its fingerprint; anything else as it is."""
    return v.get("fingerprint") if isinstance(v, dict) and "fingerprint" in v else v


def _shown(v) -> str:
    return describe(v) if isinstance(v, dict) and "fingerprint" in v else repr(v)


def _py(v):
    return v.item() if hasattr(v, "item") else v


def _pointer_saes(pointer: dict) -> list[str]:
    """The SAE folders a checkpoint.json covers (before side-by-side SAEs it listed layers only)."""
    return list(pointer.get("saes") or [f"layer{L}" for L in pointer.get("layers", [])])


def prepare_output(out: str | Path, names: list[str], *, resume: bool, force: bool, remove: bool = True) -> bool:
    """Decide what happens to a run already in `out`; True when training continues from its checkpoint.

    `names`: the SAE folders the run writes (TrainConfig.runs). --overwrite clears the old run's files:
    these SAEs' folders and the previous run's own (listed by its checkpoint.json), so a run of other
    SAEs (say --expansion 4,8 after a single SAE) never leaves an old layer{L}/ beside the new ones.
    With checkpoint.json: --resume continues (or, for a finished run, checks and repairs the final
    folders); a plain rerun is refused. Without it, SAE folders with no final SAE are what a run
    killed before its first checkpoint (or out of disk) left: --resume clears them and starts over,
    a plain rerun says so. remove=False (ranks other than 0) only decides.
    """
    out = Path(out)
    pointer = out / CHECKPOINT
    try:
        previous = formats.read_json(pointer) if pointer.exists() else {}
    except BadInput:  # an unreadable pointer: its run's folders are unknown, the pointer itself still blocks
        previous = {}
    every = list(dict.fromkeys([*names, *_pointer_saes(previous)]))
    existing = [out / name for name in every if (out / name).exists()]
    if force:
        if remove:
            for folder in existing:
                shutil.rmtree(folder)
            pointer.unlink(missing_ok=True)
        return False
    if pointer.exists():
        if resume:
            return True
        p = formats.read_json(pointer)
        state = "finished" if p.get("finished") else "stopped"
        raise BadInput(
            f"{out} holds a train-sae run {state} at {p.get('tokens', 0):,} tokens: use --resume to continue it "
            "(a finished run is checked and left as is) or --overwrite to replace it"
        )
    finals = [f for f in existing if (f / CFG).exists()]
    if finals:
        raise BadInput(f"{finals[0]} already holds an SAE (and {out} no {CHECKPOINT}): use --overwrite to replace it")
    if existing and not resume:
        raise BadInput(
            f"{existing[0]}: a run stopped before its first checkpoint left this (nothing to keep): "
            "rerun with --resume to start it over, or --overwrite"
        )
    if remove:
        for folder in existing:
            shutil.rmtree(folder)
    return False
