"""Weight sync into vLLM: the LoRA adapter and all 14B weights, seconds; and
the sync check (engine log-probs == trainer log-probs) for both.

    python -m bench.suite --only sync_lora,sync_full [--tiny] [--sync-repeats 3]

LoRA, ours: grpo_core.weightsync.WeightSync.push (gather the adapter, write it to
/dev/shm, point the engine at it) plus the adapter's load inside vLLM, which
happens at the next request: measured as the extra latency of a one-token
request right after the sync. Baseline: the same one-token request with a
LoRARequest that vLLM has not seen (an adapter already on disk), i.e. plain
vLLM's adapter load.

Full, ours: WeightSync.push from a full-fine-tuning Policy (fp32 master
weights, FSDP2, no reference copy: WeightSync.full_weights ->
RolloutEngine.load_full_weights), CUDA-synchronized; the engine then serves
a zero adapter (lora_B = 0: its base weights alone). Baseline: vLLM's model.
load_weights fed bf16 tensors already on the GPU (the issue's 0.06 s).

Check: before timing LoRA, the trainer's (random) base weights are loaded
into the engine so that both sides hold the same model; the adapter's B
matrices are then perturbed (random init leaves them 0) so that a sync that
did nothing would show. Log-probs of a few random sequences are compared.
"""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from bench import common, meters

LORA_METRICS = [("sync_lora_s", "s"), ("synccheck_lora_max_abs_diff", "nats")]
FULL_METRICS = [("sync_full_s", "s"), ("synccheck_full_max_abs_diff", "nats")]


def add_args(p) -> None:
    g = p.add_argument_group("sync")
    g.add_argument("--sync-repeats", type=int, default=None, help="timed syncs of each kind (default 3; tiny 2)")
    g.add_argument("--check-seqs", type=int, default=4, help="sequences in the log-prob check")
    g.add_argument("--check-tokens", type=int, default=None, help="prompt and response tokens each (default 32; tiny 8)")
    g.add_argument("--lora-perturb", type=float, default=None, help="std of the noise added to LoRA B (default 0.02)")
    g.add_argument("--check-tolerance", type=float, default=None,
                   help="a stated tolerance on max |engine - trainer| (nats): recorded with passed true/false")


# ------------------------------------------------------------------ helpers
def _dtype(cfg):
    from grpo_core.policy import DTYPES

    return DTYPES[cfg.model.dtype]


def _lora_b(policy):
    for name, param in policy.model.named_parameters():
        if "lora_B" in name:
            yield param.to_local() if hasattr(param, "to_local") else param.data


def perturb_lora(policy, std: float, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for local in _lora_b(policy):
            local.add_(torch.randn(local.shape, generator=g).to(local) * std)


def check_sequences(count: int, tokens: int, vocab: int, seed: int):
    seqs = common.random_prompts(count, 2 * tokens, vocab, seed)
    return [s[:tokens] for s in seqs], [s[tokens:] for s in seqs]


def engine_logprobs(eng, prompts, responses):
    return [eng.sequence_logprobs(p, r) for p, r in zip(prompts, responses)]


def trainer_logprobs(forward_logprobs, prompts, responses, device, pad_id):
    import torch

    from grpo_core.batch import pack

    batch = pack(prompts, responses, torch.zeros(len(prompts)), pad_id).to(device)
    with torch.no_grad():
        lp, _ = forward_logprobs(batch.input_ids, batch.attention_mask, 1.0)
    return [lp[i, len(p) - 1 : len(p) - 1 + len(r)].float().cpu().tolist() for i, (p, r) in enumerate(zip(prompts, responses))]


def compare(engine_lp, trainer_lp, before_lp) -> dict:
    import torch

    e = torch.tensor([x for row in engine_lp for x in row])
    t = torch.tensor([x for row in trainer_lp for x in row])
    b = torch.tensor([x for row in before_lp for x in row])
    diff, moved = (e - t).abs(), (e - b).abs()
    return {"tokens": int(diff.numel()), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_change_since_before": float(moved.max()), "mean_change_since_before": float(moved.mean()),
            "trainer_logprob_mean": float(t.mean())}


def one_token(eng, prompt, lora_request):
    from vllm import SamplingParams

    eng.wake_up()  # straight to vLLM below: a sleeping engine (KV cache released) must wake first
    with meters.Timer() as t:
        eng.llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=1.0), use_tqdm=False,
                         lora_request=lora_request)
    return t.s


