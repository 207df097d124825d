"""GPU benchmarks of grpo_core against plain vLLM / HF + peft (see bench/README.md)."""
