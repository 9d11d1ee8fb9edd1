#!/usr/bin/env bash
# Every GPU measurement of the project in one command (at most 8 minutes on one GPU):
#     bash benchmarks/gpu_pack.sh [--budget-s SECONDS] [--rows ...]
# writes benchmarks/results/gpu_<device name>.{md,json}. Refuses to start without CUDA (exit 2).
# See benchmarks/gpu_pack.py for the rows and their time guards.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; fi
exec "$python" "$here/gpu_pack.py" --command "bash benchmarks/gpu_pack.sh $*" "$@"
