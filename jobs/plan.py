"""Will a run fit? Per-GPU memory of each part at each stage of a GRPO step.

    python -m jobs.plan --profile h100x2 [train.trainer.micro_batch_size=4 ...] [--gpu-mem-gib 80] [--json]
    python -m jobs.plan --config train.yaml --gpus 2 [trainer.micro_batch_size=4 ...]
    python -m jobs.plan --profile h100x2 --tune   # + the largest token budgets, the fewest recomputed layers

Exit 0: fits; 1: does not fit (the verdict names changes that would fit);
2: bad input (one line on stderr). The formulas and calibration constants
live in grpo_core.memory; --json prints everything, for a benchmark to store
the prediction next to the measured peak.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Sequence

from grpo_core import advice, memory, modelshape
from grpo_core.cli import ArgumentParser, fail
from grpo_core.config import ConfigError, load
from grpo_core.constants import HEAD_CHUNK_TOKENS, LOGPROB_CHUNK
from grpo_core.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK


def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m jobs.plan", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="cluster profile name or path (jobs.profiles)")
    src.add_argument("--config", help="plain TrainConfig YAML (use with --gpus)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs in the run (default: the profile's nodes x gpus_per_node)")
    ap.add_argument("--gpus-per-node", type=int, default=0, help="for the host total per node (default: the profile's)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (H100 80; H200 ~140)")
    ap.add_argument("--host-mem-gib", type=float, default=0.0, help="host memory per node to check (default: the profile's cluster.mem; 0: report only)")
    ap.add_argument("--head-chunk-tokens", type=int, default=HEAD_CHUNK_TOKENS,
                    help="tokens per LM-head log-prob chunk (the trainer's: %(default)s); 0 = full logits then log-softmax")
    ap.add_argument("--logprob-chunk", type=int, default=LOGPROB_CHUNK,
                    help="with --head-chunk-tokens 0: positions per log-softmax chunk (the trainer's: %(default)s); 0 = unchunked")
    ap.add_argument("--offload-style", choices=("fsdp2", "swap"), default="fsdp2",
                    help="fsdp2: offloaded state stays on host (CPU optimizer step); swap: moved in for its phase")
    ap.add_argument("--no-entropy-metric", action="store_true",
                    help="the trainer skips the entropy metric when algorithm.entropy_coef=0")
    ap.add_argument("--vllm-process", action="store_true", help="vLLM engine core in its own process (2nd CUDA context)")
    ap.add_argument("--tune", action="store_true",
                    help="size trainer.micro_batch_tokens, trainer.logprob_micro_batch_tokens and model.recompute_layers "
                         "for this GPU (the largest budgets, the fewest recomputed layers that fit); a config that sets "
                         "one of them gets its line anyway")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def slurm_mem_gib(mem: str) -> float:
    """sbatch --mem text ("240G", "500000M", "1T"; bare = MiB) -> GiB; "" or unreadable -> 0."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", mem.upper())
    if not m:
        return 0.0
    return float(m.group(1)) * {"K": 2**-20, "M": 2**-10, "": 2**-10, "G": 1, "T": 1024}[m.group(2)]


def _resolve(args: argparse.Namespace) -> tuple[Any, int, int, float]:
    """(TrainConfig, gpus, gpus_per_node, host GiB per node) from a profile or a plain config."""
    if args.profile:
        from jobs.profiles import load_profile

        prof = load_profile(args.profile, args.overrides)
        per_node = args.gpus_per_node or prof.cluster.gpus_per_node
        gpus = args.gpus or prof.cluster.nodes * prof.cluster.gpus_per_node
        return prof.train, gpus, per_node, args.host_mem_gib or slurm_mem_gib(prof.cluster.mem)
    overrides = [o[len("train."):] if o.startswith("train.") else o for o in args.overrides]
    return load(args.config, overrides), args.gpus, args.gpus_per_node, args.host_mem_gib


