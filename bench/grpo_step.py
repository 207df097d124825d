"""Whole GRPO steps of the recipe (jobs/cluster_profiles/h100x2.yaml's train part)
on one GPU: seconds per stage, tokens/s/GPU over the step, peak GiB per stage,
and the memory planner's prediction for the same colocated step.

    python -m bench.suite --only grpo_step [--tiny] --data ../shared/data/gsm8k/train.jsonl [--grpo-steps 1]

grpo_core.train.grpo_step runs unchanged on the trainer from build_trainer
(dummy weights). Dummy weights never emit EOS, so the trainer's engine is
wrapped (common.ShapedLengths): each prompt's response length is drawn to
look like GSM8K (normal mean 250, sd 70, clipped to [150, 400]) and
generated with ignore_eos. Seconds per stage are the trainer's own metrics;
memory peaks per stage (torch allocated/reserved, the device's through
NVML) come from a listener on grpo_step's stage hook (meters.StageMemory).
The update's padding fraction (the trainer's metric) and its MFU (FLOPs as
meters.update_flops counts them). A short warm-up step (few prompts, 16
tokens) runs first. The recipe's offload flags are off: on one H200 nothing
needs to leave the GPU (--set to change).
"""
from __future__ import annotations

import copy

from bench import common, meters
from grpo_core.stages import STAGES

METRICS = ([("grpo_step_tokens_per_s_per_gpu", "tokens/s"), ("grpo_step_time_step_s", "s")]
           + [(f"grpo_step_time_{s}_s", "s") for s in (*STAGES, "idle")]
           + [("grpo_step_peak_gib", "GiB")] + [(f"grpo_step_peak_gib_{s}", "GiB") for s in STAGES]
           + [("grpo_step_update_padding_fraction", "fraction"), ("grpo_step_lora_update_mfu", "fraction"),
              ("planner_grpo_step_colocated", "GiB")])
TARGET_TPS = 4000  # the targets
TARGET_MFU = 0.55
BOUND_MFU = 0.6  # the bound: update and reference passes at this MFU
PLANNER_STAGE = {"rollout": "rollout", "reference logprobs": "reference", "update": "update",
                 "update (end of backward)": "update", "optimizer step": "update", "sync": "sync"}


def add_args(p) -> None:
    g = p.add_argument_group("grpo_step")
    g.add_argument("--grpo-steps", type=int, default=1, help="measured steps")
    g.add_argument("--grpo-warmup-prompts", type=int, default=None, help="prompts in the warm-up step (default 2; 0: none)")
    g.add_argument("--len-mean", type=float, default=None, help="response length mean (default 250; tiny 12)")
    g.add_argument("--len-sd", type=float, default=None, help="default 70; tiny 4")
    g.add_argument("--len-min", type=int, default=None, help="default 150; tiny 6")
    g.add_argument("--len-max", type=int, default=None, help="default 400; tiny 20 (also rollout.max_tokens)")
    g.add_argument("--mem-target", type=float, default=80.0, help="GiB the step should fit in (the issue: 80)")
    g.add_argument("--grpo-variant", action="append", default=[], metavar="TAG:KEY=VALUE[,KEY=VALUE]",
                   help="after the recipe's steps, the same trainer with these overrides (model.compile, model.gradient_checkpointing, "
                        "model.recompute_layers, trainer.*, algorithm.*), recorded with _TAG appended to every metric (repeatable)")


def run(ctx) -> None:
    measure(ctx)
    for variant in ctx.args.grpo_variant:
        tag, _, overrides = variant.partition(":")
        saved = (ctx.cfg, ctx.tr.cfg, common.METRIC_SUFFIX)
        try:
            ctx.cfg = ctx.tr.cfg = _apply(ctx.cfg, [o for o in overrides.split(",") if o])
            _configure_policy(ctx.tr.policy, ctx.cfg)
            common.METRIC_SUFFIX = f"{saved[2]}_{tag}"
            print(f"[bench] ---- grpo_step variant {tag}: {overrides}", flush=True)
            measure(ctx)
        finally:
            ctx.cfg, ctx.tr.cfg, common.METRIC_SUFFIX = saved
            _configure_policy(ctx.tr.policy, ctx.cfg)


def _apply(cfg, overrides):
    from grpo_core import config

    data = config.apply_overrides(config.TrainConfig, config.to_dict(cfg), overrides)
    return config.validate(config.build(config.TrainConfig, data))


