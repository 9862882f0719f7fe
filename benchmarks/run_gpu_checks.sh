#!/usr/bin/env bash
# The GPU checks recorded in RESULTS.md, as run through the device tool (wheels in .whl/ for
# packages the GPU image lacks). Writes logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch,transformers,lightning,timm;print(torch.__version__,transformers.__version__,lightning.__version__,timm.__version__)"
set -o pipefail
( time python3 -m lit_mllm.cli fit --config configs/tiny.yaml --config configs/trainer/gpu_bf16.yaml --trainer.max_epochs 2 --trainer.limit_val_batches 0 --trainer.enable_progress_bar false ) 2>&1 | grep -v Warning | tail -15 | tee $OUT/tiny_fit.log
python3 -m lit_mllm.cli fit --config configs/smoke/gpu_0.5b_synthetic.yaml --trainer.enable_progress_bar false 2>&1 | tail -8 | tee $OUT/fit05.log
python3 - <<'PY' | tee $OUT/scalars.txt
import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for d in sorted(glob.glob("runs/*/tensorboard/version_*")):
    ea = EventAccumulator(d); ea.Reload()
    for t in ea.Tags()["scalars"]:
        if t.startswith(("train/loss", "perf/")):
            v = [(e.step, round(e.value, 4)) for e in ea.Scalars(t)]
            print(d, t, v[:2], v[-3:])
PY
DECODERS=${1:-0.5b,1.5b}
timeout 400 python3 -m benchmarks.train_throughput --decoders $DECODERS --time-limit-s 360 --out $OUT/throughput.md 2>&1 | tail -45
