#!/usr/bin/env bash
# The GPU check, in one run: Lamb's Triton kernels tested compiled on CUDA, then the paired speed table.
#
#   benchmarks/gpu_check.sh --wheels     # here (with a package index): fetch pytest, hypothesis and numpy for the
#                                        # GPU machine's Python 3.12 into .gpu-wheels/ (git-ignored, ~18 MB)
#   benchmarks/gpu_check.sh              # on the CUDA machine, from the checkout with .gpu-wheels/ carried along
#   benchmarks/gpu_check.sh --dry-run    # here, on the CPU: the same steps, the kernels in Triton's interpreter
#
# The lent GPU machine has its own torch and triton and reaches no package index: the check runs its python with
# PYTHONPATH=src, in a venv that sees the system's packages, adding only what is missing from .gpu-wheels/.
# It prints the machine, the test summary and the step_speed.py tables (float32; bfloat16 parameters with float32
# masters; torch.compile'd foreach steps, bounded to 4 minutes); paste them, with the date, into
# benchmarks/README.md. Expected to take 5 to 8 minutes on an H200; the device tool allows 10 per command.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--wheels" ]]; then
    python3 -m pip download --quiet --dest .gpu-wheels --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        pytest hypothesis numpy
    ls .gpu-wheels
    exit 0
fi

dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1

if [[ $dry_run == 1 ]]; then
    python=.venv/bin/python
    device=cpu
    export TRITON_INTERPRET=1
else
    env=/tmp/torchlamb-gpu-env
    python3 -m venv --system-site-packages "$env"
    python=$env/bin/python
    # pytest, hypothesis (the tests' conftest) and numpy (the float64 reference), where the system lacks them.
    "$python" -m pip install --quiet --no-index --find-links .gpu-wheels pytest hypothesis numpy
    device=cuda
fi
export PYTHONPATH=src

echo "== $(date -u '+%Y-%m-%d %H:%M UTC') on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU')"
"$python" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.cuda.is_available())"

echo "== tests: the Triton kernels against the float64 reference, the CPU kernels and the foreach path"
"$python" -m pytest -q -p no:cacheprovider tests/test_triton.py || echo "TESTS FAILED (the timing still runs)"

echo "== step speed against AdamW(fused=True), paired in one process"
if [[ $dry_run == 1 ]]; then
    "$python" benchmarks/step_speed.py --device cpu --quick --rounds 2 --no-public --workload many-small
else
    "$python" benchmarks/step_speed.py --device cuda --rounds 20 --no-public
    "$python" benchmarks/step_speed.py --device cuda --rounds 20 --no-public --workload bert-base \
        --dtype bfloat16 --master-weights
    # torch.compile of the foreach steps: bounded, as compiling 199 tensors' steps may take minutes.
    timeout 240 "$python" benchmarks/step_speed.py --device cuda --rounds 10 --no-public --workload bert-base \
        --compile || echo "the --compile run did not finish within 240 s"
fi
