"""One process, one vLLM engine: rollout, LoRA sync, GRPO step, full sync.

    python -m bench.suite [--tiny] [--only rollout,sync_lora,grpo_step,sync_full] [options]

A 14B engine takes 77-105 s to start, so the benchmarks that need one share
it: the trainer is built once by grpo_core.train.build_trainer (engine +
LoRA Policy, the recipe's settings, dummy weights) and each benchmark
(bench/rollout.py, bench/sync.py, bench/grpo_step.py) runs on it in turn.
One failing benchmark writes its error records and the next one still runs.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common, grpo_step, meters, rollout, sync

ORDER = ("rollout", "sync_lora", "grpo_step", "sync_full")  # sync_full frees the LoRA policy: last


def parse(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(ORDER), help=f"comma list of {', '.join(ORDER)}")
    p.add_argument("--gpu-mem-util", type=float, default=None,
                   help="vLLM gpu_memory_utilization (default: the GiB the recipe gives vLLM on an 80 GiB GPU, "
                        "0.7 x 80 = 56: 0.4 of an H200)")
    p.add_argument("--recipe-vllm-fraction", type=float, default=None,
                   help="a recipe gpu_memory_utilization (of an 80 GiB GPU) to give vLLM instead of the profile's, "
                        "translated to this GPU like the profile's (an older recipe's engine as the same-run baseline)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (faster start, slower decode)")
    rollout.add_args(p)
    sync.add_args(p)
    grpo_step.add_args(p)
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in ORDER]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; known: {', '.join(ORDER)}")
    return args


@dataclass
class Context:
    tr: object  # grpo_core.train.Trainer
    cfg: object
    args: object
    out: Path
    model_path: Path
    data: str
    sampler: object
    startup_s: dict = field(default_factory=dict)

    def engine_info(self) -> dict:
        eng, r = self.tr.engine, self.cfg.rollout
        info = {"gpu_memory_utilization": r.gpu_memory_utilization, "max_num_seqs": r.max_num_seqs,
                "enforce_eager": bool(r.enforce_eager or eng.on_cpu), "enable_prefix_caching": r.enable_prefix_caching,
                "lora_rank": eng.lora_rank, "sleep_level": r.sleep_level, "load_format": self.cfg.model.load_format}
        try:
            cc = eng.llm.llm_engine.vllm_config.cache_config
            blocks = cc.num_gpu_blocks or getattr(cc, "num_cpu_blocks", None)
            info["kv_cache_tokens"] = int(blocks * cc.block_size) if blocks else None
            info["max_model_len"] = eng.llm.llm_engine.vllm_config.model_config.max_model_len
        except Exception:  # noqa: BLE001 - informative only
            pass
        return info

    def drop_policy(self) -> None:
        """Free the trainer side (LoRA policy + optimizer); the engine stays."""
        tr = self.tr
        tr.policy = tr.optimizer = tr.scheduler = None
        meters.free_memory()


def build_context(args) -> Context:
    from grpo_core.train import build_trainer, resume_or_start

    data = common.data_path(args.data)
    if not data:
        print("[bench] no GSM8K file (--data): prompts come from the synthetic task (short prompts)", flush=True)
    shape = "tiny" if args.tiny else "14b"
    t0 = time.perf_counter()
    path = common.shape_dir(args, shape, data)
    util = args.gpu_mem_util if args.gpu_mem_util is not None else common.recipe_vllm_fraction(
        args.recipe_vllm_fraction or common.recipe(args.profile, []).rollout.gpu_memory_utilization)
    hi = args.len_max if args.len_max is not None else (20 if args.tiny else 400)
    rollout_len = (args.rollout_prompt_tokens or (16 if args.tiny else 256)) + (args.rollout_max_tokens or (16 if args.tiny else 256))
    ov = common.bench_overrides(model_path=path, tiny=args.tiny, data=data, run_dir=Path(tempfile.mkdtemp(prefix="bench-run-")))
    ov += [f"rollout.max_tokens={hi}", f"rollout.gpu_memory_utilization={util}"]
    if args.enforce_eager:
        ov += ["rollout.enforce_eager=true"]
    if args.tiny:  # a smoke run: a small step
        ov += ["trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2", "trainer.micro_batch_size=4", "rollout.n=3"]
    cfg = common.recipe(args.profile, ov + args.set)
    # the engine's max_model_len = max_prompt_tokens + max(max_tokens, val_max_tokens): room for the rollout benchmark
    val = max(hi, rollout_len - cfg.data.max_prompt_tokens, cfg.rollout.max_tokens)
    cfg = common.recipe(args.profile, ov + [f"rollout.val_max_tokens={val}"] + args.set)
    shape_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = build_trainer(cfg)
    build_s = time.perf_counter() - t0
    sampler = meters.DeviceMemSampler()
    t0 = time.perf_counter()
    resume_or_start(tr)  # seeds, and for LoRA the first adapter sync (as a run starts)
    start_s = time.perf_counter() - t0
    print(f"[bench] trainer built in {build_s:.1f}s (engine + policy), first sync {start_s:.2f}s", flush=True)
    return Context(tr, cfg, args, common.out_dir(args), path, data, sampler,
                   {"shape_dir_s": shape_s, "build_trainer_s": build_s, "resume_or_start_s": start_s})


def main(argv=None) -> int:
    args = parse(argv)
    common.setup_env(args.tiny)
    from grpo_core import distributed

    out = common.out_dir(args)
    runners = {"rollout": rollout.run, "sync_lora": sync.run_lora, "grpo_step": grpo_step.run, "sync_full": sync.run_full}
    metrics_of = {"rollout": rollout.METRICS, "sync_lora": sync.LORA_METRICS, "grpo_step": grpo_step.METRICS,
                  "sync_full": sync.FULL_METRICS}
    try:
        ctx = build_context(args)
    except Exception as exc:  # noqa: BLE001 - without an engine nothing runs: say so in every record
        for name in args.only:
            for metric, unit in metrics_of[name]:
                common.record_error(metric, unit, out, exc, stage="build_trainer")
        distributed.shutdown()
        return 1
    failures = 0
    for name in ORDER:
        if name not in args.only:
            continue
        t0 = time.perf_counter()
        print(f"[bench] ---- {name}", flush=True)
        try:
            runners[name](ctx)
        except Exception as exc:  # noqa: BLE001 - record and go on
            failures += 1
            for metric, unit in metrics_of[name]:
                if metric not in common.WRITTEN:
                    common.record_error(metric, unit, out, exc, stage=name)
        print(f"[bench] ---- {name} took {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        ctx.tr.engine.close()
    except Exception:  # noqa: BLE001
        pass
    if ctx.sampler is not None:
        ctx.sampler.stop()
    distributed.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
