#!/usr/bin/env bash
# Everything a GPU machine checks, in one command, with every output kept in one folder:
# the device and versions, the CUDA tests (tests/crckd_losses/test_cuda.py, and every backend
# against the reference maths and the Triton kernels in tests/crckd_losses/backends/), then the
# whole benchmark on the device. A failing test does not stop the benchmark.
#
#   bash benchmarks/on_a_gpu.sh OUT_DIR [more benchmarks/run.py options, e.g. --budget 1]
#
# The library need not be installed: it runs from this checkout. DEVICE=cpu makes a dry run
# on a machine without a GPU (the CUDA tests then skip).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/on_a_gpu.sh OUT_DIR [run.py options]}
shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u
    nvidia-smi || true
    python -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    python -c "import triton; print('triton', triton.__version__)" || echo "no triton"
} > "$out/device.txt" 2>&1
start=$(date +%s)
python -m pytest -q -p no:cacheprovider tests/crckd_losses/test_cuda.py \
    tests/crckd_losses/backends/test_backends.py tests/crckd_losses/backends/test_triton.py \
    > "$out/tests.txt" 2>&1
echo "pytest exit status $? after $(( $(date +%s) - start )) s" >> "$out/tests.txt"
tail -n 3 "$out/tests.txt"
start=$(date +%s)
python benchmarks/run.py --device "${DEVICE:-cuda}" --out "$out" "$@" > "$out/benchmark.log" 2>&1
status=$?
echo "benchmark exit status $status after $(( $(date +%s) - start )) s" | tee -a "$out/benchmark.log"
tail -n 40 "$out/benchmark.log"
exit $status
