"""The h800x4 recipe (full fine-tuning) on one GPU at Qwen2.5-14B's widths, depth reduced.

    python -m bench.fullft [--tiny] [--layers 6] [--prompts 32] [--minis 2] [--micro 16] [--data test.jsonl]

One process: the real trainer (grpo_core.train.build_trainer + grpo_step,
the h800x4 profile's train: part with dummy weights) with full fine-tuning,
fp32 master weights, bf16 compute, FSDP2 parameter and optimizer offload
(CPUOffloadPolicy), the KL reference copy, and its vLLM engine colocated
(sleep level 2 in the update, the full weights synced every step). Then:

1. step 1, a checkpoint (grpo_core.train.save), step 2: seconds per stage
   (grpo_step's own metrics), device and host peaks per stage (a listener
   on grpo_step's stage hook + NVML / RSS samplers), tokens/s/GPU, sync seconds, and
   the planner's prediction beside each peak;
2. the 48-layer, 4-GPU prediction from those figures and the planner
   (records fullft_48l_4gpu_predicted_* and fullft_48l_4gpu_prediction.md);
3. the checkpoint restored (grpo_core.train.resume_or_start, the trainer's
   own resume path) and step 2 run again: its loss against the
   uninterrupted step 2's (rollout seeds are per step: the same tokens).

Dummy weights never emit EOS: each prompt's response length is drawn as in
bench/grpo_step.py (common.ShapedLengths: normal(250, 70) clipped to [150,
400], ignore_eos), seeded by the prompt's rollout seed, so the replayed step
draws the same lengths.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

from bench import common, meters
from bench.fullft_predict import predict_48l, stage_prediction
from grpo_core.stages import STAGES

# Depth: the host (128 GiB on the H200 machine) holds all the offloaded state, so the
# layer count is set by the planner's host model (grpo_core.memory, one rank):
# fp32 master + KL reference copy + AdamW m, v (16 B/param, resident) + fp32 grads (4 B/param,
# in the update) + the process (6 GiB), and while a checkpoint is saved or loaded, the full
# fp32 weights + both Adam states gathered on the host (12 B/param). With the untied 152064-row
# embedding and head (1.56B params) and 0.2755B per layer:
#   layers    params   host, update   host, checkpoint   checkpoint on disk
#      6      3.21B      65.8 GiB         89.7 GiB            35.9 GiB
#      7      3.48B      70.9 GiB         96.9 GiB            38.9 GiB
#      8      3.76B      76.0 GiB        104.0 GiB            42.0 GiB
# 6 keeps even the checkpoint under ~95 GiB (room for vLLM's and CUDA's own host memory) and
# its 36 GiB file within the machine's 64 GiB disk.
DEFAULT_LAYERS = 6


def parse(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(profile="h800x4")
    p.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {DEFAULT_LAYERS}; tiny 2)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 32; tiny 4)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default: the recipe's 5; tiny 3)")
    p.add_argument("--minis", type=int, default=2, help="mini-batches per step (2: the second's loss depends on "
                                                        "the restored optimizer state)")
    p.add_argument("--micro", type=int, default=None, help="update micro-batch rows (default: the recipe's 16; tiny 4)")
    p.add_argument("--gpu-mem-util", type=float, default=None,
                   help="vLLM gpu_memory_utilization (default: the GiB the recipe gives vLLM on an 80 GiB GPU)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs (faster start)")
    p.add_argument("--no-resume", action="store_true", help="skip the checkpoint save/restore and the replayed step")
    p.add_argument("--run-dir", default="", help="where the checkpoint goes (default: a temp dir, removed at the end)")
    p.add_argument("--len-mean", type=float, default=None, help="response length mean (default 250; tiny 12)")
    p.add_argument("--len-sd", type=float, default=None, help="default 70; tiny 4")
    p.add_argument("--len-min", type=int, default=None, help="default 150; tiny 6")
    p.add_argument("--len-max", type=int, default=None, help="default 400; tiny 20 (also rollout.max_tokens)")
    p.add_argument("--loss-tol", type=float, default=1e-5, help="relative tolerance for the resumed step's loss")
    return p.parse_args(argv)


def build_config(args, data: str, run_dir: Path):
    path = common.shape_dir(args, "tiny" if args.tiny else "14b", data, layers=args.layers)
    prof = common.recipe(args.profile, [f"model.path={path}"])
    util = args.gpu_mem_util if args.gpu_mem_util is not None else common.recipe_vllm_fraction(
        prof.rollout.gpu_memory_utilization)
    ov = common.bench_overrides(model_path=path, tiny=args.tiny, data=data, run_dir=run_dir)
    ov += ["trainer.param_offload=true", "trainer.optimizer_offload=true",  # the recipe's: bench_overrides turns them off
           f"rollout.max_tokens={args.len_max}", f"rollout.val_max_tokens={args.len_max}",
           f"rollout.gpu_memory_utilization={util:.4f}", f"trainer.prompts_per_step={args.prompts}",
           f"trainer.mini_batch_prompts={args.prompts // args.minis}", "checkpoint.keep=1",
           # Dummy weights never score: rewards, advantages and policy_loss are 0, and without an
           # entropy term (h800x4 has none) nothing would move the weights (the KL term's gradient is
           # 0 at the reference). h100x2's 0.001 makes the update, the sync and the resume non-trivial.
           "algorithm.entropy_coef=0.001"]
    if args.n is not None:
        ov.append(f"rollout.n={args.n}")
    if args.micro is not None:
        ov.append(f"trainer.micro_batch_size={args.micro}")
    if args.enforce_eager:
        ov.append("rollout.enforce_eager=true")
    return common.recipe(args.profile, ov + args.set), common.gpu_total_gib()


def planner(cfg, total_gib: float, gpus: int = 1, gpus_per_node: int = 0, host_mem_gib: float = 0.0):
    from grpo_core import advice, memory, modelshape

    return advice.plan(modelshape.shape_for(cfg.model.path), cfg, gpus, total_gib,
                       memory.Knobs(gpus_per_node=gpus_per_node, host_mem_gib=host_mem_gib), name="fullft")


def rel(pred: float, meas: float) -> float | None:
    return (pred - meas) / meas if meas else None


def fingerprint(tr) -> dict:
    """Sums over this rank's trainable shards and AdamW states (fp64): equal after a correct restore."""
    import torch
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    out = {"params": 0.0, "params_abs": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "steps": 0.0}
    with torch.no_grad():
        for p in tr.policy.trainable_parameters():
            out["params"] += float(local(p).sum(dtype=torch.float64))
            out["params_abs"] += float(torch.linalg.vector_norm(local(p), 1, dtype=torch.float64))
            st = tr.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[key] += float(local(st[key]).sum(dtype=torch.float64))
            if "step" in st:
                out["steps"] += float(st["step"])
    return out