# ------------------------------------------------------------------ LoRA
def run_lora(ctx) -> None:
    from vllm.lora.request import LoRARequest

    args, tr, cfg = ctx.args, ctx.tr, ctx.cfg
    eng, policy = tr.engine, tr.policy
    if not policy.is_lora:
        raise RuntimeError("the recipe is a full fine-tune (model.lora_rank=0): no LoRA sync to measure")
    repeats = args.sync_repeats or (2 if args.tiny else 3)
    tokens = args.check_tokens or (8 if args.tiny else 32)
    vocab = len(tr.tokenizer)
    probe = common.random_prompts(1, 16, vocab, args.seed + 11)[0]
    prompts, responses = check_sequences(args.check_seqs, tokens, vocab, args.seed + 12)
    # 0. the trainer's base into the engine: both sides then hold one model (dummy weights differ otherwise)
    base_error = None
    with meters.Timer() as t_base:
        try:
            if not policy.shares_base:  # a shared base is the engine's own already
                eng.load_full_weights(tr.sync.full_weights(_dtype(cfg)))  # a LoRA policy yields its base, HF-named
        except Exception as exc:  # noqa: BLE001 - the timing still means something; the check then will not match
            import traceback

            traceback.print_exc()
            base_error = f"{type(exc).__name__}: {exc}"[:500]
    # 1. the current adapter in place and loaded; the steady one-token latency without any load
    tr.sync.push(eng)
    one_token(eng, probe, eng._lora_request())
    steady = statistics.median(one_token(eng, probe, eng._lora_request()) for _ in range(3))
    before = engine_logprobs(eng, prompts, responses)
    # 2. baseline: plain vLLM loading an adapter it has not seen, from disk
    raw_dir = Path(tempfile.mkdtemp(prefix="bench-raw-adapter-"))
    tr.sync.save_adapter(raw_dir)
    raw = []
    for i in range(repeats):
        raw.append(max(0.0, one_token(eng, probe, LoRARequest(f"bench-raw-{i}", 1000 + i, str(raw_dir))) - steady))
    # 3. ours: new adapter weights each time, WeightSync.push, then the load at the next request
    std = args.lora_perturb if args.lora_perturb is not None else (0.05 if args.tiny else 0.02)
    ours, parts = [], []
    for i in range(repeats):
        perturb_lora(policy, std, args.seed + 100 + i)
        with meters.Timer() as t_sync:
            reported = tr.sync.push(eng)
        first = max(0.0, one_token(eng, probe, eng._lora_request()) - steady)
        ours.append(t_sync.s + first)
        parts.append({"sync_weights_s": t_sync.s, "sync_weights_reported_s": reported, "load_at_next_request_s": first})
    # 4. the check: engine (base + synced adapter) vs trainer (Policy.forward_logprobs)
    after = engine_logprobs(eng, prompts, responses)
    mine = trainer_logprobs(policy.forward_logprobs, prompts, responses, tr.info.device, tr.tokenizer.pad_token_id)
    check = compare(after, mine, before)
    check.update(dtype=cfg.model.dtype, lora_rank=cfg.model.lora_rank, perturb_std=std, sequences=len(prompts),
                 base_weights_error=base_error)
    adapter_mib = sum(f.stat().st_size for f in Path(tr.sync.adapter_dir).glob("*")) / 2**20
    common.record("sync_lora_s", statistics.median(ours), "s",
                  "plain vLLM loading an adapter already on disk (new LoRARequest, 1-token request)",
                  statistics.median(raw), ctx.out, higher_is_better=False, target={"op": "<=", "value": 0.5},
                  runs={"ours": parts, "ours_total_s": ours, "raw_s": raw}, steady_one_token_s=steady,
                  adapter_mib=adapter_mib, base_weights_into_engine_s=t_base.s, base_weights_error=base_error,
                  base_shared_with_engine=policy.shares_base,
                  engine=ctx.engine_info())
    tol = args.check_tolerance
    common.record("synccheck_lora_max_abs_diff", check["max_abs_diff"], "nats",
                  "change of the engine's log-probs through the sync (a sync that did nothing: diff == change)",
                  check["max_change_since_before"], ctx.out, higher_is_better=False, check=check,
                  tolerance=tol, passed=None if tol is None else check["max_abs_diff"] <= tol)


