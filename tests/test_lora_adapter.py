"""The adapter written for the engine (WeightSync.save_adapter): peft's names,
the engine's dtype, the trainer's values (lora_B carrying peft's scaling,
the config saying lora_alpha == r), loadable by safetensors and by peft; the
same bytes from 1 and 2 FSDP2 ranks, each of which writes its own copy."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

# Scaling 2: exact in any dtype, so the expected values are exact too. An odd
# rank: lora_A's rows split unevenly over 2 FSDP2 ranks.
RANK, ALPHA = 3, 6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def full_state(policy) -> dict[str, torch.Tensor]:
    """Random adapter weights (lora_B too, which peft starts at 0), the same on every rank."""
    g = torch.Generator().manual_seed(7)
    names = sorted((n, tuple(p.shape)) for n, p in policy.model.named_parameters() if p.requires_grad)
    return {n: torch.randn(shape, generator=g) * 0.1 for n, shape in names}


def worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from grpo_core import config, distributed
    from grpo_core.policy import Policy
    from grpo_core.weightsync import WeightSync

    info = distributed.init_distributed("cpu")
    for dtype in DTYPES:
        cfg = config.load(None, [f"model.path={model_dir}", f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}",
                                 f"model.dtype={dtype}"])
        torch.manual_seed(0)
        policy = Policy(model_dir, cfg.model, cfg.trainer, info, needs_reference=False)
        state = full_state(policy)
        target = Path(out) / f"{dtype}-w{world}-r{rank}"
        # A first version, then the real one over it (the file is rewritten in place).
        policy.load_trainable_state_dict({k: v * 3 for k, v in state.items()})
        sync = WeightSync(policy, target)
        sync.save_adapter(target)
        policy.load_trainable_state_dict(dict(state))  # a copy: loading fills the dict it is given
        sync.save_adapter(target)
        if rank == 0 and world == 1:
            torch.save(state, Path(out) / f"{dtype}-state.pt")
    distributed.barrier()
    distributed.shutdown()


def run_world(world: int, model_dir: Path, out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, str(model_dir), str(out)), nprocs=world, join=True, start_method="spawn")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from grpo_core.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("m") / "tiny"
    return build_tiny_model(path, [f"user\n{a} + {b}\nassistant\n#### {a + b}" for a in range(10) for b in range(10)])


@pytest.fixture(scope="module")
def written(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("adapters")
    run_world(1, model_dir, out)
    run_world(2, model_dir, out)
    return out


def peft_name(name: str) -> str:
    return name.replace(".default.", ".")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_written_adapter_is_the_trainers_in_engine_dtype(written, model_dir, dtype):
    from safetensors.torch import load_file

    state = torch.load(written / f"{dtype}-state.pt", weights_only=True)
    adapter_dir = written / f"{dtype}-w1-r0"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert set(tensors) == {peft_name(n) for n in state}
    assert len(tensors) == 2 * 7 * 2  # 2 layers x 7 linear modules x (A, B)
    for name, master in state.items():
        got = tensors[peft_name(name)]
        assert got.dtype == DTYPES[dtype], name
        scale = ALPHA / RANK if ".lora_B." in name else 1.0
        torch.testing.assert_close(got, (master * scale).to(DTYPES[dtype]), rtol=0, atol=0, msg=name)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (RANK, RANK, False)
    assert config["peft_type"] == "LORA" and isinstance(config["target_modules"], list)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_rank_writes_the_same_adapter(written, dtype):
    one = (written / f"{dtype}-w1-r0" / "adapter_model.safetensors").read_bytes()
    for rank in (0, 1):
        two = written / f"{dtype}-w2-r{rank}"
        assert (two / "adapter_model.safetensors").read_bytes() == one, f"world 2, rank {rank}"
        assert (two / "adapter_config.json").read_text() == (written / f"{dtype}-w1-r0" / "adapter_config.json").read_text()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_peft_loads_it_back_as_the_same_adapter(written, model_dir, dtype):
    """peft on the written folder == peft with the trainer's adapter (rounded to
    the engine's dtype) and the original lora_alpha."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    state = torch.load(written / f"{dtype}-state.pt", weights_only=True)
    rounded = {peft_name(k): v.to(DTYPES[dtype]).float() for k, v in state.items()}
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), written / f"{dtype}-w1-r0")
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0))
    set_peft_model_state_dict(reference, rounded)
    with torch.no_grad():
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3, "the adapter does not change the model: the test could not fail"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_write_safetensors_in_place_and_shrinking(tmp_path):
    from safetensors.torch import load_file

    from grpo_core.weightsync import write_safetensors

    path = tmp_path / "a.safetensors"
    big = {"x": torch.arange(1000, dtype=torch.float32).reshape(10, 100), "y": torch.ones(3, dtype=torch.bfloat16)}
    small = {"y": torch.full((2, 2), 2.0, dtype=torch.bfloat16), "x": torch.zeros(0)}
    for tensors in (big, small):
        size = write_safetensors(path, tensors, {"format": "pt"})
        assert size == path.stat().st_size
        back = load_file(path)
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            torch.testing.assert_close(back[k], v, rtol=0, atol=0)
