#!/usr/bin/env bash
# Every benchmark, each in its own process, in sequence; one failing (or
# timing out) does not stop the others. Results: one JSON per figure, a log
# per process, run_all.log and SUMMARY.md.
#
#   bash bench/run_all.sh [--tiny] [extra args passed to every script]
#
# Where results go: $OUT/gpu when OUT is set (the device run's fetched folder, moved to
# bench/results/<card>/<date>-<n>; --tiny: $OUT/tiny), else bench/results/local/<date>
# (--tiny: a temp dir).
# Environment (all optional):
#   PYTHON            interpreter (default: python3; --tiny: .venv/bin/python when present)
#   BENCH_DATA        GSM8K train.jsonl for grpo_step (default ../shared/data/gsm8k/train.jsonl if present)
#   VLLM_SITE         dir holding the vLLM bundle's packages, put on PYTHONPATH (default /tmp/site);
#                     installed there first from /tmp/parts when missing (../shared/device/README.md)
#   BENCH_ONLY        subset, space separated: "train_step train_step_nockpt planner_check suite gpu_checks"
#                     (the default), or "fullft" (h800x4 recipe, depth-reduced 14B, ~540 s), "learning"
#                     (the learning check, LoRA on a shared base, <= 300 s), "learning_full" (full FT, <= 300 s):
#                     each of the last three needs a 10-minute run of its own; "trl" (TRL's GRPOTrainer on
#                     grpo_step's work, bench/trl_grpo.py, <= 560 s; installs the TRL carry first, bench/install_trl.sh)
#   BENCH_TRL_ARGS    extra args for bench.trl_grpo only (e.g. "--ours bench/results/<card>/<date>-<n> --steps 2")
#   TRL_SITE          --tiny: a dir holding trl (pip install --no-deps --target DIR trl==1.16.0), put on PYTHONPATH
#   BENCH_FULLFT_ARGS extra args for bench.fullft only (e.g. "--layers 6 --enforce-eager")
#   BENCH_LEARNING_ARGS extra args for both bench.learning runs (e.g. "--steps 300")
#   BENCH_DEADLINE_S  wall budget for the whole run (default 560; --tiny 1500); each process gets
#                     what is left (train_step and planner_check at most 150 s each on the GPU)
#   BENCH_SUITE_ARGS  extra args for bench.suite only (e.g. "--gpu-mem-util 0.3")
#   BENCH_CHECKS_ARGS extra args for bench.gpu_checks only (e.g. "--checks lora_shared")
#   BENCH_GRPO_VARIANTS space-separated TAG:key=value,... steps the suite runs after the recipe's
#                     (default: nockpt, no recomputation at micro-batch 4; empty: none)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
TINY=0
for a in "$@"; do [ "$a" = "--tiny" ] && TINY=1; done

if [ -n "${OUT:-}" ]; then
  RESULTS="$OUT/$([ $TINY = 1 ] && echo tiny || echo gpu)"
elif [ $TINY = 1 ]; then
  RESULTS="${TMPDIR:-/tmp}/grpo-bench-tiny"
else
  RESULTS="$REPO/bench/results/local/$(date -u +%F)"
fi
mkdir -p "$RESULTS/logs"
LOG="$RESULTS/run_all.log"
: > "$LOG"
say() { echo "[run_all $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [ -z "${PYTHON:-}" ]; then
  if [ $TINY = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

# The vLLM bundle (GPU machines have no vLLM of their own).
VLLM_SITE=${VLLM_SITE:-/tmp/site}
if [ $TINY = 0 ] && [ ! -d "$VLLM_SITE/vllm" ] && [ -d /tmp/parts ]; then
  say "installing the vLLM bundle from /tmp/parts into $VLLM_SITE"
  PYTHON=$PYTHON bash bench/install_vllm_bundle.sh "$VLLM_SITE" >> "$LOG" 2>&1 || say "bundle install FAILED (see log)"
fi
case " ${BENCH_ONLY:-} " in *" trl "*)
  if [ $TINY = 0 ]; then
    say "installing the TRL carry into $VLLM_SITE"
    PYTHON=$PYTHON bash bench/install_trl.sh "$VLLM_SITE" >> "$LOG" 2>&1 || say "TRL install FAILED (see log)"
  fi ;;
esac
[ -n "${TRL_SITE:-}" ] && export PYTHONPATH="$TRL_SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$VLLM_SITE/vllm" ]; then
  export PYTHONPATH="$REPO:$VLLM_SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