def _configure_policy(policy, cfg) -> None:
    """The live policy recomputes and compiles as `cfg` says (a variant's model.gradient_checkpointing /
    recompute_layers / compile)."""
    from grpo_core import modelshape
    from grpo_core.policy import set_compiled, set_recompute

    set_recompute(policy.model, cfg.model.recomputed(modelshape.shape_for(cfg.model.path).layers))
    set_compiled(policy.model, cfg.model.compile)


def measure(ctx) -> None:
    import numpy as np

    import grpo_core.train as T
    from grpo_core.data import PromptSampler

    args, tr, cfg = ctx.args, ctx.tr, ctx.cfg
    if tr.policy is None:
        raise RuntimeError("the trainer's policy was freed (sync_full runs after grpo_step)")
    mean = args.len_mean if args.len_mean is not None else (12.0 if args.tiny else 250.0)
    sd = args.len_sd if args.len_sd is not None else (4.0 if args.tiny else 70.0)
    lo = args.len_min if args.len_min is not None else (6 if args.tiny else 150)
    hi = args.len_max if args.len_max is not None else (20 if args.tiny else 400)
    warm_prompts = args.grpo_warmup_prompts if args.grpo_warmup_prompts is not None else (1 if args.tiny else 2)
    eng = tr.engine
    shaped = common.ShapedLengths(eng, mean, sd, lo, hi, args.seed)
    meter = meters.StageMemory(ctx.sampler)
    steps = []
    tr.engine = shaped
    try:
        if warm_prompts > 0:  # a short step first: kernels, allocator, AdamW state
            real_sampler, tr.sampler = tr.sampler, PromptSampler(len(tr.prompts.train), warm_prompts, cfg.trainer.seed + 1)
            shaped.cap = 16
            tr.state.step += 1
            T.grpo_step(tr)
            tr.sampler, shaped.cap = real_sampler, None
        for _ in range(args.grpo_steps):
            meter.stats.clear()  # the allocator's cache stays, as between a run's steps
            ctx.sampler.reset()
            tr.state.step += 1
            metrics = T.grpo_step(tr, on_stage=meter)
            stage_peak = max([v["peak_device_gib"] for v in meter.stats.values()] + [ctx.sampler.peak()])
            rows = [len(p) + len(x.token_ids) for p, group in zip(*shaped.last) for x in group]  # the update's rows
            # what the passes compute: with trainer.share_prompts each prompt once per group
            groups = [len(p) + sum(len(x.token_ids) for x in group) for p, group in zip(*shaped.last)]
            steps.append({"metrics": metrics, "stages": copy.deepcopy(meter.stats), "step_device_peak_gib": stage_peak,
                          "max_tokens": list(shaped.limits), "prompt_lens": [len(p) for p in shaped.last[0]],
                          "padding_to_longest": 1.0 - sum(rows) / (len(rows) * max(rows)),
                          "update_tokens": sum(rows) * cfg.trainer.ppo_epochs,
                          "computed_tokens": (sum(groups) if cfg.trainer.share_prompts else sum(rows)) * cfg.trainer.ppo_epochs})
    finally:
        tr.engine = eng

    avg = lambda key: float(np.mean([s["metrics"][key] for s in steps]))  # noqa: E731
    times = {k: avg(f"time_{k}") for k in STAGES}
    step_s = avg("time_step")
    times["idle"] = step_s - sum(times.values())
    tps = avg("tokens_per_s")
    tokens = float(np.mean([s["metrics"]["tokens_per_s"] * s["metrics"]["time_step"] for s in steps]))
    peaks = {st: {k: max(s["stages"].get(st, {}).get(k, 0.0) for s in steps)
                  for k in ("peak_device_gib", "peak_allocated_gib", "peak_reserved_gib")} for st in STAGES}
    step_peak = max(s["step_device_peak_gib"] for s in steps)
    lengths = [x for s in steps for x in s["max_tokens"]]
    plens = [x for s in steps for x in s["prompt_lens"]]
    setting = {
        "profile": args.profile, "overrides": args.set, "prompts_per_step": cfg.trainer.prompts_per_step,
        "n": cfg.rollout.n, "sequences_per_step": cfg.trainer.prompts_per_step * cfg.rollout.n,
        "micro_batch_size": cfg.trainer.micro_batch_size, "mini_batch_prompts": cfg.trainer.mini_batch_prompts,
        "logprob_micro_batch_size": cfg.trainer.logprob_micro, "micro_batch_tokens": cfg.trainer.micro_batch_tokens,
        "logprob_micro_batch_tokens": cfg.trainer.logprob_micro_batch_tokens,
        "pack_sequences": cfg.trainer.pack_sequences, "share_prompts": cfg.trainer.share_prompts,
        "attn_implementation": cfg.model.attn_implementation,
        "compile": cfg.model.compile,
        "lora_rank": cfg.model.lora_rank, "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "recompute_layers": cfg.model.recompute_layers,
        "kl_coef": cfg.algorithm.kl_coef, "entropy_coef": cfg.algorithm.entropy_coef,
        "param_offload": cfg.trainer.param_offload, "optimizer_offload": cfg.trainer.optimizer_offload,
        "response_length": {"dist": shaped.describe(), "mean": float(np.mean(lengths)),
                            "min": int(min(lengths)), "max": int(max(lengths))},
        "prompt_length": {"mean": float(np.mean(plens)), "max": int(max(plens))},
        "tokens_per_step": tokens, "measured_steps": len(steps), "warmup_prompts": warm_prompts,
        "data": common.data_label(ctx.data), "engine": ctx.engine_info(),
        "metrics": [{k: v for k, v in s["metrics"].items()} for s in steps],
    }
    out = ctx.out
    flops = _update_flops(ctx)
    update_tokens = float(np.mean([s["update_tokens"] for s in steps]))
    computed_tokens = float(np.mean([s["computed_tokens"] for s in steps]))
    bound = _bound(ctx.cfg, flops, update_tokens, tokens, times)
    if computed_tokens != update_tokens:  # shared prompts: the same bound over the tokens the passes compute
        bound["computed_tokens"] = _bound(ctx.cfg, flops, computed_tokens, tokens, times)
    common.record("grpo_step_tokens_per_s_per_gpu", tps, "tokens/s", f"target (issue): {TARGET_TPS:,} tokens/s/GPU",
                  float(TARGET_TPS), out, target={"op": ">=", "value": TARGET_TPS}, bound=bound,
                  ratio_to_bound=tps / bound["tokens_per_s"], times_s=times, setting=setting)
    common.record("grpo_step_time_step_s", step_s, "s", f"step time at the {TARGET_TPS:,} tokens/s/GPU target",
                  tokens / TARGET_TPS, out, higher_is_better=False, bound_step_s=bound["step_s"], times_s=times,
                  setting=setting)
    for name, secs in times.items():
        common.record(f"grpo_step_time_{name}_s", secs, "s", "whole step (ratio = share of the step)", step_s, out,
                      higher_is_better=False, peaks=peaks.get(name),
                      note="the trainer's own stage seconds (grpo_core.stages; idle: what no stage covers)")
    common.record("grpo_step_peak_gib", step_peak, "GiB", f"{args.mem_target:g} GiB (target: fits an 80 GiB GPU)",
                  args.mem_target, out, higher_is_better=False, source=ctx.sampler.source, per_stage=peaks,
                  setting=setting)
    for name in STAGES:
        common.record(f"grpo_step_peak_gib_{name}", peaks[name]["peak_device_gib"], "GiB",
                      f"{args.mem_target:g} GiB (target)", args.mem_target, out, higher_is_better=False,
                      source=ctx.sampler.source, torch_peaks=peaks[name])
    _update_records(ctx, steps, avg("time_update"), update_tokens, computed_tokens, flops, setting)
    _planner(ctx, cfg, peaks, step_peak, max(plens), max(lengths))