def objective(m: dict, cfg) -> float:
    """The step's loss as optimised: policy loss + KL term - entropy bonus (means over mini-batches)."""
    a = cfg.algorithm
    return m["policy_loss"] + a.kl_coef * m.get("kl", 0.0) - a.entropy_coef * m.get("entropy", 0.0)


def run_step(tr, meter, step: int) -> dict:
    import grpo_core.train as T

    tr.state.step = step
    meter.stats.clear()
    metrics = T.grpo_step(tr, on_stage=meter)
    return {"metrics": metrics, "stages": {k: dict(v) for k, v in meter.stats.items()},
            "max_tokens": list(tr.engine.limits), "prompt_lens": [len(p) for p in tr.engine.last[0]]}


def main(argv=None) -> int:
    args = parse(argv)
    common.setup_env(args.tiny)
    t_start = time.perf_counter()
    defaults = dict(layers=(2, DEFAULT_LAYERS), prompts=(4, 32), len_mean=(12.0, 250.0), len_sd=(4.0, 70.0),
                    len_min=(6, 150), len_max=(20, 400))
    for key, (tiny, gpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else gpu)
    if args.tiny:
        args.n = args.n or 3
        args.micro = args.micro or 4
    if args.prompts % args.minis:
        raise SystemExit(f"--minis {args.minis} must divide --prompts {args.prompts}")
    out = common.out_dir(args)
    data = common.data_path(args.data)
    if not data:
        print("[bench] no GSM8K file (--data / BENCH_DATA): prompts come from the synthetic task", flush=True)
    own_run_dir = not args.run_dir
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-fullft-"))
    try:
        return _run(args, out, data, run_dir, t_start)
    finally:
        if own_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _run(args, out: Path, data: str, run_dir: Path, t_start: float) -> int:
    import grpo_core.train as T
    from grpo_core import distributed

    cfg, total = build_config(args, data, run_dir)
    plan = planner(cfg, total)
    print(f"[bench] fullft: {cfg.model.path} ({plan.params / 1e9:.2f}B params), planner peak {plan.peak_gib:.1f} GiB "
          f"at {plan.peak_stage.name}, host {plan.host_peak_gib:.1f} GiB (+{plan.checkpoint_host_gib:.1f} checkpoint)",
          flush=True)
    device_s, host_s = meters.DeviceMemSampler(), meters.DeviceMemSampler(host=True)
    meter = meters.StageMemory(device_s, host_s)
    meter.begin("build")
    t0 = time.perf_counter()
    tr = T.build_trainer(cfg)
    T.resume_or_start(tr)  # a fresh run dir: seeds only (full FT syncs from a checkpoint, not at start)
    meter.end()
    build = dict(meter.stats["build"], seconds=time.perf_counter() - t0)
    engine = tr.engine
    tr.engine = common.ShapedLengths(engine, args.len_mean, args.len_sd, args.len_min, args.len_max, args.seed)
    steps, failures = {}, 0
    try:
        steps[1] = run_step(tr, meter, 1)
        ckpt = {}
        if not args.no_resume:
            meter.stats.clear()
            ckpt["fingerprint_saved"] = fingerprint(tr)
            meter.begin("checkpoint_save")
            seconds = T.save(tr, types.SimpleNamespace(run_id=None))  # save() reads only the tracker's run id
            meter.end()
            ckpt["save"] = dict(meter.stats["checkpoint_save"], seconds=seconds)
        steps[2] = run_step(tr, meter, 2)
        if not args.no_resume:
            steps[2]["fingerprint"] = fingerprint(tr)
        setting = _setting(args, cfg, data, tr, steps, build, ckpt)
        setting["device_memory_source"] = device_s.source
        _records(args, out, cfg, plan, steps[2], setting, ckpt)
        if not args.no_resume:
            meter.stats.clear()
            meter.begin("checkpoint_load")
            t0 = time.perf_counter()
            latest = T.resume_or_start(tr)  # the trainer's own resume: state, optimizer, scheduler, sampler, RNG, sync
            seconds = time.perf_counter() - t0
            meter.end()
            ckpt["load"] = dict(meter.stats["checkpoint_load"], seconds=seconds, checkpoint=str(latest),
                                step_after_load=tr.state.step)
            ckpt["fingerprint_before_load"] = steps[2]["fingerprint"]
            ckpt["fingerprint_loaded"] = fingerprint(tr)
            replay = run_step(tr, meter, tr.state.step + 1)
            failures += _resume_record(args, out, cfg, steps[2], replay, ckpt, plan)
    finally:
        tr.engine = engine
        device_s.stop()
        host_s.stop()
        try:
            engine.close()
        except Exception:  # noqa: BLE001
            pass
        distributed.shutdown()
    print(f"[bench] fullft done in {time.perf_counter() - t_start:.1f}s "
          f"(host high-water mark {meters.host_hwm_gib():.1f} GiB)", flush=True)
    return 1 if failures else 0