# ------------------------------------------------------------------ full weights
def _load_direct(worker, weights):
    """Plain vLLM: the model's load_weights on tensors already in place."""
    import torch

    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(iter(weights))
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def full_policy(cfg, info):
    """A full-fine-tuning Policy of the recipe's model (fp32 master weights,
    FSDP2), without the frozen reference copy, which would not fit next to
    the engine."""
    from grpo_core.policy import Policy

    model = replace(cfg.model, lora_rank=0, share_base_weights=False, gradient_checkpointing=False)
    return Policy(cfg.model.path, model, cfg.trainer, info, needs_reference=False)


def run_full(ctx) -> None:
    import torch

    from grpo_core.weightsync import WeightSync

    args, tr, cfg = ctx.args, ctx.tr, ctx.cfg
    eng = tr.engine
    repeats = args.sync_repeats or (2 if args.tiny else 3)
    tokens = args.check_tokens or (8 if args.tiny else 32)
    vocab = len(tr.tokenizer)
    prompts, responses = check_sequences(args.check_seqs, tokens, vocab, args.seed + 13)
    if tr.policy.is_lora:  # a zero adapter (lora_B = 0): the engine's requests score with its base weights alone
        with torch.no_grad():
            for local in _lora_b(tr.policy):
                local.zero_()
        tr.sync.push(eng)
    ctx.drop_policy()  # the LoRA trainer (its base weights) out of the way
    before = engine_logprobs(eng, prompts, responses)
    policy = full_policy(cfg, tr.info)
    sync = WeightSync(policy, tr.sync.adapter_dir)
    ours, reported = [], []
    for _ in range(repeats):
        with meters.Timer() as t:
            reported.append(sync.push(eng))
        ours.append(t.s)
    after = engine_logprobs(eng, prompts, responses)
    mine = trainer_logprobs(policy.forward_logprobs, prompts, responses, tr.info.device, tr.tokenizer.pad_token_id)
    check = compare(after, mine, before)
    check.update(dtype=cfg.model.dtype, trainer_master_dtype="float32", sequences=len(prompts))
    shapes = [(name, tuple(p.shape)) for name, p in policy.model.named_parameters()]
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    del policy, sync
    meters.free_memory()
    # baseline: bf16 tensors already on the device (random: only the time matters), the model's load_weights
    dtype = _dtype(cfg)
    ready = [(name, torch.empty(shape, dtype=dtype, device=tr.info.device).normal_(0, 0.02)) for name, shape in shapes]
    raw, raw_path = [], "model.load_weights via collective_rpc"
    for _ in range(repeats):
        try:
            with meters.Timer() as t:
                eng.llm.collective_rpc(_load_direct, kwargs={"weights": ready})
                eng.llm.reset_prefix_cache()
        except Exception as exc:  # noqa: BLE001 - vLLM on CPU repacks weights; then its reload_weights
            raw_path = f"reload_weights (direct load_weights failed: {type(exc).__name__}: {str(exc)[:200]})"
            with meters.Timer() as t:
                eng.load_full_weights(ready)
        raw.append(t.s)
    del ready
    meters.free_memory()
    gib = numel * torch.tensor([], dtype=dtype).element_size() / meters.GIB
    common.record("sync_full_s", statistics.median(ours), "s", f"plain vLLM in-place load of ready bf16 tensors ({raw_path})",
                  statistics.median(raw), ctx.out, higher_is_better=False, target={"op": "<=", "value": 2.0},
                  runs={"ours_s": ours, "ours_reported_by_sync_weights_s": reported, "raw_s": raw},
                  params=numel, synced_gib=gib, engine=ctx.engine_info(), trainer_master_dtype="float32",
                  note="ours: FSDP2 master weights -> engine dtype, one gathered tensor at a time, into "
                       "RolloutEngine.load_full_weights (CUDA-synchronized)")
    tol = args.check_tolerance
    common.record("synccheck_full_max_abs_diff", check["max_abs_diff"], "nats",
                  "change of the engine's log-probs through the sync (a sync that did nothing: diff == change)",
                  check["max_change_since_before"], ctx.out, higher_is_better=False, check=check,
                  tolerance=tol, passed=None if tol is None else check["max_abs_diff"] <= tol)
