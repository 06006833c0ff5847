"""The paper's full protocol as a plan of kdtool commands, with token counts, disk and time estimates.

`scripts/reproduce-paper` is the command-line face of this module (docs/reproduce.md):

1. `load_protocol(overrides)` reads the presets (kdtool/presets/paper-*.toml) into one flat
   `Protocol` and applies the user's scale-down options;
2. `build_plan(protocol)` turns it into `Stage`s: each one kdtool command (argv), the tokens it
   processes and the disk it leaves, computed from the sizes (`sae_bytes`, `acts_bytes`, ...);
3. `estimate(plan, rates)` adds times from throughputs: measured by `measure` (each heavy stage run
   twice, briefly, at two sizes on this machine; the difference is the rate without start-up) or
   given by the user;
4. `execute(plan, runner)` runs the stages in order into one run folder, skipping the ones already
   done and resuming the ones with a checkpoint.

Steps 3 and 4 live in kdtool/reproduce_run.py.

Library code: no printing (messages go to callbacks), no sys.exit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtool import presets
from kdtool.errors import BadInput
from kdtool.parsing import parse_count

PLAN_KIND = "kdtool.reproduce.plan"
FAMILIES = ("cache-acts", "train-sae", "stats", "predict", "distill", "calibrate", "concepts", "probe", "report")
#: the stages whose time is measured; probe is derived from the stats rate, the rest take seconds
MEASURED = ("cache-acts", "train-sae", "stats", "distill")
STATE_DIR = ".reproduce"  # done markers, inside the run folder (hidden: plot report skips it)
#: per-row size of stats.parquet (8 numeric columns, uncompressed upper bound)
STATS_ROW_BYTES = 64


# ---- the protocol ---------------------------------------------------------------------------
@dataclass
class Protocol:
    """Everything the plan depends on. Presets fill it; the script's options override fields."""

    out: Path  # the run folder every command writes into
    model: str  # teacher: hub id or local folder
    revision: str | None  # hub revision of the teacher
    dataset: str  # hub dataset or local text files
    split: str
    text_column: str
    layers: list[int]  # SAE layers (hidden_states index)
    trials: dict[str, dict[str, Any]]  # name -> {"label": ..., train-sae option: value}
    sae_tokens: int  # tokens per SAE trial
    sae_batch_tokens: int
    sae_seq_len: int
    expansion: float  # d_SAE = expansion x d_model
    sae_checkpoints: int  # checkpoint every sae_tokens / this
    sae_input: str  # stream | cache
    teacher_batch: int  # sequences per teacher forward in cache-acts/train-sae/stats
    shuffle_buffer: int  # streaming train-sae: token positions per shuffle buffer
    stats_tokens: int
    alive_threshold: float
    distill: dict[str, Any]  # distill options (without dashes); widths as a list
    teacher_cache: bool  # distill --teacher-cache RUN/teacher-cache
    topk: int
    torchrun: int  # processes for distill (1: plain `kdtool distill`)
    calibrate_layer: int  # layer whose predictions are calibrated (and probed)
    baseline_width: int  # calibrate --baseline-width
    probe: dict[str, Any]  # layer, widths, per_class, seeds, max_length, pool
    concepts: Path | None  # a concepts file of the user's instead of build-concepts
    device: str | None
    offline: bool
    seed: int
    skip: tuple[str, ...]  # stage families left out
    teacher_config: dict | None  # the preset's config of the default teacher (None: read it)
    notes: list[str] = field(default_factory=list)  # scaling decisions, shown with the plan

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["concepts"] = None if self.concepts is None else str(self.concepts)
        return d


