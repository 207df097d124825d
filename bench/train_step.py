"""The trainer's LoRA update (grpo_core.train.train_step on a Policy) against
plain HF + peft on the same micro-batches: tokens/s, MFU (FLOPs per token as
bench/meters.py:update_flops counts them), peak GiB.

    python -m bench.train_step [--tiny] [--micro 8] [--seq 768] [--micro-batches 4]

No vLLM. Ours: the recipe's Policy (LoRA, gradient checkpointing, FSDP2 on
one rank) and its GRPO loss (clipped ratio + KL + entropy as configured).
Baseline: AutoModelForCausalLM.from_config + get_peft_model + gradient
checkpointing, forward with labels (prompt masked), backward, grad clip,
AdamW step: the issue's "HF + peft LoRA r32 forward+backward" figure.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

from bench import common, meters


def parse(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--micro", type=int, default=None, help="sequences per micro-batch (default 8; tiny 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 768; tiny 48)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt part of each sequence (default seq/3)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches in the timed optimizer step")
    p.add_argument("--warmup-micro-batches", type=int, default=1)
    p.add_argument("--skip-baseline", action="store_true")
    return p.parse_args(argv)


def make_batch(rows: int, seq: int, prompt: int, vocab: int, seed: int):
    """Full-length rows (no padding), response mask on the response part,
    random advantages, a flat reference (KL active as in the recipe)."""
    import torch

    from grpo_core.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    resp = torch.zeros(rows, seq - 1)
    resp[:, prompt - 1 :] = 1.0
    adv = torch.randn(rows, generator=g)
    ref = torch.full((rows, seq - 1), -math.log(vocab))
    return RolloutBatch(ids, mask, resp, adv, ref_logprobs=ref)


def run_ours(cfg, info, batch, warm, n: int):
    import torch

    from grpo_core.policy import Policy
    from grpo_core.train import train_step

    policy = Policy(cfg.model.path, cfg.model, cfg.trainer, info)
    o = cfg.optim
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    train_step(policy, optimizer, scheduler, warm, cfg)  # warm-up: kernels, allocator, AdamW state
    meters.reset_peak()
    with meters.Timer() as t:
        stats = train_step(policy, optimizer, scheduler, batch, cfg)
    out = {"seconds": t.s, "peak_allocated_gib": meters.peak_gib("allocated"), "peak_reserved_gib": meters.peak_gib("reserved"),
           "model_training_mode": bool(policy.model.training),
           "gradient_checkpointing_active": bool(getattr(policy.model, "is_gradient_checkpointing", False)
                                                 and policy.model.training),
           "trainable_params": sum(p.numel() for p in policy.trainable_parameters()),
           "loss_stats": {k: float(v) for k, v in stats.items()}}
    del policy, optimizer, scheduler
    meters.free_memory()
    return out


def run_hf_peft(cfg, device, batch, warm):
    """Plain HF + peft, same micro-batches, same LoRA and checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo_core.policy import DTYPES, _lora_targets

    m = cfg.model
    with torch.device(device):  # random init on the device, as model.load_format=dummy
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(m.path), dtype=DTYPES[m.dtype],
                                                 attn_implementation=m.attn_implementation)
    model.config.use_cache = False
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=0.0, bias="none",
                                             target_modules=_lora_targets(m.lora_target_modules)))
    if m.gradient_checkpointing:
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    micro = cfg.trainer.micro_batch_size

    def step(b):
        optimizer.zero_grad(set_to_none=True)
        chunks = range(0, len(b), micro)
        for start in chunks:
            mb = b.select(range(start, min(start + micro, len(b)))).to(device)
            labels = mb.input_ids.clone()
            labels[:, 1:][mb.response_mask == 0] = -100  # the loss on response tokens only
            labels[:, 0] = -100
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels, use_cache=False)
            (out.loss / len(chunks)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()

    step(warm)
    meters.reset_peak()
    with meters.Timer() as t:
        step(batch)
    out = {"seconds": t.s, "peak_allocated_gib": meters.peak_gib("allocated"), "peak_reserved_gib": meters.peak_gib("reserved"),
           "gradient_checkpointing_active": bool(model.is_gradient_checkpointing and model.training)}
    del model, optimizer, params
    meters.free_memory()
    return out


def main(argv=None) -> int:
    args = parse(argv)
    common.setup_env(args.tiny)
    out = common.out_dir(args)
    micro = args.micro or (4 if args.tiny else 8)
    seq = args.seq or (48 if args.tiny else 768)
    prompt = args.prompt_tokens or seq // 3
    from grpo_core import distributed

    shape = "tiny" if args.tiny else "14b"
    path = common.shape_dir(args, shape)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    cfg = common.recipe(args.profile, common.bench_overrides(model_path=path, tiny=args.tiny, data="", run_dir=run_dir)
                        + [*common.ROW_MICRO_BATCHES, f"trainer.micro_batch_size={micro}"] + args.set)
    if cfg.model.lora_rank <= 0:
        print("[bench] note: the recipe is a full fine-tune; the HF + peft baseline is LoRA only", flush=True)
    info = distributed.init_distributed(cfg.trainer.device)
    vocab = common.SHAPES[shape]["vocab_size"]
    batch = make_batch(micro * args.micro_batches, seq, prompt, vocab, args.seed)
    warm = make_batch(micro * args.warmup_micro_batches, seq, prompt, vocab, args.seed + 1)
    tokens = int(batch.attention_mask.sum())
    n = common.n_params(path)
    setting = {"shape": shape, "micro_batch_size": micro, "seq_tokens": seq, "prompt_tokens": prompt,
               "micro_batches": args.micro_batches, "tokens_per_step": tokens, "n_params": n,
               "lora_rank": cfg.model.lora_rank, "lora_alpha": cfg.model.lora_alpha, "dtype": cfg.model.dtype,
               "gradient_checkpointing": cfg.model.gradient_checkpointing, "kl_coef": cfg.algorithm.kl_coef,
               "entropy_coef": cfg.algorithm.entropy_coef, "profile": args.profile, "overrides": args.set}
    failed = False
    try:
        ours = run_ours(cfg, info, batch, warm, n)
    except Exception as exc:  # noqa: BLE001 - record, then go on with the baseline
        for metric, unit in (("train_step_tokens_per_s", "tokens/s"), ("train_step_mfu", "fraction"),
                             ("train_step_peak_gib", "GiB")):
            common.record_error(metric, unit, out, exc, setting=setting)
        ours, failed = None, True
    base = None
    if not args.skip_baseline and cfg.model.lora_rank > 0:
        try:
            base = run_hf_peft(cfg, info.device, batch, warm)
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            base = {"error": f"{type(exc).__name__}: {exc}"}
    if ours is not None:
        ok = base is not None and "seconds" in base
        tps, btps = tokens / ours["seconds"], (tokens / base["seconds"] if ok else None)
        lora = cfg.model.lora_rank > 0
        flops, how = meters.update_flops(n, ours["trainable_params"], lora=lora, recomputed=common.recomputed_params(cfg))
        # HF's gradient_checkpointing_enable recomputes every layer (model.recompute_layers is ours)
        base_flops, _ = meters.update_flops(n, ours["trainable_params"], lora=lora,
                                            recomputed=common.recomputed_params(cfg, every_layer=True))
        extra = dict(setting=setting, ours=ours, baseline_detail=base)
        label = "HF + peft LoRA, same micro-batches" if ok else "HF + peft (not measured)"
        common.record("train_step_tokens_per_s", tps, "tokens/s", label, btps, out, **extra)
        common.record("train_step_mfu", meters.mfu(tps, flops), "fraction", label,
                      meters.mfu(btps, base_flops) if ok else None, out, target={"op": ">=", "value": 0.45},
                      flops_per_token=flops, baseline_flops_per_token=base_flops, flops_counted=how,
                      mfu_formula=f"tokens/s x flops_per_token / {meters.H200_BF16_PEAK_FLOPS:g} (H200 bf16 dense)",
                      **extra)
        common.record("train_step_peak_gib", ours["peak_allocated_gib"], "GiB", label + " (torch max_memory_allocated)",
                      base["peak_allocated_gib"] if ok else None, out, higher_is_better=False,
                      peak_reserved_gib=ours["peak_reserved_gib"],
                      baseline_peak_reserved_gib=base["peak_reserved_gib"] if ok else None, **extra)
    distributed.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