def _setting(args, cfg, data, tr, steps, build, ckpt) -> dict:
    import numpy as np

    lengths = [x for s in steps.values() for x in s["max_tokens"]]
    plens = [x for s in steps.values() for x in s["prompt_lens"]]
    return {
        "profile": args.profile, "overrides": args.set, "layers": args.layers, "model": cfg.model.path,
        "prompts_per_step": cfg.trainer.prompts_per_step, "n": cfg.rollout.n,
        "mini_batch_prompts": cfg.trainer.mini_batch_prompts, "micro_batch_size": cfg.trainer.micro_batch_size,
        "logprob_micro_batch_size": cfg.trainer.logprob_micro, "lora_rank": cfg.model.lora_rank,
        "dtype": cfg.model.dtype, "param_offload": cfg.trainer.param_offload,
        "optimizer_offload": cfg.trainer.optimizer_offload, "kl_coef": cfg.algorithm.kl_coef,
        "sleep_level": cfg.rollout.sleep_level, "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
        "enforce_eager": cfg.rollout.enforce_eager, "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "response_length": {"dist": tr.engine.describe(),
                            "mean": float(np.mean(lengths)), "max": int(max(lengths))},
        "prompt_length": {"mean": float(np.mean(plens)), "max": int(max(plens))},
        "data": common.data_label(data), "build": build, "checkpoint": ckpt,
        "steps": {k: {"metrics": v["metrics"], "stages": v["stages"]} for k, v in steps.items()},
        "measured": "step 2 (step 1 is the first: allocations, autotuning)",
        "host_hwm_gib": meters.host_hwm_gib(),
    }


