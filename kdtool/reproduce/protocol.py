"""What a reproduction run is: the paper's protocol (presets + the user's scale-down) and the teacher's shape.

`scripts/reproduce-paper` is the command-line face of these modules (docs/reproduce.md):

1. `load_protocol(overrides)` reads the presets (kdtool/data/presets/paper-*.toml) into one flat
   `Protocol` and applies the user's scale-down options; `teacher_shape(protocol)` reads the
   teacher's width and depth and counts the students' parameters (this module);
2. `build_plan(protocol)` (kdtool/reproduce/plan.py) turns it into `Stage`s (kdtool/reproduce/stage.py):
   each one kdtool command (argv, written by kdtool/reproduce/commands.py), the tokens it processes
   and the disk it leaves, computed from the sizes (`sae_bytes`, `acts_bytes`, ..., kdtool/reproduce/sizes.py);
3. `estimate(plan, rates)` adds times from throughputs: measured by `measure` (each heavy stage run
   twice, briefly, at two sizes on this machine; the difference is the rate without start-up) or
   given by the user;
4. `execute(plan, runner)` runs the stages in order into one run folder, skipping the ones already
   done and resuming the ones with a checkpoint.

Steps 3 and 4 live in kdtool/reproduce/run.py. This module is kept apart from the plan because the
protocol is the input every later step reads, and it needs none of them.

Library code: no printing (messages go to callbacks), no sys.exit.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtool.distill import students as st
from kdtool.errors import BadInput
from kdtool.models import set_offline
from kdtool.parsing import parse_count
from kdtool.reproduce import presets

FAMILIES = ("cache-acts", "train-sae", "stats", "predict", "distill", "calibrate", "concepts", "probe", "report")
STATE_DIR = ".reproduce"  # done markers, inside the run folder (hidden: plot report skips it)


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
    trials: dict[str, dict[str, Any]]  # name -> {"label": ..., "name": ..., train-sae option: value}
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

    Keys: out, model, revision, dataset, split, text_column, layers, all_layers, trials (names), tokens,
    stats_tokens, batch_tokens, expansion, sae_input, teacher_batch, shuffle_buffer, steps, widths,
    batch_size, seq_len, heads, warmup, eval_every, teacher_cache, topk, torchrun, concepts,
    per_class, device, offline, seed, skip.
    """
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    proto = presets.load("paper-protocol")
    trials_p = presets.load("paper-sae-trials")
    dist_p = presets.load("paper-distill")
    notes: list[str] = []

    model = str(o.get("model", proto["teacher"]["model"]))
    teacher_config = proto["teacher"].get("config") if model == proto["teacher"]["model"] else None

    trials = copy.deepcopy(trials_p["trials"])
    want = [t.strip() for t in str(o["trials"]).split(",") if t.strip()] if "trials" in o else trials_p["default"]
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
    if o.get("all_layers") and "layers" in o:
        raise BadInput("--all-layers and --layers: give one")
    if o.get("all_layers"):
        # hidden_states 1..n: the residual stream after every block (n: after the final norm, kdtool's convention)
        n_blocks = int((teacher_config or {}).get("num_hidden_layers") or _read_config(model, o).num_hidden_layers)
        layers = list(range(1, n_blocks + 1))
        notes.append(
            f"--all-layers: SAEs at hidden_states 1..{n_blocks} (the output of every block, as the authors' "
            f"trials; hidden_states {n_blocks} is after the final norm); the paper's tables use "
            + ",".join(map(str, sae["layers"]))
        )
    else:
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


def _read_config(model: str, o: dict) -> Any:
    """A teacher's transformers config (o: the overrides' revision and offline); BadInput when unreadable."""
    from transformers import AutoConfig  # seconds to import: only when a config is read

    if o.get("offline"):
        set_offline()
    try:
        return AutoConfig.from_pretrained(model, revision=o.get("revision"), local_files_only=bool(o.get("offline")))
    except Exception as e:  # any failure means the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"--model {model}: cannot read its config ({first}); the plan needs its width and depth: "
            "give a local save_pretrained folder or run where the hub is reachable"
        ) from None


def teacher_shape(p: Protocol) -> Teacher:
    """Read the teacher's config (preset for the default model, else AutoConfig) and count the
    students' parameters on the meta device (no memory, exact counts)."""
    # torch and transformers here, not at the top: seconds to import, and reproduce-paper's --help,
    # option errors and protocol checks need neither
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if p.teacher_config is not None:
        cfg_d = dict(p.teacher_config)
        config = AutoConfig.for_model(cfg_d.pop("model_type"), **cfg_d)
        source = "kdtool/data/presets/paper-protocol.toml"
    else:
        config = _read_config(p.model, {"revision": p.revision, "offline": p.offline})
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
