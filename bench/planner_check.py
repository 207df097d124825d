"""The memory planner (grpo_core.memory) against measured peaks of the real
trainer (Policy + batched_logprobs + train_step + sync), stage by stage.

    python -m bench.planner_check [--tiny] [--configs lora14b_mb4,lora14b_mb8,full1.5b_mb8]

No vLLM in this process, so the comparison is of the trainer's share: the
planner's GPU parts minus vLLM, the CUDA context, NCCL and allocator
fragmentation (what the planner's compute parts were fitted to) against
torch.cuda.max_memory_allocated. The device-level figure (NVML: what
nvidia-smi shows) is set against the planner's parts minus vLLM alone.
Batches are full-length rows of max_prompt_tokens + rollout.max_tokens,
every other one right-padded by 37 tokens (a padding mask, as real batches
have), the planner's worst case.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from bench import common, meters

TRAINER_EXCLUDE = ("CUDA context", "NCCL", "vLLM", "allocator fragmentation")
# name -> (shape, shape when --tiny, LoRA?, micro-batch)
CONFIGS = {
    "lora14b_mb4": ("14b", "tiny", True, 4),
    "lora14b_mb8": ("14b", "tiny", True, 8),
    "full1.5b_mb8": ("1.5b", "tiny-tied", False, 8),
}
# planner stages -> the measured stage they predict
STAGE_OF = {"reference logprobs": "reference", "update": "update", "update (end of backward)": "update",
            "optimizer step": "update", "sync": "sync"}


def parse(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per measured update (grads accumulate)")
    p.add_argument("--tolerance", type=float, default=0.15)
    return p.parse_args(argv)


def make_batch(rows: int, seq: int, prompt: int, vocab: int, seed: int):
    import torch

    from grpo_core.batch import pack

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(rows):
        length = seq - (37 if i % 2 and seq > 80 else 0)
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompts.append(ids[:prompt])
        responses.append(ids[prompt:])
    return pack(prompts, responses, torch.randn(rows, generator=g), pad_id=0)


def predicted(cfg, name: str, total_gib: float) -> dict[str, dict[str, float]]:
    from grpo_core import advice, modelshape

    shape = modelshape.shape_for(cfg.model.path)
    plan = advice.plan(shape, cfg, 1, total_gib, name=name)
    out = {}
    for st in plan.stages:
        gpu = [p for p in st.parts if p.where == "gpu"]
        out[st.name] = {
            "trainer_gib": sum(p.gib for p in gpu if not p.name.startswith(TRAINER_EXCLUDE)),
            "device_gib": sum(p.gib for p in gpu if not p.name.startswith("vLLM")),
            "parts": {p.name: round(p.gib, 3) for p in gpu if not p.name.startswith("vLLM")},
        }
    return out


class Holder:
    """One Policy (+ AdamW) reused by configs that differ only in micro-batch."""

    def __init__(self) -> None:
        self.key = None
        self.policy = self.optimizer = self.scheduler = None

    def get(self, key, cfg, info):
        import torch

        from grpo_core.policy import Policy

        if key != self.key:
            self.drop()
            self.policy = Policy(cfg.model.path, cfg.model, cfg.trainer, info)
            o = cfg.optim
            self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                               eps=o.eps, weight_decay=o.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
            self.key = key
        return self.policy, self.optimizer, self.scheduler

    def drop(self) -> None:
        self.policy = self.optimizer = self.scheduler = None
        self.key = None
        meters.free_memory()


def measure(cfg, info, holder: Holder, key, sampler, micro_batches: int, seed: int) -> dict:
    from grpo_core.train import batched_logprobs, train_step
    from grpo_core.weightsync import WeightSync

    policy, optimizer, scheduler = holder.get(key, cfg, info)
    micro = cfg.trainer.micro_batch_size
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
    vocab = common.SHAPES[key[0]]["vocab_size"]
    # Warm-up (not measured): kernels, and AdamW's state, which then lives in every stage as the planner assumes.
    warm = make_batch(micro, min(seq, 64), min(seq, 64) // 2, vocab, seed + 1)
    train_step(policy, optimizer, scheduler, warm, cfg)
    meters.free_memory()
    state = {"allocated_gib": meters.current_gib("allocated"), "reserved_gib": meters.current_gib("reserved"),
             "device_gib": sampler.now()}
    batch = make_batch(micro * micro_batches, seq, cfg.data.max_prompt_tokens, vocab, seed)
    meter = meters.StageMemory(sampler)
    meter.begin("reference")
    batch.ref_logprobs = batched_logprobs(policy, batch, micro, cfg.rollout.temperature, reference=True)
    meter.begin("update")
    train_step(policy, optimizer, scheduler, batch, cfg)
    meter.begin("sync")
    sync = WeightSync(policy, Path(tempfile.mkdtemp(prefix="bench-adapter-")))
    if policy.is_lora:
        sync.save_adapter(sync.adapter_dir)
    else:  # what WeightSync.push feeds vLLM, one gathered tensor at a time
        for _name, tensor in sync.full_weights(sync.dtype):
            del tensor
    meter.end()
    shutil.rmtree(sync.adapter_dir, ignore_errors=True)
    return {"state": state, "stages": meter.stats, "seq": seq, "rows": len(batch)}


def main(argv=None) -> int:
    args = parse(argv)
    common.setup_env(args.tiny)
    out = common.out_dir(args)
    from grpo_core import distributed

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    info = None
    holder = Holder()
    sampler = None
    failures = 0
    for name in names:
        shape_big, shape_tiny, lora, micro = CONFIGS[name]
        shape = shape_tiny if args.tiny else shape_big
        metric = f"planner_{name}"
        try:
            path = common.shape_dir(args, shape)
            ov = common.bench_overrides(model_path=path, tiny=args.tiny, data="", run_dir=Path(tempfile.mkdtemp(prefix="bench-planner-")))
            # A trainer alone (no engine to share a base with) holds its own base.
            ov += [*common.ROW_MICRO_BATCHES, f"trainer.micro_batch_size={micro}", "model.share_base_weights=false"] + ([] if lora else ["model.lora_rank=0"])
            if args.tiny:
                ov += ["data.max_prompt_tokens=32", "rollout.max_tokens=32"]
            cfg = common.recipe(args.profile, ov + args.set)
            if info is None:
                info = distributed.init_distributed(cfg.trainer.device)
                sampler = meters.DeviceMemSampler()
            total = common.gpu_total_gib()
            pred = predicted(cfg, name, total)
            meas = measure(cfg, info, holder, (shape, cfg.model.lora_rank), sampler, args.micro_batches, args.seed)
            stages, worst_pred, worst_meas = {}, 0.0, 0.0
            for pname, mname in STAGE_OF.items():
                m = meas["stages"][mname]
                p = pred[pname]
                stages[pname] = {"measured_as": mname, "predicted_trainer_gib": p["trainer_gib"],
                                 "measured_allocated_gib": m["peak_allocated_gib"],
                                 "measured_reserved_gib": m["peak_reserved_gib"],
                                 "predicted_device_gib": p["device_gib"], "measured_device_gib": m["peak_device_gib"],
                                 "parts": p["parts"]}
                worst_pred = max(worst_pred, p["trainer_gib"])
            for m in meas["stages"].values():
                worst_meas = max(worst_meas, m["peak_allocated_gib"])
            for mname in ("reference", "update", "sync"):  # the planner's prediction for the measured stage: its worst part
                group = [p for p, s in STAGE_OF.items() if s == mname]
                pv = max(pred[p]["trainer_gib"] for p in group)
                mv = meas["stages"][mname]["peak_allocated_gib"]
                stages[f"measured:{mname}"] = {"predicted_trainer_gib": pv, "measured_allocated_gib": mv,
                                               "rel_error": (pv - mv) / mv if mv else None}
            dev_pred = max(pred[p]["device_gib"] for p in STAGE_OF)
            dev_meas = max(m["peak_device_gib"] for m in meas["stages"].values())
            rel = (worst_pred - worst_meas) / worst_meas if worst_meas else None
            common.record(
                metric, worst_pred, "GiB", "measured trainer peak (torch max_memory_allocated, no vLLM)",
                worst_meas, out, higher_is_better=False, rel_error=rel,
                within_tolerance=None if rel is None else abs(rel) <= args.tolerance, tolerance=args.tolerance,
                device_level={"predicted_gib": dev_pred, "measured_gib": dev_meas, "source": sampler.source,
                              "rel_error": (dev_pred - dev_meas) / dev_meas if dev_meas else None,
                              "note": "planner parts minus vLLM (incl. CUDA context, fragmentation) vs device memory in use"},
                config={"shape": shape, "lora_rank": cfg.model.lora_rank, "micro_batch_size": micro,
                        "micro_batches": args.micro_batches, "seq": meas["seq"], "rows": meas["rows"],
                        "gradient_checkpointing": cfg.model.gradient_checkpointing, "dtype": cfg.model.dtype,
                        "kl_coef": cfg.algorithm.kl_coef, "entropy_coef": cfg.algorithm.entropy_coef,
                        "attn": cfg.model.attn_implementation, "profile": args.profile, "overrides": args.set},
                state_after_warmup=meas["state"], stages=stages,
            )
        except Exception as exc:  # noqa: BLE001 - one config failing must not hide the others
            failures += 1
            common.record_error(metric, "GiB", out, exc)
            holder.drop()
    holder.drop()
    if sampler is not None:
        sampler.stop()
    distributed.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
