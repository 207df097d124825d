"""The bench's FLOPs count and its response-length wrapper, by hand."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common, meters  # noqa: E402


def test_update_flops_by_hand() -> None:
    # LoRA: 4N + 6 N_lora, + 2 N_rec for the recomputed layers
    assert meters.update_flops(100, 10, lora=True, recomputed=40)[0] == 400 + 60 + 80
    assert meters.update_flops(100, 10, lora=True, recomputed=0)[0] == 460
    # full fine-tuning: 6N (+ 2 N_rec); its trainable count is N itself, not added again
    assert meters.update_flops(100, 100, lora=False, recomputed=0)[0] == 600
    assert "2 N_rec" in meters.update_flops(100, 100, lora=False, recomputed=90)[1]
    assert meters.mfu(1000.0, 989e9) == 1000.0 * 989e9 / meters.H200_BF16_PEAK_FLOPS


class _Engine:
    def __init__(self) -> None:
        self.calls = []
        self.lora_rank = 8

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seeds, ignore_eos=False):
        self.calls.append((list(max_tokens), ignore_eos))
        return [[] for _ in prompts]


def test_shaped_lengths_are_seeded_per_prompt_clipped_and_ignore_eos() -> None:
    engine = _Engine()
    shaped = common.ShapedLengths(engine, mean=250.0, sd=70.0, lo=150, hi=400, seed=0)
    prompts = [[1], [2], [3]]
    shaped.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=300, seeds=[7, 8, 9])
    first, ignore_eos = engine.calls[-1]
    assert ignore_eos and all(150 <= m <= 300 for m in first)
    shaped.generate(prompts[1:], n=2, temperature=1.0, top_p=1.0, max_tokens=300, seeds=[8, 9])
    assert engine.calls[-1][0] == first[1:]  # a prompt's length follows its seed (a replayed step draws the same)
    shaped.cap = 16
    shaped.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=300, seeds=[7, 8, 9])
    assert engine.calls[-1][0] == [16, 16, 16]
    assert shaped.lora_rank == 8 and shaped.last[0] == prompts  # the rest is the engine's


def test_trl_records_skip_the_warmup_and_divide_ours_by_trl(tmp_path) -> None:
    import json

    from bench import trl_grpo

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "grpo_step_tokens_per_s_per_gpu.json").write_text(json.dumps({"value": 3000.0, "hardware": "H200"}))
    (ours / "grpo_step_peak_gib.json").write_text(json.dumps({"value": 60.0}))
    step = lambda i, s, tok, peak: {"step": i, "seconds": s, "tokens": tok, "peak_device_gib": peak,  # noqa: E731
                                    "peak_allocated_gib": peak - 1, "peak_reserved_gib": peak}
    # step 1 is the warm-up: out of the rate, not of the peak
    steps = [step(1, 100.0, 1000, 90.0), step(2, 200.0, 160_000, 70.0), step(3, 200.0, 240_000, 75.0)]
    trl_grpo.write_records(tmp_path, ours, steps, {}, "nvml")
    rate = json.loads((tmp_path / "trl_grpo_step_tokens_per_s_per_gpu.json").read_text())
    assert rate["value"] == 1000.0 and rate["baseline_value"] == 3000.0 and rate["measured_steps"] == [2, 3]
    assert json.loads((tmp_path / "trl_grpo_step_peak_gib.json").read_text())["value"] == 90.0
    vs = json.loads((tmp_path / "vs_trl_grpo_step_ratio.json").read_text())
    assert vs["value"] == 3.0 and vs["ratio"] == 1.0 and vs["ours_hardware"] == "H200"
    # without ours: TRL's figures alone, no ratio
    other = tmp_path / "alone"
    trl_grpo.write_records(other, tmp_path / "nowhere", steps[:1], {}, "rss")
    assert json.loads((other / "trl_grpo_step_tokens_per_s_per_gpu.json").read_text())["value"] == 10.0
    assert not (other / "vs_trl_grpo_step_ratio.json").exists()