def format_plan(p: memory.Plan, key_prefix: str = "") -> str:
    lines = [f"{p.model}: {p.params / 1e9:.2f}B params, {p.trainable / 1e6:.1f}M trainable; "
             f"{p.gpus} GPU(s) x {p.gpu_mem_gib:g} GiB; sequence {p.seq_len} tokens; GiB per GPU"]
    for s in p.stages:
        lines.append(f"\n[{s.name}]  GPU {s.total('gpu'):.2f}  host {s.total('host'):.2f}")
        lines += [f"  {q.where:4} {q.gib:8.2f}  {q.name}" + (f"  ({q.note})" if q.note else "") for q in s.parts]
    lines.append(f"\npeak: {p.peak_gib:.2f} GiB per GPU at '{p.peak_stage.name}' (of {p.gpu_mem_gib:g}); "
                 f"host: {p.host_peak_gib:.1f} GiB per GPU, {p.host_per_node_gib:.1f} GiB per node "
                 f"(a checkpoint adds {p.checkpoint_host_gib:.1f} GiB on rank 0)")
    lines.append(f"vLLM KV cache: {p.kv_tokens} tokens = {p.kv_tokens // p.seq_len} full-length sequences")
    # a note that starts with a setting is advice too: written as this command takes it
    lines += [f"note: {key_prefix if re.match(r'[a-z_]+[.][a-z_]+=', n) else ''}{n}" for n in p.notes]
    if p.fits:
        lines.append(f"verdict: fits ({p.gpu_mem_gib - p.peak_gib:.1f} GiB headroom per GPU)")
    else:
        lines.append("verdict: does not fit: " + "; ".join(p.problems))
        if p.fixes:
            lines.append(f"  would fit with any one of these lines, appended to this command as is "
                         f"(each peaks at most {memory.SUGGEST_HEADROOM:.0%} of the GPU):")
        lines += [f"    {' '.join(as_args(fix, key_prefix))}  # peak {peak:.1f} GiB, {peak / p.gpu_mem_gib:.0%} of "
                  f"{p.gpu_mem_gib:g}" for fix, peak in p.fixes] or [f"  no change found; {_no_fix_hint(p)}"]
    return "\n".join(lines)


def _no_fix_hint(p: memory.Plan) -> str:
    # Each rank's engine holds the whole model (TP 1, config.check_layout), so
    # more GPUs shrink the trainer's share but never the engine's.
    if p.kv_tokens < p.seq_len:
        return "vLLM holds the whole model on every GPU, so more GPUs do not help: use GPUs with more memory or a smaller model"
    return "use more GPUs or a smaller model"


def as_args(fix: tuple[str, ...], key_prefix: str) -> list[str]:
    """A planner fix as command-line words: `train.`-prefixed keys for a profile, `--gpus N` for a GPU count."""
    return [f"--gpus {change.split()[1]}" if change.startswith("use ") else key_prefix + change for change in fix]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg, gpus, per_node, host_gib = _resolve(args)
        if gpus < 1:
            raise ConfigError("how many GPUs? pass --gpus N (or a profile with cluster.gpus_per_node)")
        shape, name = modelshape.shape_for_model(cfg.model), modelshape.shape_name(cfg.model.path)
        knobs = memory.Knobs(head_chunk_tokens=args.head_chunk_tokens, logprob_chunk=args.logprob_chunk, offload_style=args.offload_style,
                             vllm_in_process=not args.vllm_process, entropy_metric=not args.no_entropy_metric,
                             gpus_per_node=per_node,
                             host_mem_gib=host_gib)
        p = advice.plan(shape, cfg, gpus, args.gpu_mem_gib, knobs, name=name, tune=args.tune)
    except (ConfigError, ValueError, OSError) as exc:
        fail(f"plan: {exc}", EXIT_BAD_INPUT)
    print(json.dumps(p.to_dict(), indent=1) if args.json else format_plan(p, "train." if args.profile else ""))
    return EXIT_OK if p.fits else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
