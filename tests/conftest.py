"""Shared fixtures: the real MLflow server, the real local Slurm, and the
environment every in-process or child vLLM engine needs on CPU."""
from __future__ import annotations

import os
from pathlib import Path

from tests.mlflow_server import mlflow_server  # noqa: F401  (fixture)
from tests.slurm_harness import slurm_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
# GSM8K's test split (MIT, LICENSE beside it) ships with the tests: a user's
# clone has no ../shared.
GSM8K_DIR = REPO / "tests" / "data" / "gsm8k"

# vLLM on 2 CPU cores: engine in-process, a bounded KV cache, no reserved core.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a tracking server unless they start one.
os.environ.pop("MLFLOW_TRACKING_URI", None)
