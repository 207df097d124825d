"""Shared pieces of the benchmarks: result records, model-shape dirs, timers,
memory meters, the recipe config, and stopgaps for hooks grpo_core lacks.

Every benchmark writes one JSON file per figure (`record`). On CPU
(`--tiny`) the same code runs on a tiny Qwen2 so that a GPU run is never the
first run of a script.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib.metadata
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
H200_BF16_PEAK_FLOPS = 989e12  # dense bf16, SXM (the MFU denominator)
REQUIRED_FIELDS = ("metric", "value", "unit", "baseline", "baseline_value", "ratio", "hardware", "date", "command")

# Qwen2.5 shapes (config.json keys). vocab_size stays the real one even though
# the benchmark tokenizer is smaller: it sets the logits' size and the FLOPs.
SHAPES: dict[str, dict[str, Any]] = {
    "14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    # CPU smoke shapes: vLLM's CPU attention needs head_dim >= 32; vocab larger
    # than the tokenizer, as for the real shapes.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=False),
    "tiny-tied": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
}
TOKENIZER_VOCAB = {"14b": 8192, "1.5b": 8192, "tiny": 600, "tiny-tied": 600}
FALLBACK_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    'Let\'s think step by step and output the final answer after "####". #### 72',
]


# ---------------------------------------------------------------- environment
def setup_env(tiny: bool) -> None:
    """Before torch/vLLM start: in-process engine, no FlashInfer sampler, and
    on CPU a bounded KV cache and no reserved core (../shared/FACTS.md)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tiny:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny Qwen2 (no GPU)")
    p.add_argument("--out", default=None,
                   help="results dir (default: $BENCH_OUT, else bench/results/h200/<date>-local; --tiny: a temp dir)")
    p.add_argument("--profile", default="h100x2", help="jobs/cluster_profiles/<name>.yaml whose train: part is the recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TrainConfig override (repeatable), applied last")
    p.add_argument("--data", default=os.environ.get("BENCH_DATA", ""),
                   help="GSM8K train .jsonl (default: $BENCH_DATA, else ../shared/data/gsm8k/train.jsonl if present; "
                        "'none': the synthetic task)")
    p.add_argument("--shape-cache", default=os.environ.get("BENCH_SHAPES", str(Path(tempfile.gettempdir()) / "grpo-bench-shapes")),
                   help="where generated model-shape dirs (config + tokenizer) are kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix for every metric name (a second setting in the same results dir)")
    return p


METRIC_SUFFIX = ""  # --tag


