#!/usr/bin/env bash
# Every GPU figure the docs need (docs/performance.md), in one run meant to take under 5 minutes on a current GPU:
#   1. python -m warp_kernel.check: the CUDA backend's correctness checks, then its benchmark;
#   2. benchmarks/attack_cost.py --device cuda: feature passes in float32 and bfloat16 with each
#      attention, at batch 1, 2, BATCH and 2 x BATCH; seconds per image of every preset at 1024,
#      priced from passes and timed as complete attacks; folder mode priced in images per minute;
#   3. benchmarks/folder.py: uad.py on a folder of BATCH photos with --batch 1 and --batch BATCH,
#      images per minute, and the two runs' files compared byte for byte;
#   4. attack_cost.py --compile: whether torch.compile pays for a 40-step stage 2 on the GPU,
#      compile time included (COMPILE=0 leaves it out).
#   5. with several GPUs, benchmarks/folder.py --nproc: uad.py on a folder in one process on one
#      GPU against torchrun with one process per GPU, images per minute (docs/scale.md).
# Without a GPU it says so in one line and exits 2; otherwise it exits 1 if any step failed.
#
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.txt          # BATCH=8 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BATCH="${BATCH:-4}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)" 2>/dev/null
then
  echo "benchmarks/gpu.sh: no CUDA GPU is visible here; nothing was measured" >&2
  exit 2
fi
status=0
step() { echo; echo "== $*"; "$@" || { echo "== FAILED (exit $?): $*"; status=1; }; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
step python -m warp_kernel.check
step python benchmarks/attack_cost.py --device cuda --attention sam,sdpa,sdpa-mask \
  --dtype float32,bfloat16 --batch "$BATCH" --join --full --repeats 5
step python benchmarks/folder.py --device cuda --batch "$BATCH" --images "$BATCH"
step python benchmarks/folder.py --device cuda --batch "$BATCH" --images "$BATCH" \
  --preset paper -- --attention sdpa --dtype bfloat16
if [ "${COMPILE:-1}" != 0 ]; then
  step python benchmarks/attack_cost.py --device cuda --attention sdpa --dtype bfloat16 --compile
fi
GPUS="$(python -c "import torch; print(torch.cuda.device_count())")"
if [ "$GPUS" -gt 1 ]; then
  step python benchmarks/folder.py --device cuda --nproc "$GPUS" --images "$((2 * GPUS))" \
    --preset no-fidelity -- --attention sdpa --dtype bfloat16
fi
exit "$status"