def _records(args, out, cfg, plan, step, setting, ckpt) -> None:
    m, st = step["metrics"], step["stages"]
    world = 1
    times = {s: m[f"time_{s}"] for s in STAGES}
    times["idle"] = m["time_step"] - sum(times.values())
    common.record("fullft_step_tokens_per_s_per_gpu", m["tokens_per_s"] / world, "tokens/s",
                  f"none: {args.layers} of 48 layers (see fullft_48l_4gpu_predicted_tokens_per_s_per_gpu)", None, out,
                  times_s=times, setting=setting)
    common.record("fullft_time_step_s", m["time_step"], "s", "none", None, out, higher_is_better=False, times_s=times)
    for name, secs in times.items():
        common.record(f"fullft_time_{name}_s", secs, "s", "whole step (ratio = share of the step)", m["time_step"], out,
                      higher_is_better=False)
    common.record("fullft_sync_s", m["time_sync"], "s", "target (issue 15): <= 2 s", 2.0, out, higher_is_better=False,
                  target={"op": "<=", "value": 2.0}, params=plan.params)
    dev_peak, host_peak, stages = 0.0, 0.0, {}
    for name in STAGES:
        s = st.get(name, {})
        pd, ph = stage_prediction(plan, name)
        md, mh = s.get("peak_device_gib", 0.0), s.get("peak_host_gib", 0.0)
        dev_peak, host_peak = max(dev_peak, md), max(host_peak, mh)
        stages[name] = {"predicted_device_gib": pd, "measured_device_gib": md, "rel_error_device": rel(pd, md),
                        "predicted_host_gib": ph, "measured_host_gib": mh, "rel_error_host": rel(ph, mh),
                        "torch_peak_allocated_gib": s.get("peak_allocated_gib"),
                        "torch_peak_reserved_gib": s.get("peak_reserved_gib")}
        common.record(f"fullft_peak_gib_{name}", md, "GiB", "planner (grpo_core.memory) for this stage", pd, out,
                      higher_is_better=False, rel_error=rel(pd, md), source=setting["device_memory_source"],
                      detail=stages[name])
        common.record(f"fullft_host_peak_gib_{name}", mh, "GiB", "planner's host memory for this stage", ph, out,
                      higher_is_better=False, rel_error=rel(ph, mh), detail=stages[name])
    common.record("fullft_peak_gib", dev_peak, "GiB", "planner's peak (grpo_core.memory)", plan.peak_gib, out,
                  higher_is_better=False, rel_error=rel(plan.peak_gib, dev_peak), per_stage=stages,
                  plan=plan.to_dict())
    common.record("fullft_planner_error", rel(plan.peak_gib, dev_peak), "fraction",
                  "target (issue 15): |error| <= 0.10", 0.10, out, higher_is_better=False,
                  predicted_gib=plan.peak_gib, measured_gib=dev_peak, predicted_stage=plan.peak_stage.name,
                  target={"op": "abs<=", "value": 0.10}, per_stage=stages)
    common.record("fullft_host_peak_gib", host_peak, "GiB", "planner's host peak per rank (steps, no checkpoint)",
                  plan.host_peak_gib, out, higher_is_better=False, rel_error=rel(plan.host_peak_gib, host_peak),
                  per_stage=stages, host_hwm_gib=meters.host_hwm_gib())
    common.record("fullft_host_planner_error", rel(plan.host_peak_gib, host_peak), "fraction",
                  "target (issue 15): |error| <= 0.10", 0.10, out, higher_is_better=False,
                  predicted_gib=plan.host_peak_gib, measured_gib=host_peak, target={"op": "abs<=", "value": 0.10})
    if "save" in ckpt:
        sync_host = stage_prediction(plan, "sync")[1]
        pred = sync_host + plan.checkpoint_host_gib
        common.record("fullft_host_peak_gib_checkpoint_save", ckpt["save"]["peak_host_gib"], "GiB",
                      "planner: sync-stage host + the gathered checkpoint", pred, out, higher_is_better=False,
                      rel_error=rel(pred, ckpt["save"]["peak_host_gib"]), seconds=ckpt["save"]["seconds"],
                      checkpoint_gib=plan.checkpoint_host_gib)
        common.record("fullft_checkpoint_save_s", ckpt["save"]["seconds"], "s", "none", None, out,
                      higher_is_better=False, checkpoint_gib=plan.checkpoint_host_gib)
    predict_48l(args, out, cfg, plan, step, stages)


