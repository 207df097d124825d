"""A LoRA trainer whose frozen base is the engine's weights: HF parameters
become views of vLLM-layout tensors (fused qkv/gate_up, padded vocabulary),
nothing is copied, and the policy computes exactly what a policy with its
own copy computes.

vLLM's CPU backend repacks its weights, so here the engine's side is a dict
laid out as vLLM's GPU model holds it (built from the same checkpoint);
the GPU run shares the real engine's tensors (bench/gpu_checks.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from grpo_core import config
from grpo_core.rollout import FUSED_PROJECTIONS, _FUSED_INTO, _split, hf_views

VOCAB_PAD = 64  # vLLM pads the vocabulary rows of embeddings and LM head


def engine_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF state dict rearranged as vLLM's Qwen2 keeps it."""
    out = {}
    for name, tensor in state.items():
        prefix, module, leaf = _split(name)
        if module in _FUSED_INTO:
            fused = _FUSED_INTO[module]
            key = f"{prefix}{fused}.{leaf}"
            if key not in out:
                out[key] = torch.cat([state[f"{prefix}{part}.{leaf}"] for part in FUSED_PROJECTIONS[fused]])
        elif module in ("embed_tokens", "lm_head"):
            rows = -(-tensor.shape[0] // VOCAB_PAD) * VOCAB_PAD
            out[name] = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
        else:
            out[name] = tensor.clone()
    return out


# ------------------------------------------------------------------ hf_views
def test_views_slice_fused_rows_without_copying():
    qkv = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)  # q: 6 rows, k: 2, v: 2
    engine = {"l.0.attn.qkv_proj.weight": qkv, "embed.weight": torch.zeros(8, 3)}
    shapes = {"l.0.attn.q_proj.weight": (6, 3), "l.0.attn.k_proj.weight": (2, 3),
              "l.0.attn.v_proj.weight": (2, 3), "embed.weight": (5, 3)}
    views = hf_views(engine, shapes)
    assert torch.equal(views["l.0.attn.k_proj.weight"], qkv[6:8])
    assert torch.equal(views["l.0.attn.v_proj.weight"], qkv[8:10])
    assert views["l.0.attn.v_proj.weight"].data_ptr() == qkv.data_ptr() + 8 * 3 * 4
    assert views["embed.weight"].shape == (5, 3) and views["embed.weight"].data_ptr() == engine["embed.weight"].data_ptr()
    views["l.0.attn.q_proj.weight"][0, 0] = -1.0
    assert qkv[0, 0] == -1.0  # one tensor, two names


def test_views_reject_missing_and_misshapen():
    engine = {"l.mlp.gate_up_proj.weight": torch.zeros(8, 2)}
    with pytest.raises(KeyError, match="down_proj"):
        hf_views(engine, {"l.mlp.down_proj.weight": (2, 4)})
    with pytest.raises(ValueError, match="up_proj"):  # gate 4 + up 6 rows > 8
        hf_views(engine, {"l.mlp.gate_proj.weight": (4, 2), "l.mlp.up_proj.weight": (6, 2)})


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("extra, reason", [
    (["model.lora_rank=0"], "full fine-tuning"),
    (["trainer.device=cpu"], "CPU backend"),
    (["rollout.tensor_parallel_size=2"], "tensor_parallel_size=2"),
    (["trainer.param_offload=true"], "param_offload"),
])
def test_config_rejects_what_cannot_share(extra, reason):
    base = ["model.path=m", "model.lora_rank=8", "model.share_base_weights=true", "trainer.device=cuda"]
    with pytest.raises(config.ConfigError, match=reason):
        config.load(None, base + extra)


# ------------------------------------------------------------------ policy
@pytest.fixture(scope="module", params=["untied", "tied"])
def model_dir(request, tmp_path_factory) -> Path:
    from grpo_core.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny",
                            [f"user\n{a} + {b}\nassistant\n#### {a + b}" for a in range(10) for b in range(10)])
    if request.param == "tied":  # Qwen2.5 up to 3B ties the LM head to the embedding
        from transformers import AutoModelForCausalLM

        tied = path.parent / "tied"
        shutil.copytree(path, tied)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        model.save_pretrained(tied)
        assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
        return tied
    return path


def _policy(model_dir: Path, shared_base=None):
    from grpo_core import distributed
    from grpo_core.policy import Policy

    info = distributed.init_distributed("cpu")
    cfg = config.load(None, [f"model.path={model_dir}", "model.lora_rank=4", "model.lora_alpha=8", "trainer.device=cpu"])
    torch.manual_seed(0)
    return Policy(str(model_dir), cfg.model, cfg.trainer, info, needs_reference=False, shared_base=shared_base)


def test_policy_on_shared_base_equals_policy_with_own_copy(model_dir):
    from transformers import AutoModelForCausalLM

    own = _policy(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = engine_layout({n: p.detach() for n, p in hf.named_parameters()})
    before = {n: t.clone() for n, t in engine.items()}
    shared = _policy(model_dir, shared_base=lambda shapes: hf_views(engine, shapes))

    # No copy: the trainer's base tensors live inside the engine's.
    storages = {t.untyped_storage().data_ptr() for t in engine.values()}
    base = [(n, p) for n, p in shared.model.named_parameters() if not p.requires_grad]
    assert base and all(p.untyped_storage().data_ptr() in storages for _, p in base)
    assert all(not hasattr(p, "full_tensor") for _, p in base), "FSDP2 must leave the shared base alone"
    assert all(hasattr(p, "full_tensor") for p in shared.trainable_parameters())

    ids = torch.randint(3, hf.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    optimizers = {}
    for name, policy in (("own", own), ("shared", shared)):
        optimizers[name] = torch.optim.AdamW(policy.trainable_parameters(), lr=0.05)
    for _ in range(2):  # the second pass sees a nonzero LoRA B
        results = {}
        for name, policy in (("own", own), ("shared", shared)):
            logprobs, _ = policy.forward_logprobs(ids, mask, 0.7)
            (logprobs * mask[:, 1:]).sum().backward()
            grads = [p.grad.full_tensor().clone() for p in policy.trainable_parameters()]
            optimizers[name].step()
            optimizers[name].zero_grad()
            results[name] = (logprobs.detach(), grads)
        torch.testing.assert_close(results["shared"][0], results["own"][0], rtol=0, atol=0)
        for g_shared, g_own in zip(results["shared"][1], results["own"][1]):
            torch.testing.assert_close(g_shared, g_own, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in results["own"][1])
    assert all(torch.equal(engine[n], before[n]) for n in engine), "the shared base must stay frozen"
