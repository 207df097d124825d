"""Policy.forward_logprobs (the LM head applied chunk by chunk to the final
hidden states) equals the plain full-logits computation on a tiny Qwen2,
sharded with FSDP2 on one rank: values, entropy and parameter gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from grpo_core import config
from grpo_core.algorithm import entropy_from_logits
from grpo_core.batch import pack

TEMPERATURE = 0.7
MODES = {  # name: config overrides
    "full": [],
    "full-bf16": ["model.dtype=bfloat16"],
    "lora": ["model.lora_rank=4", "model.lora_alpha=8"],
    # lm_head itself LoRA-wrapped: no plain weight, the full-logits fallback
    "lora-head": ["model.lora_rank=4", "model.lora_alpha=8", "model.lora_target_modules=q_proj,lm_head"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from grpo_core.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("m") / "tiny"
    return build_tiny_model(path, [f"user\n{a} + {b}\nassistant\n#### {a + b}" for a in range(10) for b in range(10)])


@pytest.fixture(scope="module")
def info():
    import torch.distributed as dist

    from grpo_core import distributed

    created = not dist.is_initialized()
    with pytest.MonkeyPatch.context() as mp:  # one rank here, whatever launched pytest
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID"):
            mp.delenv(name, raising=False)
        yield distributed.init_distributed("cpu")
    if created:
        dist.destroy_process_group()


def make_batch(vocab: int):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    responses = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (4, 1, 7)]
    return pack(prompts, responses, torch.zeros(3), 0)  # right-padded, unequal lengths


def full_logits(module: nn.Module, input_ids, attention_mask):
    """The computation forward_logprobs replaced: all logits, then softmax."""
    logits = module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logits = logits.float() / TEMPERATURE
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp, entropy_from_logits(logits)


def grads_of(policy) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in policy.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            out[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().clone()
            p.grad = None
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_logprobs_equals_full_logits(model_dir, info, mode):
    from grpo_core.policy import Policy

    cfg = config.load(None, [f"model.path={model_dir}", *MODES[mode]])
    torch.manual_seed(0)
    policy = Policy(str(model_dir), cfg.model, cfg.trainer, info)
    hf = policy.model.get_base_model() if policy.is_lora else policy.model
    if policy.is_lora:  # peft starts B at 0 (a no-op adapter, zero A grads): make it matter
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_" in name:
                    p.to_local().normal_(0.0, 0.3)
    head = hf.get_output_embeddings()
    assert (type(head) is nn.Linear) == (mode != "lora-head")
    batch = make_batch(hf.config.vocab_size)
    ids, mask, resp = batch.input_ids, batch.attention_mask, batch.response_mask
    gen = torch.Generator().manual_seed(4)
    c_lp, c_ent = torch.randn(resp.shape, generator=gen), torch.randn(resp.shape, generator=gen)
    tol = dict(rtol=1e-3, atol=1e-3) if mode == "full-bf16" else dict(rtol=1e-5, atol=1e-5)

    head_positions: list[int] = []
    hook = head.register_forward_hook(lambda _m, _a, out: head_positions.append(out.shape[1]))
    lp, ent = policy.forward_logprobs(ids, mask, TEMPERATURE, with_entropy=True, entropy_grad=True)
    hook.remove()
    # the fast path runs the head on no positions at all
    assert head_positions == ([0] if mode != "lora-head" else [ids.shape[1]])
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == resp.shape
    ((c_lp * lp + c_ent * ent) * resp).sum().backward()
    new_grads = grads_of(policy)

    lp_ref, ent_ref = full_logits(policy.model, ids, mask)
    ((c_lp * lp_ref + c_ent * ent_ref) * resp).sum().backward()
    ref_grads = grads_of(policy)
    torch.testing.assert_close(lp, lp_ref, **tol)
    torch.testing.assert_close(ent, ent_ref, **tol)
    # every trainable tensor, lm_head and embeddings too in full fine-tuning
    assert new_grads.keys() == ref_grads.keys() and len(new_grads) > 0
    if not policy.is_lora:
        assert any("lm_head" in n for n in new_grads) and any("embed_tokens" in n for n in new_grads)
    for name, g in new_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, ref_grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")

    # entropy as a metric only: the same numbers, no graph
    _, ent_metric = policy.forward_logprobs(ids, mask, TEMPERATURE, with_entropy=True)
    assert not ent_metric.requires_grad
    torch.testing.assert_close(ent_metric, ent.detach())

    # the reference policy (the adapter disabled, or the frozen copy), without grad
    with torch.no_grad():
        ref_lp, none = policy.forward_logprobs(ids, mask, TEMPERATURE, reference=True)
        if policy.is_lora:
            with policy.model.disable_adapter():
                want, _ = full_logits(policy.model, ids, mask)
        else:
            want, _ = full_logits(policy.reference, ids, mask)
    assert none is None
    torch.testing.assert_close(ref_lp, want, **tol)
    if policy.is_lora:  # the adapter does change the policy, so the reference is a different one
        assert (ref_lp - lp.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_whose_first_forward_is_the_reference_pass_trains(model_dir, info, dtype):
    """A step's first policy forward is the reference pass (adapter off).
    FSDP2 initialises there; peft's disable_adapter clearing the adapter's
    requires_grad made it reduce the fp32 adapter's grads in bf16, and the
    first backward failed (seen on the H200, reproduced here). In fp32,
    leaving disable_adapter resharded the root before the head ran
    ("lm_head is still sharded")."""
    from grpo_core.policy import Policy

    cfg = config.load(None, [f"model.path={model_dir}", f"model.dtype={dtype}", *MODES["lora"]])
    torch.manual_seed(0)
    policy = Policy(str(model_dir), cfg.model, cfg.trainer, info, needs_reference=False)
    batch = make_batch(policy.model.get_base_model().config.vocab_size)
    ids, mask, resp = batch.input_ids, batch.attention_mask, batch.response_mask
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.to_local().normal_(0.0, 0.3)
        reference, _ = policy.forward_logprobs(ids, mask, TEMPERATURE, reference=True)
        with policy.model.disable_adapter():  # peft's own: the base alone
            base, _ = policy.forward_logprobs(ids, mask, TEMPERATURE)
    torch.testing.assert_close(reference, base, rtol=0, atol=0)
    assert all(p.requires_grad for p in policy.trainable_parameters())  # restored on the way out
    lp, _ = policy.forward_logprobs(ids, mask, TEMPERATURE)
    assert (lp - reference)[resp.bool()].abs().max() > 1e-2  # the adapter is on again
    (lp * resp).sum().backward()
    grads = grads_of(policy)
    assert grads and all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("overrides", [("model.lora_rank=0",), ("model.lora_rank=4", "model.lora_alpha=8")])
def test_gradients_after_a_no_grad_pass_equal_a_fresh_backward(model_dir, overrides):
    """A log-prob pass (no backward) between updates changes no gradient. It did for full fine-tuning:
    the root's unsharded parameters kept what the backward before had added, so the embedding, final
    norm and lm_head gradients came out 2x, 3x, ... the right ones, step after step."""
    from grpo_core.train import batched_logprobs
    from tests.test_packing import grads_after, make_batch, make_policy, vocab_of

    policy, cfg = make_policy(model_dir, *overrides)
    batch = make_batch(vocab_of(policy))
    _, fresh = grads_after(policy, batch, cfg)
    for _ in range(2):
        batched_logprobs(policy, batch, 4, 1.0, reference=False)
        _, after = grads_after(policy, batch, cfg)
        assert fresh.keys() == after.keys() and len(fresh) > 0
        for name, g in fresh.items():
            torch.testing.assert_close(after[name], g, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
