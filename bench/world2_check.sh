#!/usr/bin/env bash
# The h100x2 layout on one host's GPUs: N ranks (torchrun), each with its own
# in-process vLLM engine and a LoRA trainer on that engine's weights (shared
# base, KV-only sleep), one GRPO step, then the sync check on every rank
# (bf16, 1.5B shape with saved random weights). Per-GPU memory is sampled
# while it runs: each engine must sit on its own rank's GPU.
#
#   NPROC=2 bash bench/world2_check.sh        (results: $OUT or /tmp/world2)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/world2}; mkdir -p "$OUTDIR"
VLLM_SITE=${VLLM_SITE:-/tmp/site}
if [ ! -d "$VLLM_SITE/vllm" ] && [ -d /tmp/parts ]; then
  ( cd /tmp && cat parts/p* > bundle.tar && mkdir -p b "$VLLM_SITE" && tar -C b -xf bundle.tar \
      && tar -C "$VLLM_SITE" -xJf b/vllm.tar.xz \
      && python3 -m pip install -q --no-index --no-deps --no-compile --target "$VLLM_SITE" b/wheels/*.whl )
fi
export PYTHONPATH="$PWD:$VLLM_SITE" VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 TOKENIZERS_PARALLELISM=false
DATA=${BENCH_DATA:-../shared/data/gsm8k/train.jsonl}
MODEL=$(python3 -c "from pathlib import Path; from bench.gpu_checks import saved_model; print(saved_model('1.5b', Path('/tmp/grpo-bench-shapes'), '$DATA'))" | tail -1)
( while sleep 3; do nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | tr '\n' ' '; echo; done ) > "$OUTDIR/gpu_mem.txt" &
SMI=$!
timeout "${LIMIT_S:-300}" python3 -m torch.distributed.run --nproc_per_node "${NPROC:-2}" -m grpo_core.synccheck --steps 1 \
  "model.path=$MODEL" model.dtype=bfloat16 data.source=gsm8k "data.train_path=$DATA" "data.test_path=$DATA" \
  trainer.run_dir=/tmp/world2-run tracking.enabled=false trainer.device=cuda rollout.n=2 rollout.max_tokens=16 \
  rollout.val_max_tokens=16 rollout.enforce_eager=true rollout.gpu_memory_utilization=0.3 data.max_prompt_tokens=256 \
  trainer.prompts_per_step=4 trainer.mini_batch_prompts=4 trainer.micro_batch_size=8 algorithm.kl_coef=0.001 \
  algorithm.entropy_coef=0.05 model.lora_rank=32 model.lora_alpha=32 optim.lr=0.002 \
  model.share_base_weights=true rollout.sleep_level=1 > "$OUTDIR/world2.log" 2>&1
RC=$?
kill $SMI
echo "rc=$RC" | tee -a "$OUTDIR/world2.log"
grep '^{' "$OUTDIR/world2.log"; sort -u "$OUTDIR/gpu_mem.txt" | tail -4
exit $RC
