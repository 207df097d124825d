"""The one vLLM log line the rollout adapter drops: the rotary embedding's "Failed to load weights"."""
from __future__ import annotations

import logging

import pytest

from grpo_core.rollout import RELOAD_LOGGER, RotaryReloadFilter, quiet_rotary_reload


def _record(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    # as vllm/model_executor/model_loader/reload/layerwise.py logs it: logger.warning("%s: ...", name)
    return logging.LogRecord(RELOAD_LOGGER, level, "layerwise.py", 266, msg, args, None)


def test_the_filter_drops_the_rotary_message_and_passes_others() -> None:
    f = RotaryReloadFilter()
    assert not f.filter(_record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not f.filter(_record("%s: Failed to load weights", "YaRNScalingRotaryEmbedding"))
    assert f.filter(_record("%s: Failed to load weights", "QKVParallelLinear"))  # a real layer: a real problem
    assert f.filter(_record("%s: Delayed processing", "RotaryEmbedding"))
    assert f.filter(_record("RotaryEmbedding: Failed to load weights from /x"))


def test_installed_on_vllm_s_logger_once(caplog: pytest.LogCaptureFixture) -> None:
    quiet_rotary_reload()
    quiet_rotary_reload()
    logger = logging.getLogger(RELOAD_LOGGER)
    assert sum(isinstance(f, RotaryReloadFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=RELOAD_LOGGER):
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]
