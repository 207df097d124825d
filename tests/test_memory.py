"""The memory planner (grpo_core.memory) and its CLI (jobs.plan), on CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_core import memory, modelshape
from grpo_core.config import TrainConfig, apply_overrides, build, load, to_dict, validate
from grpo_core.advice import plan
from grpo_core.memory import Knobs
from grpo_core.modelshape import KNOWN_SHAPES, lora_params, shape_for

ROOT = Path(__file__).resolve().parent.parent
Q14 = KNOWN_SHAPES["Qwen2.5-14B"]


def cfg(*overrides: str):
    base = ["model.path=Qwen/Qwen2.5-14B-Instruct", "model.dtype=bfloat16", "model.lora_rank=32",
            "model.gradient_checkpointing=true", "rollout.gpu_memory_utilization=0.4", "rollout.sleep_level=1",
            "trainer.micro_batch_size=4"]
    return load(None, base + list(overrides))


def with_change(c, change: str):
    """`c` with one suggested `key=value` applied, through the user's own override path."""
    return validate(build(TrainConfig, apply_overrides(TrainConfig, to_dict(c), [change])))


def part(p: memory.Plan, stage: str, prefix: str) -> memory.Part:
    return [q for s in p.stages if s.name == stage for q in s.parts if q.name.startswith(prefix)][0]


@pytest.mark.parametrize("name, count", [
    ("Qwen2.5-0.5B", 494_032_768),  # tied embeddings: counted once
    ("Qwen2.5-1.5B", 1_543_714_304),
    ("Qwen2.5-3B", 3_085_938_688),
    ("Qwen2.5-7B", 7_615_616_512),
    ("Qwen2.5-14B", 14_770_033_664),  # the published count
    ("Qwen2.5-32B", 32_763_876_352),
])
def test_param_counts_match_published(name: str, count: int) -> None:
    assert KNOWN_SHAPES[name].params() == count


def test_14b_param_count_by_hand() -> None:
    h, i, kv, v = 5120, 13824, 8 * 128, 152064
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (+bias), k, v (+bias), o (no bias)
    layer = attn + 3 * h * i + 2 * h  # gate/up/down + two RMSNorms
    assert 48 * layer + 2 * v * h + h == 14_770_033_664  # + embed, lm_head (untied), final norm


def test_lora_r32_all_linear_14b() -> None:
    # r * (in + out) per linear: q 5120+5120, k 5120+1024, v 5120+1024, o 5120+5120,
    # gate 5120+13824, up 5120+13824, down 13824+5120 -> 89,600; x 32 = 2,867,200 per layer;
    # x 48 layers = 137,625,600 (lm_head is not in peft's all-linear).
    assert lora_params(Q14, 32) == 137_625_600
    assert lora_params(Q14, 32, "q_proj,v_proj") == 48 * 32 * (10240 + 6144)
    with pytest.raises(ValueError, match="valid: all-linear"):
        lora_params(Q14, 32, "qkv")


