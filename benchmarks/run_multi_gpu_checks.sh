#!/usr/bin/env bash
# Multi-GPU checks recorded in RESULTS.md (device tool, nvidia-h200-x2): DDP scaling of the
# 1.5B-class smoke recipe from 1 to 2 GPUs, and the seed recipe (EVA02-E + 7B, random weights)
# under FSDP on 2 GPUs. Wheels in .whl/ supply packages the GPU image lacks. Logs go to $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
S=configs/smoke
for n in 1 2; do
  timeout 170 python3 -m lit_mllm.cli fit --config $S/gpu_0.5b_synthetic.yaml --config $S/decoder_1.5b.yaml \
    --data.batch_size 16 --trainer.devices $n --trainer.strategy ddp --trainer.max_steps 40 \
    --trainer.default_root_dir runs/ddp$n --trainer.logger.init_args.save_dir runs/ddp$n \
    --trainer.enable_progress_bar false > $OUT/ddp$n.log 2>&1; echo "ddp$n rc=$?"; tail -2 $OUT/ddp$n.log
done
timeout 330 python3 -m lit_mllm.cli fit --config configs/seed_eva02e_7b.yaml --config $S/seed_fsdp_random.yaml \
  --trainer.enable_progress_bar false > $OUT/fsdp.log 2>&1; echo "fsdp rc=$?"; grep -v Warning $OUT/fsdp.log | tail -8
python3 - <<'PY' | tee $OUT/scalars.txt
import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for d in sorted(glob.glob("runs/*/tensorboard/version_*")):
    ea = EventAccumulator(d); ea.Reload()
    for t in ea.Tags()["scalars"]:
        if t in ("train/loss", "perf/tokens_per_sec", "perf/mfu", "perf/gpu_mem_peak_gib", "perf/step_time_s", "perf/samples_per_sec"):
            v = [(e.step, round(e.value, 4)) for e in ea.Scalars(t)]
            print(d, t, v[:2], v[-3:])
PY
