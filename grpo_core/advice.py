"""What jobs.plan advises: the plan of a step (grpo_core.memory) and, when it
does not fit, the changes that make it fit with SUGGEST_HEADROOM; when it
fits, the largest token budgets and fewest recomputed layers. Searches over
memory.build, nothing else: pure arithmetic."""
from __future__ import annotations

import dataclasses
from typing import Any

from .config import ConfigError, check_layout, validate
from .memory import SUGGEST_HEADROOM, Knobs, Plan, build
from .modelshape import ModelShape


def largest_budget(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs,
                   key: str, step: int = 256) -> tuple[int, float] | None:
    """The largest token budget for `key` (trainer.micro_batch_tokens or trainer.logprob_micro_batch_tokens)
    whose plan keeps SUGGEST_HEADROOM, and its peak: a multiple of `step` tokens (or one sequence), at
    most a rank's whole mini-batch (the update) or batch (the no-grad passes). None: not even one sequence."""
    t, seq = cfg.trainer, cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
    prompts = t.mini_batch_prompts if key == "trainer.micro_batch_tokens" else t.prompts_per_step
    most = -(-prompts * cfg.rollout.n // gpus) * seq
    sizes = [seq] + list(range(-(-seq // step) * step, most, step)) + [most]
    sizes = sorted(set(x for x in sizes if seq <= x <= most))
    peak = lambda i: build(name, shape, with_setting(cfg, key, sizes[i]), gpus, mem, k)  # noqa: E731
    lo, hi, best = 0, len(sizes) - 1, None  # the peak grows with the budget: bisect
    while lo <= hi:
        mid = (lo + hi) // 2
        q = peak(mid)
        if roomy(q):
            best, lo = (sizes[mid], q.peak_gib), mid + 1
        else:
            hi = mid - 1
    return best


def fewest_recomputed(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs,
                      above: int = 0) -> tuple[int, float] | None:
    """The fewest recomputed layers (the first ones; more than `above`, fewer than all, which is
    gradient_checkpointing's own) whose plan keeps SUGGEST_HEADROOM, and its peak; None if none does."""
    ckpt = with_setting(cfg, "model.gradient_checkpointing", True)
    lo, hi, best = above + 1, shape.layers - 1, None
    while lo <= hi:  # the peak falls with each recomputed layer: bisect
        mid = (lo + hi) // 2
        q = build(name, shape, with_setting(ckpt, "model.recompute_layers", mid), gpus, mem, k)
        if roomy(q):
            best, hi = (mid, q.peak_gib), mid - 1
        else:
            lo = mid + 1
    return best


def roomy(p: Plan) -> bool:
    """Fits with SUGGEST_HEADROOM: what advice may propose."""
    return p.fits and p.peak_gib <= SUGGEST_HEADROOM * p.gpu_mem_gib


def with_setting(cfg: Any, key: str, value: Any) -> Any:
    """cfg with one dotted key (section.name) set: how every candidate change is tried."""
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def _excess(p: Plan) -> float:
    """How far a plan is from fitting (0 = fits), for ranking partial fixes."""
    host = max(0.0, p.host_per_node_gib - p.knobs.host_mem_gib) if p.knobs.host_mem_gib else 0.0
    return max(0.0, p.peak_gib - SUGGEST_HEADROOM * p.gpu_mem_gib) + host + (1000.0 if p.kv_tokens < p.seq_len else 0.0)


def _single_changes(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs) -> list[tuple[str, Any, int]]:
    """Candidate one-key changes, in order of preference; searched ones (micro-batch, utilization) only if they fit."""
    m, r, t = cfg.model, cfg.rollout, cfg.trainer
    c: list[tuple[str, Any, int]] = []
    some = fewest_recomputed(name, shape, cfg, gpus, mem, k, m.recompute_layers if m.gradient_checkpointing else 0)
    if some is not None:  # recomputing only the first layers, before recomputing all of them
        c2 = with_setting(with_setting(cfg, "model.gradient_checkpointing", True), "model.recompute_layers", some[0])
        switch = "" if m.gradient_checkpointing else "model.gradient_checkpointing=true + "
        c.append((f"{switch}model.recompute_layers={some[0]}", c2, gpus))
    if not m.gradient_checkpointing:
        c.append(("model.gradient_checkpointing=true", with_setting(cfg, "model.gradient_checkpointing", True), gpus))
    elif m.recompute_layers:
        c.append(("model.recompute_layers=0", with_setting(cfg, "model.recompute_layers", 0), gpus))
    for key in ("trainer.micro_batch_tokens", "trainer.logprob_micro_batch_tokens"):  # a budget set: a smaller one
        size = largest_budget(name, shape, cfg, gpus, mem, k, key) if getattr(t, key[8:]) else None
        if size is not None and size[0] < getattr(t, key[8:]):
            c.append((f"{key}={size[0]}", with_setting(cfg, key, size[0]), gpus))
    # the largest micro-batch that fits; the log-prob one only when set apart (0 follows the update's)
    for key, current in (("trainer.micro_batch_size", t.micro_batch_size),
                         ("trainer.logprob_micro_batch_size", t.logprob_micro_batch_size)):
        for mb in range(current - 1, 0, -1):
            c2 = with_setting(cfg, key, mb)
            if roomy(build(name, shape, c2, gpus, mem, k)):
                c.append((f"{key}={mb}", c2, gpus))
                break
    if r.sleep_level == 0:
        c.append(("rollout.sleep_level=1", with_setting(cfg, "rollout.sleep_level", 1), gpus))
    for key in ("trainer.optimizer_offload", "trainer.param_offload"):  # on: GPU -> host; off: host -> GPU
        c.append((f"{key}={str(not getattr(t, key[8:])).lower()}", with_setting(cfg, key, not getattr(t, key[8:])), gpus))
    if r.sleep_level == 1:  # no host backup of vLLM's weights; sync rewrites them anyway
        c.append(("rollout.sleep_level=2", with_setting(cfg, "rollout.sleep_level", 2), gpus))
    for u in sorted((u / 100 for u in range(5, 96)), key=lambda u: abs(u - r.gpu_memory_utilization)):
        c2 = with_setting(cfg, "rollout.gpu_memory_utilization", u)
        if u != r.gpu_memory_utilization and roomy(build(name, shape, c2, gpus, mem, k)):
            c.append((f"rollout.gpu_memory_utilization={u:.2f}", c2, gpus))  # the nearest that fits
            break
    return [x for x in c + [(f"use {g} GPUs", cfg, g) for g in (2 * gpus, 4 * gpus, 8 * gpus)] if _accepted(x)]


def _accepted(change: tuple[str, Any, int]) -> bool:
    """Advice is pasted as printed: a change the same command would refuse (config.validate, the
    rollout layout for that many ranks; e.g. param_offload with a shared base) is never offered."""
    _label, cfg, gpus = change
    try:
        check_layout(validate(cfg), gpus)
    except ConfigError:
        return False
    return True


def _partial_changes(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs) -> list[tuple[str, Any, int]]:
    """Single changes plus steps that only help: half the micro-batch; the least utilization that holds a sequence."""
    c = _single_changes(name, shape, cfg, gpus, mem, k)
    if cfg.trainer.micro_batch_size > 1:
        mb = cfg.trainer.micro_batch_size // 2
        c.append((f"trainer.micro_batch_size={mb}", with_setting(cfg, "trainer.micro_batch_size", mb), gpus))
    for u in range(round(cfg.rollout.gpu_memory_utilization * 100) + 1, 96):
        c2 = with_setting(cfg, "rollout.gpu_memory_utilization", u / 100)
        q = build(name, shape, c2, gpus, mem, k)
        if q.kv_tokens >= q.seq_len:
            c.append((f"rollout.gpu_memory_utilization={u / 100:.2f}", c2, gpus))
            break
    return [x for x in c if _accepted(x)]


def _fitting(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for label, c2, g in _single_changes(name, shape, cfg, gpus, mem, k):
        q = build(name, shape, c2, g, mem, k)
        group = label.split("=")[0].split(" ")[0]  # only the smallest TP / GPU count that fits
        if roomy(q) and not any(f.startswith(group) for f, _ in out):
            out.append((label, q.peak_gib))
    return out


def _sizing_notes(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs, tune: bool) -> list[str]:
    """The largest token budgets and the fewest recomputed layers that fit, for the keys set (or all: tune)."""
    notes = []
    for key, what in (("trainer.micro_batch_tokens", "update"), ("trainer.logprob_micro_batch_tokens", "no-grad log-prob")):
        if tune or getattr(cfg.trainer, key[8:]):
            size = largest_budget(name, shape, cfg, gpus, mem, k, key)
            notes.append(f"{key}={size[0]} fits (peak {size[1]:.1f} GiB): the largest {what} token budget at "
                         f"<= {SUGGEST_HEADROOM:.0%} of the GPU" if size else f"{key}: not even one sequence fits")
    m = cfg.model
    if m.gradient_checkpointing and (tune or m.recompute_layers):
        some = fewest_recomputed(name, shape, cfg, gpus, mem, k)
        if some is not None:
            notes.append(f"model.recompute_layers={some[0]} fits (peak {some[1]:.1f} GiB): the fewest recomputed "
                         f"layers of {shape.layers} at <= {SUGGEST_HEADROOM:.0%} of the GPU")
    return notes


def plan(shape: ModelShape, cfg: Any, gpus: int, gpu_mem_gib: float, knobs: Knobs = Knobs(), name: str = "",
         tune: bool = False) -> Plan:
    """The memory plan; if it does not fit, `suggestions` lists changes (one, else two) that make it fit.
    A fitting plan's notes size the token budgets and recomputed layers that are set (tune: all of them)."""
    p = build(name, shape, cfg, gpus, gpu_mem_gib, knobs)
    r = cfg.rollout
    if p.fits:
        p.notes += _sizing_notes(name, shape, cfg, gpus, gpu_mem_gib, knobs, tune)
        if not roomy(p):
            p.notes.append(f"the peak is {100 * p.peak_gib / gpu_mem_gib:.1f}% of the GPU: less than "
                           f"{100 * (1 - SUGGEST_HEADROOM):.0f}% headroom for allocator spikes the model does not see")
        if p.kv_tokens < p.seq_len * r.max_num_seqs:  # headroom could go to the KV cache (rollout throughput)
            for u in range(95, round(r.gpu_memory_utilization * 100), -1):
                q = build(name, shape, with_setting(cfg, "rollout.gpu_memory_utilization", u / 100), gpus, gpu_mem_gib, knobs)
                if roomy(q):
                    p.notes.append(f"rollout.gpu_memory_utilization={u / 100:.2f} still fits (peak {q.peak_gib:.1f} GiB):"
                                   f" KV cache for {q.kv_tokens // q.seq_len} full-length sequences")
                    break
        return p
    found = _fitting(name, shape, cfg, gpus, gpu_mem_gib, knobs)
    singles = {label for label, _ in found}
    for label, c2, g in _single_changes(name, shape, cfg, gpus, gpu_mem_gib, knobs):
        if len(found) >= 4 or label.startswith("use "):
            break
        if label in singles or _excess(build(name, shape, c2, g, gpu_mem_gib, knobs)) >= _excess(p):
            continue  # pairs start with a change that helps but is not enough
        more = [(m, pk) for m, pk in _fitting(name, shape, c2, g, gpu_mem_gib, knobs)
                if m not in singles and not m.startswith(("use ", label.split("=")[0]))]
        if more and f"{label} + {more[0][0]}" not in {f for f, _ in found}:  # a pair may repeat a two-key single
            found.append((f"{label} + {more[0][0]}", more[0][1]))
    if not found:  # greedy: take the change that helps most, a few times, until one more change fits
        c2, g, combo = cfg, gpus, []
        for _ in range(5):
            fit = _fitting(name, shape, c2, g, gpu_mem_gib, knobs)
            if fit:
                last = {label.split("=")[0].split(" ")[0]: label for label in combo + [fit[0][0]]}  # later wins
                found = [(" + ".join(last.values()), fit[0][1])]
                break
            now = _excess(build(name, shape, c2, g, gpu_mem_gib, knobs))
            tried = [(_excess(build(name, shape, c3, g3, gpu_mem_gib, knobs)), n, label, c3, g3)
                     for n, (label, c3, g3) in enumerate(_partial_changes(name, shape, c2, g, gpu_mem_gib, knobs))]
            best = min(tried, key=lambda x: (x[0], x[1]), default=None)
            if best is None or best[0] >= now:
                break
            c2, g, combo = best[3], best[4], combo + [best[2]]
    p.suggestions = [f"{label} (peak -> {pk:.1f} GiB)" for label, pk in found]
    p.fixes = [(tuple(label.split(" + ")), pk) for label, pk in found]
    return p
