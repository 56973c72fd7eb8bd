"""Views of a run written beside it: exact per-token gradient views, per-position splits, learned token masks.

    save_token_views(run_dir, "step-10", policy, tokenizer, pairs)   # entanglement_tokens/step-10.json
    save_position_views(run_dir, 10, tokenizer, probe.position_rows, pair_rows)
    save_mask_views(run_dir, "final", policy, tokenizer, pairs, pad_id)   # token_masks/final.json
"""

from __future__ import annotations

import os

import torch

from entangle.checkpoint import write_json
from entangle.data import TokenizedPair
from entangle.batching import collate
from entangle.hooks import HookContext, LoopCallback
from entangle.logps import Policy, sequence_logps


def save_token_views(run_dir: str, name: str, model, tokenizer, pairs: list[TokenizedPair]) -> None:
    """`entanglement_tokens/NAME.json` (`step-N` in training): exact per-token gradient inner products
    and cosines of `pairs`. `model` is a language model or a `Policy` (whose token mask, if any, is
    written beside: `token_masks/NAME.json`)."""
    from entangle.diagnostics.tokens import to_json, token_gradients

    lm = model.model if isinstance(model, Policy) else model
    views = [{"pair": p.index, **to_json(token_gradients(lm, p.prompt_ids, p.chosen_ids, p.rejected_ids,
                                                          tokenizer))} for p in pairs]
    folder = os.path.join(run_dir, "entanglement_tokens")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"{name}.json"), views)
    lm.zero_grad(set_to_none=True)
    if isinstance(model, Policy) and model.token_mask is not None:
        save_mask_views(run_dir, name, model, tokenizer, pairs, tokenizer.pad_token_id)


@torch.no_grad()
def save_mask_views(run_dir: str, name: str, policy: Policy, tokenizer, pairs: list[TokenizedPair],
                    pad_id: int, device=None, write: bool = True) -> None:
    """`token_masks/NAME.json`: the learned token weights m_t of each pair's chosen and rejected tokens.
    `policy` may be the prepared wrapper; in a sharded run every process calls this (the forward gathers)
    and one writes."""
    batch = collate(pairs, pad_id).to(device or next(policy.parameters()).device)
    weights = sequence_logps(policy, batch).weights.float().cpu()          # [2B, T]
    if not write:
        return
    B, resp = len(pairs), batch.response_mask.cpu()
    views = []
    for i, p in enumerate(pairs):
        view = {"pair": p.index}
        for side, row, ids in (("chosen", i, p.chosen_ids), ("rejected", B + i, p.rejected_ids)):
            view[f"{side}_tokens"] = [tokenizer.decode([t]) for t in ids]
            view[f"{side}_mask"] = [round(float(w), 4) for w in weights[row][resp[row]]]
        views.append(view)
    folder = os.path.join(run_dir, "token_masks")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"{name}.json"), views)


def save_position_views(run_dir: str, step: int, tokenizer, rows: list[dict], pair_rows: list[dict]) -> None:
    """`entanglement_positions/step-N.json`: each position's share of its pair's <grad_w, grad_l>
    (this process's pairs), with the decoded tokens."""
    inner = {r["pair"]: r["inner"] for r in pair_rows}
    views = [{"pair": r["pair"], "inner": inner.get(r["pair"]), "other": r["other"],
              "chosen_tokens": [tokenizer.decode([t]) for t in r["chosen_ids"]], "chosen": r["chosen"],
              "rejected_tokens": [tokenizer.decode([t]) for t in r["rejected_ids"]], "rejected": r["rejected"]}
             for r in rows]
    folder = os.path.join(run_dir, "entanglement_positions")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"step-{step}.json"), views)


class TokenMaskViews(LoopCallback):
    """`loss.token_mask`: the learned weights on a few held-out (else training) pairs once training ends;
    every process joins the forward, the main process writes `token_masks/final.json`."""

    def __init__(self, n_pairs: int):
        self.n_pairs = n_pairs

    def on_fit_end(self, ctx: HookContext) -> None:
        pairs = (ctx.eval_pairs or ctx.train_pairs)[: self.n_pairs]
        save_mask_views(ctx.run_dir, "final", ctx.policy, ctx.tokenizer, pairs, ctx.tokenizer.pad_token_id,
                        ctx.accelerator.device, write=ctx.is_main)
