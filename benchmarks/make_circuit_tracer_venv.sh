#!/usr/bin/env bash
# Make the virtualenv benchmarks/attribution.py runs circuit-tracer 0.5.0 from (it needs transformers <= 4.57.3 and
# nnsight >= 0.6, which clash with interplab's transformers 5). torch goes in first and pinned, so that resolving
# circuit-tracer's own requirements finds it satisfied instead of pulling a CUDA build of several GB.
#
#     bash benchmarks/make_circuit_tracer_venv.sh [VENV]      # default ~/.cache/interplab/venvs/circuit-tracer
set -euo pipefail
VENV="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/interplab/venvs/circuit-tracer}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import circuit_tracer, nnsight" 2>/dev/null; then
    echo "$VENV is ready"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.13.0"
"$VENV/bin/pip" install --quiet "circuit-tracer==0.5.0" "nnsight==0.6.3" "transformers>=4.56,<=4.57.3" "torch==2.13.0"
"$VENV/bin/python" -c "import torch, transformers, nnsight, circuit_tracer; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__)"
echo "$VENV is ready"
