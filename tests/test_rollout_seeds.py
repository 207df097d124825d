"""Every sample of a step has its own random stream.

vLLM seeds sample j of a request at `seed + j`, and the trainer's per-prompt
seeds are consecutive (base + dataset index, train.rollout_seeds): passed
through unchanged, prompt i's sample j+1 and prompt i+1's sample j shared one
stream, so the same question at nearby indices (the synthetic task has 15)
got a near-copy of one group. RolloutEngine.generate spaces them by n.
"""
from __future__ import annotations

from grpo_core.config import RolloutConfig
from grpo_core.rollout import RolloutEngine, child_seed_base


class RecordingLLM:
    def __init__(self) -> None:
        self.params = []

    def generate(self, prompts, params, use_tqdm, lora_request):
        self.params = params
        return []


def test_child_streams_of_consecutive_prompt_seeds_are_distinct():
    eng = object.__new__(RolloutEngine)  # no vLLM engine: only the SamplingParams it builds are looked at
    eng.cfg, eng.on_cpu, eng.lora_rank = RolloutConfig(), True, 0
    eng._asleep = eng._weights_awake = eng._weights_shared = False
    eng._lora_version, eng._lora_path = 0, None
    eng.llm = RecordingLLM()
    n, base = 16, 12345
    eng.generate([[1, 2, 3]] * 64, n=n, temperature=1.0, top_p=1.0, max_tokens=4,
                 seeds=[base + i for i in range(64)])
    # vLLM's rule (v1/engine/parallel_sampling.ParentRequest): child j of a request seeded s is seeded s + j
    streams = [p.seed + j for p in eng.llm.params for j in range(p.n)]
    assert len(set(streams)) == len(streams) == 64 * n
    # still a pure function of the trainer's seed: a replayed step samples the same tokens
    assert [p.seed for p in eng.llm.params] == [child_seed_base(base + i, n) for i in range(64)]


def test_vllm_same_prompt_adjacent_seeds_are_not_shifted_copies(tmp_path):
    """On the real engine: one prompt at seeds s and s + 1 (as two nearby dataset rows of one
    question get). Before the spacing, group(s + 1)[j] == group(s)[j + 1] for every j."""
    from grpo_core.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", ["1 + 2", "3", "#### 3", "2 + 2 = 4"], hidden=64)
    eng = RolloutEngine(str(model), RolloutConfig(max_num_seqs=16), dtype="float32", seed=0, max_model_len=64)
    try:
        prompt = [1, 2, 3, 4]
        a, b = eng.generate([prompt, prompt], n=4, temperature=1.0, top_p=1.0, max_tokens=8, seeds=[100, 101],
                            ignore_eos=True)
        again = eng.generate([prompt], n=4, temperature=1.0, top_p=1.0, max_tokens=8, seeds=[100], ignore_eos=True)[0]
    finally:
        eng.close()
    tokens = lambda group: [s.token_ids for s in group]  # noqa: E731
    assert tokens(again) == tokens(a), "a seeded request must replay"
    assert len(set(tokens(a) + tokens(b))) == 8, (tokens(a), tokens(b))