export BENCH_OUT="$RESULTS"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# as the recipe's cluster env (jobs/cluster_profiles/h100x2.yaml); set it empty to turn off
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF-expandable_segments:True}
[ -z "${BENCH_GIT_SHA:-}" ] && BENCH_GIT_SHA=$(git rev-parse --short HEAD 2>/dev/null || echo unknown) && export BENCH_GIT_SHA

if [ $TINY = 1 ]; then DEADLINE=${BENCH_DEADLINE_S:-1500}; CAP=600; else DEADLINE=${BENCH_DEADLINE_S:-560}; CAP=150; fi
# fullft starts a vLLM engine and moves ~13 GiB of offloaded state per pass: its own cap; the
# learning checks stop at their target (bench/learning.py --stop-at) within 300 s
if [ $TINY = 1 ]; then FULLFT_CAP=600; LEARN_CAP=600; LEARN_TINY=(--steps 6 --no-verdict); else FULLFT_CAP=545; LEARN_CAP=300; LEARN_TINY=(); fi
# TRL: weights saved for its vLLM (~29 GiB), engine start, then steps of ~4-5 min each (estimated): its own cap
if [ $TINY = 1 ]; then TRL_CAP=1500; else TRL_CAP=560; fi
ONLY=${BENCH_ONLY:-"train_step train_step_nockpt planner_check suite gpu_checks"}
# The recipe's recomputation choice and the one the shared base leaves room for.
NOCKPT="model.gradient_checkpointing=false"
START=$(date +%s)
say "results -> $RESULTS; python $PYTHON; deadline ${DEADLINE}s; only: $ONLY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1

FAILED=""
run() {  # run NAME CAP_S MODULE ARGS...
  local name=$1 cap=$2 module=$3; shift 3
  case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  local limit=$(( left < cap ? left : cap ))
  if [ "$limit" -le 20 ]; then say "SKIP $name: no time left (${left}s)"; FAILED="$FAILED $name(skipped)"; return 0; fi
  say "START $name (limit ${limit}s): $PYTHON -m $module $*"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=20 "$limit" "$PYTHON" -m "$module" "$@" > "$RESULTS/logs/$name.log" 2>&1
  local rc=$?
  grep -h '^\[bench\]' "$RESULTS/logs/$name.log" >> "$LOG"
  say "END $name rc=$rc in $(( $(date +%s) - t0 ))s"
  if [ $rc -ne 0 ]; then FAILED="$FAILED $name(rc=$rc)"; tail -n 25 "$RESULTS/logs/$name.log" | sed 's/^/    /' >> "$LOG"; fi
}

run train_step "$CAP" bench.train_step "$@"
run train_step_nockpt "$CAP" bench.train_step --tag _nockpt --micro 4 --set "$NOCKPT" "$@"
run planner_check "$CAP" bench.planner_check "$@"
# (row micro-batches: the recipe's token budget would override the 4 rows; no layer count without recomputation)
VARIANTS=${BENCH_GRPO_VARIANTS-"nockpt:$NOCKPT,model.recompute_layers=0,trainer.micro_batch_tokens=0,trainer.micro_batch_size=4"}
VARIANT_ARGS=()
for v in $VARIANTS; do VARIANT_ARGS+=(--grpo-variant "$v"); done
# shellcheck disable=SC2086
run suite 100000 bench.suite "${VARIANT_ARGS[@]}" "$@" ${BENCH_SUITE_ARGS:-}
# shellcheck disable=SC2086
run gpu_checks 100000 bench.gpu_checks "$@" ${BENCH_CHECKS_ARGS:-}
# shellcheck disable=SC2086
run fullft "$FULLFT_CAP" bench.fullft "$@" ${BENCH_FULLFT_ARGS:-}
# shellcheck disable=SC2086
run learning "$LEARN_CAP" bench.learning --mode lora "${LEARN_TINY[@]}" "$@" ${BENCH_LEARNING_ARGS:-}
# shellcheck disable=SC2086
run learning_full "$LEARN_CAP" bench.learning --mode full "${LEARN_TINY[@]}" "$@" ${BENCH_LEARNING_ARGS:-}
# shellcheck disable=SC2086
run trl "$TRL_CAP" bench.trl_grpo "$@" ${BENCH_TRL_ARGS:-}

"$PYTHON" -m bench.summary "$RESULTS" >> "$LOG" 2>&1 || say "summary failed"
say "done in $(( $(date +%s) - START ))s; failed:${FAILED:- none}"
[ -z "$FAILED" ]
