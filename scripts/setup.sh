#!/usr/bin/env bash
# Create .venv/ and install the locked dependency tree plus medpipe itself (editable).
# Called by `make setup` (and so by `make demo` / `make test`) only when requirements.lock or pyproject.toml
# changed since the last successful run; the stamp file records that.
# GPU=1 (`make setup GPU=1`): .venv-gpu/ from requirements-gpu.lock (TensorFlow with CUDA; NVIDIA driver needed).
set -euo pipefail
cd "$(dirname "$0")/.."

# pip check lines that are expected: tensorflow-serving-api's declared `tensorflow` (skipped with --no-deps), and in
# the GPU venv medpipe's declared tensorflow-cpu (replaced by tensorflow[and-cuda], the same import package).
EXPECTED="tensorflow-serving-api .* requires tensorflow"
if [ "${GPU:-0}" = "1" ]; then
  VENV=.venv-gpu LOCK=requirements-gpu.lock EXPECTED="$EXPECTED|medpipe .* requires tensorflow-cpu"
else
  VENV=.venv LOCK=requirements.lock
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "setup: Python 3.11 is required (TensorFlow 2.21 + Beam 2.77 + Airflow 3.3 are locked for it)." >&2
  echo "       Install it, or point PYTHON=/path/to/python3.11 at one." >&2
  exit 1
fi

STAMP=$VENV/.medpipe-installed
want="$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# This machine's pip config names local find-links folders that may not exist; their warnings are noise.
pip_install() {
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install --quiet "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2; rm -f "$log"
    echo "setup: pip install $* failed (see above)" >&2; return 1
  fi
  grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" -e "^ *!!" "$log" | grep -i -e error -e warning || true
  rm -f "$log"
}
pip_install --upgrade "pip>=24"
echo "setup: installing the locked dependency tree ($LOCK) into $VENV (a few minutes on a fresh machine)..."
pip_install -r "$LOCK"
pip_install --no-deps tensorflow-serving-api==2.21.0
pip_install --no-deps -e .
# Everything except the expected lines above must be consistent (captured first: `grep -q` in a pipefail pipeline
# can end the check early and hide a problem).
problems="$("$VENV/bin/python" -m pip check | grep -v -E "$EXPECTED" || true)"
if [ -n "$problems" ]; then
  echo "$problems" >&2
  echo "setup: dependency check failed (see above)" >&2
  exit 1
fi
# Bytecode for medpipe's own packages: where PYTHONDONTWRITEBYTECODE is set (this machine and its CI), every process
# would otherwise recompile them (~50 ms for an ingest, again in each Beam worker and test subprocess).
"$VENV/bin/python" -m compileall -q -j 0 medpipe beam_pipelines models serving dags >/dev/null
echo "$want" > "$STAMP"
echo "setup: done in $(( $(date +%s) - start )) s"
