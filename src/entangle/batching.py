"""Batches for the model: pad and collate tokenised pairs, the prefix-shared layout, and each step's pairs.

    batch = collate(pairs[:4], pad_id)             # concatenated [2B, T]: chosen rows, then rejected rows
    batch = collate(pairs[:4], pad_id, pack=True)  # plus the prefix-shared rows [prompt, chosen, rejected]
    batch = collate(examples[:4], pad_id)          # KTO: the example rows, then their KL rows; extra["labels"]
    idx = batch_indices(len(pairs), step, global_batch, seed)   # a seeded permutation per epoch
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from entangle.data import TokenizedPair


# ------------------------------------------------------------------------------------ collating


@dataclass
class Batch:
    """Sequences padded on the right. Every item has two rows, laid out first rows first: a pair's chosen rows,
    then its rejected rows; a KTO example's own rows, then its KL rows."""

    input_ids: torch.Tensor       # [N, T]
    attention_mask: torch.Tensor  # [N, T] 1 for real tokens
    response_mask: torch.Tensor   # [N, T] True where the token is a response token (scored)
    index: torch.Tensor           # [B] source positions of the items
    extra: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice) -> "Batch":
        """The rows `rows` alone (padding trimmed); `index` and the labels stay, the packed layout goes."""
        width = int(self.attention_mask[rows].sum(1).max())
        extra = {k: v for k, v in self.extra.items() if k != "packed"}
        return Batch(self.input_ids[rows, :width], self.attention_mask[rows, :width], self.response_mask[rows, :width],
                     self.index, extra)

    def to(self, device) -> "Batch":
        def move(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        return Batch(move(self.input_ids), move(self.attention_mask), move(self.response_mask),
                     move(self.index), {k: move(v) if isinstance(v, torch.Tensor) else
                                        v.to(device) if hasattr(v, "to") else v for k, v in self.extra.items()})


def pad_sequences(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """`(prompt, response)` rows -> input_ids, attention_mask, response_mask, each [N, T]."""
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    resp = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p):n] = True
    return ids, attn, resp


def collate(items: Sequence, pad_id: int, pack: bool = False) -> Batch:
    """B items (pairs, or KTO examples) -> one concatenated batch of 2B rows: each item's first row at 0..B-1
    (chosen, or the example), its second at B..2B-1 (rejected, or the KL row); KTO labels in `extra["labels"]`.

    `pack` adds the prefix-shared layout of pairs (`batch.extra["packed"]`, see `pack_pairs`), which the
    log-prob computation uses where the model allows it; the concatenated rows stay the reference."""
    first, second = zip(*(it.rows() for it in items))
    ids, attn, resp = pad_sequences(list(first) + list(second), pad_id)
    extra = {}
    if hasattr(items[0], "label"):
        extra["labels"] = torch.tensor([it.label for it in items], dtype=torch.bool)
    elif pack:
        extra["packed"] = pack_pairs(items, pad_id)
    return Batch(ids, attn, resp, torch.tensor([it.index for it in items], dtype=torch.long), extra)


@dataclass
class PackedPairs:
    """B pairs as B rows `[prompt, chosen, rejected]`: the prompt is run once for both responses.

    The rejected tokens see the prompt and themselves, never the chosen tokens, and their position
    ids restart after the prompt, so every response token has exactly the context (and position) it
    has in its own row of the concatenated batch. Scored tokens are listed explicitly:
    `hidden[src_row, src_pos]` predicts `targets`, which belongs to row `out_row` of the
    concatenated layout (chosen 0..B-1, rejected B..2B-1), at position `out_pos` there.
    `unpack` maps the concatenated layout back: position t of concatenated row r is position
    `unpack[r, t] % T` of packed row `unpack[r, t] // T` (-1 at padding)."""

    input_ids: torch.Tensor      # [B, T]
    allowed: torch.Tensor        # [B, T, T] bool: query t may attend to key s
    position_ids: torch.Tensor   # [B, T]
    src_row: torch.Tensor        # [K]
    src_pos: torch.Tensor        # [K]
    targets: torch.Tensor        # [K]
    out_row: torch.Tensor        # [K]
    lengths: torch.Tensor        # [2B] scored tokens per concatenated row
    out_pos: torch.Tensor        # [K]
    unpack: torch.Tensor         # [2B, Tc] index into the flattened packed rows [B * T]; Tc as in `collate`

    def to(self, device) -> "PackedPairs":
        return PackedPairs(*(getattr(self, f.name).to(device) for f in fields(self)))


def pack_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> PackedPairs:
    B = len(pairs)
    T = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)   # padding queries see themselves only
    src_row, src_pos, targets, out_row, out_pos = [], [], [], [], []
    lengths = torch.zeros(2 * B, dtype=torch.long)
    Tc = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    unpack = torch.full((2 * B, Tc), -1, dtype=torch.long)
    for i, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        n = P + C + R
        ids[i, :n] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids, dtype=torch.long)
        pos[i, :n] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        allowed[i, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[i, P + C : n, P : P + C] = False                 # rejected never sees the chosen
        # token k of a response is predicted by the position before it: the prompt's last for k = 0
        # (as in the concatenated rows, a response right at the start of a row has no first prediction).
        first = 0 if P > 0 else 1
        for k in range(first, C):
            src_row.append(i), src_pos.append(P + k - 1), targets.append(p.chosen_ids[k]), out_row.append(i)
            out_pos.append(P + k - 1)
        for k in range(first, R):
            src_row.append(i), src_pos.append(P - 1 if k == 0 else P + C + k - 1)
            targets.append(p.rejected_ids[k]), out_row.append(B + i), out_pos.append(P + k - 1)
        lengths[i], lengths[B + i] = C - first, R - first
        unpack[i, : P + C] = i * T + torch.arange(P + C)
        unpack[B + i, : P + R] = i * T + torch.cat([torch.arange(P), torch.arange(P + C, n)])
    t = (lambda x: torch.tensor(x, dtype=torch.long))
    return PackedPairs(ids, allowed, pos, t(src_row), t(src_pos), t(targets), t(out_row), lengths, t(out_pos), unpack)


# ------------------------------------------------------------------------------------ sampling


def batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """The example indices of optimiser step `step` (0-based): a seeded permutation per epoch."""
    per_epoch = n // global_batch
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[j * global_batch : (j + 1) * global_batch].tolist()


def process_share(indices: Sequence[int], process_index: int, per_process: int) -> list[int]:
    """This process's contiguous share of a step's global batch (every process the same size)."""
    return list(indices[process_index * per_process : (process_index + 1) * per_process])


def micro_batches(items: Sequence, indices: Sequence[int], batch_size: int, pad_id: int,
                  pack: bool, device) -> list[Batch]:
    """Collated micro-batches of `batch_size` items over `indices`, on `device`."""
    return [collate([items[i] for i in indices[k : k + batch_size]], pad_id, pack).to(device)
            for k in range(0, len(indices), batch_size)]
