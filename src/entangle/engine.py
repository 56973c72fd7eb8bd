"""The few distributed details of a training step, behind one small adapter over Accelerate: how a step's
micro-batches accumulate without synchronising, how DeepSpeed scales and steps inside the backward, and
whether weights live in shards. Nothing else in entangle branches on the distributed type.

    with engine.accumulating(accelerator, model, last=False): ...   # DDP no_sync, DeepSpeed's flag, FSDP no_sync
    loss_scale = engine.loss_scale(accelerator, n_micro)              # DeepSpeed divides by its accumulation itself
"""

from __future__ import annotations

import contextlib


def kind(accelerator) -> str:
    """Accelerate's distributed type: NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED, ..."""
    return accelerator.distributed_type.name


def is_deepspeed(accelerator) -> bool:
    return kind(accelerator) == "DEEPSPEED"


def is_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: weights and optimiser state live in shards across processes."""
    return kind(accelerator) in ("FSDP", "DEEPSPEED")


@contextlib.contextmanager
def accumulating(accelerator, model, last: bool):
    """Gradients synchronise (DeepSpeed: the engine steps) only on a step's last micro-batch."""
    if last:
        yield
    elif is_deepspeed(accelerator):
        # ZeRO-2/3 engines have no no_sync; Accelerate's own flag (private: the one place entangle touches it,
        # checked by tests/launch_sharded.py under ZeRO-3) makes the engine accumulate instead of stepping.
        state = accelerator.gradient_state
        state._set_sync_gradients(False)
        try:
            yield
        finally:
            state._set_sync_gradients(True)
    else:
        with accelerator.no_sync(model):
            yield


def loss_scale(accelerator, n_micro: int) -> int:
    """What each micro-batch's loss is multiplied by before its backward: DeepSpeed's engine divides by its
    accumulation count itself (and steps inside the last backward), so entangle undoes that; 1 elsewhere."""
    return n_micro if is_deepspeed(accelerator) else 1
