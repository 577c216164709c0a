#!/usr/bin/env bash
# Build segflex with its CUDA kernels, run the GPU tests, the sanitizers and the benchmarks.
#
#   scripts/gpu_check.sh [build] [test] [sanitize] [bench] [sass]    (default: all but sass)
#
# Logs go to $OUT (default ./out): build.log, tests.log, memcheck.log, racecheck.log,
# bench_attention.{log,json}, bench_decode.{log,json}. Meant for a machine with an NVIDIA GPU
# (sm_90 by default; SEGFLEX_CUDA_ARCHS overrides).
set -u
OUT=$(realpath -m "${OUT:-out}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
stages=${*:-build test sanitize bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

has() { [[ " $stages " == *" $1 "* ]]; }
step() { echo "=== $1 ($(date +%T))"; }

if has build; then
    step build
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
    CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
    export CUDA_HOME LIBRARY_PATH="$CUDA_HOME/lib64:$CUDA_HOME/lib:${LIBRARY_PATH:-}"
    SEGFLEX_CUDA=1 $PY -m pip install -e . --no-build-isolation --no-deps -q >"$OUT/build.log" 2>&1
    rc=$?
    tail -3 "$OUT/build.log"
    $PY -c "import segflex, torch; print('segflex cuda:', segflex.cuda_available(), 'torch', torch.__version__)" || rc=1
    if [ $rc -ne 0 ]; then echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; fi
fi

if has sass; then
    step sass
    for f in prefill decode; do
        nvcc -c "csrc/cuda/$f.cu" -o "/tmp/$f.o" -O3 -std=c++17 -DSEGFLEX_WITH_CUDA -Icsrc \
            -gencode=arch=compute_90a,code=sm_90a && echo "$f:" &&
            cuobjdump -sass "/tmp/$f.o" | grep -oE "HMMA[.A-Z0-9]*|HGMMA[.A-Z0-9]*|LDSM[.A-Z0-9]*|LDL|STL" |
            sort | uniq -c
    done
fi

if has test; then
    step tests
    timeout 420 $PY -m pytest tests/test_gpu.py tests/test_gpu_generate.py -q --maxfail=3 -p no:cacheprovider ${TESTK:+-k "$TESTK"} \
        2>&1 | tee "$OUT/tests.log" | tail -25
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if has sanitize; then
    for tool in memcheck racecheck; do
        step "$tool"
        SEGFLEX_GPU_QUICK=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 \
            compute-sanitizer --tool "$tool" --print-limit 20 --kernel-name kns=sfcuda \
            $PY -m pytest tests/test_gpu.py -q -k smoke -p no:cacheprovider >"$OUT/$tool.log" 2>&1
        echo "$tool exit $?"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|error" "$OUT/$tool.log" | tail -4
    done
fi

if has bench; then
    step bench_attention
    (cd benchmarks && timeout 540 $PY bench_attention.py --device cuda --json "$OUT/bench_attention.json") \
        >"$OUT/bench_attention.log" 2>&1
    tail -9 "$OUT/bench_attention.log"
    step bench_decode
    (cd benchmarks && timeout 200 $PY bench_decode.py --device cuda --json "$OUT/bench_decode.json") \
        >"$OUT/bench_decode.log" 2>&1
    tail -9 "$OUT/bench_decode.log"
fi
step done
exit $status
