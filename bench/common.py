"""Shared pieces of the benchmarks: result records, model-shape dirs, the
recipe config, and GSM8K-like response lengths (time, memory and FLOPs
meters are bench/meters.py).

Every benchmark writes one JSON file per figure (`record`). On CPU
(`--tiny`) the same code runs on a tiny Qwen2 so that a GPU run is never the
first run of a script.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench.meters import GIB

REPO = Path(__file__).resolve().parents[1]
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
                   help="results dir (default: $BENCH_OUT, else bench/results/local/<date>; --tiny: a temp dir)")
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
        path = REPO / "bench" / "results" / "local" / time.strftime('%Y-%m-%d', time.gmtime())
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


def data_label(path: str) -> str:
    """The data a record names: "synthetic" for none (data_path's ""), else the file relative to the repo
    when inside it (records travel between machines)."""
    if not path:
        return "synthetic"
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


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


RECIPE_GPU_GIB = 80.0  # the GPUs the recipes are written for (h100x2, h800x4)


def gpu_total_gib() -> float:
    """This GPU's memory; with no GPU, the recipe's 80 GiB (the CPU smoke runs plan for it)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else RECIPE_GPU_GIB


def recipe_vllm_fraction(recipe_fraction: float) -> float:
    """The gpu_memory_utilization that gives vLLM on this GPU the GiB a recipe's fraction gives it on an
    80 GiB GPU (an H200's 140 GiB would otherwise hand vLLM a larger KV cache than the recipe has)."""
    return min(0.9, recipe_fraction * RECIPE_GPU_GIB / gpu_total_gib())


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
    from grpo_core import modelshape

    return modelshape.shape_for(str(path)).params()


def recomputed_params(cfg, every_layer: bool = False) -> int:
    """Parameters of the decoder layers that recompute in backward (model.gradient_checkpointing,
    model.recompute_layers; every_layer: all of them when any): their forward runs twice."""
    from grpo_core import modelshape

    shape = modelshape.shape_for(cfg.model.path)
    count = cfg.model.recomputed(shape.layers)
    return (shape.layers if every_layer and count else count) * shape.layer_params()


# ---------------------------------------------------------------- the recipe
def profile(name: str):
    """A shipped profile (jobs/cluster_profiles/<name>.yaml) or a profile file, `extends` merged."""
    from jobs.profiles import load_profile

    return load_profile(name)


def recipe(name: str, overrides: Sequence[str]):
    """The profile's train: part + overrides -> a validated TrainConfig."""
    from grpo_core import config

    train = config.to_dict(profile(name).train)
    return config.validate(config.build(config.TrainConfig, config.apply_overrides(config.TrainConfig, train, list(overrides))))


# Row-count micro-batches with every layer recomputed (when gradient_checkpointing is on), for the
# benchmarks that set trainer.micro_batch_size themselves (train_step, planner_check): the recipe's
# token budgets and partial recomputation would otherwise override their micro-batches, and their
# rows are independent sequences, not prompt groups.
ROW_MICRO_BATCHES = ["trainer.micro_batch_tokens=0", "trainer.logprob_micro_batch_tokens=0", "model.recompute_layers=0",
                     "trainer.share_prompts=false"]


def bench_overrides(*, model_path: Path, tiny: bool, data: str, run_dir: Path) -> list[str]:
    """What every benchmark changes in the recipe: a dummy-weight model of the
    shape, one GPU (no offload: the H200 holds it), no tracking, local data."""
    ov = [f"model.path={model_path}", "model.load_format=dummy", f"trainer.device={'cpu' if tiny else 'cuda'}",
          "trainer.param_offload=false", "trainer.optimizer_offload=false", "tracking.enabled=false",
          f"trainer.run_dir={run_dir}", "rollout.tensor_parallel_size=1"]
    if tiny:  # bf16 matmuls are slow on CPUs without bf16 units; the smoke run checks code paths, not speed
        ov += ["model.dtype=float32", "model.share_base_weights=false"]  # vLLM's CPU weights cannot be shared
        ov += ["model.recompute_layers=0"]  # a count of the 14B shape's 48 layers: the tiny one has 2
    if data:
        ov += ["data.task=gsm8k", f"data.train_path={data}", "data.test_path="]
    else:
        ov += ["data.task=synthetic"]
    return ov


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Skip the first ids (byte tokens / specials) so that no prompt is mostly control tokens.
    low = min(260, max(0, vocab - 2))
    return torch.randint(low, vocab, (count, length), generator=g).tolist()


class ShapedLengths:
    """The trainer's engine (a grpo_core.engine.Engine) with GSM8K-like
    response lengths: dummy weights never emit EOS, so each prompt gets
    max_tokens drawn from normal(mean, sd), rounded and clipped to [lo,
    min(hi, max_tokens)] (and to `cap` when set), and ignore_eos. The draw is
    seeded by the prompt's rollout seed: a replayed step draws the same
    lengths. Set as Trainer.engine for the steps it shapes; everything but
    generate goes to the engine. `last` is the last call's (prompts, samples)."""

    def __init__(self, engine, mean: float, sd: float, lo: int, hi: int, seed: int) -> None:
        self.engine, self.mean, self.sd, self.lo, self.hi, self.seed = engine, mean, sd, lo, hi, seed
        self.cap: int | None = None
        self.limits: list[int] = []
        self.last: tuple[list[list[int]], list] = ([], [])

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seeds, ignore_eos=False):
        import numpy as np

        top = min(self.hi, max_tokens, self.cap or max_tokens)
        draw = lambda s: np.random.default_rng([self.seed, s]).normal(self.mean, self.sd)  # noqa: E731
        self.limits = [int(np.clip(np.rint(draw(s)), min(self.lo, top), top))
                       for s in (seeds if seeds is not None else range(len(prompts)))]
        samples = self.engine.generate(prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=self.limits,
                                       seeds=seeds, ignore_eos=True)
        self.last = (prompts, samples)
        return samples

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def describe(self) -> str:
        return f"normal({self.mean}, {self.sd}) clipped to [{self.lo}, {self.hi}]"
