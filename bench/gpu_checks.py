"""Two checks the suite's LoRA engine cannot make:

1. the sync check (engine log-probs == trainer log-probs after a real GRPO
   update) for LoRA and full weights in bf16, on a 1.5B-shaped model whose
   random weights are saved to disk, so trainer and engine start identical;
2. the full 14B weight sync into an engine without LoRA (the full fine-tune
   path), vs vLLM's own load_weights of bf16 tensors already on the GPU.

    python -m bench.gpu_checks [--tiny] [--data train.jsonl] [--out DIR]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

CHECKS = ("lora", "lora_shared", "full", "sync_full_14b")
TOLERANCE_BF16 = 0.15  # nats per token; bf16 kernels of vLLM and HF differ by rounding


def saved_model(shape: str, root: Path, data: str) -> Path:
    """Shape dir plus random weights written with save_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = common.make_shape_dir(root / f"{shape}-weights", shape, common.corpus_from(data))
    if not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
        model.save_pretrained(path)
    return path


def sync_check_overrides(mode: str, model: Path, data: str, tiny: bool, run_dir: Path) -> list[str]:
    """grpo_core.synccheck's overrides for one check (also bench/world2_check.sh's)."""
    overrides = [
        f"model.path={model}", f"model.dtype={'float32' if tiny else 'bfloat16'}",
        *(["data.task=gsm8k", f"data.train_path={data}", f"data.test_path={data}"] if data else ["data.task=synthetic"]),
        f"trainer.run_dir={run_dir}", "tracking.enabled=false",
        "rollout.n=2", "rollout.max_tokens=16", "rollout.val_max_tokens=16", "rollout.enforce_eager=true",
        "rollout.gpu_memory_utilization=0.3", "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=4",
        "trainer.micro_batch_size=8", "algorithm.kl_coef=0.0", "data.max_prompt_tokens=256",
        # Random weights never score: the entropy term is what moves them.
        "algorithm.entropy_coef=0.05",
    ]
    overrides += ["model.lora_rank=32", "model.lora_alpha=32", "optim.lr=0.002"] if mode != "full" else ["optim.lr=0.0002"]
    if mode == "lora_shared":  # the trainer's base is the engine's own weights; the KV cache sleeps in the update
        overrides += ["model.share_base_weights=true", "rollout.sleep_level=1"]
    return overrides


def sync_check(mode: str, model: Path, data: str, tiny: bool, run_dir: Path) -> dict:
    overrides = sync_check_overrides(mode, model, data, tiny, run_dir)
    proc = subprocess.run([sys.executable, "-m", "grpo_core.synccheck", "--steps", "1", *overrides],
                          capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_sync_timing(shape_path: Path, tiny: bool, repeats: int = 3) -> dict:
    import torch

    from grpo_core import config, distributed
    from grpo_core.policy import Policy
    from grpo_core.rollout import RolloutEngine
    from grpo_core.weightsync import WeightSync

    cfg = config.load(None, [f"model.path={shape_path}", "model.load_format=dummy",
                             f"model.dtype={'float32' if tiny else 'bfloat16'}", "algorithm.kl_coef=0.0",
                             "rollout.gpu_memory_utilization=0.25", "rollout.enforce_eager=true"])
    info = distributed.init_distributed("auto")
    engine = RolloutEngine(str(shape_path), cfg.rollout, dtype=cfg.model.dtype, seed=0, max_model_len=2048,
                           on_cpu=info.device.type == "cpu", load_format="dummy")
    policy = Policy(str(shape_path), cfg.model, cfg.trainer, info, needs_reference=False)
    weights = WeightSync(policy, Path(tempfile.mkdtemp()))
    sync = lambda: weights.push(engine)  # noqa: E731
    sync()  # warm-up: first gathers allocate
    ours = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        sync()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ours.append(time.perf_counter() - start)
    dtype = torch.float32 if tiny else torch.bfloat16
    ready = [(n, t.clone()) for n, t in weights.full_weights(dtype)]
    base = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.load_full_weights(iter(ready))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        base.append(time.perf_counter() - start)
    engine.close()
    return {"ours_s": min(ours), "ours_all": ours, "baseline_s": min(base), "baseline_all": base,
            "tensors": len(ready), "gib": sum(t.numel() * t.element_size() for _, t in ready) / 2**30}


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma list of {', '.join(CHECKS)} (tiny: lora, full and sync_full_14b only)")
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"unknown check {unknown[0]!r}; known: {', '.join(CHECKS)}")
    common.setup_env(args.tiny)
    out = common.out_dir(args)
    data = common.data_path(args.data)
    root = Path(args.shape_cache)
    failed = 0
    modes = [m for m in ("lora", "lora_shared", "full") if m in checks and not (args.tiny and m == "lora_shared")]
    small = saved_model("tiny" if args.tiny else "1.5b", root, data) if modes else None
    for mode in modes:
        try:
            r = sync_check(mode, small, data, args.tiny, Path(tempfile.mkdtemp(prefix=f"sync-{mode}-")))
            tol = 2e-4 if args.tiny else TOLERANCE_BF16
            common.record(f"synccheck_{mode}_bf16_max_abs_diff", r["max_abs_diff"], "nats",
                          "change of the engine's log-probs through the update (a sync that did nothing: diff ~ change)",
                          r["max_change_since_start"], out, higher_is_better=False, tolerance=tol,
                          passed=r["max_abs_diff"] <= tol < r["max_change_since_start"], detail=r)
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            failed += 1
            common.record_error(f"synccheck_{mode}_bf16_max_abs_diff", "nats", out, exc)
    if "sync_full_14b" in checks:
        try:
            t = full_sync_timing(common.shape_dir(args, "tiny" if args.tiny else "14b", data), args.tiny)
            common.record("sync_full_14b_s", t["ours_s"], "s",
                          "vLLM model.load_weights of bf16 tensors already on the GPU", t["baseline_s"], out,
                          higher_is_better=False, target={"op": "<=", "value": 2.0}, detail=t)
        except Exception as exc:  # noqa: BLE001
            failed += 1
            common.record_error("sync_full_14b_s", "s", out, exc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