def _update_flops(ctx) -> dict:
    """FLOPs per token of the update: the model's (MFU; recomputation is not useful work) and the hardware's
    (HFU: + the recomputed forwards), as meters.update_flops counts them."""
    cfg, policy = ctx.cfg, ctx.tr.policy
    n, n_lora = common.n_params(cfg.model.path), sum(p.numel() for p in policy.trainable_parameters())
    model, model_how = meters.update_flops(n, n_lora, lora=policy.is_lora, recomputed=0)
    hardware, hardware_how = meters.update_flops(n, n_lora, lora=policy.is_lora,
                                                 recomputed=common.recomputed_params(cfg))
    return {"n": n, "model": model, "model_how": model_how, "hardware": hardware, "hardware_how": hardware_how}


def _update_records(ctx, steps, time_update: float, update_tokens: float, computed_tokens: float, flops: dict,
                    setting: dict) -> None:
    """The update stage: its padding fraction and its MFU (over the tokens it computes: with shared
    prompts each prompt once per group, not once per row)."""
    import numpy as np

    cfg = ctx.cfg
    padding = [s["metrics"]["update_padding_fraction"] for s in steps]
    common.record("grpo_step_update_padding_fraction", float(np.mean(padding)), "fraction",
                  "every row padded to the step's longest", float(np.mean([s["padding_to_longest"] for s in steps])),
                  ctx.out, higher_is_better=False, per_step=padding,
                  how="the trainer's update_padding_fraction: padding slots / all token slots of the update's "
                      "micro-batches", pack_sequences=cfg.trainer.pack_sequences,
                  micro_batch_tokens=cfg.trainer.micro_batch_tokens)
    tps = computed_tokens / time_update
    common.record("grpo_step_lora_update_mfu", meters.mfu(tps, flops["model"]), "fraction",
                  f"target (issue): MFU {TARGET_MFU:g}", TARGET_MFU, ctx.out, target={"op": ">=", "value": TARGET_MFU},
                  flops_per_token=flops["model"], flops_counted=flops["model_how"],
                  hardware_flops_utilization=meters.mfu(tps, flops["hardware"]),
                  hardware_flops_per_token=flops["hardware"], hardware_flops_counted=flops["hardware_how"],
                  peak_flops=meters.H200_BF16_PEAK_FLOPS, update_tokens_per_s=tps, update_tokens=update_tokens,
                  time_update_s=time_update, computed_tokens=computed_tokens,
                  note="computed (unpadded) tokens x ppo_epochs over the update stage's seconds (padding slots not "
                       "counted; with share_prompts a prompt counts once per group, as it is computed)",
                  setting=setting)


