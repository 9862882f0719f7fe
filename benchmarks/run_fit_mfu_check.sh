#!/usr/bin/env bash
# `lit-mllm fit` vs the benchmark on the same workload (device tool, one GPU): the smoke recipe
# (MLP projector, packed rows, varlen attention, per-layer compile on CUDA) with a 0.5B- or
# 1.5B-class decoder (DECODER=0.5b|1.5b, default 1.5b) at micro-batch BATCH (default 32: 64
# runs out of memory at 1.5B on the H200), then the benchmark's lit-mllm MLP row at the same
# micro-batch with text lengths matching the synthetic captions. Wheels for packages the GPU
# image lacks come from WHEELS (default .whl).
# Logs under $OUT.
DECODER=${DECODER:-1.5b}
BATCH=${BATCH:-32}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
overlay=()
fit_kernels=()
bench_kernels=(--lit-attn varlen)
if [ "${KERNELS:-}" = fa4-quack ]; then
  fit_kernels=(--model.decoder.attn_implementation lit_varlen_fa4 --model.decoder.mlp_kernel quack
    --model.residual_dtype autocast)
  bench_kernels=(--lit-attn varlen-fa4 --mlp-kernel quack --residual-dtype autocast)
fi
[ "$DECODER" = 1.5b ] && overlay=(--config configs/smoke/decoder_1.5b.yaml)
python3 -m lit_mllm.cli fit --config configs/smoke/gpu_0.5b_synthetic.yaml "${overlay[@]}" "${fit_kernels[@]}" \
  --data.batch_size "$BATCH" --trainer.max_steps ${STEPS:-60} --trainer.enable_progress_bar false \
  --trainer.default_root_dir runs/fit_check --trainer.logger.init_args.save_dir runs/fit_check \
  > $OUT/fit_$DECODER.log 2>&1; echo "fit rc=$?"
python3 - <<'PY' | tee $OUT/fit_${DECODER}_scalars.txt
import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = sorted(glob.glob("runs/fit_check/tensorboard/version_*"))[-1]
ea = EventAccumulator(d); ea.Reload()
for t in ("train/loss", "perf/step_time_s", "perf/samples_per_sec", "perf/tokens_per_sec",
          "perf/mfu", "perf/data_wait_pct", "perf/gpu_mem_peak_gib"):
    if t in ea.Tags()["scalars"]:
        v = [(e.step, round(e.value, 4)) for e in ea.Scalars(t)]
        print(t, "first", v[:1], "last", v[-3:])
PY
timeout 300 python3 -m benchmarks.train_throughput --decoders "$DECODER" --rows mlp --batch-sizes mlp="$BATCH" \
  --text-tokens 20,34,71 --gen-batches 0 --loader-batches 0 --compile on "${bench_kernels[@]}" \
  --out $OUT/bench_${DECODER}_short.md 2>&1 | grep -E "^\| lit|error" | head -4
