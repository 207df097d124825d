"""Choices and sizes that torch code implements and torch-free code must know: one
definition each. config validates the choices and --help lists them; memory and jobs.plan
model the chunk sizes; algorithm and policy implement both and import them from here
(config and the CLIs never import torch).
"""
from __future__ import annotations

DTYPES = ("float32", "bfloat16")  # model.dtype: torch's names (policy maps them to torch dtypes)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
HEAD_CHUNK_TOKENS = 1024  # tokens per LM-head chunk (algorithm.lm_head_logprobs)
LOGPROB_CHUNK = 256  # full-logits path: positions per log-softmax chunk (algorithm.token_logprobs)
