"""The model and data flags every teacher-reading command shares, spelled once.

cache-acts, train-sae, stats and distill get them from one decorator, so --model/--dataset/...
mean the same everywhere and are declared in one place; the command receives them parsed:

    @with_teacher_flags
    def main(..., flags: TeacherFlags) -> None:
        teacher = load_teacher(flags.model_spec()); text = flags.data_spec()

Only typer and the standard library at import time (this runs on every TAB press).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from kdtool.cli.common import SeedOpt as SeedOpt  # re-exported: --seed is one of the shared flags

if TYPE_CHECKING:  # pragma: no cover
    from kdtool.models import LoadedModel, ModelSpec
    from kdtool.text.tokens import DataSpec

MODEL_PANEL = "Teacher model"
DATA_PANEL = "Text data"


def choices(name: str, *values: str) -> type[Enum]:
    """A str Enum whose members are `values` (Typer shows them as [a|b|c]); one line per choice option."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


ModelDtype = choices("ModelDtype", "auto", "float32", "bfloat16", "float16")


def acts_option(panel: str | None = None):
    """--acts: the activation cache a command reads (train-sae, stats, ...)."""
    return Annotated[
        Optional[Path],
        typer.Option(
            "--acts",
            help="Activation cache from `kdtool cache-acts` [default: acts].",
            file_okay=False,
            rich_help_panel=panel,
            show_default=False,
        ),
    ]


def layers_option(help: str, panel: str | None = None, short: bool = True):
    """--layer/-l: a list of layers (12 or 8,12,16), parsed by `parse_layers`; the help says what they select."""
    names = ("--layer", "-l") if short else ("--layer",)
    return Annotated[Optional[str], typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)]


def values_option(name: str, help: str, panel: str | None = None, *, optional: bool = False):
    """An option taking one value or a comma list (train-sae's --expansion 4,8,16: one SAE per value), as text
    for the command to parse. optional: no default (None), and none shown in --help."""
    if optional:
        return Annotated[Optional[str], typer.Option(name, help=help, rich_help_panel=panel, show_default=False)]
    return Annotated[str, typer.Option(name, help=help, rich_help_panel=panel)]


def tokens_option(help: str, panel: str | None = None):
    """--tokens: a token count in the compact notation (300M, 2.5B, 50K), parsed by `parse_tokens`."""
    return Annotated[Optional[str], typer.Option("--tokens", help=help, rich_help_panel=panel, show_default=False)]


def parse_layers(text: str | None) -> list[int] | None:
    """--layer's text as a list of layer indices; errors name the option (exit 2)."""
    from kdtool.cli.common import parse_opt
    from kdtool.parsing import parse_int_list

    return None if text is None else parse_opt("--layer", lambda t: parse_int_list(t, minimum=0), text)


def parse_tokens(text: str | None) -> int | None:
    """--tokens' text as a count; errors name the option (exit 2)."""
    from kdtool.cli.common import parse_opt
    from kdtool.parsing import parse_count

    return None if text is None else parse_opt("--tokens", parse_count, text)


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Teacher: a hub id (e.g. EleutherAI/pythia-410m), a local save_pretrained folder or a .gguf file. "
        "Default: the embedded SmolLM2-135M (converted once into $KDTOOL_HOME).",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option("--revision", help="Hub branch, tag or commit of --model.", rich_help_panel=MODEL_PANEL),
]
DtypeOpt = Annotated[
    ModelDtype,
    typer.Option(
        "--dtype",
        help="Dtype the teacher computes in (auto: bfloat16 on a CUDA GPU that supports it, else float32).",
        rich_help_panel=MODEL_PANEL,
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto (CUDA if available), cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Never use the network (models and datasets from local files/cache only).",
        rich_help_panel=MODEL_PANEL,
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow a hub model to run its own Python code (only for models you trust).",
        rich_help_panel=MODEL_PANEL,
    ),
]
DatasetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dataset",
        help="Text: a datasets hub name (NAME or NAME:CONFIG), a local file (.txt, .jsonl, .json or .parquet; .gz ok) "
        "or folder of them, or a save_to_disk folder. Default: the embedded corpus (see scripts/fetch-corpus).",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split to read.", rich_help_panel=DATA_PANEL)]
TextColumnOpt = Annotated[
    str, typer.Option("--text-column", help="Field/column holding the text.", rich_help_panel=DATA_PANEL)
]
SeqLenOpt = Annotated[
    int,
    typer.Option(
        "--seq-len", min=2, help="Tokens per packed sequence (EOS between documents).", rich_help_panel=DATA_PANEL
    ),
]
StreamingOpt = Annotated[
    bool,
    typer.Option(
        "--streaming/--no-streaming",
        help="Stream a hub dataset instead of downloading it whole (local files are always streamed).",
        rich_help_panel=DATA_PANEL,
    ),
]

STREAM_PANEL = "Streaming input (no cache)"
StreamOpt = Annotated[
    bool,
    typer.Option(
        "--stream",
        help="Read activations from the teacher (implied by --model or --dataset) instead of --acts.",
        rich_help_panel=STREAM_PANEL,
    ),
]
StreamBatchSizeOpt = Annotated[
    int,
    typer.Option("--batch-size", min=1, help="Streaming: sequences per teacher forward.", rich_help_panel=STREAM_PANEL),
]
StreamDropFirstOpt = Annotated[
    bool,
    typer.Option(
        "--drop-first/--keep-first", help="Streaming: drop position 0 of each sequence.", rich_help_panel=STREAM_PANEL
    ),
]


