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
bash bench/install_vllm_bundle.sh "$VLLM_SITE" || exit 1
export PYTHONPATH="$PWD:$VLLM_SITE" VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 TOKENIZERS_PARALLELISM=false
DATA=${BENCH_DATA:-../shared/data/gsm8k/train.jsonl}
# gpu_checks' lora_shared check, with the KL term on (its reference pass starts each step) and every rank on CUDA
mapfile -t OVERRIDES < <(python3 -c "
import sys; from pathlib import Path; from bench.gpu_checks import saved_model, sync_check_overrides
model = saved_model('1.5b', Path('/tmp/grpo-bench-shapes'), sys.argv[1])
print('\n'.join(sync_check_overrides('lora_shared', model, sys.argv[1], False, Path('/tmp/world2-run'))))
" "$DATA" | grep -E '^[a-z_]+\.[a-z_.]+=')
( while sleep 3; do nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | tr '\n' ' '; echo; done ) > "$OUTDIR/gpu_mem.txt" &
SMI=$!
timeout "${LIMIT_S:-300}" python3 -m torch.distributed.run --nproc_per_node "${NPROC:-2}" -m grpo_core.synccheck --steps 1 \
  "${OVERRIDES[@]}" algorithm.kl_coef=0.001 trainer.device=cuda > "$OUTDIR/world2.log" 2>&1
RC=$?
kill $SMI
echo "rc=$RC" | tee -a "$OUTDIR/world2.log"
grep '^{' "$OUTDIR/world2.log"; sort -u "$OUTDIR/gpu_mem.txt" | tail -4
exit $RC