def _bound(cfg, flops: dict, update_tokens: float, step_tokens: float, times: dict) -> dict:
    """The issue's bound for this step on this GPU: the rollout and sync as measured (the rollout runs at raw
    vLLM speed: rollout_ratio_vs_raw_vllm), the update at its model FLOPs/token (4N + 6 N_lora) and the
    reference pass at 2N, both at BOUND_MFU of the GPU's bf16 peak."""
    rate = BOUND_MFU * meters.H200_BF16_PEAK_FLOPS
    ref_tokens = update_tokens / cfg.trainer.ppo_epochs
    secs = {"rollout": times["rollout"], "sync": times["sync"], "update": update_tokens * flops["model"] / rate,
            "reference": ref_tokens * 2 * flops["n"] / rate if cfg.algorithm.kl_coef else 0.0}
    return {"tokens_per_s": step_tokens / sum(secs.values()), "step_s": sum(secs.values()), "stage_s": secs,
            "how": f"measured rollout + sync; update (4N + 6 N_lora)/token and reference 2N/token at {BOUND_MFU:g} "
                   f"MFU of {meters.H200_BF16_PEAK_FLOPS:.3g} FLOP/s"}


def _planner(ctx, cfg, peaks, step_peak, prompt_max, response_max) -> None:
    """grpo_core.memory's plan for this very config next to the measured device peaks."""
    from grpo_core import advice, memory, modelshape

    total = common.gpu_total_gib()
    shape = modelshape.shape_for(cfg.model.path)
    plan = advice.plan(shape, cfg, 1, total, name="grpo_step")
    observed = advice.with_setting(advice.with_setting(cfg, "data.max_prompt_tokens", prompt_max), "rollout.max_tokens", response_max)
    plan_obs = memory.build("grpo_step", shape, observed, 1, total, memory.Knobs())
    stages = {}
    for st, st_obs in zip(plan.stages, plan_obs.stages):
        m = peaks[PLANNER_STAGE[st.name]]
        stages[st.name] = {"predicted_gib": st.total("gpu"), "predicted_observed_lengths_gib": st_obs.total("gpu"),
                           "measured_device_gib": m["peak_device_gib"], "measured_reserved_gib": m["peak_reserved_gib"]}
    rel = (plan.peak_gib - step_peak) / step_peak if step_peak else None
    rel_obs = (plan_obs.peak_gib - step_peak) / step_peak if step_peak else None
    common.record("planner_grpo_step_colocated", plan.peak_gib, "GiB", "measured device peak of the whole step (NVML)",
                  step_peak, ctx.out, higher_is_better=False, rel_error=rel,
                  predicted_with_observed_lengths_gib=plan_obs.peak_gib, rel_error_observed_lengths=rel_obs,
                  note=("the planner sizes every micro-batch at max_prompt_tokens + rollout.max_tokens; the step's "
                        f"longest prompt was {prompt_max} and longest response {response_max} tokens"),
                  plan_fits=plan.fits, plan_problems=plan.problems, plan_suggestions=plan.suggestions, stages=stages)
