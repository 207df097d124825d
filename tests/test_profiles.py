"""Profiles: shipped recipes, extends, overrides, strict one-line errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from grpo_core.config import ConfigError
from jobs import profiles
from jobs.profiles import dump_profile, list_profiles, load_profile, load_resolved

SHIPPED = tuple(list_profiles([profiles.BUILTIN_DIR]))


def _error(name: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_profile(name, overrides or [])
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_describe_themselves(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name and profile.description
    assert "\n" not in profile.description


def test_local_and_slurm_cpu_share_the_tiny_recipe() -> None:
    local, cpu = load_profile("local"), load_profile("slurm-cpu")
    assert local.cluster.launcher == "local" and cpu.cluster.launcher == "slurm"
    assert local.train == cpu.train
    t = local.train
    assert (t.model.path, t.model.tiny, t.data.task) == ("runs/tiny-model", True, "synthetic")
    assert (t.rollout.n, t.rollout.max_tokens, t.trainer.total_steps) == (16, 4, 150)
    assert (t.trainer.prompts_per_step, t.trainer.mini_batch_prompts, t.trainer.micro_batch_size) == (64, 32, 256)
    assert (t.optim.lr, t.optim.beta2, t.optim.grad_clip, t.algorithm.kl_coef, t.checkpoint.every) == (1.5e-3, 0.99, 0.2, 0.0, 25)


def test_h100x2_is_the_lora_seed_recipe() -> None:
    p = load_profile("h100x2")
    m, t, r, a = p.train.model, p.train.trainer, p.train.rollout, p.train.algorithm
    assert m.path == "Qwen/Qwen2.5-14B-Instruct" and m.dtype == "bfloat16"
    assert (m.lora_rank, m.lora_alpha, m.lora_target_modules, m.gradient_checkpointing) == (32, 32, "all-linear", True)
    assert (t.prompts_per_step, t.mini_batch_prompts, r.n) == (116, 116, 5)
    assert (p.train.optim.lr, a.kl_coef, a.kl_estimator, a.entropy_coef) == (3e-5, 0.001, "k3", 0.001)
    assert (p.train.data.max_prompt_tokens, r.max_tokens) == (512, 1024)
    assert (t.param_offload, t.optimizer_offload, m.share_base_weights, r.sleep_level) == (False, False, True, 1)
    assert (r.gpu_memory_utilization, r.max_num_seqs) == (0.7, 512)
    assert (p.cluster.gpus_per_node, p.cluster.tasks_per_node) == (2, 2)
    assert p.train.data.train_path == "data/gsm8k/train.jsonl"
    assert p.cluster.signal_lead_s >= 300  # minutes for a 14B step + checkpoint, not submitit's 90 s


def test_h800x4_is_the_full_finetune_seed_recipe_and_inherits() -> None:
    p, base = load_profile("h800x4"), load_profile("h100x2")
    t, r = p.train.trainer, p.train.rollout
    assert p.train.model.lora_rank == 0 and p.train.optim.lr == 1e-6
    assert (t.prompts_per_step, t.mini_batch_prompts, t.micro_batch_size, r.n) == (1024, 256, 16, 5)
    assert (r.tensor_parallel_size, r.gpu_memory_utilization) == (1, 0.8)  # one engine per GPU
    assert p.cluster.gpus_per_node == 4 and p.train.checkpoint.every > 0
    assert (t.param_offload, t.optimizer_offload, p.train.model.share_base_weights, r.sleep_level) == (True, True, False, 2)
    assert p.train.data == base.train.data and p.cluster.env == base.cluster.env  # via extends
    assert p.description != base.description  # descriptions are not inherited


def test_a_lora_setting_cannot_reach_the_full_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """h100x2 and h800x4 extend a common base (_qwen14b), not each other: a knob added to
    the LoRA recipe stays there."""
    files: list[Path] = []
    profiles._read_raw(profiles.find_profile("h800x4"), files=files)
    assert [f.stem for f in files] == ["h800x4", "_qwen14b"]
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("_qwen14b", "h100x2", "h800x4"):
        text = (profiles.BUILTIN_DIR / f"{name}.yaml").read_text()
        (mine / f"{name}.yaml").write_text(text.replace("    lora_alpha: 32\n", "    lora_alpha: 64\n"))
    monkeypatch.setenv(profiles.PROFILES_ENV, str(mine))
    assert load_profile("h100x2").train.model.lora_alpha == 64
    assert load_profile("h800x4").train.model.lora_alpha == 32  # the default (it was 64 while h800x4 extended h100x2)


def test_bases_are_found_but_not_listed() -> None:
    assert "_qwen14b" not in list_profiles() and profiles.find_profile("_qwen14b").is_file()
    assert "_qwen14b" not in _error("nope")


def test_overrides_use_dotted_keys_for_both_parts() -> None:
    p = load_profile("h100x2", ["cluster.partition=big", "train.rollout.n=8", "cluster.time=1:30:00",
                                "cluster.env.NCCL_DEBUG=INFO", "cluster.sbatch.exclusive=true",
                                "cluster.sbatch.constraint=h100"])
    assert p.cluster.partition == "big" and p.train.rollout.n == 8 and p.cluster.time_min == 90
    assert p.cluster.time == "1:30:00"  # kept as written; time_min is what Slurm applies
    assert p.cluster.env_map()["NCCL_DEBUG"] == "INFO"
    assert p.cluster.env_map()["PYTHONUNBUFFERED"] == "1"  # one entry changed, the rest kept
    assert p.cluster.sbatch_map() == {"exclusive": True, "constraint": "h100"}


@pytest.mark.parametrize("override, needle", [
    ("cluster.partitio=x", "valid keys under 'cluster': account, cpus_per_task"),
    ("train.rollout.nn=8", "valid keys under 'train.rollout'"),
    ("foo.bar=1", "keys start with 'cluster.' or 'train.'"),
    ("train.rollout.n=eight", "expected int"),
    ("cluster.nodes=0", "must be >= 1"),
    ("cluster.launcher=k8s", "valid values: slurm, local"),
    ("cluster.template=nope", "valid values: grpo"),
    ("cluster.signal_lead_s=50000", "at most half of cluster.time ('1-00:00:00': 1440 min)"),
    ("train.rollout.tensor_parallel_size=8", "each rank needs the whole base"),
    ("train.trainer.mini_batch_prompts=100", "does not divide"),
    ("train.trainer.logprob_micro_batch_size=-1", "0: the same as trainer.micro_batch_size"),
    ("cluster.sbatch.signal=USR1@60", "submitit sets --signal itself"),
    ("cluster.sbatch.output=x.log", "submitit sets --output itself"),
    ("cluster.sbatch.partition=x", "use cluster.partition"),
    ("cluster.env.MLFLOW_TRACKING_TOKEN=abc", "looks like a secret"),
    ("cluster.env.HF_TOKEN=abc", "looks like a secret"),
    ("cluster.env.1BAD=abc", "NAME=VALUE"),
    ("cluster.setup=export WANDB_API_KEY=abc", "secret"),
    ("train.tracking.tracking_uri=https://me:pw@mlflow.example", "credentials"),
])
def test_bad_overrides_are_one_line_errors(override: str, needle: str) -> None:
    message = _error("h100x2", [override])
    assert message.startswith("profile h100x2: ") and needle in message


def test_tensor_parallel_beyond_the_node_is_rejected() -> None:
    message = _error("h800x4", ["train.rollout.tensor_parallel_size=8"])
    assert message.startswith("profile h800x4: ") and "exceeds" in message


def test_tensor_parallel_engines_with_several_ranks_are_rejected() -> None:
    message = _error("h800x4", ["train.rollout.tensor_parallel_size=4"])
    assert message.startswith("profile h800x4: ") and "4 training ranks" in message
    assert "use rollout.tensor_parallel_size=1" in message and "\n" not in message
    # one rank may drive a tensor-parallel engine over the node's GPUs
    assert load_profile("h800x4", ["cluster.tasks_per_node=1", "train.rollout.tensor_parallel_size=4"])


def test_tokenizers_parallelism_is_not_a_secret() -> None:
    assert load_profile("local", ["cluster.env.TOKENIZERS_PARALLELISM=true"]).cluster.env_map()


def test_unknown_profile_lists_the_known_ones() -> None:
    message = _error("nope")
    assert "unknown profile 'nope'" in message and all(name in message for name in SHIPPED)


def test_profile_file_errors(tmp_path: Path) -> None:
    bad_top = _write(tmp_path, "top", "clusterr: {}\n")
    assert "valid keys under '<top>': cluster, description, extends, train" in _error(str(bad_top))
    bad_key = _write(tmp_path, "key", "cluster: {partitionn: x}\n")
    assert "unknown key 'cluster.partitionn'" in _error(str(bad_key))
    bad_type = _write(tmp_path, "type", "train: {rollout: {n: [1]}}\ncluster: {launcher: local}\n")
    assert "train.rollout.n: expected int" in _error(str(bad_type))
    _write(tmp_path, "a", "extends: b.yaml\n")
    _write(tmp_path, "b", "extends: a.yaml\n")
    assert "extends cycle" in _error(str(tmp_path / "a.yaml"))
    orphan = _write(tmp_path, "orphan", "extends: nothere\n")
    assert "unknown profile 'nothere'" in _error(str(orphan))
    assert "not valid YAML" in _error(str(_write(tmp_path, "yaml", "cluster: [\n")))
    assert "profile file not found" in _error(str(tmp_path / "missing.yaml"))


def test_user_profiles_folder_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    _write(mine, "bigq", "description: my cluster\nextends: h100x2\ncluster: {partition: bigq, account: lab}\n")
    _write(mine, "local", "description: shadowed local\nextends: slurm-cpu\n")
    monkeypatch.setenv(profiles.PROFILES_ENV, f"{tmp_path / 'absent'}:{mine}")
    found = list_profiles()
    assert found["bigq"] == mine / "bigq.yaml" and found["local"] == mine / "local.yaml"
    assert found["h100x2"].parent == profiles.BUILTIN_DIR
    p = load_profile("bigq")
    assert (p.cluster.partition, p.cluster.account, p.train.model.lora_rank) == ("bigq", "lab", 32)
    assert load_profile(str(mine / "bigq.yaml")).cluster.account == "lab"
    assert load_profile("local").cluster.launcher == "slurm"  # the user's folder wins


def test_env_and_sbatch_as_yaml_mappings(tmp_path: Path) -> None:
    path = _write(tmp_path, "m", "extends: slurm-cpu\ncluster:\n  env: {A: 'x y', B: 2}\n"
                                 "  sbatch: {exclusive: true, constraint: skylake, reservation: false}\n")
    c = load_profile(str(path)).cluster
    assert c.env_map() == {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "A": "x y", "B": "2"}
    assert c.sbatch_map() == {"exclusive": True, "constraint": "skylake"}


@pytest.mark.parametrize("name", SHIPPED)
def test_resolved_profile_round_trips(name: str, tmp_path: Path) -> None:
    p = load_profile(name, ["cluster.sbatch.exclusive=true", "cluster.env.X=a=b"])
    path = tmp_path / "profile.yaml"
    path.write_text(dump_profile(p))
    back = load_resolved(path)
    assert dataclasses.replace(back, source="") == dataclasses.replace(p, source="")


@pytest.mark.parametrize("yaml_value, minutes", [
    ("90", 90),             # a YAML number: sbatch's MM form
    ("'90'", 90),
    ("4:00:00", 240),       # unquoted: YAML 1.1 would read the base-60 int 14400, i.e. 14400 minutes
    ("90:00", 90),          # MM:SS
    ("2-00:00:00", 2880),
    ("1-12", 2160),
    ("0:04:30", 5),         # Slurm rounds seconds up to the minute
])
def test_cluster_time_in_slurm_forms_from_yaml(yaml_value: str, minutes: int, tmp_path: Path) -> None:
    path = _write(tmp_path, "mine", f"extends: slurm-cpu\ncluster:\n  time: {yaml_value}\n")
    profile = load_profile(str(path))
    assert profile.cluster.time_min == minutes
    assert f"#SBATCH --time={minutes}\n" in _script(profile)
    assert load_resolved(_write(tmp_path, "again", dump_profile(profile))).cluster == profile.cluster


def test_cluster_time_old_spelling_still_reads(tmp_path: Path) -> None:
    """time_min (whole minutes) was the key before cluster.time: old profiles and run dirs keep working."""
    assert load_profile("h100x2", ["cluster.time_min=45"]).cluster.time_min == 45
    old = _write(tmp_path, "old", "extends: h100x2\ncluster:\n  time_min: 30\n")
    assert load_profile(str(old)).cluster.time == "30"  # and it overrides the parent's cluster.time
    resolved = dump_profile(load_profile("slurm-cpu")).replace("  time: '30'\n", "  time_min: 30\n")
    assert "time_min: 30" in resolved  # a run dir's profile.yaml from before cluster.time (resubmit reads it)
    assert load_resolved(_write(tmp_path, "run", resolved)).cluster.time_min == 30
    both = _write(tmp_path, "both", "extends: h100x2\ncluster:\n  time_min: 30\n  time: '1:00:00'\n")
    with pytest.raises(ConfigError, match="cluster.time_min is the old name of cluster.time; set only cluster.time"):
        load_profile(str(both))


def _script(profile: profiles.Profile) -> str:
    from jobs.render import RunSpec, render_sbatch

    return render_sbatch(profile, RunSpec(name="t", run_dir="/shared/runs/t", workdir="/shared", python="python3"))
