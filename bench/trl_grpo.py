"""The peer: TRL's GRPOTrainer on the work of bench/grpo_step.py, in its own
process of the same device run, recorded beside ours.

    python -m bench.trl_grpo [--tiny] [--data GSM8K.jsonl] [--steps 2]

Same work: the recipe's model shape (bench.common's 14B shape dir, dummy
random-init weights; --tiny: the tiny Qwen2), LoRA r32 all-linear through
peft's LoraConfig (the recipe's rank, alpha and targets), 116 prompts x 5
per step (one optimizer step per generation batch, as ours), the same GSM8K
prompts (chat-templated by TRL with the same tokenizer, prompts over
data.max_prompt_tokens dropped as ours does), the recipe's lr, KL weight
(TRL's beta: a reference pass with the adapter disabled), entropy weight,
temperature and top_p, gradient checkpointing on (TRL's default and its
docs' advice for large models), bf16, vLLM colocated
(use_vllm=True, vllm_mode="colocate"). TRL is not patched.

Lengths: ours draws GSM8K-like response lengths (normal(250, 70) clipped to
[150, 400]) and passes ignore_eos; TRL has one max_completion_length for
all rows, so it gets ours' maximum (400) with vLLM's ignore_eos through
generation_kwargs (dummy weights rarely emit EOS anyway). TRL's rows are
thus longer than ours on average: tokens/s counts the tokens TRL actually
processed (prompt + completion of each step's sequences, TRL's own
state.num_input_tokens_seen), and the record gives the generated lengths.
--completion-length 250 with --ignore-eos gives every row ours' mean.

TRL's colocated vLLM loads the model from `model.name_or_path` (it has no
load_format option), so the random-init model is saved once (bf16, ~29 GiB
for the 14B shape) to --weights-dir first, removed once the engine holds it; TRL then pushes the merged
LoRA weights into vLLM every step (its design), which is part of its step.

Whole steps are timed by a TrainerCallback (on_step_begin .. on_step_end,
CUDA synchronized); per step: tokens, torch.cuda.max_memory_allocated and
the device's peak (NVML, meters.DeviceMemSampler). The first step is a
warm-up; records are (re)written after every step, so a run cut short
still leaves its figures. Records: trl_grpo_step_tokens_per_s_per_gpu,
trl_grpo_step_peak_gib and, when ours (grpo_step_tokens_per_s_per_gpu.json)
is in --ours (default: the results dir), vs_trl_grpo_step_ratio = ours / TRL's.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench import common, meters

TARGET_RATIO = 3.0  # the issue: ours >= 3x TRL's tokens/s/GPU


def parse():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (the first is a warm-up when there are two or more)")
    p.add_argument("--micro", type=int, default=None,
                   help="TRL's per_device_train_batch_size (default 10; tiny 5); gradient accumulation makes up the 116 x 5")
    p.add_argument("--completion-length", type=int, default=None, help="max_completion_length (default 400, ours' max; tiny 20)")
    p.add_argument("--ignore-eos", action=argparse_bool(), default=True, help="force every row to max_completion_length")
    p.add_argument("--vllm", action=argparse_bool(), default=True,
                   help="vLLM colocated (default; --no-vllm: TRL's HF generate)")
    p.add_argument("--gpu-mem-util", type=float, default=None,
                   help="vllm_gpu_memory_utilization (default: ours', the GiB the recipe gives vLLM on an 80 GiB GPU)")
    p.add_argument("--sleep-mode", action=argparse_bool(), default=False, help="vllm_enable_sleep_mode")
    p.add_argument("--ours", default=os.environ.get("BENCH_OURS", ""),
                   help="results dir holding ours' grpo_step_tokens_per_s_per_gpu.json and grpo_step_peak_gib.json "
                        "(default: $BENCH_OURS, else the results dir): each device run has an empty $OUT")
    p.add_argument("--weights-dir", default=None, help="where the dummy weights are saved for vLLM (default: beside the shape dir); removed once loaded")
    return p.parse_args()


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def prompts_dataset(cfg, tokenizer, seed: int):
    """The task's train rows as TRL conversational prompts, ours' length filter applied."""
    from datasets import Dataset

    from grpo_core.tasks import make_task

    task = make_task(cfg.data, seed)
    rows = []
    for row in task.rows("train"):
        text = tokenizer.apply_chat_template(list(row.messages), tokenize=False, add_generation_prompt=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= cfg.data.max_prompt_tokens:
            rows.append({"prompt": list(row.messages), "ground_truth": row.ground_truth})
    return task, Dataset.from_list(rows)


class StepMeter:
    """TrainerCallback hooks: time, tokens and memory of each whole optimizer step."""

    def __init__(self, sampler, on_step) -> None:
        self.sampler, self.on_step = sampler, on_step
        self.steps: list[dict] = []
        self.lengths: list[int] = []  # completion lengths seen by the reward function in this step

    def on_step_begin(self, args, state, control, **kw):
        meters.reset_peak()
        self.sampler.reset()
        self.lengths = []
        self.tokens0 = state.num_input_tokens_seen
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        meters.sync()
        secs = time.perf_counter() - self.t0
        tokens = state.num_input_tokens_seen - self.tokens0
        lens = self.lengths or [0]
        self.steps.append({"step": state.global_step, "seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs,
                           "sequences": len(self.lengths), "completion_mean": sum(lens) / len(lens),
                           "completion_min": min(lens), "completion_max": max(lens),
                           "peak_allocated_gib": meters.peak_gib("allocated"),
                           "peak_reserved_gib": meters.peak_gib("reserved"), "peak_device_gib": self.sampler.peak()})
        print(f"[bench] trl step {state.global_step}: {secs:.1f} s, {tokens} tokens, {tokens / secs:.1f} tokens/s, "
              f"device peak {self.sampler.peak():.1f} GiB", flush=True)
        self.on_step(self.steps)


def write_records(out: Path, ours_dir: Path, steps: list[dict], setting: dict, source: str) -> None:
    measured = steps[1:] if len(steps) > 1 else steps
    tokens, secs = sum(s["tokens"] for s in measured), sum(s["seconds"] for s in measured)
    tps = tokens / secs
    peak = max(s["peak_device_gib"] for s in steps)
    ours = _ours(ours_dir, "grpo_step_tokens_per_s_per_gpu")
    ours_peak = _ours(ours_dir, "grpo_step_peak_gib")
    info = dict(steps=steps, measured_steps=[s["step"] for s in measured],
                warmup_included=len(steps) == 1, setting=setting)
    common.record("trl_grpo_step_tokens_per_s_per_gpu", tps, "tokens/s",
                  f"ours ({ours_dir}/grpo_step_tokens_per_s_per_gpu.json)" if ours else f"ours: none in {ours_dir}",
                  ours, out, how="TRL's state.num_input_tokens_seen (prompt + completion tokens of the step's "
                  "sequences) over whole steps (TrainerCallback on_step_begin..on_step_end)", **info)
    common.record("trl_grpo_step_peak_gib", peak, "GiB",
                  f"ours ({ours_dir}/grpo_step_peak_gib.json)" if ours_peak else f"ours: none in {ours_dir}",
                  ours_peak, out, higher_is_better=False, source=source,
                  peak_allocated_gib=max(s["peak_allocated_gib"] for s in steps),
                  peak_reserved_gib=max(s["peak_reserved_gib"] for s in steps), **info)
    if ours:
        common.record("vs_trl_grpo_step_ratio", ours / tps, "ratio", f"target (issue): >= {TARGET_RATIO:g}", TARGET_RATIO,
                      out, target={"op": ">=", "value": TARGET_RATIO}, ours_tokens_per_s=ours, trl_tokens_per_s=tps,
                      ours_record=f"{ours_dir}/grpo_step_tokens_per_s_per_gpu.json", ours_hardware=_ours(
                          ours_dir, "grpo_step_tokens_per_s_per_gpu", "hardware"),
                      trl_record="trl_grpo_step_tokens_per_s_per_gpu.json",
                      note="tokens/s on the tokens each actually processed; TRL's rows run to max_completion_length, "
                           "ours' are GSM8K-like (see both records' settings)")


def _ours(where: Path, metric: str, key: str = "value"):
    path = where / f"{metric}.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None


def main() -> None:
    args = parse()
    common.setup_env(args.tiny)
    out = common.out_dir(args)
    import torch
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, __version__ as trl_version
    from transformers import TrainerCallback

    data = common.data_path(args.data)
    model_dir = common.shape_dir(args, "tiny" if args.tiny else "14b", data)
    run_dir = Path(tempfile.mkdtemp(prefix="trl-grpo-"))
    cfg = common.recipe(args.profile, common.bench_overrides(model_path=model_dir, tiny=args.tiny, data=data,
                                                             run_dir=run_dir) + args.set)
    use_vllm = args.vllm
    gpu_mem_util = args.gpu_mem_util if args.gpu_mem_util is not None else round(
        common.recipe_vllm_fraction(cfg.rollout.gpu_memory_utilization), 4)
    length = args.completion_length or (20 if args.tiny else 400)
    micro = args.micro or (5 if args.tiny else 10)
    seqs = cfg.trainer.prompts_per_step * cfg.rollout.n
    if seqs % micro:
        raise SystemExit(f"error: --micro {micro} does not divide {seqs} sequences per step")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    device = "cpu" if args.tiny else "cuda"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    with torch.device(device):  # random init on the device: dummy weights, as ours
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    save_s = 0.0
    if use_vllm:  # TRL's colocated LLM(model=model.name_or_path) needs weights on disk
        # one fixed place, emptied first and removed once vLLM has loaded it: a 14B copy is ~29 GiB of a
        # 64 GiB device disk, and a run killed midway must not leave a second one behind the next
        wdir = Path(args.weights_dir or Path(args.shape_cache) / f"{model_dir.name}-trl-weights")
        shutil.rmtree(wdir, ignore_errors=True)
        t0 = time.perf_counter()
        model.save_pretrained(wdir, max_shard_size="5GB")
        tokenizer.save_pretrained(wdir)
        save_s = time.perf_counter() - t0
        model.name_or_path = model.config.name_or_path = str(wdir)  # the model copies it at init
    task, dataset = prompts_dataset(cfg, tokenizer, args.seed)

    def reward(completions, ground_truth, completion_ids, **kw):
        meter.lengths.extend(len(c) for c in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.score(t, g) for t, g in zip(texts, ground_truth)]

    m = cfg.model
    peft_config = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=0.0, bias="none",
                             task_type="CAUSAL_LM",
                             target_modules="all-linear" if m.lora_target_modules == "all-linear"
                             else [t.strip() for t in m.lora_target_modules.split(",")])
    gen_kwargs = ({"ignore_eos": True} if use_vllm else {"min_new_tokens": length}) if args.ignore_eos else None
    targs = GRPOConfig(
        output_dir=str(run_dir / "out"), max_steps=args.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=seqs // micro, num_generations=cfg.rollout.n, max_completion_length=length,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, beta=cfg.algorithm.kl_coef,
        entropy_coef=cfg.algorithm.entropy_coef, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        gradient_checkpointing=True, bf16=not args.tiny, use_cpu=args.tiny, use_vllm=use_vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=gpu_mem_util, vllm_max_model_length=cfg.data.max_prompt_tokens + length,
        vllm_enable_sleep_mode=args.sleep_mode, generation_kwargs=gen_kwargs, logging_steps=1, report_to="none",
        save_strategy="no", seed=args.seed, dataloader_num_workers=0, log_completions=False)
    setting = {
        "trl": trl_version, "profile": args.profile, "model": "tiny" if args.tiny else "14b (dummy weights)",
        "prompts_per_step": cfg.trainer.prompts_per_step, "num_generations": cfg.rollout.n, "sequences_per_step": seqs,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": seqs // micro,
        "max_completion_length": length, "generation_kwargs": gen_kwargs, "use_vllm": use_vllm,
        "vllm_mode": "colocate" if use_vllm else None, "vllm_gpu_memory_utilization": gpu_mem_util,
        "vllm_enable_sleep_mode": args.sleep_mode, "lora": {"r": m.lora_rank, "alpha": m.lora_alpha,
        "targets": m.lora_target_modules}, "beta": cfg.algorithm.kl_coef, "entropy_coef": cfg.algorithm.entropy_coef,
        "loss_type": targs.loss_type, "gradient_checkpointing": True, "bf16": not args.tiny, "lr": cfg.optim.lr,
        "data": common.data_label(data), "prompts_in_dataset": len(dataset), "weights_save_s": save_s,
    }
    sampler = meters.DeviceMemSampler()

    class Callback(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            meter.on_step_begin(*a, **kw)

        def on_step_end(self, *a, **kw):
            meter.on_step_end(*a, **kw)

    meter = StepMeter(sampler, lambda steps: write_records(out, Path(args.ours or out), steps, setting, sampler.source))
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Callback()])
    setting["trainer_init_s"] = time.perf_counter() - t0
    if use_vllm:  # TRL pushes the trainer's weights into vLLM from here on; the files are not read again
        shutil.rmtree(wdir, ignore_errors=True)
    print(f"[bench] trl {trl_version}: trainer built in {setting['trainer_init_s']:.1f} s "
          f"(weights saved in {save_s:.1f} s); vllm={use_vllm}", flush=True)
    trainer.train()
    sampler.stop()
    if not meter.steps:
        raise SystemExit("error: TRL ran no step")


if __name__ == "__main__":
    main()
