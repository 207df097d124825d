"""Cutting a mini-batch's rows into micro-batches: by row count, or by a
token budget so every forward carries about the same work.

Pure list arithmetic over row lengths (prompt + response tokens). A
micro-batch's token slots are what its forward computes: padded, its rows
times its longest row (batch.RolloutBatch.select trims to that); packed
(batch.pack_rows), its rows' tokens. How rows are grouped never changes the
update (the loss denominators are global, grpo_core.train), only its speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def longest_first(units: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Units longest first: micro-batches of like lengths carry little padding (each is trimmed to
    its own longest unit), and the first is the largest."""
    return sorted(units, key=lambda u: (-lengths[u], u))


def unit_rows(units: Sequence[int], group: int) -> list[int]:
    """The rows of `units` when each unit is `group` consecutive rows (a prompt's group, or a row alone)."""
    return [u * group + i for u in units for i in range(group)]


def slots(rows: Sequence[int], lengths: Sequence[int], packed: bool) -> int:
    """Token slots one micro-batch of `rows` computes."""
    if not rows:
        return 0
    return sum(lengths[r] for r in rows) if packed else len(rows) * max(lengths[r] for r in rows)


def by_rows(order: Sequence[int], size: int) -> list[list[int]]:
    """`size` rows at a time, in `order`."""
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def by_tokens(order: Sequence[int], lengths: Sequence[int], budget: int, packed: bool) -> list[list[int]]:
    """Rows (`order`: longest first) binned so each bin's slots stay within
    `budget`; a row longer than the budget gets a bin of its own.

    Packed: first-fit decreasing (a short row fills the first bin with room).
    Padded: sorted greedy, a bin closing when the next row would pass the
    budget, so each bin holds rows of like lengths (little padding)."""
    bins: list[list[int]] = []
    used: list[int] = []
    for row in order:
        n = lengths[row]
        if packed:
            fit = next((i for i, u in enumerate(used) if u + n <= budget), None)
        else:  # the open bin's longest row is its first
            fit = len(bins) - 1 if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= budget else None
        if fit is None:
            bins.append([row])
            used.append(n)
        else:
            bins[fit].append(row)
            used[fit] += n
    return bins


def even_out(bins: list[list[int]], count: int, lengths: Sequence[int], packed: bool) -> list[list[int]]:
    """`bins` made `count` long (every rank runs the same number of passes:
    FSDP's collectives pair up pass by pass). The bin with the most slots is
    split in halves while one has two rows; past that, empty bins (passes
    that count for nothing, grpo_core.train)."""
    out = [list(b) for b in bins]
    while len(out) < count:
        splittable = [i for i, b in enumerate(out) if len(b) > 1]
        if not splittable:
            out.append([])
            continue
        i = max(splittable, key=lambda j: (slots(out[j], lengths, packed), -j))
        half = len(out[i]) // 2
        out[i : i + 1] = [out[i][:half], out[i][half:]]
    return out


@dataclass(frozen=True)
class Cut:
    """How one kind of pass cuts rows: `tokens` > 0 is a token budget, else `rows` rows at a time."""

    rows: int
    tokens: int = 0
    packed: bool = False

    def bins(self, order: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
        if self.tokens > 0:
            return by_tokens(order, lengths, self.tokens, self.packed)
        return by_rows(order, self.rows)


@dataclass
class Slots:
    """Token slots of the passes actually run, and how many held a real token."""

    real: int = 0
    total: int = 0

    def add(self, rows: Sequence[int], lengths: Sequence[int], packed: bool, *, counts: bool = True) -> None:
        """One pass over `rows`; a pass that counts for nothing (an even-out filler) is all padding."""
        self.total += slots(rows, lengths, packed)
        self.real += sum(lengths[r] for r in rows) if counts else 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real / self.total if self.total else 0.0
