"""The trainer's rollout stage against raw vLLM on the same batch and engine.

    python -m bench.suite --only rollout [--tiny] [--rollout-prompts 64 --rollout-n 5 --rollout-prompt-tokens 256 --rollout-max-tokens 256]

Ours: what grpo_core.train.grpo_step does (engine.wake_up, RolloutEngine.
generate with per-prompt seeds, engine.sleep). Baseline: LLM.generate on the
same LLM object with one SamplingParams(n, max_tokens, ignore_eos=True) and
the same LoRA request, so the difference is the trainer's own overhead. The
prefix cache is reset before every timed run. Dummy weights give a near
uniform next-token distribution, so EOS (1 in 152064) is all but never
sampled even where ignore_eos is not passed; tokens/s counts the tokens
actually generated.
"""
from __future__ import annotations

import statistics

from bench import common, meters

METRICS = [("rollout_tokens_per_s", "tokens/s")]
ISSUE_REFERENCE = {"raw_vllm_tok_s": "11.5k-13.3k (256x5x512, default engine)", "raw_vllm_lora_r32_tok_s": 9300}


def add_args(p) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-prompts", type=int, default=None, help="prompts (default 64; tiny 4)")
    g.add_argument("--rollout-n", type=int, default=None, help="samples per prompt (default 5; tiny 2)")
    g.add_argument("--rollout-prompt-tokens", type=int, default=None, help="default 256; tiny 16")
    g.add_argument("--rollout-max-tokens", type=int, default=None, help="generated per sample (default 256; tiny 16)")
    g.add_argument("--rollout-repeats", type=int, default=1, help="timed runs of each (alternating)")


def run(ctx) -> None:
    from vllm import SamplingParams

    from grpo_core.train import rollout_seeds

    args, tr, cfg = ctx.args, ctx.tr, ctx.cfg
    eng = tr.engine
    count = args.rollout_prompts or (4 if args.tiny else 64)
    plen = args.rollout_prompt_tokens or (16 if args.tiny else 256)
    gen = args.rollout_max_tokens or (16 if args.tiny else 256)
    n = args.rollout_n or (2 if args.tiny else 5)
    prompts = common.random_prompts(count, plen, len(tr.tokenizer), args.seed)
    r = cfg.rollout

    def ours(batch, max_tokens, step):
        seeds = rollout_seeds(cfg.trainer.seed, step, list(range(len(batch))))
        eng.wake_up()
        samples = eng.generate(batch, n=n, temperature=r.temperature, top_p=r.top_p, max_tokens=max_tokens, seeds=seeds,
                               ignore_eos=True)
        eng.sleep()
        return sum(len(s.token_ids) for group in samples for s in group)

    def raw(batch, max_tokens, step):
        eng.wake_up()  # a no-op unless rollout.sleep_level > 0; the raw engine must be awake
        params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, temperature=r.temperature, top_p=r.top_p)
        outs = eng.llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False,
                                lora_request=eng._lora_request())
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    # warm-up: first requests, the adapter's load
    ours(prompts[:4], 8, 0)
    raw(prompts[:4], 8, 0)
    runs = {"ours": [], "raw": []}
    for rep in range(args.rollout_repeats):
        for name, fn in (("raw", raw), ("ours", ours)) if rep % 2 == 0 else (("ours", ours), ("raw", raw)):
            eng.llm.reset_prefix_cache()
            with meters.Timer() as t:
                tokens = fn(prompts, gen, rep + 1)
            runs[name].append({"seconds": t.s, "generated_tokens": tokens, "tokens_per_s": tokens / t.s})
    ours_tps = statistics.mean(x["tokens_per_s"] for x in runs["ours"])
    raw_tps = statistics.mean(x["tokens_per_s"] for x in runs["raw"])
    common.record(
        "rollout_tokens_per_s", ours_tps, "tokens/s",
        "raw vLLM LLM.generate, same engine, batch and LoRA request (ignore_eos)", raw_tps, ctx.out,
        target={"op": "ratio >=", "value": 0.95}, runs=runs,
        batch={"prompts": count, "n": n, "prompt_tokens": plen, "max_tokens": gen, "sequences": count * n},
        engine=ctx.engine_info(), lora_adapter_active=eng._lora_request() is not None,
        ours_lora_request=repr(eng._lora_request()),
        ours_impl="RolloutEngine.generate (ignore_eos=True)",
        issue_reference=ISSUE_REFERENCE, startup=ctx.startup_s,
    )
