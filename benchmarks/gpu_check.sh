#!/usr/bin/env bash
# One prepared run for an H200 lent by the device tool: GPU tests, then GPU benchmarks.
# Needs no network and stops itself in under 8 minutes. Results go to $OUT (default benchmarks/out/).
#
# Wheels travel in .whl/ (git-ignored): run benchmarks/fetch_wheels.sh here first. lark is required
# (the GPU image lacks it); flash-linear-attention and titans-pytorch are peers: without them the
# peer rows say so and everything else still runs.
#
# Call from the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -u
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -i -E 'lark|sympy|networkx|flash|titans' || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -m pip install -q --no-index lark 2>/dev/null || true
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -20
timeout 260 python3 benchmarks/gpu.py --out "$OUT/gpu.json" --budget-s 200 2>&1 | tee "$OUT/gpu_bench.txt" | tail -40
# opt-in (adds up to 150 s, past the 8 minutes above): hydra's 2-D training step at the ETTh1 shape —
# exact wavefront vs torch tiles vs the generated Triton tile kernels
if [ "${MEMDSL_GPU_2D:-0}" = 1 ]; then
  timeout 150 python3 benchmarks/gpu.py --twod --out "$OUT/gpu_2d.json" --budget-s 120 2>&1 | tee "$OUT/gpu_2d.txt" | tail -10
fi
