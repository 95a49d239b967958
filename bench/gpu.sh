#!/usr/bin/env bash
# One-shot GPU run on a lent H100/H200 (no internet, torch and triton preinstalled):
# install the carried wheels, run the CUDA tests, tune the plan options, then the kernel
# table (on the tuned plans) and the report. Results land in $OUT (default bench/results),
# named by the device; the tuned table in codegen/tuned/<device>.json (copied to $OUT).
# Every step is time-boxed and writes as it goes: a step cut short keeps what it measured.
#
#   carry: .whl (wheels of fla-core, einops, ...; see README "Benchmarks"), then
#   bash bench/gpu.sh            # at most 9.5 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 FLA_DISABLE_BACKEND_DISPATCH=1 LINATTN_BENCH_OUT=$OUT
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/$dev.gpu.txt" 2>&1
timeout 150 python3 -m pytest -q -x tests/test_cuda.py 2>&1 | tee "$OUT/$dev.tests.log"
timeout 170 python3 -m bench.tune --budget 140 2>&1 | tee "$OUT/$dev.tune.log"
cp codegen/tuned/*.json "$OUT/" 2>/dev/null
timeout 240 python3 -m pytest bench -q -p no:cacheprovider --benchmark-json="$OUT/$dev.json" 2>&1 | tee "$OUT/$dev.bench.log"
python3 -m bench.report "$OUT/$dev.json" --out "$OUT"
