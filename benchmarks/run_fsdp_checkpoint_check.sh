#!/usr/bin/env bash
# FSDP checkpoint check (device tool, nvidia-h200-x2): train 10 steps under FSDP on 2 GPUs with
# sharded checkpoints, resume to step 15 from last.ckpt, then load the sharded checkpoint on
# one GPU and on the CPU (trainable weights only). Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
C="--config configs/smoke/gpu_0.5b_synthetic.yaml --config configs/trainer/fsdp.yaml --config configs/smoke/fsdp_checkpoint.yaml"
timeout 180 python3 -m lit_mllm.cli fit $C > $OUT/fsdp_fit.log 2>&1; echo "fit rc=$?"; tail -2 $OUT/fsdp_fit.log
ls -la runs/fsdp/ckpt runs/fsdp/ckpt/* | head -20; du -sh runs/fsdp/ckpt
timeout 180 python3 -m lit_mllm.cli fit $C --trainer.max_steps 15 --ckpt_path runs/fsdp/ckpt/last.ckpt > $OUT/fsdp_resume.log 2>&1; echo "resume rc=$?"; grep -i -E "restor|resum|stopped" $OUT/fsdp_resume.log | tail -3
for dev in cuda cpu; do
timeout 120 python3 - $dev <<'PY' 2>&1 | grep -v Warning | tail -4
import sys, torch
from lit_mllm.export import load_checkpoint
m = load_checkpoint("runs/fsdp/ckpt/last.ckpt").to(sys.argv[1])
trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
print(sys.argv[1], "loaded; trainable params", trainable, "device", next(m.parameters()).device)
PY
done