def out_dir(args) -> Path:
    global METRIC_SUFFIX
    METRIC_SUFFIX = getattr(args, "tag", "") or ""
    if args.out:
        path = Path(args.out)
    elif os.environ.get("BENCH_OUT"):
        path = Path(os.environ["BENCH_OUT"])
    elif args.tiny:
        path = Path(tempfile.gettempdir()) / "grpo-bench-tiny"
    else:
        path = REPO / "bench" / "results" / "h200" / f"{time.strftime('%Y-%m-%d', time.gmtime())}-local"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_path(arg: str) -> str:
    """The GSM8K train file, or "" (then the recipe falls back to the synthetic task)."""
    if arg == "none":
        return ""
    candidates = [arg] if arg else [
        str(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"),
        str(REPO / "shared" / "data" / "gsm8k" / "train.jsonl"),
        str(REPO / "data" / "gsm8k" / "train.jsonl"),
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return str(Path(c).resolve())
    if arg:
        raise SystemExit(f"--data {arg}: no such file")
    return ""


# ---------------------------------------------------------------- records
_HARDWARE: str | None = None
WRITTEN: set[str] = set()  # metrics recorded by this process (a later failure must not overwrite them)


def _version(pkg: str) -> str:
    for dist in (pkg, f"{pkg}-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def hardware() -> str:
    global _HARDWARE
    if _HARDWARE is None:
        import torch

        soft = (f"torch {torch.__version__}, vllm {_version('vllm')}, transformers {_version('transformers')}, "
                f"peft {_version('peft')}")
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            total = torch.cuda.get_device_properties(0).total_memory / GIB
            driver = "unknown"
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20)
                driver = out.stdout.strip().splitlines()[0] if out.stdout.strip() else driver
            except (OSError, subprocess.SubprocessError):
                pass
            _HARDWARE = (f"{name} ({total:.0f} GiB) x{torch.cuda.device_count()}, driver {driver}, "
                         f"CUDA {torch.version.cuda}, {soft}")
        else:
            _HARDWARE = f"cpu (tiny smoke, {os.cpu_count()} cores), {soft}"
    return _HARDWARE


def _git_sha() -> str:
    if os.environ.get("BENCH_GIT_SHA"):
        return os.environ["BENCH_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def record(metric: str, value: float | None, unit: str, baseline: str, baseline_value: float | None, out_dir: Path,
           *, higher_is_better: bool = True, **extra: Any) -> dict[str, Any]:
    """Write <out_dir>/<metric>.json: one figure, ours next to its baseline.

    ratio = value / baseline_value always; `higher_is_better` says which way
    is good (for seconds and GiB, a ratio < 1 means ours is better)."""
    WRITTEN.add(metric)  # by its untagged name, as callers ask
    metric += METRIC_SUFFIX
    ratio = None
    if value is not None and baseline_value not in (None, 0):
        ratio = float(value) / float(baseline_value)
    rec = {
        "metric": metric, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
        "ratio": ratio, "higher_is_better": higher_is_better, "hardware": hardware(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", _module_name()] + sys.argv[1:]),
        "git_sha": _git_sha(), **extra,
    }
    rec = _clean(rec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{metric}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
    show = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, (int, float)) else str(v))  # noqa: E731
    print(f"[bench] {metric}: {show(value)} {unit} | {baseline}: {show(baseline_value)} | ratio {show(ratio)}", flush=True)
    return rec


def record_error(metric: str, unit: str, out_dir: Path, exc: BaseException, **extra: Any) -> dict[str, Any]:
    """A figure that could not be measured: value null and the error, so a
    missing number is never silent."""
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print(tb, file=sys.stderr, flush=True)
    return record(metric, None, unit, "n/a (failed)", None, out_dir, error=f"{type(exc).__name__}: {exc}"[:2000],
                  traceback=tb[-4000:], **extra)


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else Path(sys.argv[0]).name


# ---------------------------------------------------------------- model shapes
def corpus_from(data: str, limit: int = 3000) -> list[str]:
    if not data:
        return list(FALLBACK_CORPUS) * 4
    from grpo_core.data import PROMPT_SUFFIX

    texts = []
    with open(data, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= limit:
                break
            if line.strip():
                row = json.loads(line)
                texts.append(f"user\n{row['question']} {PROMPT_SUFFIX}\nassistant\n{row['answer']}")
    return texts or list(FALLBACK_CORPUS)


def make_shape_dir(path: str | Path, shape: str = "14b", corpus: Iterable[str] | None = None,
                   layers: int | None = None) -> Path:
    """A model dir without weights: Qwen2 config.json of `shape`, a
    generation_config.json and a byte-level BPE tokenizer (smaller than the
    vocabulary; the ids above it are never fed in, and vLLM decodes them to
    nothing). Weights come from vLLM's load_format="dummy" and the trainer's
    random init. `layers` reduces (or grows) the depth at the shape's widths.
    Reused when already built for the same shape."""
    from grpo_core.tiny import train_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    path = Path(path)
    marker = path / "bench_shape.txt"
    label = shape if layers is None else f"{shape} layers={layers}"
    if marker.is_file() and marker.read_text().strip() == label and (path / "config.json").is_file():
        return path
    tok = train_tokenizer(list(corpus) if corpus is not None else FALLBACK_CORPUS, vocab_size=TOKENIZER_VOCAB[shape],
                          full_byte_alphabet=True)
    s = dict(SHAPES[shape], **({} if layers is None else {"num_hidden_layers": int(layers)}))
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0, "hidden_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": s["num_hidden_layers"],
        "use_cache": True, "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "transformers_version": "4.43.1", **s,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "transformers_version": "4.43.1"},
            indent=1) + "\n")
        tok.save_pretrained(tmp)
        (tmp / "bench_shape.txt").write_text(label + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def shape_dir(args, shape: str, data: str = "", layers: int | None = None) -> Path:
    name = shape if layers is None else f"{shape}-{layers}l"
    return make_shape_dir(Path(args.shape_cache) / name, shape, corpus_from(data), layers)


def n_params(path: str | Path) -> int:
    """Total parameters of the shape (the N of 6N FLOPs per token)."""
    from grpo_core import memory

    return memory.shape_for(str(path)).params()


def mfu(tokens_per_s: float, n: int, peak_flops: float = H200_BF16_PEAK_FLOPS) -> float:
    return tokens_per_s * 6 * n / peak_flops


# ---------------------------------------------------------------- the recipe
def _read_profile(name: str) -> dict[str, Any]:
    """The profile's raw data with `extends` merged (as jobs.profiles does),
    read here so that the benchmarks need neither submitit nor mlflow."""
    from grpo_core.config import read_yaml

    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else REPO / "jobs" / "cluster_profiles" / f"{name}.yaml"
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent:
        base = _read_profile(str(path.parent / f"{parent}.yaml") if not str(parent).endswith((".yaml", ".yml")) else parent)
        data = _merge(base, data)
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe(profile: str, overrides: Sequence[str]):
    """The profile's train: part + overrides -> a validated TrainConfig."""
    from grpo_core import config

    train = _read_profile(profile).get("train") or {}
    return config.validate(config.build(config.TrainConfig, config.apply_overrides(config.TrainConfig, train, list(overrides))))


def bench_overrides(*, model_path: Path, tiny: bool, data: str, run_dir: Path) -> list[str]:
    """What every benchmark changes in the recipe: a dummy-weight model of the
    shape, one GPU (no offload: the H200 holds it), no tracking, local data."""
    ov = [f"model.path={model_path}", "model.load_format=dummy", f"trainer.device={'cpu' if tiny else 'cuda'}",
          "trainer.param_offload=false", "trainer.optimizer_offload=false", "tracking.enabled=false",
          f"trainer.run_dir={run_dir}", "rollout.tensor_parallel_size=1"]
    if tiny:  # bf16 matmuls are slow on CPUs without bf16 units; the smoke run checks code paths, not speed
        ov += ["model.dtype=float32", "model.share_base_weights=false"]  # vLLM's CPU weights cannot be shared
    if data:
        ov += ["data.task=gsm8k", f"data.train_path={data}", "data.test_path="]
    else:
        ov += ["data.task=synthetic"]
    return ov


# ---------------------------------------------------------------- stopgaps for grpo_core
def from_config(config_or_path, *, dtype, device, attn_implementation: str = "sdpa"):
    """A random-init HF causal LM built directly on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_or_path if not isinstance(config_or_path, (str, Path)) else AutoConfig.from_pretrained(str(config_or_path))
    with torch.device(device):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            return AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation=attn_implementation)


def policy_supports_dummy() -> bool:
    from grpo_core.policy import Policy

    return "load_format" in inspect.getsource(Policy.__init__)


@contextlib.contextmanager
def dummy_weights(device) -> Iterable[None]:
    """Until grpo_core.policy.Policy builds from the config itself for
    model.load_format=dummy: inside this block from_pretrained(path) becomes
    from_config(path's config) on `device` (random init, no checkpoint read)."""
    if policy_supports_dummy():
        yield
        return
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.__dict__["from_pretrained"]

    def fake(cls, path, *args, dtype=None, torch_dtype=None, attn_implementation="sdpa", **kwargs):
        return from_config(path, dtype=dtype or torch_dtype, device=device, attn_implementation=attn_implementation)

    AutoModelForCausalLM.from_pretrained = classmethod(fake)
    try:
        yield
    finally:
        AutoModelForCausalLM.from_pretrained = original


def engine_supports_ignore_eos(engine) -> bool:
    return "ignore_eos" in inspect.signature(type(engine).generate).parameters


def engine_generate(engine, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                    max_tokens: int | Sequence[int], seeds: list[int] | None, ignore_eos: bool = False):
    """RolloutEngine.generate with per-prompt max_tokens and ignore_eos.

    Calls the engine's own generate when it takes them (the proposed
    grpo_core.rollout patch); until then a line-for-line copy of its body
    with the two extras, so that dummy-weight rollouts have GSM8K-like
    lengths."""
    if engine_supports_ignore_eos(engine):  # the class's method: the instance's may be a benchmark wrapper
        return type(engine).generate(engine, prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                     seeds=seeds, ignore_eos=ignore_eos)
    from vllm import SamplingParams

    from grpo_core.engine import Sample

    limits = [int(max_tokens)] * len(prompts) if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
    params = [
        SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=limits[i], ignore_eos=ignore_eos,
                       seed=None if seeds is None else seeds[i], detokenize=True)
        for i in range(len(prompts))
    ]
    outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                  lora_request=engine._lora_request())
    return [[Sample(tuple(c.token_ids), c.text, c.finish_reason == "length") for c in out.outputs] for out in outputs]


# ---------------------------------------------------------------- time and memory
def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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


class StagePeaks:
    """A grpo_step(on_stage=...) callback: per stage, seconds and the peaks
    of torch allocated/reserved, device memory and host RSS (samplers).
    `begin(name)` / `end()` meter stages outside the step (a checkpoint)."""

    def __init__(self, device: "DeviceMemSampler", host: "DeviceMemSampler") -> None:
        self.device, self.host = device, host
        self.stats: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        self._t0 = 0.0

    def __call__(self, name: str) -> None:
        self.end()
        if name != "end":
            self.begin(name)

    def begin(self, name: str) -> None:
        self.end()
        reset_peak()
        self.device.reset()
        self.host.reset()
        self._current, self._t0 = name, time.perf_counter()

    def end(self) -> None:
        if self._current is None:
            return
        sync()
        s = self.stats.setdefault(self._current, {"seconds": 0.0, "calls": 0, "peak_allocated_gib": 0.0,
                                                  "peak_reserved_gib": 0.0, "peak_device_gib": 0.0,
                                                  "peak_host_gib": 0.0})
        s["seconds"] += time.perf_counter() - self._t0
        s["calls"] += 1
        s["peak_allocated_gib"] = max(s["peak_allocated_gib"], peak_gib("allocated"))
        s["peak_reserved_gib"] = max(s["peak_reserved_gib"], peak_gib("reserved"))
        s["peak_device_gib"] = max(s["peak_device_gib"], self.device.peak())
        s["peak_host_gib"] = max(s["peak_host_gib"], self.host.peak())
        self._current = None


class StageMeter:
    """Wraps functions as named stages: seconds, and per-stage peaks of torch
    allocated / reserved memory and of device memory (DeviceMemSampler).
    A stage entered several times keeps the sum of times and the max peaks."""

    def __init__(self, sampler: DeviceMemSampler | None) -> None:
        self.sampler = sampler
        self.stats: dict[str, dict[str, float]] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            reset_peak()
            if self.sampler is not None:
                self.sampler.reset()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                s = self.stats.setdefault(name, {"seconds": 0.0, "calls": 0, "peak_allocated_gib": 0.0,
                                                 "peak_reserved_gib": 0.0, "peak_device_gib": 0.0})
                s["seconds"] += time.perf_counter() - t0
                s["calls"] += 1
                s["peak_allocated_gib"] = max(s["peak_allocated_gib"], peak_gib("allocated"))
                s["peak_reserved_gib"] = max(s["peak_reserved_gib"], peak_gib("reserved"))
                if self.sampler is not None:
                    s["peak_device_gib"] = max(s["peak_device_gib"], self.sampler.peak())

        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped

    def clear(self) -> None:
        self.stats.clear()


@contextlib.contextmanager
def patched(obj, name: str, value) -> Iterable[None]:
    """Set obj.name = value for the block (a module global, an attribute)."""
    if not hasattr(obj, name):
        raise AttributeError(f"{getattr(obj, '__name__', obj)!r} has no attribute {name!r}: grpo_core changed; update bench/")
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Skip the first ids (byte tokens / specials) so that no prompt is mostly control tokens.
    low = min(260, max(0, vocab - 2))
    return torch.randint(low, vocab, (count, length), generator=g).tolist()
