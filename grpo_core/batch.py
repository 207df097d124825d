"""Packing rollouts into padded tensors for the policy update."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """One row per sampled response; logprob positions are shifted by one
    (position t scores token t+1), so masks have length T-1."""

    input_ids: Tensor  # [B, T] right-padded prompt + response
    attention_mask: Tensor  # [B, T]
    response_mask: Tensor  # [B, T-1] 1 where the predicted token is a response token
    advantages: Tensor  # [B]
    old_logprobs: Tensor | None = None  # [B, T-1]
    ref_logprobs: Tensor | None = None  # [B, T-1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int] | range) -> "RolloutBatch":
        """Rows `rows`, trimmed to their own longest sequence (less padding)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        length = int(self.attention_mask[index].sum(dim=1).max())
        pick = lambda t, cut: None if t is None else t[index][:, :cut]  # noqa: E731
        return RolloutBatch(
            input_ids=pick(self.input_ids, length),
            attention_mask=pick(self.attention_mask, length),
            response_mask=pick(self.response_mask, length - 1),
            advantages=self.advantages[index],
            old_logprobs=pick(self.old_logprobs, length - 1),
            ref_logprobs=pick(self.ref_logprobs, length - 1),
        )

    def to(self, device: torch.device) -> "RolloutBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return RolloutBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def pack(prompts: list[list[int]], responses: list[list[int]], advantages: Tensor, pad_id: int) -> RolloutBatch:
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    response_mask = torch.zeros((rows, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, : len(p) + len(r)] = 1
        response_mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return RolloutBatch(input_ids, attention, response_mask, advantages.float())


@dataclass(frozen=True)
class PackedRows:
    """A right-padded micro-batch laid out as one sequence: the rows back to
    back, position ids restarting at 0 per row. With no attention mask,
    transformers reads the restarts as document boundaries and keeps
    attention within a row (masking_utils.find_packed_sequence_indices)."""

    input_ids: Tensor  # [1, N], N = the rows' real tokens
    position_ids: Tensor  # [1, N]
    scored: Tensor  # [B, T-1] bool: padded positions whose next token is in the same row
    sources: Tensor  # [M] flat positions, in `scored` order; each scores the next flat token


def pack_rows(input_ids: Tensor, attention_mask: Tensor) -> PackedRows:
    """The packed layout of right-padded rows (as `pack` builds them)."""
    real = attention_mask.bool()
    rows, width = real.shape
    lengths = real.sum(dim=1)
    offsets = torch.arange(width, device=real.device)
    if not torch.equal(real, offsets < lengths[:, None]):
        raise ValueError("packing needs right-padded rows (real tokens first)")
    starts = torch.cumsum(lengths, 0) - lengths
    scored = real[:, 1:]
    sources = (starts[:, None] + offsets[None, :-1])[scored]
    positions = offsets.expand(rows, width)[real]
    return PackedRows(input_ids[real][None], positions[None], scored, sources)
