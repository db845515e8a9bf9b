#!/usr/bin/env bash
# Every GPU figure of the performance issue in one prepared run (under 9 minutes on one H100/H200: each part has a time limit), for a session that
# is lent a GPU machine for ~15 minutes in all. From the repository root, on the GPU machine:
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]        # logs to OUT_DIR (default $OUT, else /tmp/gpu_checks)
#   DEVICE=cpu SIZE=64 STEPS=1 bash benchmarks/gpu_checks.sh /tmp/gc    # a smoke run of the script itself
#
# The machine has torch and torchvision but not pycocotools (the engine's evaluation imports it); where a
# folder .whl/ holds its wheel (see the device tool's README: pip download ... pycocotools), it is installed
# first. Each part's output is its own log; a part that fails does not stop the others. Copy the figures, the
# card and these commands into benchmarks/RESULTS.md.
set -u
out=${1:-${OUT:-/tmp/gpu_checks}}
dev=${DEVICE:-cuda} size=${SIZE:-800} steps=${STEPS:-8}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
part() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$out/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v '^\s*$' "$out/$name.log" | grep -iv 'warning' | tail -n 12 | tee -a "$out/summary.txt"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
  | tee "$out/summary.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee -a "$out/summary.txt"
# LGD / baseline step at the paper's scale (the targets: <= 1.35x RetinaNet/FCOS, <= 1.6x R-CNNs,
# memory <= 1.3x), fp32, then bf16 + channels_last for the two detectors the issue measured that way
part step_overhead_fp32 270 python3 benchmarks/step_overhead.py --size "$size" --device "$dev" --steps "$steps" --warmup 3
part step_overhead_bf16_cl 100 python3 benchmarks/step_overhead.py --size "$size" --device "$dev" --steps "$steps" \
  --warmup 3 --amp bf16 --channels-last --detectors retinanet,faster_rcnn
# the teacher alone, 16 images x 50 objects at 800x1333 (the issue: >= 5x faster than the reference teacher)
part teacher 45 python3 benchmarks/teacher.py --device "$dev" --size "$size" --steps "$steps"
# the training loop vs the pure step (target: within 1.1x), RetinaNet R-18 192 px batch 8, baseline and LGD
part engine_baseline 50 python3 benchmarks/engine_throughput.py --device "$dev" --iters 60
part engine_lgd 50 python3 benchmarks/engine_throughput.py --device "$dev" --iters 60 --lgd
echo "logs in $out"
