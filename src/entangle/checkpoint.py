"""Atomic checkpoints: weights (safetensors), optimiser, scheduler, RNG states, data position.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `checkpoints/step-N/`
when complete, so a kill at any moment leaves the previous checkpoint intact. Everything loads
with `torch.load(weights_only=True)` or safetensors: no pickled code.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from entangle.engine import is_sharded
from entangle.errors import TrainingError
from entangle.models import is_peft

STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_DIR.match(d))]
    return sorted(found)


def resolve_resume(run_dir: str, resume: str) -> str | None:
    """`latest` -> the newest complete checkpoint (None if there is none); otherwise a folder path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise TrainingError(f"{resume}: not a checkpoint folder (no trainer_state.json); use train.resume=latest")
    return resume


MASK_FILE = "token_mask.safetensors"


SHARDED_STATE = "sharded_state"   # FSDP/DeepSpeed checkpoints: Accelerate's per-process state folder


def hf_model(accelerator, policy):
    """The transformers/peft model inside a prepared `Policy`."""
    return accelerator.unwrap_model(policy).model


def save_weights(accelerator, policy, folder: str) -> None:
    """A folder that `transformers` (full) or `peft` (adapter) loads directly."""
    state = accelerator.get_state_dict(policy)  # gathered under FSDP/ZeRO-3
    if accelerator.is_main_process:
        mask = {k.removeprefix("token_mask."): v.contiguous() for k, v in state.items() if k.startswith("token_mask.")}
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        hf_model(accelerator, policy).save_pretrained(folder, state_dict=state, safe_serialization=True)
        if mask:  # loss.token_mask: the learned mask head, beside the model
            save_file(mask, os.path.join(folder, MASK_FILE))


def load_weights(model, folder: str) -> None:
    """Load weights saved by `save_weights` into an unwrapped model (tied weights re-tied)."""
    if is_peft(model):
        from peft import set_peft_model_state_dict

        adapter = os.path.join(folder, "adapter_model.safetensors")
        if not os.path.exists(adapter):
            raise TrainingError(f"{folder}: no adapter_model.safetensors: it holds full weights, but model.lora.r > 0; "
                                "load it with model.lora.r=0")
        set_peft_model_state_dict(model, load_file(adapter))
        return
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        raise TrainingError(f"{folder}: a LoRA adapter, but model.lora.r is 0; load it with the run's model.lora.r")
    state = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        if os.path.basename(f) != MASK_FILE:
            state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = {id(p) for n, p in model.state_dict(keep_vars=True).items() if n in state}
    really_missing = [n for n in missing if id(model.state_dict(keep_vars=True)[n]) not in shared]
    if really_missing or unexpected:
        raise TrainingError(f"{folder}: weights do not match the model (missing {really_missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    np.random.set_state(_tuples(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):  # safe-loaded states come back with lists where the setters want tuples
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _rng_to_saveable(state: dict) -> dict:
    py = state["python"]
    npy = state["numpy"]
    return {**state, "python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], torch.from_numpy(npy[1].astype(np.int64)), npy[2], npy[3], npy[4]]}


def _rng_from_saved(state: dict) -> dict:
    npy = state["numpy"]
    return {**state, "numpy": (npy[0], npy[1].numpy().astype(np.uint32), npy[2], npy[3], npy[4])}


def save_checkpoint(run_dir: str, step: int, accelerator, model, optimizer, scheduler, trainer_state: dict,
                    extra_tensors: dict[str, dict] | None = None, keep: int = 0) -> str:
    """Write `checkpoints/step-N` atomically; every process writes its own RNG state. A failed write (a full
    disk) removes the partial folder and is a one-line error; earlier checkpoints stay intact."""
    tmp = os.path.join(run_dir, "checkpoints", f".tmp-step-{step}")
    try:
        return _save_checkpoint(run_dir, step, accelerator, model, optimizer, scheduler, trainer_state,
                                extra_tensors, keep)
    except (OSError, RuntimeError) as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        why = "disk full" if getattr(e, "errno", None) == 28 or "No space" in str(e) else str(e).splitlines()[0][:160]
        raise TrainingError(f"could not write checkpoint step-{step} in {run_dir} ({why}); the previous checkpoints "
                            "are intact: free space and continue with train.resume=latest") from None


def _save_checkpoint(run_dir: str, step: int, accelerator, model, optimizer, scheduler, trainer_state: dict,
                     extra_tensors: dict[str, dict] | None = None, keep: int = 0) -> str:
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    save_weights(accelerator, model, os.path.join(tmp, "model"))
    torch.save(_rng_to_saveable(rng_state()), os.path.join(tmp, f"rng-{accelerator.process_index}.pt"))
    if is_sharded(accelerator):  # each process's shard of the weights and optimiser state, Accelerate's layout
        accelerator.save_state(os.path.join(tmp, SHARDED_STATE))
    if accelerator.is_main_process:
        if not is_sharded(accelerator):
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        for name, tensors in (extra_tensors or {}).items():
            save_tensors(os.path.join(tmp, f"{name}.safetensors"), tensors)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=1)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for _, old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: str, accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimiser, scheduler and this process's RNG; returns the trainer state."""
    if is_sharded(accelerator):
        if not os.path.isdir(os.path.join(folder, SHARDED_STATE)):
            raise TrainingError(f"{folder}: no {SHARDED_STATE}/ (saved by a run that was not sharded); resume it "
                                "with the same launch set-up")
        accelerator.load_state(os.path.join(folder, SHARDED_STATE))
    else:
        load_weights(hf_model(accelerator, model), os.path.join(folder, "model"))
        mask = accelerator.unwrap_model(model).token_mask
        if mask is not None:
            path = os.path.join(folder, "model", MASK_FILE)
            if not os.path.exists(path):
                raise TrainingError(f"{folder}: no {MASK_FILE} (the checkpoint was not trained with loss.token_mask)")
            mask.load_state_dict(load_file(path))
        if not os.path.exists(os.path.join(folder, "optimizer.pt")):
            raise TrainingError(f"{folder}: no optimizer.pt (saved by a sharded run); resume it with the same "
                                "launch set-up")
        optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
    rng_file = os.path.join(folder, f"rng-{accelerator.process_index}.pt")
    if os.path.exists(rng_file):
        set_rng_state(_rng_from_saved(torch.load(rng_file, weights_only=True)))
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return json.load(f)


def save_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file of named tensors (state beside the weights: a reference, ...)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata=None if metadata is None else {k: str(v) for k, v in metadata.items()})


def load_extra(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, f"{name}.safetensors")
    return load_file(path) if os.path.exists(path) else None


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
