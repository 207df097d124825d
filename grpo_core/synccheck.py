"""Proof that weight sync works: after real GRPO updates, the engine's
log-probs of fixed responses equal the trainer's.

    python -m grpo_core.synccheck --config FILE [--steps K] [key=value ...]

Prints one JSON line: max/mean |engine - trainer| over the response tokens,
and how far the engine's log-probs moved from before training (a sync
that silently did nothing would show a large difference and no movement).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import config, distributed
from .batch import pack
from .train import build_trainer, grpo_step, resume_or_start


def run_check(cfg: config.TrainConfig, steps: int, num_prompts: int = 4) -> dict[str, float]:
    tr = build_trainer(cfg)
    resume_or_start(tr)
    prompts = tr.prompts.train[:num_prompts]
    # Fixed responses: sampled once, before any update.
    responses = [
        list(s.token_ids)
        for s in tr.engine.greedy(prompts, cfg.rollout.max_tokens)
    ]
    before = [tr.engine.sequence_logprobs(p, r) for p, r in zip(prompts, responses)]
    for _ in range(steps):
        tr.state.step += 1
        grpo_step(tr)
    engine_lp = [tr.engine.sequence_logprobs(p, r) for p, r in zip(prompts, responses)]
    batch = pack(prompts, responses, torch.zeros(len(prompts)), tr.tokenizer.pad_token_id).to(tr.info.device)
    with torch.no_grad():
        trainer_lp, _ = tr.policy.forward_logprobs(batch.input_ids, batch.attention_mask, 1.0)
    diffs, moves = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ours = trainer_lp[i, len(p) - 1 : len(p) - 1 + len(r)].float().cpu()
        theirs = torch.tensor(engine_lp[i])
        diffs.append((ours - theirs).abs())
        moves.append((theirs - torch.tensor(before[i])).abs())
    diff, move = torch.cat(diffs), torch.cat(moves)
    tr.engine.close()
    return {
        "mode": "lora" if tr.policy.is_lora else "full", "dtype": cfg.model.dtype, "device": tr.info.device.type,
        "steps": steps, "tokens": int(diff.numel()), "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()), "max_change_since_start": float(move.max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_core.synccheck", description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        print(json.dumps(run_check(cfg, args.steps)), flush=True)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
