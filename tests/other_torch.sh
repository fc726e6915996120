#!/usr/bin/env bash
# The test suite under other torch releases than CI's: for each TORCH=TORCHVISION pair, a
# fresh virtual environment with that torch (and the Triton it pins), this checkout on
# PYTHONPATH; per version its failures, summary line and skip reasons other than a missing
# GPU. Needs PyPI; each version takes a few GB of disk while it runs and is removed after.
#
#   bash tests/other_torch.sh 2.4.1=0.19.1 2.7.1=0.22.1 2.11.0=0.26.0
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n 2,7p "$0"; exit 2; }
for pair in "$@"; do
    torch_v=${pair%%=*} vision_v=${pair#*=}
    venv=$(mktemp -d)/venv
    python3 -m venv "$venv"
    # numpy < 2.4: Triton 3.6 and older cannot run their interpreter with numpy 2.4.
    if ! "$venv/bin/pip" install -q --no-cache-dir "torch==$torch_v" "torchvision==$vision_v" \
            "numpy<2.4" scikit-learn matplotlib tqdm pillow pytest hypothesis > /dev/null 2>&1
    then
        echo "torch $torch_v: install failed"
    else
        versions=$("$venv/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>/dev/null || "$venv/bin/python" -c "import torch; print('torch', torch.__version__)")
        # Failures, errors, the summary, and the reasons of skips other than CUDA's.
        result=$(PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider 2>&1 \
            | grep -E "^(FAILED|ERROR) |^SKIPPED|^[0-9]+ (passed|failed|errors?)|Interrupted" \
            | grep -v "needs a CUDA device")
        echo "== $versions"
        echo "$result"
    fi
    rm -rf "$(dirname "$venv")"
done
