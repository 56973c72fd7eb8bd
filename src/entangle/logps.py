"""Response log-probs from one forward pass, computing logits only where a response token is scored.

    out = sequence_logps(model, batch)          # out.logps [N], out.lengths [N]
    chosen, rejected = out.logps.chunk(2)       # pairs are laid out chosen rows first

The decoder runs once over the padded batch; the LM head and log-softmax run only on the K
hidden states that predict response tokens, so no `[N, T, vocab]` tensor exists over the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entangle.batching import Batch
from entangle.errors import ModelError
from entangle.models import is_peft

log = logging.getLogger(__name__)
MASK_NEEDS_LAYOUT = ("loss.token_mask=sparse needs a decoder/head layout entangle knows (transformers causal "
                     "LMs without logit scaling)")
# Attributes on the model's own objects (no module-level state): the LM head carries the row layout of its input
# while it runs on response rows and a recorder listens, and the prefix-shared layout while a packed forward runs;
# a model remembers what it was told once.
LAYOUT, LISTENERS, TOLD = "entangle_head_layout", "entangle_layout_listeners", "entangle_told"
PACKED = "entangle_packed_layout"


@dataclass
class HeadLayout:
    """The row layout of the response-only LM head input `[K, d]`: the batch row [K] and the sequence position
    [K] of each head input. Set on the head module by the forward that makes it (`response_logps`), while a gradient
    recorder listens (`listen`); read with `head_layout(head)`."""

    rows: torch.Tensor
    positions: torch.Tensor


def head_layout(head) -> HeadLayout | None:
    """The layout of the head's current input, None outside a listened-to response forward."""
    return getattr(head, LAYOUT, None)


def packed_layout(head):
    """The `batching.PackedPairs` of the prefix-shared forward now running, None outside one (or unlistened)."""
    return getattr(head, PACKED, None)


def listen(head, listening: bool) -> None:
    """A recorder starts (True) or stops (False) needing the head's row layout."""
    setattr(head, LISTENERS, getattr(head, LISTENERS, 0) + (1 if listening else -1))


def _tell_once(model, key: str, level: int, message: str, *args) -> None:
    """Log `message` the first time `model` meets `key` (remembered on the model object)."""
    told = getattr(model, TOLD, None)
    if told is None:
        told = set()
        object.__setattr__(model, TOLD, told)
    if key not in told:
        told.add(key)
        log.log(level, message, *args)


@dataclass
class PairLogps:
    """Everything a paired loss reads, for B pairs: `(B,)` tensors, reference ones None without a reference.

    `policy_*_logps` are what the margin uses (the masked sums under `loss.token_mask`), the `*_lengths`
    the scored response tokens of each side (length-normalised losses divide by them)."""

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor | None
    reference_rejected_logps: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    token_weights: torch.Tensor | None = None   # [2B, T] learned token weights (loss.token_mask), detached
    unmasked_logps: torch.Tensor | None = None  # [2B] plain response log-prob sums under a token mask, detached

    def unmasked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain (unmasked) chosen and rejected log-prob sums [B], [B]: what `logps/*` report."""
        if self.unmasked_logps is None:
            return self.policy_chosen_logps, self.policy_rejected_logps
        return self.unmasked_logps.chunk(2)

    def args(self) -> tuple:
        """The positional arguments of `losses.Loss`: (pc, pr, rc, rr, lc, lr)."""
        return (self.policy_chosen_logps, self.policy_rejected_logps, self.reference_chosen_logps,
                self.reference_rejected_logps, self.chosen_lengths, self.rejected_lengths)

    @property
    def n_pairs(self) -> int:
        return self.policy_chosen_logps.numel()


@dataclass
class CompletionLogps:
    """What KTO reads for B examples: `(B,)` tensors and the step's reference point z0 (a scalar)."""

    policy_logps: torch.Tensor
    reference_logps: torch.Tensor
    labels: torch.Tensor        # bool, True = desirable
    lengths: torch.Tensor
    z0: torch.Tensor

    def args(self) -> tuple:
        """The positional arguments of `losses.UnpairedLoss`: (policy, reference, labels, z0)."""
        return self.policy_logps, self.reference_logps, self.labels, self.z0

    @property
    def n_pairs(self) -> int:
        return self.policy_logps.numel()


@dataclass
class LogpsOut:
    """What `response_logps` computes for N rows; K is the number of scored response tokens (row-major order of
    `response_mask[:, 1:]`, position t predicting token t+1)."""

    logps: torch.Tensor                # [N] summed response log-probs (float32 or wider)
    lengths: torch.Tensor              # [N] response token counts
    token_logps: torch.Tensor | None   # [N, T] log-prob of the token at each position (0 off-response)
    weights: torch.Tensor | None = None   # [N, T] learned token weights m_t (token_mask only; 0 off-response)
    masked: torch.Tensor | None = None    # [N] sum_t m_t log pi_t: what a masked margin uses
    tokens: torch.Tensor | None = None    # [K] each scored token's log-prob (with the graph)
    rows: torch.Tensor | None = None      # [K] the row of each scored token
    features: torch.Tensor | None = None  # [K, d] the hidden states that predict them (the LM head's input)
    logits: torch.Tensor | None = None    # [K, V] float32 logits at those positions

    @property
    def scored(self) -> torch.Tensor:
        """The log-probs the loss sees: masked sums under a token mask, else the plain sums."""
        return self.logps if self.masked is None else self.masked