def _resume_record(args, out, cfg, original, replay, ckpt, plan) -> int:
    a, b = original["metrics"], replay["metrics"]
    keys = ("policy_loss", "kl", "entropy", "grad_norm", "reward_mean", "clip_fraction", "response_length_mean")
    diffs = {k: abs(a[k] - b[k]) for k in keys if k in a and k in b}
    loss_a, loss_b = objective(a, cfg), objective(b, cfg)
    diff = abs(loss_a - loss_b)
    tol = args.loss_tol * max(1.0, abs(loss_a))
    equal = diff <= tol and diffs["policy_loss"] <= tol
    restored = ckpt["fingerprint_loaded"] == ckpt["fingerprint_saved"]
    moved = ckpt["fingerprint_before_load"]["params"] != ckpt["fingerprint_saved"]["params"]
    common.record("fullft_resume_loss_equal", 1.0 if equal else 0.0, "bool",
                  "1 = the resumed step 2's loss equals the uninterrupted step 2's", 1.0, out,
                  abs_diff=diff, exact=diff == 0.0, tolerance=f"{args.loss_tol:g} x max(1, |loss|)",
                  loss="policy_loss + kl_coef x kl - entropy_coef x entropy (means over the mini-batches)",
                  loss_uninterrupted=loss_a, loss_resumed=loss_b, policy_loss_uninterrupted=a["policy_loss"],
                  policy_loss_resumed=b["policy_loss"], abs_diffs=diffs,
                  state_restored_exactly=restored, weights_moved_in_step_2=moved,
                  same_response_lengths=original["max_tokens"] == replay["max_tokens"], minis=args.minis,
                  note=("dummy weights never score, so advantages and policy_loss are 0; the KL and entropy terms "
                        "depend on the restored weights, and with 2 mini-batches the second's on the restored "
                        "AdamW state too. fingerprints: fp64 sums of the trainable shards and AdamW states"),
                  fingerprints={k: v for k, v in ckpt.items() if k.startswith("fingerprint")},
                  checkpoint={k: v for k, v in ckpt.items() if not k.startswith("fingerprint")},
                  metrics_uninterrupted=a, metrics_resumed=b)
    if "load" in ckpt:
        sync_host = stage_prediction(plan, "sync")[1]
        pred = sync_host + plan.checkpoint_host_gib
        common.record("fullft_host_peak_gib_checkpoint_load", ckpt["load"]["peak_host_gib"], "GiB",
                      "planner: sync-stage host + the loaded checkpoint", pred, out, higher_is_better=False,
                      rel_error=rel(pred, ckpt["load"]["peak_host_gib"]), seconds=ckpt["load"]["seconds"])
        common.record("fullft_checkpoint_load_s", ckpt["load"]["seconds"], "s", "none", None, out,
                      higher_is_better=False)
    return 0 if equal and restored and moved else 1


if __name__ == "__main__":
    sys.exit(main())
