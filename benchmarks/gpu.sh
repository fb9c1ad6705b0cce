#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU and a CUDA build of PyTorch already installed (this uses that
# torch, not the CPU-only .venv): the CUDA tests (tests/test_cuda.py and the device cases of the robustness
# tests), then the benchmark with every contender on the GPU. Logs and JSON go to $OUT (default
# benchmarks/results). Peers' wheels placed in .whl/ (backpack, curvlinops, laplace, ...) are installed first,
# into /tmp/site, without dependencies.
#
#   bash benchmarks/gpu.sh [test|bench|all] [extra arguments for benchmarks.run]
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
WHAT=${1:-all}
shift || true
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PY -c "import torch, fxjac; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
rc=0
if [ "$WHAT" != bench ]; then
    timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -p no:cacheprovider -v -rfE --durations=10 tests/test_cuda.py \
        "tests/test_robustness.py::test_products_on_device" \
        "tests/test_robustness.py::test_operand_on_another_device_is_a_shape_error" 2>&1 \
        | tee "$OUT/gpu-tests.log" | tail -30
    rc=${PIPESTATUS[0]}
fi
if [ "$WHAT" != test ]; then
    timeout "${BENCH_TIMEOUT:-420}" $PY -m benchmarks.run --device cuda --out "$OUT" "$@" \
        > "$OUT/gpu-bench.md" 2> "$OUT/gpu-bench.log"
    brc=$?
    tail -15 "$OUT/gpu-bench.log"
    cat "$OUT/gpu-bench.md"
    [ $brc -eq 0 ] || rc=$brc
fi
exit $rc
