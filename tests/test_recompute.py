"""Recomputation of the first k decoder layers (model.recompute_layers):
the same loss and gradients as no recomputation, for LoRA and full
fine-tuning; exactly the first k layers run their forward twice; and the
planner's update memory falls with each recomputed layer up to the last
one (recomputing that too, the all-layers plan, saves its activations but
holds its input again during its recompute)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from grpo_core import advice, config, modelshape
from grpo_core.policy import _decoder_layers
from tests.test_packing import grads_after, make_batch, make_policy, vocab_of

LAYERS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from grpo_core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", [f"user\n{a} + {b}\nassistant\n#### {a + b}"
                                                                    for a in range(10) for b in range(10)], layers=LAYERS)


def run(model_dir, layout: tuple[str, ...], k: int, monkeypatch):
    recompute = ("model.gradient_checkpointing=true", f"model.recompute_layers={k}") if k else ()
    policy, cfg = make_policy(model_dir, *layout, *recompute, "algorithm.entropy_coef=0.01")
    # Counted in the class's forward: module hooks do not fire again in checkpoint's recompute.
    from transformers.models.qwen2 import modeling_qwen2

    index = {id(layer): i for i, layer in enumerate(_decoder_layers(policy.model))}
    calls, forward = [0] * LAYERS, modeling_qwen2.Qwen2DecoderLayer.forward

    def counted(self, *args, **kwargs):
        calls[index[id(self)]] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen2.Qwen2DecoderLayer, "forward", counted)
    stats, grads = grads_after(policy, make_batch(vocab_of(policy)), cfg)
    monkeypatch.undo()
    return stats, grads, calls


@pytest.mark.parametrize("layout", [("model.lora_rank=4", "model.lora_alpha=8"), ("model.lora_rank=0",)])
def test_recomputing_k_layers_gives_the_same_gradients(model_dir, layout, monkeypatch):
    stats, grads, calls = run(model_dir, layout, 0, monkeypatch)
    assert calls == [1] * LAYERS
    assert any(g.abs().max() > 1e-4 for g in grads.values())
    for k in (1, 2, LAYERS):
        s_k, g_k, calls = run(model_dir, layout, k, monkeypatch)
        assert calls == [2] * k + [1] * (LAYERS - k)  # a recomputed layer's forward runs again in backward
        assert s_k == pytest.approx(stats, rel=1e-6, abs=1e-7)
        for name, g in grads.items():  # the same kernels on the same inputs: equal to fp32 rounding
            torch.testing.assert_close(g_k[name], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"k={k} {n}: {m}")


def test_recompute_layers_needs_checkpointing_and_at_most_the_model_s_layers(model_dir):
    with pytest.raises(config.ConfigError, match="needs model.gradient_checkpointing=true"):
        config.load(None, [f"model.path={model_dir}", "model.recompute_layers=1"])
    with pytest.raises(config.ConfigError, match=f"recompute_layers=4 > the model's {LAYERS} decoder layers"):
        make_policy(model_dir, "model.gradient_checkpointing=true", "model.recompute_layers=4")


def test_planner_update_memory_falls_with_recomputed_layers():
    shape = modelshape.KNOWN_SHAPES["Qwen2.5-14B"]
    base = config.load(None, ["model.path=Qwen/Qwen2.5-14B-Instruct", "model.dtype=bfloat16", "model.lora_rank=32",
                              "model.share_base_weights=true", "rollout.sleep_level=1", "trainer.micro_batch_size=16",
                              "model.gradient_checkpointing=true"])

    def update_gib(k: int) -> float:
        m = dataclasses.replace(base.model, gradient_checkpointing=k > 0, recompute_layers=k)
        stages = advice.plan(shape, dataclasses.replace(base, model=m), 1, 140.0).stages
        return {s.name: s.total("gpu") for s in stages}["update"]

    peaks = [update_gib(k) for k in range(shape.layers + 1)]
    assert all(a > b for a, b in zip(peaks, peaks[1:-1])), "each recomputed layer but the last saves memory"
    assert peaks[0] - peaks[shape.layers - 1] > 20  # GiB: 47 of 48 layers' activations at 16 x 1536 tokens
    everything = {s.name: s.total("gpu") for s in advice.plan(shape, base, 1, 140.0).stages}["update"]
    assert peaks[-1] == everything  # recompute_layers=0 is all of them
