#!/usr/bin/env bash
# The GPU checks and benchmarks in one command (about 6 minutes on one H100):
#
#   bash bench/gpu.sh            # from anywhere; results in bench/results/*.cuda.json
#
# - The tests marked gpu: a real audit whose "auto" device is the GPU, CUDA memory.
# - LRP collection: torchvision VGG-16 (random init, 2 classes) at 224 x 224, 2,000
#   generated images, batch 32, audited at features.22; cnp's collection vs a plain
#   forward and backward pass (autograd) on the same batches.
# - DRSA: planted data N = 10,000, d = 512, K = 4; fit_drsa vs the reference rule
#   (2,500 epochs x 3 restarts) on the GPU.
# - Compact-model latency: ResNet-18 and VGG-11 pruned 30 % and 50 % vs unpruned, on the GPU.
# - A whole audit: a default `cnp audit` (and one with CNP) of 3,160 images through a real
#   cnp-server, which picks the GPU itself, vs one forward+backward pass on the GPU.
#
# Environment: uses .venv/bin/python when it exists, else $PYTHON or python3. When the
# project does not import there (a fresh GPU machine), it runs
#   pip install -e '.[server,dev]'
# which needs a package index or a wheelhouse (PIP_FIND_LINKS=dir PIP_NO_INDEX=1): the
# repository cannot carry torch's wheels. $OUT, when set (the device runner), also gets
# a copy of the JSON files. The card's name is recorded in each JSON (machine.gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import torch, torchvision, zennit, torch_pruning, scipy, pytest, cnp_core" 2>/dev/null; then
    echo "cnp does not import with $PY: installing it (pip install -e '.[server,dev]')" >&2
    "$PY" -m pip install --quiet -e '.[server,dev]'
fi
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

"$PY" -m pytest -q -m gpu -p no:cacheprovider tests
"$PY" -m bench.lrp_collection --device cuda --arch vgg16 --size 224 --images 2000 --batch 32 --repeats 3
"$PY" -m bench.drsa --device cuda --n 10000 --dim 512 --k 4
"$PY" -m bench.pruned_latency --device cuda
"$PY" -m bench.audit_speed --device cuda

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp bench/results/*.cuda.json "$OUT"/
fi