def load_protocol(overrides: dict[str, Any] | None = None) -> Protocol:
    """The paper's protocol from the presets, with `overrides` (None values are ignored) applied.

    Keys: out, model, revision, dataset, split, text_column, layers, trials (names), tokens,
    stats_tokens, batch_tokens, expansion, sae_input, teacher_batch, shuffle_buffer, steps, widths,
    batch_size, seq_len, heads, warmup, eval_every, teacher_cache, topk, torchrun, concepts,
    per_class, device, offline, seed, skip.
    """
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    proto = presets.load("paper-protocol")
    trials_p = presets.load("paper-sae-trials")["trials"]
    dist_p = presets.load("paper-distill")
    notes: list[str] = []

    model = str(o.get("model", proto["teacher"]["model"]))
    teacher_config = proto["teacher"].get("config") if model == proto["teacher"]["model"] else None

    trials = copy.deepcopy(trials_p)
    if "trials" in o:
        want = [t.strip() for t in str(o["trials"]).split(",") if t.strip()]
        unknown = [t for t in want if t not in trials]
        if unknown or not want:
            raise BadInput(f"--trials: unknown trial(s) {', '.join(unknown) or '(none)'}; known: {', '.join(trials)}")
        trials = {t: trials[t] for t in want}

    sae = proto["sae"]
    sae_tokens = _count(o.get("tokens", sae["tokens"]), "--tokens")
    batch_tokens = _count(o.get("batch_tokens", sae["batch_tokens"]), "--batch-tokens")
    if sae_tokens < batch_tokens:
        raise BadInput(f"--tokens {sae_tokens:,} is less than one SAE batch (--batch-tokens {batch_tokens:,})")
    sae_input = str(o.get("sae_input", sae["input"]))
    if sae_input not in ("stream", "cache"):
        raise BadInput(f"--sae-input must be stream or cache, got {sae_input!r}")
    layers = [int(x) for x in o.get("layers", sae["layers"])]

    dist = dict(dist_p["distill"])
    ref_steps = int(dist_p["scaling"]["reference_steps"])
    for key, opt in (("widths", "widths"), ("batch_size", "batch-size"), ("seq_len", "seq-len"), ("heads", "heads")):
        if key in o:
            dist[opt] = o[key]
    dist["widths"] = [int(w) for w in dist["widths"]]
    if "steps" in o:
        steps = int(o["steps"])
        if steps < 1:
            raise BadInput(f"--steps must be >= 1, got {steps}")
        dist["steps"] = steps
        if steps < ref_steps:
            # the same fractions of the run as the paper's 1000 / 500 / 1000 of 30,000 steps
            for opt in ("warmup", "eval-every", "save-every"):
                dist[opt] = max(1, round(dist_p["distill"][opt] * steps / ref_steps))
            notes.append(
                f"distill: --steps {steps} < {ref_steps:,}: warmup {dist['warmup']}, eval-every "
                f"{dist['eval-every']}, save-every {dist['save-every']} (the paper's fractions of the run)"
            )
    if "warmup" in o:
        dist["warmup"] = int(o["warmup"])
    if "eval_every" in o:
        dist["eval-every"] = int(o["eval_every"])
    if dist["warmup"] >= dist["steps"]:
        raise BadInput(f"--warmup {dist['warmup']} must be below --steps {dist['steps']}")
    torchrun = int(o.get("torchrun", 1))
    if torchrun < 1:
        raise BadInput(f"--torchrun must be >= 1, got {torchrun}")
    if int(dist["batch-size"]) % torchrun:
        raise BadInput(f"--torchrun {torchrun}: --batch-size {dist['batch-size']} must be divisible by it")

    widths = dist["widths"]
    calib_layer = int(proto["predict"]["calibrate_layer"])
    if calib_layer not in layers:
        calib_layer = layers[len(layers) // 2]
        want = proto["predict"]["calibrate_layer"]
        notes.append(f"calibrate/probe: layer {want} is not among --layers: using {calib_layer}")
    baseline = int(proto["predict"]["baseline_width"])
    if baseline not in widths:
        baseline = max(widths)
        want = proto["predict"]["baseline_width"]
        notes.append(f"calibrate: control width {want} is not among --widths: using {baseline}")

    probe = dict(proto["probe"])
    probe["layer"] = calib_layer
    pw = [w for w in probe["widths"] if w in widths] or list(widths)
    if pw != list(probe["widths"]):
        notes.append(f"probe: students {','.join(map(str, pw))} (the paper's 128,768,1024 are not all distilled)")
    probe["widths"] = pw
    if "per_class" in o:
        probe["per_class"] = int(o["per_class"])

    skip = tuple(s.strip() for s in str(o.get("skip", "")).split(",") if s.strip())
    bad = [s for s in skip if s not in FAMILIES]
    if bad:
        raise BadInput(f"--skip: unknown stage(s) {', '.join(bad)}; stages: {', '.join(FAMILIES)}")

    p = Protocol(
        out=Path(o.get("out", "paper-run")),
        model=model,
        revision=o.get("revision"),
        dataset=str(o.get("dataset", proto["data"]["dataset"])),
        split=str(o.get("split", proto["data"]["split"])),
        text_column=str(o.get("text_column", proto["data"]["text_column"])),
        layers=layers,
        trials=trials,
        sae_tokens=sae_tokens,
        sae_batch_tokens=batch_tokens,
        sae_seq_len=int(o.get("sae_seq_len", sae["seq_len"])),
        expansion=float(o.get("expansion", sae["expansion"])),
        sae_checkpoints=int(sae["checkpoints"]),
        sae_input=sae_input,
        teacher_batch=int(o.get("teacher_batch", sae["teacher_batch"])),
        shuffle_buffer=_count(o.get("shuffle_buffer", sae["shuffle_buffer"]), "--shuffle-buffer"),
        stats_tokens=_count(o.get("stats_tokens", proto["stats"]["tokens"]), "--stats-tokens"),
        alive_threshold=float(proto["stats"]["alive_threshold"]),
        distill=dist,
        teacher_cache=bool(o.get("teacher_cache", False)),
        topk=int(o.get("topk", 64)),
        torchrun=torchrun,
        calibrate_layer=calib_layer,
        baseline_width=baseline,
        probe=probe,
        concepts=Path(o["concepts"]) if "concepts" in o else None,
        device=o.get("device"),
        offline=bool(o.get("offline", False)),
        seed=int(o.get("seed", 0)),
        skip=skip,
        teacher_config=teacher_config,
        notes=notes,
    )
    if p.stats_tokens < 1:
        raise BadInput("--stats-tokens must be >= 1")
    return p


def _count(value: Any, option: str) -> int:
    try:
        n = parse_count(str(value))
    except BadInput as e:
        raise BadInput(f"{option}: {e}") from None
    if n < 1:
        raise BadInput(f"{option} must be >= 1, got {value!r}")
    return n


# ---- the teacher's shape ----------------------------------------------------------------------
@dataclass
class Teacher:
    """What the sizes depend on: the teacher's width, depth and the students' parameter counts."""

    config: Any  # transformers config
    d_model: int
    n_layers: int
    vocab: int
    params: int
    students: dict[int, dict[str, int]]  # width -> {params, non_embedding_params}
    source: str  # where the config came from


def teacher_shape(p: Protocol) -> Teacher:
    """Read the teacher's config (preset for the default model, else AutoConfig) and count the
    students' parameters on the meta device (no memory, exact counts)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdtool import students as st

    if p.teacher_config is not None:
        cfg_d = dict(p.teacher_config)
        config = AutoConfig.for_model(cfg_d.pop("model_type"), **cfg_d)
        source = "kdtool/presets/paper-protocol.toml"
    else:
        if p.offline:
            from kdtool.models import set_offline

            set_offline()
        try:
            config = AutoConfig.from_pretrained(p.model, revision=p.revision, local_files_only=p.offline)
        except Exception as e:  # any failure means the same to the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput(
                f"--model {p.model}: cannot read its config ({first}); the plan needs its width and depth: "
                "give a local save_pretrained folder or run where the hub is reachable"
            ) from None
        source = f"{p.model} config.json"
    d = int(config.hidden_size)
    n_layers = int(config.num_hidden_layers)
    bad = [L for L in p.layers if not 0 <= L <= n_layers]
    if bad:
        raise BadInput(f"--layers {','.join(map(str, bad))}: {p.model} has hidden_states 0..{n_layers}")
    if p.calibrate_layer > n_layers:
        raise BadInput(f"probe/calibrate layer {p.calibrate_layer} is beyond {p.model}'s {n_layers} blocks")
    policy = st.StudentPolicy(heads=str(p.distill["heads"]), ffn_ratio=str(p.distill["ffn-ratio"]))
    counts = {}
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
        t_params = st.param_counts(teacher)["params"]
        del teacher
        for w in p.distill["widths"]:
            model = AutoModelForCausalLM.from_config(st.narrow_config(config, w, policy))
            counts[w] = st.param_counts(model)
            del model
    return Teacher(config, d, n_layers, int(config.vocab_size), int(t_params), counts, source)


# ---- sizes (bytes) ------------------------------------------------------------------------------
def sae_bytes(d: int, n_features: int) -> int:
    """One SAE on disk: W_enc [d, F] + W_dec [F, d] + b_enc [F] + b_pre [d], fp32."""
    return 4 * (2 * d * n_features + n_features + d)


def sae_optimizer_bytes(d: int, n_features: int) -> int:
    """Adam's two moments of every SAE parameter (fp32) + last_fired [F] int64 (the latest checkpoint only)."""
    return 2 * sae_bytes(d, n_features) + 8 * n_features


def acts_bytes(tokens: int, n_layers: int, d: int, dtype_bytes: int = 2) -> int:
    """An activation cache: tokens x layers x d_model x bytes (float16/bfloat16: 2)."""
    return tokens * n_layers * d * dtype_bytes


def student_bytes(params: int) -> int:
    """A student's save_pretrained folder (fp32 safetensors)."""
    return 4 * params


def student_checkpoint_bytes(params: int) -> int:
    """distill's checkpoint/width{W}.pt: model + AdamW exp_avg + exp_avg_sq, fp32."""
    return 12 * params


def teacher_cache_bytes(train_tokens: int, eval_tokens: int, topk: int, vocab: int) -> int:
    """--teacher-cache (kdtool/teacher_cache.py): per training token k ids (int32) + k log-probs (float32)
    + token, mask, rest mass; per held-out token the full log-probs [V] (float32) + token and mask."""
    return train_tokens * (8 * topk + 9) + eval_tokens * (4 * vocab + 5)


def sae_checkpoint_count(tokens: int, batch: int, every: int) -> int:
    """Checkpoint folders train-sae leaves: each milestone reached before the last step, plus the final one
    (the same rule as kdtool/sae_train.py)."""
    steps = tokens // batch
    count, seen, nxt = 0, 0, every if every else None
    for _ in range(steps):
        seen += batch
        done = seen + batch > tokens
        if nxt is not None and seen >= nxt and not done:
            count += 1
            nxt = (seen // every + 1) * every
        if done:
            break
    return count + 1


# ---- stages -------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One kdtool command of the plan and what it costs."""

    name: str  # unique: train-sae-A, stats-A, distill, ...
    family: str  # one of FAMILIES
    title: str
    argv: list[str]  # starts with "kdtool" or "torchrun"
    tokens: dict[str, int] = field(default_factory=dict)  # named token counts
    disk: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes) left on disk
    peak_extra: int = 0  # bytes held only while the stage runs (checkpoint swaps)
    rate: str | None = None  # which throughput times it (a MEASURED family, or "stats" for probe)
    amount: float = 0  # tokens (or steps for distill) at that rate
    extra: dict[str, float] = field(default_factory=dict)  # what else the time depends on
    resume_marker: Path | None = None  # a file that means "partly done: add --resume"
    detail: str = ""  # one line about the token counts
    seconds: float | None = None  # filled by estimate()
    time_note: str = ""

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def disk_bytes(self) -> int:
        return sum(b for _, b in self.disk)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "title": self.title,
            "command": self.command,
            "argv": self.argv,
            "tokens": self.tokens,
            "detail": self.detail,
            "disk": [{"what": w, "bytes": b} for w, b in self.disk],
            "disk_bytes": self.disk_bytes,
            "peak_extra_bytes": self.peak_extra,
            "rate": self.rate,
            "amount": self.amount,
            "seconds": self.seconds,
            "time_note": self.time_note,
        }


