"""Memory budgets: what a command will hold at its peak, estimated from the model's shapes before the work, and
checked against a budget (one line, exit 2, before the work; never a kill after it).

    limit = memory.work_budget(model, device, gib=None)   # default: 90 % of what is free now (RAM or the GPU's)
    memory.check(memory.forward(model, rows=8, length=576, grad=False), limit, "generate", "lower --batch-size")
    # -> "generate needs about 9.10 GiB, over its budget of 4.00 GiB; lower --batch-size" (OverBudget, exit 2)
    batch = memory.largest_batch(lambda b: memory.forward(model, b, 576, grad=False), limit, requested=8,
                                 what="generate", option="--batch-size")

The estimates count what dominates: the weights, their gradients and Adam's two moments (exact), the float32
logits and their log-softmax, the activations a backward keeps (per layer: ~8 hidden + 4 MLP-wide values per
token, and eager attention's scores), and the KV cache while sampling. They are estimates: the benchmark
`benchmarks/scan_memory.py` compares them with measured peaks.

`use_huge_pages()` (the command line calls it) puts large tensors on transparent huge pages, so that a step's
fresh allocations fault in 512x fewer pages.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from entangle.errors import OverBudget

log = logging.getLogger(__name__)

GIB = 2**30
FREE_SHARE = 0.9     # the default budget: this share of the memory free when the command starts


THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_granted() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks for them (mode `madvise` or `always`)."""
    try:
        with open(THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:            # not Linux, or no transparent huge pages
        return False


def use_huge_pages() -> bool:
    """Put every tensor of 2 MiB or more on transparent huge pages (PyTorch's `THP_MEM_ALLOC_ENABLE`): a large
    tensor freed and allocated again each step (logits, the embedding's gradient) then faults in 512x fewer
    pages (about 250,000 page faults per SmolLM2 2 x 256 step otherwise; `docs/results/speed.md`). Freed memory
    still goes back to the system, so memory stays bounded (about 0.1 GiB more peak RSS, from the 2 MiB rounding).
    Takes effect only before the process's first tensor of 2 MiB; True when the kernel grants huge pages on
    request (Linux, THP mode `madvise` or `always`). Process-wide, so the library never calls it on its own."""
    if not huge_pages_granted():
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def check_gib(gib: float | None, name: str = "--memory-gib") -> None:
    """A budget in GiB is > 0 and finite, or None (the default)."""
    if gib is not None and not (isinstance(gib, (int, float)) and 0 < gib < float("inf")):
        raise OverBudget(f"{name} must be a number > 0 (got {gib})")


def work_budget(model, device: str = "cpu", gib: float | None = None, name: str = "--memory-gib") -> int:
    """Bytes the work may use beyond the loaded model: `gib` (the command's whole budget) minus the weights, or
    by default 90 % of what is free now (the weights are already in memory)."""
    check_gib(gib, name)
    if gib is None:
        return free(device)
    if weights(model) > gib * GIB:
        raise OverBudget(f"the model's weights alone take {size(weights(model))}, over {name}={gib}; raise it")
    return int(gib * GIB) - weights(model)


def size(n_bytes: float) -> str:
    """`1.23 GiB`, or MiB below one GiB."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def free(device: str = "cpu") -> int:
    """90 % of the free memory of `device` now (RAM for the CPU)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        available = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        import psutil

        available = psutil.virtual_memory().available
    return int(available * FREE_SHARE)


def shape(model) -> dict:
    """Hidden size, layers, MLP width, vocabulary, heads and KV heads of a causal LM (Llama- or GPT-2-style)."""
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    return {"hidden": hidden, "layers": getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer"),
            "mlp": getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden,
            "vocab": c.vocab_size, "heads": heads, "kv_heads": getattr(c, "num_key_value_heads", None) or heads}


def weights(model) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def trainable(model) -> int:
    """Bytes of the trainable parameters (each has a gradient of the same size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def forward(model, rows: int, length: int, grad: bool, logits_rows: int | None = None) -> int:
    """Peak bytes of one forward of `rows` sequences of `length` tokens beyond the weights: kept activations
    when `grad` (every layer's), else one layer's at a time; float32 logits and log-softmax of `logits_rows`
    positions per sequence (default: all)."""
    s = shape(model)
    width = next(model.parameters()).element_size()
    tokens = rows * length
    per_layer = tokens * (8 * s["hidden"] + 4 * s["mlp"]) * width
    if getattr(model.config, "_attn_implementation", "eager") == "eager":     # sdpa/flash never hold the scores
        per_layer += rows * s["heads"] * length * length * width
    acts = per_layer * (s["layers"] if grad else 1)
    logits = rows * (length if logits_rows is None else logits_rows) * s["vocab"] * 4 * (3 if grad else 2)
    return acts + logits


def recorded(model, rows: int, length: int) -> int:
    """Extra peak bytes while a gradient recorder watches a training step (`diagnostics.entanglement`, the
    pairwise-normalised update): every module with trainable parameters keeps its output gradient to the step's end,
    and prefix-shared rows are rewritten as two rows per pair; about rows x length x (inputs + outputs) x 4 bytes
    over those modules. SmolLM2-135M, 2 pairs of 512 tokens: 3.2 GiB here, 4.0 GiB more peak RSS measured with
    diagnostics every step than without; the whole training estimate with it, 8.3 GiB beyond the weights, against
    7.2 GiB peak RSS measured (`entangle train ... diagnostics.entanglement.every=1`, 2026-12-05)."""
    per_token = 0
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(m, torch.nn.Embedding):
            per_token += 1 + m.embedding_dim
        else:
            weight = max(own, key=lambda p: p.dim())
            per_token += sum(weight.shape) if weight.dim() == 2 else 2 * weight.numel()
    return rows * length * per_token * 4


def kv_cache(model, rows: int, length: int) -> int:
    """Bytes of the KV cache of `rows` sequences of `length` tokens."""
    s = shape(model)
    width = next(model.parameters()).element_size()
    return 2 * s["layers"] * rows * length * s["kv_heads"] * (s["hidden"] // s["heads"]) * width


def check(need: int, limit: int, what: str, advice: str) -> None:
    """A one-line error when `need` bytes exceed `limit`; else a log line of both."""
    if need > limit:
        raise OverBudget(f"{what} needs about {size(need)}, over its budget of {size(limit)}; {advice}")
    log.info("memory: %s needs about %s of %s", what, size(need), size(limit))


def largest_batch(need: Callable[[int], int], limit: int, requested: int, what: str, option: str) -> int:
    """The largest batch <= `requested` whose `need(batch)` fits `limit`; a one-line message when it is smaller,
    a one-line error when even one does not fit."""
    batch = requested
    while batch > 1 and need(batch) > limit:
        batch = max(1, batch // 2)
    check(need(batch), limit, f"{what} (batch {batch})", f"lower {option} or the lengths, or raise --memory-gib")
    if batch < requested:
        log.warning("%s: %s %d does not fit the memory budget of %s; using %d", what, option, requested,
                    size(limit), batch)
    return batch
