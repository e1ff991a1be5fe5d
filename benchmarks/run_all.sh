#!/usr/bin/env bash
# Run every benchmark in order; each appends/updates its own section of benchmarks/RESULTS.md.
# Usage: bash benchmarks/run_all.sh [--quick]   (extra arguments are passed to every script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
echo "== $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for b in bench_train bench_encode bench_search bench_embed_memory; do
    echo
    echo "== $b $*"
    "$PY" "benchmarks/$b.py" "$@"
done
echo
echo "== done: benchmarks/RESULTS.md"