def test_counts_agree_with_transformers_and_peft() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=320, vocab_size=300, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf))
    shape = modelshape.shape_from_config(hf)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    assert lora_params(shape, 8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    del torch


def test_shape_for_names_dirs_and_errors(tmp_path: Path) -> None:
    assert shape_for("Qwen/Qwen2.5-14B-Instruct") == Q14
    assert modelshape.shape_name("Qwen/Qwen2.5-14B-Instruct") == "Qwen2.5-14B"
    assert shape_for("/models/qwen2.5-0.5b-instruct") == KNOWN_SHAPES["Qwen2.5-0.5B"]
    assert shape_for("1.5B") == KNOWN_SHAPES["Qwen2.5-1.5B"]
    assert shape_for("qwen2.5-32b") == KNOWN_SHAPES["Qwen2.5-32B"]
    (tmp_path / "config.json").write_text(json.dumps(dict(
        hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False)))
    assert shape_for(str(tmp_path)) == Q14
    with pytest.raises(ValueError, match="Qwen2.5-0.5B, Qwen2.5-1.5B"):
        shape_for("meta-llama/Llama-3-70B")


def test_activation_formula_lora_sdpa() -> None:
    h, i, r, s = 5120, 13824, 32, 1536
    got = memory.layer_activation_bytes(Q14, s, full=False, targets=modelshape.lora_targets(Q14), rank=r, attn="sdpa")
    # norms 2x4h (fp32 inputs) + qkv/gate-up inputs 2x2h + attention q,k,v(repeated),out 8h
    # + SwiGLU 6i + down input 2i + LoRA A outputs 7x2r + fp32 lse 4*heads + mask bias 2s
    assert got == 8 * h + 4 * h + 8 * h + 8 * i + 14 * r + 4 * 40 + 2 * s
    full = memory.layer_activation_bytes(Q14, s, full=True, targets=[], rank=0, attn="flash_attention_2")
    assert full == 12 * h + 4 * h + (4 * h + 4 * 1024) + 8 * i + 4 * 40


def test_checkpointing_reduces_activations() -> None:
    on = plan(Q14, cfg(), 2, 140.0)
    off = plan(Q14, cfg("model.gradient_checkpointing=false"), 2, 140.0)
    a_on, a_off = part(on, "update", "activations").gib, part(off, "update", "activations").gib
    assert a_on < a_off / 5
    assert on.peak_gib < off.peak_gib


def test_offload_moves_state_to_host() -> None:
    gpu = plan(Q14, cfg(), 2, 140.0)
    off = plan(Q14, cfg("trainer.optimizer_offload=true"), 2, 140.0)
    assert part(gpu, "update", "AdamW").where == "gpu"
    assert part(off, "update", "AdamW").where == "host"
    assert off.host_peak_gib > gpu.host_peak_gib
    assert part(off, "update", "base weights").where == "gpu"
    p_off = plan(Q14, cfg("trainer.param_offload=true"), 2, 140.0)
    assert part(p_off, "update", "base weights").where == "host"
    # verl-style swapping brings the optimizer in for its step only
    swap = plan(Q14, cfg("trainer.optimizer_offload=true"), 2, 140.0, Knobs(offload_style="swap"))
    assert part(swap, "update", "AdamW").where == "host"
    assert part(swap, "optimizer step", "AdamW").where == "gpu"


def test_more_gpus_shrink_sharded_parts() -> None:
    full = cfg("model.lora_rank=0")
    two, eight = plan(Q14, full, 2, 140.0), plan(Q14, full, 8, 140.0)
    for name in ("weights", "AdamW", "gradients"):
        assert part(eight, "update", name).gib == pytest.approx(part(two, "update", name).gib / 4)
    assert part(eight, "update", "activations").gib == part(two, "update", "activations").gib
    assert eight.peak_gib < two.peak_gib


def test_sleep_frees_vllm_during_update_and_backs_up_weights() -> None:
    awake, asleep = plan(Q14, cfg("rollout.sleep_level=0"), 2, 140.0), plan(Q14, cfg(), 2, 140.0)
    upd = {s.name: s for s in awake.stages}["update"]
    assert any(q.name.startswith("vLLM KV") for q in upd.parts)
    assert part(asleep, "update", "vLLM weights backed up").where == "host"
    level2 = plan(Q14, cfg("rollout.sleep_level=2"), 2, 140.0)
    assert level2.host_peak_gib < asleep.host_peak_gib
    assert awake.peak_gib > asleep.peak_gib


def test_shared_base_is_counted_once_and_only_the_kv_cache_sleeps() -> None:
    own, shared = plan(Q14, cfg(), 1, 140.0), plan(Q14, cfg("model.share_base_weights=true"), 1, 140.0)
    base = part(own, "update", "base weights").gib
    assert base == pytest.approx(Q14.params() * 2 / 2**30)
    for stage in ("update", "sync"):
        names = [q.name for s in shared.stages if s.name == stage for q in s.parts]
        assert not any(n.startswith("base weights") for n in names)
        assert sum(n.startswith("vLLM weights (") for n in names) == 1, names  # kept awake: the trainer reads it
        assert not any(n.startswith("vLLM KV") or n.startswith("vLLM weights backed up") for n in names)
        assert not any(n.startswith("FSDP") for n in names)  # nothing of the base is all-gathered
    assert own.peak_gib - shared.peak_gib > 0.9 * base


def test_kv_cache_and_rollout_budget() -> None:
    p = plan(Q14, cfg(), 2, 140.0)
    # 2 (K,V) x 48 layers x 8 kv heads x 128 x 2 bytes per token
    per_token = 2 * 48 * 8 * 128 * 2
    assert p.kv_tokens == int(part(p, "rollout", "vLLM KV").gib * memory.GIB // per_token)
    rollout = {s.name: s for s in p.stages}["rollout"]
    vllm = sum(q.gib for q in rollout.parts if q.name.startswith("vLLM"))
    assert vllm == pytest.approx(0.4 * 140.0)


def test_fits_verdict() -> None:
    p = plan(Q14, cfg(), 2, 140.0)
    assert p.fits and not p.suggestions and p.peak_gib < 140.0
    # a small KV cache is not a failure, but the headroom it could use is named
    assert any(n.startswith("rollout.gpu_memory_utilization=") and "still fits" in n for n in p.notes)


def apply_suggestion(c, gpus: int, suggestion: str):
    for change in suggestion.split(" (peak")[0].split(" + "):
        if change.startswith("use "):
            gpus = int(change.split()[1])
        else:
            c = with_change(c, change)
    return c, gpus


def test_suggestions_make_it_fit() -> None:
    big = cfg("model.lora_rank=0", "rollout.sleep_level=0", "rollout.gpu_memory_utilization=0.6",
              "trainer.micro_batch_size=64",
              "trainer.param_offload=true", "trainer.optimizer_offload=true")
    p = plan(Q14, big, 4, 80.0)
    assert not p.fits and "update" in p.problems[0]
    assert p.suggestions
    for suggestion in p.suggestions:
        c, g = apply_suggestion(big, 4, suggestion)
        after = plan(Q14, c, g, 80.0)
        assert after.fits and after.peak_gib <= memory.SUGGEST_HEADROOM * 80.0, suggestion  # advice keeps headroom
    assert any(s.startswith("rollout.sleep_level=1 + ") for s in p.suggestions)  # sleeping buys a larger micro-batch
    mb = [s.split(" (")[0] for s in p.suggestions if s.startswith("trainer.micro_batch_size=")]
    assert mb, p.suggestions  # and it is the largest that fits with headroom
    one_more = plan(Q14, with_change(big, f"trainer.micro_batch_size={int(mb[0].split('=')[1]) + 1}"), 4, 80.0)
    assert one_more.peak_gib > memory.SUGGEST_HEADROOM * 80.0


def test_logprob_micro_batch_sizes_only_the_no_grad_passes() -> None:
    same, big = plan(Q14, cfg(), 1, 140.0), plan(Q14, cfg("trainer.logprob_micro_batch_size=64"), 1, 140.0)
    stage = lambda p, name: {s.name: s for s in p.stages}[name].total("gpu")  # noqa: E731
    assert stage(big, "update") == stage(same, "update")
    seq = 512 + 1024  # the defaults: data.max_prompt_tokens + rollout.max_tokens
    layer = part(big, "reference logprobs", "layer forward").gib  # 64 rows: the layer, not a logits chunk, is larger
    assert layer == pytest.approx(memory.layer_activation_bytes(
        Q14, seq, full=False, targets=modelshape.lora_targets(Q14, cfg().model.lora_target_modules), rank=32,
        attn=cfg().model.attn_implementation, act=memory.ACT) * 64 * seq / memory.GIB)
    assert stage(big, "reference logprobs") > stage(same, "reference logprobs")
    # too large to fit: the largest that fits with headroom is suggested
    huge = cfg("trainer.logprob_micro_batch_size=4096")
    p = plan(Q14, huge, 1, 80.0)
    assert not p.fits and "reference logprobs" in p.problems[0]
    lp = [s.split(" (")[0] for s in p.suggestions if s.startswith("trainer.logprob_micro_batch_size=")]
    assert lp, p.suggestions
    n = int(lp[0].split("=")[1])
    assert plan(Q14, with_change(huge, lp[0]), 1, 80.0).peak_gib <= memory.SUGGEST_HEADROOM * 80.0
    one_more = plan(Q14, with_change(huge, f"trainer.logprob_micro_batch_size={n + 1}"), 1, 80.0)
    assert one_more.peak_gib > memory.SUGGEST_HEADROOM * 80.0  # the largest that fits with headroom


def test_host_memory_problem_suggests_less_offload_or_deeper_sleep() -> None:
    c = cfg("trainer.param_offload=true", "trainer.optimizer_offload=true")
    p = plan(Q14, c, 2, 140.0, Knobs(host_mem_gib=60.0))
    assert any(x.startswith("host memory") for x in p.problems)
    assert p.suggestions and all(plan(Q14, *apply_suggestion(c, 2, s), 140.0, Knobs(host_mem_gib=60.0)).fits
                                 for s in p.suggestions)
    assert any("rollout.sleep_level=2" in s or "offload=false" in s for s in p.suggestions)


def test_full_ft_offloaded_host_memory_by_hand() -> None:
    """h800x4's 14B full fine-tune on 4 GPUs, all state offloaded (FSDP2 CPUOffloadPolicy), worked out
    by hand. Per rank, sharded /4, fp32: master weights 4 B, the KL reference copy 4 B, AdamW m and v
    8 B, the gradients 4 B during the update; plus the process. A checkpoint gathers the full fp32
    weights and both Adam states on rank 0's host (12 B per parameter, unsharded)."""
    c = cfg("model.lora_rank=0", "trainer.param_offload=true", "trainer.optimizer_offload=true",
            "rollout.sleep_level=2", "algorithm.kl_coef=0.001")
    p = plan(Q14, c, 4, 80.0, Knobs(gpus_per_node=4))
    n, gib = 14_770_033_664, 2**30
    upd = {s.name: s for s in p.stages}["update"]
    assert upd.total("host") == pytest.approx(n * (4 + 4 + 8 + 4) / 4 / gib + memory.HOST_PROCESS_GIB)  # 74.78
    sync = {s.name: s for s in p.stages}["sync"]
    assert sync.total("host") == pytest.approx(n * (4 + 4 + 8) / 4 / gib + memory.HOST_PROCESS_GIB)  # 61.02
    assert p.checkpoint_host_gib == pytest.approx(n * 12 / gib)  # 165.05
    # the node's peak: 4 ranks at their sync-stage state + rank 0's gathered checkpoint (409.1 GiB),
    # more than 4 ranks in the update (299.1 GiB)
    assert p.host_per_node_gib == pytest.approx(4 * sync.total("host") + n * 12 / gib)
    assert p.host_per_node_gib == pytest.approx(409.1, abs=0.1)
    assert not plan(Q14, c, 4, 80.0, Knobs(gpus_per_node=4, host_mem_gib=400.0)).fits
    # LoRA checkpoints only the adapter and its Adam states
    lora = plan(Q14, cfg(), 2, 140.0)
    assert lora.checkpoint_host_gib == pytest.approx(12 * lora_params(Q14, 32) / gib)


def test_several_changes_when_no_single_one_fits() -> None:
    c = cfg("trainer.micro_batch_size=8")
    p = plan(Q14, c, 2, 40.0)
    assert len(p.problems) == 2 and len(p.suggestions) == 1 and p.suggestions[0].count(" + ") >= 1
    assert plan(Q14, *apply_suggestion(c, 2, p.suggestions[0]), 40.0).fits
    # one engine per GPU holds the whole 27.5 GiB of bf16 weights: nothing fits a 24 GiB GPU
    assert plan(Q14, c, 2, 24.0).suggestions == []


def test_checkpointing_is_suggested_first() -> None:
    p = plan(Q14, cfg("model.gradient_checkpointing=false", "trainer.micro_batch_size=8"), 2, 140.0)
    assert not p.fits and p.suggestions[0].startswith("model.gradient_checkpointing=true")


def test_kv_cache_too_small_suggests_utilization() -> None:
    p = plan(Q14, cfg("rollout.gpu_memory_utilization=0.2"), 1, 140.0)
    assert any("KV cache" in x for x in p.problems)
    assert any(s.startswith("rollout.gpu_memory_utilization=0.2") for s in p.suggestions)


def test_gpus_must_divide_tensor_parallel() -> None:
    with pytest.raises(ValueError, match="multiple of rollout.tensor_parallel_size"):
        plan(Q14, cfg("rollout.tensor_parallel_size=4"), 2, 140.0)


def test_tensor_parallel_engines_are_rejected_with_several_ranks() -> None:
    from grpo_core.config import ConfigError

    with pytest.raises(ConfigError, match="4 training ranks.*use rollout.tensor_parallel_size=1"):
        plan(Q14, cfg("model.lora_rank=0", "rollout.tensor_parallel_size=4"), 4, 80.0)
    p = plan(Q14, cfg("model.lora_rank=0", "rollout.tensor_parallel_size=1"), 4, 80.0)
    # one engine per GPU: each holds the full bf16 weights
    assert part(p, "rollout", "vLLM weights").gib == pytest.approx(Q14.params() * 2 / 2**30)
    assert not any("tensor_parallel_size" in s for s in p.suggestions)


def test_json_round_trip() -> None:
    d = plan(Q14, cfg(), 2, 140.0).to_dict()
    json.dumps(d)
    assert d["peak_stage"] in [s["name"] for s in d["stages"]]
    assert d["constants"]["CUDA_CONTEXT_GIB"] == memory.CUDA_CONTEXT_GIB
    assert [s["name"] for s in d["stages"]] == list(memory.STAGES)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_config_text_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("model: {path: Qwen/Qwen2.5-14B-Instruct, dtype: bfloat16, lora_rank: 32, "
                         "gradient_checkpointing: true}\nrollout: {gpu_memory_utilization: 0.4, sleep_level: 1}\n")
    r = run_cli("--config", str(yaml_file), "--gpus", "2", "--gpu-mem-gib", "140", "trainer.micro_batch_size=4")
    assert r.returncode == 0, r.stderr
    for stage in memory.STAGES:
        assert f"[{stage}]" in r.stdout
    assert "verdict: fits" in r.stdout
    r = run_cli("--config", str(yaml_file), "--gpus", "2", "--gpu-mem-gib", "40", "--json")
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert not d["fits"] and d["suggestions"]


def test_cli_profile() -> None:
    r = run_cli("--profile", "h800x4", "train.rollout.sleep_level=1", "--gpu-mem-gib", "140")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 GPU(s) x 140 GiB" in r.stdout and "verdict: fits" in r.stdout
    r = run_cli("--profile", "h800x4", "--gpu-mem-gib", "36")  # each GPU's engine holds the 27.5 GiB of weights
    assert r.returncode == 1 and "would fit with any one of these lines" in r.stdout


def test_cli_bad_input() -> None:
    r = run_cli("--profile", "h100x2", "train.model.path=gpt2-xl")
    assert r.returncode == 2 and r.stderr.startswith("error: plan: cannot tell the model shape")
    r = run_cli("--profile", "local")
    assert r.returncode == 2 and "--gpus" in r.stderr


# Peak torch-allocated GiB on one H200 (torch 2.11, transformers 5.17, peft 0.21): a real FSDP2 trainer step
# (fully_shard per layer + root, bf16 mixed precision, fp32 LoRA adapters / fp32 full-FT master, AdamW,
# 2 micro-batches of 1536-token padded sequences through grpo_core.algorithm.token_logprobs), second step of
# two, one GPU, no vLLM: the planner's trainer parts (no context/NCCL/vLLM/fragmentation) must match.
H200_TRAINER_PEAKS = [  # (shape, lora, checkpointing, micro-batch, entropy: False/True(loss)/"metric", GiB)
    ("Qwen2.5-14B", True, True, 8, False, 51.019),
    ("Qwen2.5-14B", True, True, 16, False, 67.915),
    ("Qwen2.5-14B", True, True, 4, True, 57.066),
    ("Qwen2.5-14B", True, True, 4, "metric", 57.067),  # entropy_coef=0, entropy logged under no_grad
    ("Qwen2.5-1.5B", False, True, 8, "metric", 64.635),
    ("Qwen2.5-14B", True, False, 1, False, 50.466),
    ("Qwen2.5-1.5B", False, True, 8, False, 35.670),
    ("Qwen2.5-3B", False, False, 2, False, 63.893),
]


@pytest.mark.parametrize("name, lora, ckpt, mb, ent, measured", H200_TRAINER_PEAKS)
def test_trainer_parts_match_h200_measurements(name: str, lora: bool, ckpt: bool, mb: int, ent: bool | str,
                                               measured: float) -> None:
    c = load(None, ["model.path=x", "model.dtype=bfloat16", f"model.lora_rank={32 if lora else 0}",
                    f"model.gradient_checkpointing={str(ckpt).lower()}", f"trainer.micro_batch_size={mb}",
                    f"algorithm.entropy_coef={0.001 if ent is True else 0.0}", "algorithm.kl_coef=0.0",
                    "rollout.sleep_level=2"])
    # Measured on the full-logits path (before lm_head_logprobs): head_chunk_tokens=0 models it.
    p = plan(KNOWN_SHAPES[name], c, 1, 1000.0, Knobs(entropy_metric=ent == "metric", head_chunk_tokens=0))
    skip = ("CUDA context", "NCCL", "vLLM", "allocator fragmentation")
    trainer = {s.name: sum(q.gib for q in s.parts if q.where == "gpu" and not q.name.startswith(skip)) for s in p.stages}
    predicted = max(trainer[s] for s in ("update", "update (end of backward)", "optimizer step"))
    assert predicted == pytest.approx(measured, rel=0.03)
