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
class FlatRows:
    """A right-padded micro-batch laid out for one forward pass without the
    padded [B, T] shape, and how its per-token results map back to it.

    Packed (pack_rows): the rows back to back as one sequence, position ids
    restarting at 0 per row and no mask: transformers reads the restarts as
    document boundaries and keeps attention within a row
    (masking_utils.find_packed_sequence_indices).
    Prompt groups (share_prompts): each prompt once, then its rows' responses,
    each response's positions continuing from its prompt's end; a 4D mask lets
    a response see its prompt and itself only, so every log-prob is the one
    its own padded row gives."""

    input_ids: Tensor  # [S, L]
    position_ids: Tensor  # [S, L]
    attention_mask: Tensor | None  # [S, 1, L, L] bool (True: may attend), or None (packed)
    scored: Tensor  # [B, T-1] bool: padded positions whose value this layout computes
    sources: Tensor  # [M] flat positions into [S * L], in `scored` order; each predicts...
    targets: Tensor  # [M] ...this token


def pack_rows(input_ids: Tensor, attention_mask: Tensor) -> FlatRows:
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
    flat = input_ids[real]
    return FlatRows(flat[None], positions[None], None, scored, sources, flat[sources + 1])


def prompt_lengths(attention_mask: Tensor, response_mask: Tensor) -> list[int]:
    """Each row's prompt tokens: its first response token is predicted at position prompt - 1
    (a row without response tokens is all prompt)."""
    has_response = response_mask.bool().any(dim=1)
    return torch.where(has_response, response_mask.argmax(dim=1) + 1, attention_mask.sum(dim=1)).tolist()


def group_prompts(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, group: int) -> FlatRows:
    """Right-padded rows, every `group` consecutive ones sampled from one prompt, as one sequence per
    group: the prompt once, then each row's response. A response's first token is scored from the
    prompt's last position (the same hidden state its padded row has there)."""
    rows = input_ids.shape[0]
    if group < 1 or rows % group:
        raise ValueError(f"{rows} rows do not split into groups of {group}")
    device, scored = input_ids.device, response_mask.bool()
    # Laid out on the host (one copy, not a device sync per row), the mask built on the device.
    input_ids, attention_mask, response_mask = input_ids.cpu(), attention_mask.cpu(), response_mask.cpu()
    lengths = attention_mask.sum(dim=1).tolist()
    prompts = prompt_lengths(attention_mask, response_mask)
    ids, positions, segments, sources, targets = [], [], [], [], []
    for g in range(rows // group):
        first = g * group
        p = prompts[first]
        members = range(first, first + group)
        if any(prompts[r] != p or not torch.equal(input_ids[r, :p], input_ids[first, :p]) for r in members):
            raise ValueError(f"rows {first}..{first + group - 1} do not share one prompt")
        seq, pos, seg = input_ids[first, :p].tolist(), list(range(p)), [0] * p
        for i, r in enumerate(members, start=1):
            n = lengths[r] - p  # this row's response tokens
            start = len(seq)  # where its tokens go in the group's sequence
            sources.append((g, ([p - 1] + list(range(start, start + n - 1))) if n else []))
            targets += input_ids[r, p : p + n].tolist()
            seq += input_ids[r, p : p + n].tolist()
            pos += list(range(p, p + n))
            seg += [i] * n
        ids.append(seq)
        positions.append(pos)
        segments.append(seg)
    span = max(len(s) for s in ids)
    pad = lambda xs, fill: torch.tensor([x + [fill] * (span - len(x)) for x in xs], dtype=torch.long)  # noqa: E731
    seg = pad(segments, -1).to(device)
    query, key = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(span, span, dtype=torch.bool, device=device).tril()
    sees = causal & (query >= 0) & ((key == 0) | (key == query))  # a real query: its prompt and its own response
    # A padding position sees itself: a query with nothing to attend to would give NaN.
    sees |= torch.eye(span, dtype=torch.bool, device=device) & (query < 0)
    flat_sources = torch.tensor([g * span + s for g, ss in sources for s in ss], dtype=torch.long)
    return FlatRows(pad(ids, 0).to(device), pad(positions, 0).to(device), sees[:, None], scored,
                    flat_sources.to(device), torch.tensor(targets, dtype=torch.long).to(device))


def unit_lengths(batch: RolloutBatch, group: int) -> list[int]:
    """Tokens of each unit a pass lays out: a row (group 1), or a group of `group` rows sharing a
    prompt, whose prompt counts once (group_prompts)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    if group == 1:
        return lengths
    if len(lengths) % group:
        raise ValueError(f"{len(lengths)} rows do not split into prompt groups of {group}")
    prompts = prompt_lengths(batch.attention_mask, batch.response_mask)
    return [prompts[g] + sum(lengths[r] - prompts[r] for r in range(g, g + group)) for g in range(0, len(lengths), group)]


def lay_out(mb: RolloutBatch, packed: bool, group: int) -> FlatRows | None:
    """How a micro-batch runs: packed, in prompt groups of `group` rows, or padded (None)."""
    if packed:
        return pack_rows(mb.input_ids, mb.attention_mask)
    if group > 1:
        return group_prompts(mb.input_ids, mb.attention_mask, mb.response_mask, group)
    return None