@dataclass
class Plan:
    protocol: Protocol
    teacher: Teacher
    stages: list[Stage]
    notes: list[str]

    def totals(self) -> dict[str, Any]:
        final = sum(s.disk_bytes for s in self.stages)
        peak = final + max((s.peak_extra for s in self.stages), default=0)
        secs = [s.seconds for s in self.stages if s.rate]
        known = all(x is not None for x in secs)
        return {
            "disk_bytes": final,
            "disk_peak_bytes": peak,
            "teacher_download_bytes": 2 * self.teacher.params,
            "seconds": sum(x for x in secs if x is not None) if known else None,
            "seconds_known": sum(x for x in secs if x is not None),
            "stages_without_time": [s.name for s in self.stages if s.rate and s.seconds is None],
        }

    def as_dict(self) -> dict[str, Any]:
        t = self.teacher
        return {
            "kind": PLAN_KIND,
            "protocol": self.protocol.as_dict(),
            "teacher": {
                "model": self.protocol.model,
                "d_model": t.d_model,
                "n_layers": t.n_layers,
                "vocab": t.vocab,
                "params": t.params,
                "students": {str(w): c for w, c in t.students.items()},
                "config_source": t.source,
            },
            "stages": [s.as_dict() for s in self.stages],
            "totals": self.totals(),
            "notes": self.notes,
        }


