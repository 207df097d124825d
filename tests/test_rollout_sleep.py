"""RolloutEngine's sleep/wake bookkeeping, at the boundary to vLLM (a fake
LLM records what the adapter asks of it). vLLM's CPU backend has no sleep
mode, so the GPU runs (bench/) exercise the real calls; this pins down which
calls are made in which state, e.g. that a shared base is never put to sleep,
through any number of cycles."""
from __future__ import annotations

from torch import nn

from grpo_core import rollout
from grpo_core.config import RolloutConfig
from grpo_core.rollout import RolloutEngine


class FakeWorker:
    def __init__(self) -> None:
        model = nn.Module()
        model.qkv_proj = nn.Linear(4, 12, bias=False)
        self.model_runner = type("Runner", (), {"get_model": lambda _self: model})()


class FakeLLM:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.worker = FakeWorker()

    def collective_rpc(self, fn, args=(), kwargs=None):
        self.calls.append(fn.__name__)
        return [fn(self.worker)] if fn is rollout._engine_weights else [None]

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({tags})")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, params, use_tqdm, lora_request):
        self.calls.append("generate")
        return []


def engine(sleep_level: int) -> RolloutEngine:
    eng = object.__new__(RolloutEngine)  # no vLLM engine: the fake stands in for it
    eng.cfg, eng.on_cpu, eng.lora_rank = RolloutConfig(sleep_level=sleep_level), False, 8
    eng._asleep = eng._weights_awake = eng._weights_shared = False
    eng._lora_version, eng._lora_path = 0, None
    eng.llm = FakeLLM()
    return eng


def test_shared_base_only_ever_releases_the_kv_cache():
    eng = engine(sleep_level=1)
    views = eng.share_weights({"q_proj.weight": (4, 4), "k_proj.weight": (4, 4), "v_proj.weight": (4, 4)})
    assert views["k_proj.weight"].data_ptr() == eng.llm.worker.model_runner.get_model().qkv_proj.weight.data_ptr() + 16 * 4
    eng.llm.calls.clear()
    for _ in range(3):  # a rollout, then the update, per step
        eng.sleep()
        assert not eng.discards_weights
        eng.wake_weights()  # what a sync does first: nothing to wake, the weights never slept
        eng.wake_up()
    assert eng.llm.calls == ["reset_prefix_cache", "_release_kv_cache", "_wake_kv_cache"] * 3


def test_own_base_sleeps_through_vllm_and_wakes_weights_before_the_kv_cache():
    eng = engine(sleep_level=2)
    eng.sleep()
    eng.sleep()  # already asleep: no second call
    assert eng.discards_weights
    eng.wake_weights()
    eng.wake_up()
    assert eng.llm.calls == ["sleep(2)", "wake_up(['weights'])", "wake_up(['kv_cache'])"]


def test_generate_on_a_sleeping_engine_wakes_it_first():
    eng = engine(sleep_level=1)
    eng.sleep()
    eng.generate([], n=1, temperature=1.0, top_p=1.0, max_tokens=4, seeds=None)
    assert eng.llm.calls == ["sleep(1)", "wake_up(None)", "generate"]


def test_sleep_level_zero_never_sleeps():
    eng = engine(sleep_level=0)
    eng.sleep()
    eng.wake_up()
    assert eng.llm.calls == []
