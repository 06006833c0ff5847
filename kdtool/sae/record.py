"""What an SAE folder says about how it was trained, in a few flat fields (`training_record`).

`kdtool stats` copies this record into each layer's summary, so that a stats file says which
training run (which trial: lambda, controller, width, seeds, tokens) its numbers measure even after
the SAE folders are gone; the report groups layers into trials by it (kdtool/report/trials.py).
Only kdtool's own layout records training; other layouts give None.
"""

from __future__ import annotations

from typing import Any

#: the fields of a record, from cfg.json's "kdtool" section (its "config" is train-sae's TrainConfig)
FIELDS = (
    "l1",  # lambda, or the controller's starting value
    "target_l0",  # the controller's target (None: fixed lambda)
    "l1_rate",
    "l1_warmup",
    "normalize",
    "d_sae",
    "d_in",
    "init_seed",  # the SAE's initialisation seed (the run's --seed unless --init-seed)
    "data_seed",  # the run's --seed: the order of the batches
    "lr",
    "batch_tokens",
    "tokens",  # training tokens the SAE has seen
    "model",
    "dataset",
)


def training_record(cfg: dict | None) -> dict[str, Any] | None:
    """The training settings of a kdtool SAE folder's cfg.json (a dict), or None for other layouts."""
    kd = (cfg or {}).get("kdtool")
    if not isinstance(kd, dict):
        return None
    run = kd.get("config") if isinstance(kd.get("config"), dict) else {}
    sae = kd.get("sae") if isinstance(kd.get("sae"), dict) else {}  # absent before side-by-side SAEs
    controller = kd.get("controller") if isinstance(kd.get("controller"), dict) else {}
    source = kd.get("source") if isinstance(kd.get("source"), dict) else {}
    norm = kd.get("normalize")
    data_seed = run.get("seed")
    init_seed = sae.get("init_seed", run.get("init_seed"))  # a list only in a run config with several
    return {
        "l1": kd.get("l1", run.get("l1")),
        "target_l0": controller.get("target_l0", run.get("target_l0")),
        "l1_rate": controller.get("rate", run.get("l1_rate")),
        "l1_warmup": controller.get("warmup_steps", run.get("l1_warmup")),
        "normalize": norm.get("method") if isinstance(norm, dict) else run.get("normalize", "none"),
        "d_sae": cfg.get("d_sae"),
        "d_in": cfg.get("d_in"),
        "init_seed": data_seed if init_seed is None or isinstance(init_seed, list) else init_seed,
        "data_seed": data_seed,
        "lr": run.get("lr"),
        "batch_tokens": run.get("batch_tokens"),
        "tokens": kd.get("tokens"),
        "model": source.get("model"),
        "dataset": source.get("dataset"),
    }
