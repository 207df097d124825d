"""jobs.plan's advice is pasted as printed: every suggested line, appended to
the same command, is accepted and fits with headroom; so does jobs.submit."""
from __future__ import annotations

import shlex

import pytest

from grpo_core import memory
from jobs import plan, submit


def _suggested(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, list[list[str]]]:
    code = plan.main(argv)
    out = capsys.readouterr().out
    lines = out.split("appended to this command as is", 1)[-1].splitlines()[1:] if "as is" in out else []
    return code, out, [shlex.split(line, comments=True) for line in lines if line.startswith("    ")]


@pytest.mark.parametrize("argv", [
    ["--profile", "h800x4", "--gpu-mem-gib", "36"],
    ["--profile", "h100x2", "train.trainer.micro_batch_tokens=65536", "train.model.share_base_weights=false"],
    ["--profile", "h800x4", "train.trainer.micro_batch_size=64"],
    ["--profile", "h100x2", "train.trainer.micro_batch_tokens=400000", "train.trainer.pack_sequences=true",
     "train.trainer.share_prompts=false",
     "train.model.share_base_weights=false"],
    ["--profile", "h100x2", "train.model.gradient_checkpointing=false", "train.model.recompute_layers=0"],  # recompute some
    # h100x2 shares its base with vLLM, which refuses param_offload: advice must not offer it
    ["--profile", "h100x2", "train.trainer.micro_batch_tokens=65536"],
    ["--profile", "h100x2", "train.trainer.micro_batch_tokens=400000", "train.trainer.pack_sequences=true",
     "train.trainer.share_prompts=false"],
])
def test_every_suggestion_pastes_into_the_same_command_and_keeps_headroom(argv, capsys, tmp_path) -> None:
    code, out, fixes = _suggested(capsys, argv)
    assert code == 1 and fixes, out
    for words in fixes:
        again = plan.main([*argv, *words])
        after = capsys.readouterr().out
        assert again == 0, f"{words}: {after[-500:]}"
        peak, gpu = (float(x) for x in after.split("\npeak: ")[1].split(" GiB per GPU")[0:1] +
                     [after.split("(of ")[1].split(")")[0]])
        assert peak <= memory.SUGGEST_HEADROOM * gpu + 1e-9, words
        if "--gpus" not in words:  # jobs.submit takes the same words
            assert submit.main(["--profile", argv[1], "--runs-dir", str(tmp_path), "--show-config",
                                *[w for w in argv[2:] if w.startswith("train.")], *words]) == 0
            capsys.readouterr()


def test_no_fix_says_why_more_gpus_do_not_help(capsys) -> None:
    """At 24 GiB the engine's own copy of the 14B weights does not fit, whatever the GPU count."""
    code, out, fixes = _suggested(capsys, ["--profile", "h800x4", "--gpu-mem-gib", "24"])
    assert code == 1 and not fixes
    assert "no change found; vLLM holds the whole model on every GPU, so more GPUs do not help" in out


def test_config_mode_advice_has_no_train_prefix(capsys, tmp_path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: {path: Qwen/Qwen2.5-14B-Instruct, dtype: bfloat16, lora_rank: 32}\n")
    code, out, fixes = _suggested(capsys, ["--config", str(cfg), "--gpus", "1", "--gpu-mem-gib", "40"])
    assert code == 1 and fixes and not any(w.startswith("train.") for f in fixes for w in f), out
    assert plan.main(["--config", str(cfg), "--gpus", "1", "--gpu-mem-gib", "40", *fixes[0]]) == 0


def test_a_fitting_plan_says_when_headroom_is_thin(capsys) -> None:
    """vLLM at 0.97 of an 80 GiB GPU peaks at ~79.7 GiB: it fits, and the verdict says how thin that is."""
    assert plan.main(["--profile", "h100x2", "train.rollout.gpu_memory_utilization=0.97"]) == 0
    out = capsys.readouterr().out
    peak = float(out.split("\npeak: ")[1].split(" GiB")[0])
    assert memory.SUGGEST_HEADROOM * 80 < peak <= 80
    assert f"note: the peak is {100 * peak / 80:.1f}% of the GPU: less than 5% headroom" in out
    assert plan.main(["--profile", "h100x2", "train.rollout.gpu_memory_utilization=0.5"]) == 0
    out = capsys.readouterr().out
    assert "less than 5% headroom" not in out
    notes = [line for line in out.splitlines() if line.startswith("note: train.rollout.gpu_memory_utilization=")]
    assert notes, out
    suggested = float(notes[0].split("=")[1].split()[0])
    assert plan.main(["--profile", "h100x2", f"train.rollout.gpu_memory_utilization={suggested}"]) == 0
    peak = float(capsys.readouterr().out.split("\npeak: ")[1].split(" GiB")[0])
    assert peak <= memory.SUGGEST_HEADROOM * 80  # the hint for a larger KV cache keeps headroom too
