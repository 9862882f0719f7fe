#!/usr/bin/env bash
# `lit-mllm fit` vs the benchmark on the same workload (device tool, one GPU): the 0.5B-class
# smoke recipe (MLP projector, packed rows, varlen attention, per-layer compile on CUDA) at
# micro-batch 64, then the benchmark's lit-mllm MLP row at micro-batch 64 with text lengths
# matching the synthetic captions. Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m lit_mllm.cli fit --config configs/smoke/gpu_0.5b_synthetic.yaml --trainer.max_steps ${STEPS:-80} \
  --trainer.enable_progress_bar false > $OUT/fit05.log 2>&1; echo "fit rc=$?"
python3 - <<'PY' | tee $OUT/fit05_scalars.txt
import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = sorted(glob.glob("runs/gpu_0.5b/tensorboard/version_*"))[-1]
ea = EventAccumulator(d); ea.Reload()
for t in ("train/loss", "perf/step_time_s", "perf/samples_per_sec", "perf/tokens_per_sec", "perf/mfu", "perf/gpu_mem_peak_gib"):
    if t in ea.Tags()["scalars"]:
        v = [(e.step, round(e.value, 4)) for e in ea.Scalars(t)]
        print(t, "first", v[:1], "last", v[-3:])
PY
timeout 300 python3 -m benchmarks.train_throughput --decoders 0.5b --rows mlp --batch-sizes mlp=64 \
  --text-tokens 20,34,71 --gen-batches 0 --loader-batches 0 --compile on --lit-attn varlen \
  --out $OUT/bench05_short.md 2>&1 | grep -E "^\| 0.5B|MFU|error" | head -8
