"""The planner's token budgets (trainer.micro_batch_tokens,
trainer.logprob_micro_batch_tokens) and recomputed layers
(model.recompute_layers): a budget of k sequences sizes a pass like k rows,
a budget below one sequence like one row (it runs alone), and the sizes
jobs.plan prints are the largest budgets / fewest layers that keep the
headroom (one step more does not)."""
from __future__ import annotations

import re

import pytest

from grpo_core import advice, memory
from jobs import plan as plan_cli
from tests.test_memory import Q14, cfg, with_change

SEQ = 512 + 1024  # test_memory's cfg: max_prompt_tokens + rollout.max_tokens


def stage(p: memory.Plan, name: str) -> float:
    return {s.name: s.total("gpu") for s in p.stages}[name]


@pytest.mark.parametrize("packed", [False, True])
def test_a_budget_of_k_sequences_sizes_like_k_rows(packed):
    base = ("trainer.pack_sequences=true",) if packed else ()
    rows = advice.plan(Q14, cfg(*base, "trainer.micro_batch_size=4", "trainer.logprob_micro_batch_size=8"), 1, 140.0)
    tokens = advice.plan(Q14, cfg(*base, f"trainer.micro_batch_tokens={4 * SEQ}",
                                  f"trainer.logprob_micro_batch_tokens={8 * SEQ}"), 1, 140.0)
    assert stage(tokens, "update") == stage(rows, "update")
    assert stage(tokens, "reference logprobs") == stage(rows, "reference logprobs")
    one_row = advice.plan(Q14, cfg(*base, "trainer.micro_batch_size=1"), 1, 140.0)
    below = advice.plan(Q14, cfg(*base, "trainer.micro_batch_tokens=100"), 1, 140.0)
    assert stage(below, "update") == stage(one_row, "update")  # a longer row runs alone
    more = advice.plan(Q14, cfg(*base, f"trainer.micro_batch_tokens={8 * SEQ}"), 1, 140.0)
    assert stage(more, "update") > stage(tokens, "update") + 1.0


def test_packed_sdpa_masks_span_the_whole_pass():
    """sdpa on packed rows builds one [N, N] mask per pass: the planner charges it; flex attention does not."""
    n = 16 * SEQ
    padded = advice.plan(Q14, cfg(f"trainer.micro_batch_tokens={n}"), 1, 140.0)
    packed = advice.plan(Q14, cfg(f"trainer.micro_batch_tokens={n}", "trainer.pack_sequences=true"), 1, 140.0)
    flex = advice.plan(Q14, cfg(f"trainer.micro_batch_tokens={n}", "trainer.pack_sequences=true",
                                "model.attn_implementation=flex_attention"), 1, 140.0)
    assert stage(packed, "update") > stage(padded, "update") > stage(flex, "update")


def _note(out: str, key: str) -> tuple[int, float]:
    m = re.search(rf"note: train\.{re.escape(key)}=(\d+) fits \(peak ([\d.]+) GiB\)", out)
    assert m, out
    return int(m.group(1)), float(m.group(2))


def _peak(argv, capsys) -> tuple[int, float]:
    code = plan_cli.main(argv)
    return code, float(capsys.readouterr().out.split("\npeak: ")[1].split(" GiB")[0])


def test_tune_prints_the_largest_budgets_and_the_fewest_recomputed_layers(capsys):
    argv = ["--profile", "h100x2", "train.trainer.pack_sequences=true", "train.trainer.share_prompts=false",
            "train.model.attn_implementation=flex_attention",
            "train.trainer.micro_batch_tokens=0", "train.trainer.logprob_micro_batch_tokens=0", "train.model.recompute_layers=0"]
    assert plan_cli.main(argv) == 0
    assert "micro_batch_tokens" not in capsys.readouterr().out  # only asked for (--tune) or set
    assert plan_cli.main([*argv, "--tune"]) == 0
    out = capsys.readouterr().out
    limit = memory.SUGGEST_HEADROOM * 80
    for key, step in (("trainer.micro_batch_tokens", 256), ("trainer.logprob_micro_batch_tokens", 256),
                      ("model.recompute_layers", -1)):
        value, peak = _note(out, key)
        code, pasted = _peak([*argv, f"train.{key}={value}"], capsys)
        assert code == 0 and pasted == pytest.approx(peak, abs=0.05) and pasted <= limit
        _, beyond = _peak([*argv, f"train.{key}={value + step}"], capsys)
        assert beyond > limit, key  # one step further loses the headroom


def test_a_set_budget_gets_its_line_without_tune(capsys):
    assert plan_cli.main(["--profile", "h100x2", "train.trainer.micro_batch_tokens=8192"]) == 0
    value, _ = _note(capsys.readouterr().out, "trainer.micro_batch_tokens")
    assert value > 8192


def test_the_fewest_recomputed_layers_respect_the_current_setting():
    c = cfg("model.gradient_checkpointing=false", "trainer.micro_batch_size=8")
    k, peak = advice.fewest_recomputed("", Q14, c, 2, 140.0, memory.Knobs())
    assert 0 < k < Q14.layers and peak <= memory.SUGGEST_HEADROOM * 140
    fewer = with_change(with_change(c, "model.gradient_checkpointing=true"), f"model.recompute_layers={k - 1}")
    assert not advice.roomy(advice.plan(Q14, fewer, 2, 140.0))
    assert advice.fewest_recomputed("", Q14, c, 2, 140.0, memory.Knobs(), above=k)[0] == k + 1  # more than set
