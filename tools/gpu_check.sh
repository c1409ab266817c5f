#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py: stages, timeouts, $OUT). Run from anywhere; --dry on a CPU.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