def _compact(n: int) -> str:
    """300000000 -> '300M' (what parse_count reads back); other numbers as digits."""
    for suffix, unit in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _arg(v: Any) -> str:
    if isinstance(v, float) and v == int(v) and abs(v) >= 1:
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _cmd(*head: str, **opts: Any) -> list[str]:
    """_cmd('kdtool', 'stats', sae='x', alive_threshold=1e-5, o='y') -> [..., '--sae', 'x',
    '--alive-threshold', '1e-05', '-o', 'y']; None is left out, True is a bare flag."""
    argv = list(head)
    for k, v in opts.items():
        if v is None or v is False:
            continue
        flag = "-o" if k == "o" else "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, _arg(v)]
    return argv


def _teacher(p: Protocol) -> dict[str, Any]:
    return {"model": p.model, "revision": p.revision, "device": p.device, "offline": p.offline}


def _data(p: Protocol) -> dict[str, Any]:
    return {
        "dataset": p.dataset,
        "split": None if p.split == "train" else p.split,
        "text_column": None if p.text_column == "text" else p.text_column,
    }


def build_plan(p: Protocol, teacher: Teacher | None = None) -> Plan:
    """Every stage of the protocol, in order, with its command, token counts and disk."""
    t = teacher or teacher_shape(p)
    notes = list(p.notes)
    seed = p.seed or None
    if p.sae_input == "cache":
        source = {"acts": str(p.out / "acts")}
    else:
        source = {**_teacher(p), **_data(p), "seq_len": p.sae_seq_len, "batch_size": p.teacher_batch}
        cache = acts_bytes(p.sae_tokens, len(p.layers), t.d_model)
        notes.append(
            f"SAE input: streaming (the teacher runs inside train-sae and stats, nothing is cached). A cache "
            f"(--sae-input cache) would need {fmt_bytes(cache)} ({p.sae_tokens:,} tokens x {len(p.layers)} layers "
            f"x {t.d_model} x 2 bytes) and run the teacher once instead of {len(p.trials)} times."
        )
    stages = [
        *_sae_stages(p, t, source, seed),
        *[_predict_stage(p, name) for name in p.trials],
        _distill_stage(p, t, seed),
        *[_calibrate_stage(p, name) for name in p.trials],
        *_probe_stages(p, seed),
        Stage(
            "report",
            "report",
            "every figure and table the run folder allows",
            _cmd("kdtool", "plot", "report", str(p.out)),
            disk=[("report/ (figures, HTML, Markdown)", 5 * 10**6)],
        ),
    ]
    if p.revision:
        notes.append("probe has no --revision: it loads the teacher's default revision")
    return Plan(p, t, [s for s in stages if s.family not in p.skip], notes)