def split_model(model):
    """`(decoder, lm_head, config)` of a causal LM (through PEFT), or None if the layout is unknown."""
    base = model.get_base_model() if is_peft(model) else model
    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cfg = getattr(base, "config", None)
    if decoder is None or head is None or cfg is None or getattr(cfg, "logit_scale", None) not in (None, 1.0):
        return None
    return decoder, head, cfg


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least float32 (bf16/fp16 logits lose too much)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def response_logits(head, cfg, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on selected hidden states [K, d] -> float32 logits [K, V] (with Gemma-style soft-capping)."""
    logits = upcast(head(hidden))
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class Policy(torch.nn.Module):
    """A causal LM whose forward returns response log-probs. Training wraps *this* module with
    DDP/FSDP/DeepSpeed, so the response-only computation runs inside the wrapper's forward."""

    def __init__(self, model, token_mask: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.token_mask = token_mask       # mitigations.TokenMask (loss.token_mask: sparse), trained with the policy
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap reads it

    def forward(self, input_ids, attention_mask, response_mask, token_level: bool = False, packed=None):
        # A plain tuple, not a LogpsOut: DDP/FSDP/DeepSpeed wrappers find output tensors in tuples.
        out = response_logps(self.model, input_ids, attention_mask, response_mask, token_level, self.token_mask,
                             packed)
        return out.logps, out.lengths, out.token_logps, out.weights, out.masked


def sequence_logps(model, batch: Batch, token_level: bool = False, pack: bool = True) -> LogpsOut:
    """Summed log-probs of each row's response tokens given everything before them.

    `model` is a causal LM, a `Policy`, or a DDP/FSDP wrapper of a `Policy`. When the batch carries the
    prefix-shared layout (`collate(..., pack=True)`), `pack` is true, no token-level output is
    asked for and the model can take it, each pair runs as one row `[prompt, chosen, rejected]`."""
    inner = getattr(model, "module", model)
    lm = inner.model if isinstance(inner, Policy) else model
    packed = batch.extra.get("packed") if pack and not token_level else None
    if packed is not None and not can_pack(lm):
        packed = None
    if isinstance(inner, Policy):
        return LogpsOut(*model(batch.input_ids, batch.attention_mask, batch.response_mask, token_level, packed))
    return response_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask, token_level,
                          packed=packed)


# Architectures whose attention takes a custom 4-D mask with explicit position ids, checked against the
# concatenated layout in tests/test_logps.py (llama, gpt2) and benchmarks/vs_trl.py (SmolLM2 = llama).
PACKABLE = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo2", "gemma"}


def can_pack(model) -> bool:
    """Whether prefix sharing applies to `model` (says once per model type when it does not)."""
    parts = split_model(model)
    cfg = parts[2] if parts is not None else getattr(model, "config", None)
    kind = getattr(cfg, "model_type", type(model).__name__)
    attn = getattr(cfg, "_attn_implementation", None) or "eager"
    ok = parts is not None and kind in PACKABLE and attn in ("sdpa", "eager")
    if not ok:
        _tell_once(model, f"pack:{kind}:{attn}", logging.INFO, "prefix sharing is not available for %s with %s "
                   "attention; using the concatenated batch", kind, attn)
    return ok


def _packed_logps(model, packed, n_rows: int) -> LogpsOut:
    """`response_logps` on the prefix-shared rows (see `PackedPairs`): summed log-probs [2B] and lengths [2B]."""
    decoder, head, cfg = split_model(model)
    dtype = decoder.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    mask = torch.zeros(packed.allowed.shape, dtype=dtype, device=packed.allowed.device)
    mask = mask.masked_fill(~packed.allowed, torch.finfo(dtype).min)[:, None]                  # [B, 1, T, T]
    listened = bool(getattr(head, LISTENERS, 0))   # a gradient recorder unpacks the rows (diagnostics.ghost)
    if listened:
        setattr(head, PACKED, packed)
    try:
        hidden = decoder(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                         use_cache=False).last_hidden_state                                       # [B, T, d]
        features = hidden[packed.src_row, packed.src_pos]                                       # [K, d]
        if listened:   # the head at once (a checkpointed chunk would run its forward hooks again)
            logits = _head(head, cfg, features, packed.out_row, packed.out_pos)                 # [K, V]
            tok = -F.cross_entropy(logits, packed.targets, reduction="none")                   # [K]
        else:
            tok = _chunked_token_logps(head, cfg, features, packed.targets, head_chunk_rows(cfg))
    finally:
        setattr(head, PACKED, None)
    logps = torch.zeros(n_rows, dtype=tok.dtype, device=tok.device).index_add(0, packed.out_row, tok)
    return LogpsOut(logps, packed.lengths, None, tokens=tok, rows=packed.out_row)


HEAD_CHUNK_BYTES = 256 * 2**20   # float32 logits the LM head holds at once; beyond, it runs in chunks


def _head(head, cfg, features: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float32 logits [K, V] of the head on `features` [K, d]; while a gradient recorder listens, the head carries
    its input's row layout (`head_layout(head)`) for the duration of its call."""
    if getattr(head, LISTENERS, 0):       # lets a gradient recorder split the [K, d] head input by row
        setattr(head, LAYOUT, HeadLayout(rows, positions))
    try:
        return response_logits(head, cfg, features)
    finally:
        setattr(head, LAYOUT, None)


def head_chunk_rows(cfg) -> int:
    """Rows of float32 logits within `HEAD_CHUNK_BYTES` for the model's vocabulary (from its config: a sharded
    head's weight has no full shape)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return max(1, HEAD_CHUNK_BYTES // (4 * max(int(text.vocab_size), 1)))


def _chunked_token_logps(head, cfg, features: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int):
    """Each scored token's log-prob [K] with never more than `rows_per_chunk` rows of logits alive: each chunk's
    head and cross-entropy are recomputed in the backward (activation checkpointing), so the numbers and
    gradients are exactly those of the whole head at once."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, t):
        return -F.cross_entropy(response_logits(head, cfg, h), t, reduction="none")

    if features.shape[0] <= rows_per_chunk:   # fits at once: no recompute
        return piece(features, targets)
    outs = []
    for a in range(0, features.shape[0], rows_per_chunk):
        h, t = features[a : a + rows_per_chunk], targets[a : a + rows_per_chunk]
        outs.append(checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t))
    return torch.cat(outs)


def response_logps(model, ids, attn, resp, token_level: bool = False, token_mask=None, packed=None,
                   features: bool = False, logits: bool = False, **decoder_kwargs) -> LogpsOut:
    """The one computation of response log-probs in entangle: the decoder once over `ids` [N, T], the LM head and
    log-softmax only on the K positions that predict response tokens (`resp` [N, T]). Everything that needs
    response log-probs calls it (training, references, evaluation, the scan, the token views, TRL's forward).

    `packed`: the prefix-shared layout of pairs (`batching.PackedPairs`): one row `[prompt, chosen, rejected]`
    per pair. `token_level`: also [N, T] per-position log-probs. `token_mask`: learned token weights on the head's
    input (`mitigations.TokenMask`). `features` / `logits`: also return the head's input [K, d] / logits [K, V].
    A model whose decoder/head layout is unknown computes full logits (said once per model)."""
    if packed is not None and token_mask is None and not (token_level or features or logits):
        return _packed_logps(model, packed, ids.shape[0])
    N, T = ids.shape
    target = resp[:, 1:]                      # [N, T-1] position t predicts token t+1
    rows = torch.arange(N, device=ids.device)[:, None].expand(N, T - 1)[target]   # [K]
    targets = ids[:, 1:][target]              # [K]
    parts = split_model(model)
    hidden = head_logits = None
    if parts is not None:
        decoder, head, cfg = parts
        hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False,
                         **decoder_kwargs).last_hidden_state[:, :-1][target]                       # [K, d]
        rows_per_chunk = head_chunk_rows(cfg)
        if logits or getattr(head, LISTENERS, 0) or hidden.shape[0] <= rows_per_chunk:
            positions = torch.arange(T - 1, device=ids.device)[None].expand(N, T - 1)[target]
            head_logits = _head(head, cfg, hidden, rows, positions)                               # [K, V]
        else:   # a long batch: never [K, V] logits at once (exact: each chunk is recomputed in the backward)
            tok = _chunked_token_logps(head, cfg, hidden, targets, rows_per_chunk)
    else:
        if token_mask is not None:
            raise ModelError(f"{type(model).__name__}: {MASK_NEEDS_LAYOUT}")
        _tell_once(model, "layout", logging.WARNING, "%s: unknown decoder/head layout; computing full logits "
                   "(more memory)", type(model).__name__)
        out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=features)
        head_logits = upcast(out.logits[:, :-1][target])
        hidden = out.hidden_states[-1][:, :-1][target] if features else None
    if head_logits is not None:
        tok = -F.cross_entropy(head_logits, targets, reduction="none")                          # [K]
    logps = torch.zeros(N, dtype=tok.dtype, device=ids.device).index_add(0, rows, tok)
    token_logps = weights = masked = None
    if token_level:
        token_logps = torch.zeros(N, T, dtype=tok.dtype, device=ids.device)
        token_logps[:, 1:][target] = tok
    if token_mask is not None:
        m = token_mask(hidden).to(tok.dtype)                                                     # [K]
        masked = torch.zeros(N, dtype=tok.dtype, device=ids.device).index_add(0, rows, m * tok)
        weights = torch.zeros(N, T, dtype=tok.dtype, device=ids.device)
        weights[:, 1:][target] = m
    return LogpsOut(logps, target.sum(1), token_logps, weights, masked, tok, rows,
                    hidden if features else None, head_logits if logits else None)