def model_spec(
    model: str | None = None,
    revision: str | None = None,
    dtype: ModelDtype | str = "auto",
    device: str = "auto",
    offline: bool = False,
    trust_remote_code: bool = False,
) -> ModelSpec:
    """The parsed shared model flags as a kdtool.models.ModelSpec (BadInput on bad values)."""
    from kdtool.models import ModelSpec

    return ModelSpec(
        model=model,
        revision=revision,
        dtype=str(getattr(dtype, "value", dtype)),
        device=device,
        offline=offline,
        trust_remote_code=trust_remote_code,
    )


def data_spec(
    dataset: str | None = None,
    split: str = "train",
    text_column: str = "text",
    seq_len: int = 512,
    streaming: bool = True,
    seed: int = 0,
    *,
    holdout: str = "train",
    **extra,
) -> DataSpec:
    """The parsed shared data flags as a kdtool.text.tokens.DataSpec; holdout='eval' for evaluation text."""
    from kdtool.text.tokens import DataSpec

    return DataSpec(
        dataset=dataset,
        split=split,
        text_column=text_column,
        seq_len=seq_len,
        streaming=streaming,
        seed=seed,
        holdout=holdout,
        **extra,
    )


@dataclass(frozen=True)
class TeacherFlags:
    """The shared model and data flags of one command line, as parsed."""

    model: str | None = None
    revision: str | None = None
    dtype: ModelDtype | str = ModelDtype.auto
    device: str = "auto"
    offline: bool = False
    trust_remote_code: bool = False
    dataset: str | None = None
    split: str = "train"
    text_column: str = "text"
    seq_len: int = 512
    streaming: bool = True
    seed: int = 0

    def model_spec(self) -> ModelSpec:
        return model_spec(self.model, self.revision, self.dtype, self.device, self.offline, self.trust_remote_code)

    def data_spec(self, **kwargs) -> DataSpec:
        return data_spec(self.dataset, self.split, self.text_column, self.seq_len, self.streaming, self.seed, **kwargs)


#: (parameter, Typer annotation) of each shared flag, in --help order; defaults are TeacherFlags'
_SHARED = (
    ("model", ModelOpt),
    ("revision", RevisionOpt),
    ("dtype", DtypeOpt),
    ("device", DeviceOpt),
    ("offline", OfflineOpt),
    ("trust_remote_code", TrustRemoteCodeOpt),
    ("dataset", DatasetOpt),
    ("split", SplitOpt),
    ("text_column", TextColumnOpt),
    ("seq_len", SeqLenOpt),
    ("streaming", StreamingOpt),
    ("seed", SeedOpt),
)


def with_flag_group(command, name: str, group: type, flags: tuple[tuple[str, object], ...]):
    """Append a group of shared flags to a Typer command's options and hand them to it as `name: group`.

    Typer reads a command's options from its signature, so the wrapper's signature is the command's
    own parameters (minus `name`) followed by the group's (defaults: a `group()`); calls split them off
    again and build the group. Groups stack (each decorator removes its own parameter).
    """
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != name]
    defaults = group()
    shared = [
        inspect.Parameter(
            flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann, default=getattr(defaults, flag)
        )
        for flag, ann in flags
    ]

    @functools.wraps(command)
    def run(**kwargs):
        parsed = group(**{flag: kwargs.pop(flag) for flag, _ in flags})
        return command(**kwargs, **{name: parsed})

    keyword_only = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]  # a later group's parameter
    params = [p for p in own if p not in keyword_only] + shared + keyword_only
    run.__signature__ = inspect.Signature(params, return_annotation=None)
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return run


def with_teacher_flags(command):
    """Append the shared model and data flags to a command and hand them to it as `flags: TeacherFlags`."""
    return with_flag_group(command, "flags", TeacherFlags, _SHARED)


def quiet_transformers() -> None:
    """transformers' own progress bars ("Loading weights") and chatter off, unless --debug."""
    import logging

    from kdtool.cli.common import STATE

    if STATE.debug:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    logging.getLogger("kdtool.models").setLevel(logging.WARNING)


def load_teacher(spec: ModelSpec) -> LoadedModel:
    """load_model with the CLI's manners: its own phase (a line, and a spinner on a terminal), no transformers bars."""
    import contextlib

    from kdtool.cli.common import err_console, log, show_progress
    from kdtool.models import EMBEDDED_NAME, load_model

    quiet_transformers()
    what = spec.model or EMBEDDED_NAME
    log(f"loading teacher {what} ...")
    spinner = err_console().status(f"loading teacher {what} ...") if show_progress() else contextlib.nullcontext()
    with spinner:
        loaded = load_model(spec, notify=log)
    log(
        f"loaded {loaded.name}: {loaded.n_layers} blocks, d_model {loaded.d_model}, "
        f"{str(loaded.dtype).removeprefix('torch.')} on {loaded.device}"
    )
    return loaded