def _sae_stages(p: Protocol, t: Teacher, source: dict, seed: int | None) -> list[Stage]:
    d, n_layers, layers = t.d_model, len(p.layers), p.layers
    F = int(round(p.expansion * d))
    stages = []
    if p.sae_input == "cache":
        acts = p.out / "acts"
        stages.append(
            Stage(
                "cache-acts",
                "cache-acts",
                f"cache the residual stream at layers {_arg(layers)}",
                _cmd(
                    "kdtool",
                    "cache-acts",
                    **_teacher(p),
                    **_data(p),
                    seq_len=p.sae_seq_len,
                    batch_size=p.teacher_batch,
                    layers=layers,
                    tokens=_compact(p.sae_tokens),
                    seed=seed,
                    o=acts,
                ),
                tokens={"teacher_forward": p.sae_tokens, "cached_per_layer": p.sae_tokens},
                disk=[
                    (
                        f"activation cache: {p.sae_tokens:,} tokens x {n_layers} layers x {d} x 2 bytes",
                        acts_bytes(p.sae_tokens, n_layers, d),
                    )
                ],
                rate="cache-acts",
                amount=p.sae_tokens,
                resume_marker=acts / "manifest.json",
                detail=f"teacher forward {p.sae_tokens:,} tokens; each cached at {n_layers} layers",
            )
        )
    steps = p.sae_tokens // p.sae_batch_tokens
    trained = steps * p.sae_batch_tokens
    every = max(p.sae_batch_tokens, p.sae_tokens // max(p.sae_checkpoints, 1))
    n_ckpt = sae_checkpoint_count(p.sae_tokens, p.sae_batch_tokens, every)
    one, opt = sae_bytes(d, F), sae_optimizer_bytes(d, F)
    streamed = p.sae_input == "stream"
    for name, trial in p.trials.items():
        out = p.out / f"saes-{name}"
        stages.append(
            Stage(
                f"train-sae-{name}",
                "train-sae",
                f"SAE trial {name}: {trial.get('label', '')}",
                _cmd(
                    "kdtool",
                    "train-sae",
                    **source,
                    layer=layers,
                    expansion=p.expansion,
                    batch_tokens=p.sae_batch_tokens,
                    tokens=_compact(p.sae_tokens),
                    checkpoint_every=_compact(every),
                    shuffle_buffer=_compact(p.shuffle_buffer) if streamed else None,
                    **{k: v for k, v in trial.items() if k != "label"},
                    seed=seed,
                    o=out,
                ),
                tokens={"teacher_forward": trained if streamed else 0, "sae_train_per_layer": trained, "steps": steps},
                disk=[
                    (
                        f"{n_layers} SAEs x {1 + n_ckpt} (final + {n_ckpt} checkpoints), {fmt_bytes(one)} each "
                        f"({d} x {F:,} fp32)",
                        n_layers * (1 + n_ckpt) * one,
                    ),
                    (f"Adam state in the latest checkpoint ({n_layers} x {fmt_bytes(opt)})", n_layers * opt),
                ],
                # the new checkpoint's Adam state is written before the previous one is deleted
                peak_extra=n_layers * opt,
                rate="train-sae",
                amount=trained,
                # the brief measured runs wrote one checkpoint; this one writes n_ckpt
                extra={"checkpoint_writes": n_ckpt - 1, "checkpoint_bytes": n_layers * (one + opt)},
                resume_marker=out / "checkpoint.json",
                detail=(f"teacher forward {trained:,} tokens; " if streamed else "")
                + f"{trained:,} tokens x {n_layers} layers ({steps:,} steps of {p.sae_batch_tokens:,})",
            )
        )
    for name in p.trials:
        stages.append(
            Stage(
                f"stats-{name}",
                "stats",
                f"F, L0, alpha, d* and importances of trial {name}",
                _cmd(
                    "kdtool",
                    "stats",
                    sae=p.out / f"saes-{name}",
                    **source,
                    tokens=_compact(p.stats_tokens),
                    alive_threshold=None if p.alive_threshold == 1e-5 else p.alive_threshold,
                    o=p.out / f"stats-{name}.parquet",
                ),
                tokens={"teacher_forward": p.stats_tokens if streamed else 0, "measured": p.stats_tokens},
                disk=[("stats table", n_layers * F * STATS_ROW_BYTES)],
                rate="stats",
                amount=p.stats_tokens,
                detail=f"{p.stats_tokens:,} tokens through {n_layers} SAEs",
            )
        )
    return stages


def _predict_stage(p: Protocol, name: str) -> Stage:
    return Stage(
        f"predict-{name}",
        "predict",
        f"predicted floors L*(d_S) of trial {name}, every layer",
        _cmd(
            "kdtool",
            "predict",
            str(p.out / f"stats-{name}.parquet"),
            widths=p.distill["widths"],
            o=p.out / f"predict-{name}.parquet",
        ),
        disk=[("predict table", 16 * 1024)],
    )


def _distill_stage(p: Protocol, t: Teacher, seed: int | None) -> Stage:
    ds = p.distill
    steps, bs, seq = int(ds["steps"]), int(ds["batch-size"]), int(ds["seq-len"])
    train_tokens = steps * bs * seq
    eval_tokens = int(ds["eval-batches"]) * bs * seq
    every, save = int(ds["eval-every"]), int(ds["save-every"])
    n_evals = 1 + steps // every + (1 if steps % every else 0)  # step 0, every N, the last
    n_saves = (steps // save + (1 if steps % save else 0)) if save else 1
    params = sum(c["params"] for c in t.students.values())
    disk = [
        (f"{len(t.students)} students, {params / 1e6:,.1f}M params (fp32)", student_bytes(params)),
        ("checkpoint/ (weights + AdamW moments, fp32)", student_checkpoint_bytes(params)),
    ]
    cache = None
    if p.teacher_cache:
        cache = p.out / "teacher-cache"
        disk.append(
            (
                f"teacher cache: top-{p.topk} of {train_tokens:,} training tokens, all {t.vocab:,} log-probs "
                f"of {eval_tokens:,} held-out ones",
                teacher_cache_bytes(train_tokens, eval_tokens, p.topk, t.vocab),
            )
        )
    launcher = ["kdtool"] if p.torchrun == 1 else ["torchrun", "--nproc_per_node", str(p.torchrun), "-m", "kdtool"]
    out = p.out / "students"
    opts = {k.replace("-", "_"): v for k, v in ds.items()}
    return Stage(
        "distill",
        "distill",
        f"distil into widths {_arg(ds['widths'])}: {steps:,} steps of {bs} x {seq}"
        + (f" on {p.torchrun} processes" if p.torchrun > 1 else ""),
        _cmd(
            *launcher,
            "distill",
            **_teacher(p),
            **_data(p),
            **opts,
            teacher_cache=cache,
            topk=p.topk if cache else None,
            seed=seed,
            o=out,
        ),
        tokens={
            "teacher_forward": train_tokens + eval_tokens,
            "train_per_student": train_tokens,
            "steps": steps,
            "evaluations": n_evals,
            "checkpoints": n_saves,
        },
        disk=disk,
        peak_extra=student_checkpoint_bytes(params),  # old and new checkpoint/ while it is swapped
        rate="distill",
        amount=steps,
        # the brief measured runs evaluated twice and saved once
        extra={
            "evaluations": n_evals - 2,
            "eval_batches": int(ds["eval-batches"]),
            "checkpoint_writes": n_saves - 1,
            "checkpoint_bytes": student_checkpoint_bytes(params),
        },
        resume_marker=out / "checkpoint" / "state.pt",
        detail=f"teacher forward {train_tokens + eval_tokens:,} tokens (one per batch for every width); "
        f"{train_tokens:,} training tokens per student; {n_evals} held-out evaluations",
    )


def _calibrate_stage(p: Protocol, name: str) -> Stage:
    return Stage(
        f"calibrate-{name}",
        "calibrate",
        f"fit the observed floors to trial {name}'s predictions at layer {p.calibrate_layer}",
        _cmd(
            "kdtool",
            "calibrate",
            str(p.out / "students" / "floors.parquet"),
            predicted=p.out / f"predict-{name}.parquet",
            layer=p.calibrate_layer,
            baseline_width=p.baseline_width,
            o=p.out / f"calib-{name}.json",
        ),
        disk=[("calib.json", 64 * 1024)],
    )


def _probe_stages(p: Protocol, seed: int | None) -> list[Stage]:
    pr = p.probe
    stages = []
    concepts = p.concepts or p.out / "concepts.parquet"
    if p.concepts is None:
        stages.append(
            Stage(
                "concepts",
                "concepts",
                "six binary concepts from Debian text (fetches the packages with apt-get download)",
                _cmd("kdtool", "probe", "build-concepts", o=concepts, per_class=pr["per_class"], fetch=True, seed=seed),
                disk=[("concepts table", 6 * 2 * int(pr["per_class"]) * 600)],
            )
        )
    models = ["teacher", *(str(p.out / "students" / f"width{w}") for w in pr["widths"])]
    n_tokens = 6 * 2 * int(pr["per_class"]) * int(pr["max_length"]) * len(models)
    stages.append(
        Stage(
            "probe",
            "probe",
            f"linear probes at layer {pr['layer']}: teacher and students {_arg(pr['widths'])}",
            _cmd(
                "kdtool",
                "probe",
                "run",
                str(concepts),
                teacher=p.model,
                models=models,
                layer=pr["layer"],
                per_class=pr["per_class"],
                seeds=pr["seeds"],
                max_length=pr["max_length"],
                pool=pr["pool"],
                device=p.device,
                offline=p.offline,
                seed=seed,
                o=p.out / "probe.parquet",
            ),
            tokens={"forward_at_most": n_tokens},
            disk=[("probe table", 64 * 1024)],
            # forward passes: bounded by the rate of the stage that runs the teacher (+ SAE encoding or disk writes)
            rate="stats" if p.sae_input == "stream" else "cache-acts",
            amount=n_tokens,
            detail=f"at most {n_tokens:,} tokens forward (6 concepts x 2 x {pr['per_class']} texts x "
            f"{pr['max_length']} tokens x {len(models)} models)",
        )
    )
    return stages


# ---- formatting ---------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    """Decimal units, as disks are sold: 1.84 TB."""
    if n is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "unknown"
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m:02d} min"
    d, h = divmod(round(s / 3600), 24)
    return f"{d} d {h} h"


def free_bytes(folder: Path) -> int | None:
    """Free space where `folder` is (or would be) created."""
    p = folder.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
