"""grpo_core: a GRPO trainer for causal LMs (vLLM rollouts, FSDP2 updates)."""
