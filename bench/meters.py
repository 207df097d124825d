"""Time, memory and FLOPs meters of the benchmarks.

Seconds of a GRPO step's stages are the trainer's own (grpo_step's metrics,
grpo_core.stages); StageMemory hears the same stage boundaries through
grpo_step(on_stage=...) and keeps each stage's memory peaks.
"""
from __future__ import annotations

import gc
import os
import threading
import time
from typing import Callable

GIB = 1024**3
H200_BF16_PEAK_FLOPS = 989e12  # dense bf16, SXM (the MFU denominator)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(kind: str = "allocated") -> float:
    """torch's peak since reset_peak(): 'allocated' (tensors) or 'reserved'
    (the caching allocator's segments). 0.0 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() if kind == "allocated" else torch.cuda.max_memory_reserved()) / GIB


def current_gib(kind: str = "allocated") -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return (torch.cuda.memory_allocated() if kind == "allocated" else torch.cuda.memory_reserved()) / GIB


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Timer:
    """with Timer() as t: ...  -> t.s (seconds; CUDA synchronized at both ends)."""

    def __init__(self, synchronize: bool = True) -> None:
        self.synchronize = synchronize
        self.s = 0.0

    def __enter__(self) -> "Timer":
        if self.synchronize:
            sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.synchronize:
            sync()
        self.s = time.perf_counter() - self._t0


class DeviceMemSampler:
    """Device-level memory in use (what nvidia-smi shows: torch's segments,
    the CUDA context, NCCL, cuBLAS workspaces, anything outside torch),
    polled every `interval` s on a daemon thread; `reset()` starts a new
    peak. NVML when importable, else cudaMemGetInfo; process RSS on CPU."""

    def __init__(self, interval: float = 0.02, host: bool = False) -> None:
        import torch

        self.interval = interval
        self._read: Callable[[], float]
        self.source = "rss"
        if host:  # this process's resident host memory, on any machine
            self._read = host_rss_gib
        elif torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                index = torch.cuda.current_device()
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
                if visible and visible.split(",")[index].strip().isdigit():
                    index = int(visible.split(",")[index])
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / GIB
                self.source = "nvml"
            except Exception:  # noqa: BLE001 - any NVML trouble: fall back
                def read() -> float:
                    free, total = torch.cuda.mem_get_info()
                    return (total - free) / GIB

                self._read = read
                self.source = "cudaMemGetInfo"
        else:
            import psutil

            proc = psutil.Process()
            self._read = lambda: proc.memory_info().rss / GIB
        self._peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-mem-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._peak = max(self._peak, self._read())
            except Exception:  # noqa: BLE001 - a sampler must never kill the benchmark
                pass
            time.sleep(self.interval)

    def now(self) -> float:
        return self._read()

    def reset(self) -> None:
        self._peak = self._read()

    def peak(self) -> float:
        self._peak = max(self._peak, self._read())
        return self._peak

    def stop(self) -> None:
        self._stop.set()


def _proc_status_gib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GIB  # kB
    return 0.0


def host_rss_gib() -> float:
    """Resident host memory of this process (pinned buffers included)."""
    return _proc_status_gib("VmRSS")


def host_hwm_gib() -> float:
    """The process's lifetime peak of resident host memory (VmHWM)."""
    return _proc_status_gib("VmHWM")


class StageMemory:
    """A grpo_step(on_stage=...) listener: per stage, the peaks of torch
    allocated/reserved, device memory and (with a host sampler) host RSS.
    `begin(name)` / `end()` meter phases outside the step (a checkpoint)."""

    def __init__(self, device: DeviceMemSampler, host: DeviceMemSampler | None = None) -> None:
        self.device, self.host = device, host
        self.stats: dict[str, dict[str, float]] = {}
        self._current: str | None = None

    def __call__(self, name: str) -> None:
        self.end()
        if name != "end":
            self.begin(name)

    def begin(self, name: str) -> None:
        self.end()
        reset_peak()
        self.device.reset()
        if self.host is not None:
            self.host.reset()
        self._current = name

    def end(self) -> None:
        if self._current is None:
            return
        s = self.stats.setdefault(self._current, {"calls": 0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0,
                                                  "peak_device_gib": 0.0, "peak_host_gib": 0.0})
        s["calls"] += 1
        s["peak_allocated_gib"] = max(s["peak_allocated_gib"], peak_gib("allocated"))
        s["peak_reserved_gib"] = max(s["peak_reserved_gib"], peak_gib("reserved"))
        s["peak_device_gib"] = max(s["peak_device_gib"], self.device.peak())
        if self.host is not None:
            s["peak_host_gib"] = max(s["peak_host_gib"], self.host.peak())
        self._current = None


# ---------------------------------------------------------------- FLOPs
def update_flops(n: int, n_trainable: int, *, lora: bool, recomputed: int) -> tuple[float, str]:
    """FLOPs per token of one policy update (forward + backward), and how
    they are counted. N = all parameters of the model (attention's
    length-dependent FLOPs left out, as in 6N). Full fine-tuning: 6N
    (forward 2N, activation grads 2N, weight grads 2N). LoRA: the frozen base
    has no weight grads, so 4N, plus the adapters' own 6 N_lora.
    Recomputation runs the forward of the recomputed decoder layers again:
    + 2 N_rec (`recomputed`: their parameters; all layers: ~2N)."""
    if lora:
        flops, how = 4 * n + 6 * n_trainable, "4N + 6 N_lora (frozen base: forward 2N + activation grads 2N)"
    else:
        flops, how = 6 * n, "6N (forward 2N + activation grads 2N + weight grads 2N)"
    if recomputed:
        flops, how = flops + 2 * recomputed, how + " + 2 N_rec (the recomputed layers' second forward)"
    return float(flops), f"{how}; N = {n:.4g}, N_lora = {n_trainable if lora else 0:.4g}, N_rec = {recomputed:.4g}"


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float = H200_BF16_PEAK_FLOPS) -> float:
    return tokens_per_s * flops_per_token / peak_flops
