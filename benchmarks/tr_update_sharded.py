"""Cost of one trust-region update when the policy is sharded: prints median seconds per update.

    torchrun --standalone --nproc_per_node 2 benchmarks/tr_update_sharded.py [--model smollm2-135m] [--repeats 5]

Times `TrustRegionReference.update` on the same model unsharded (each process on its own), and sharded
by FSDP (units = decoder layers), FSDP2 and DeepSpeed ZeRO-3 (when installed) across the processes
(gloo on CPU, NCCL where the launch gives GPUs), full and LoRA (r 8 on q/k/v/o). The update gathers one
piece at a time, so its cost is one all-gather of the model (LoRA: of the units or matrices holding
adapters) plus the blend.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
import torch.distributed as dist

from entangle import models, reference


def shard(model, mode):
    base = model.get_base_model() if models.is_peft(model) else model
    blocks = [m for m in base.modules() if type(m).__name__ in base._no_split_modules]
    if mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}), use_orig_params=True,
                    device_id=torch.device("cpu"))
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for b in blocks:
            fully_shard(b)
        fully_shard(model)
        return model
    if mode == "zero3":
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                               "zero_optimization": {"stage": 3}})
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    modes = ["none", "fsdp", "fsdp2"] + (["zero3"] if importlib.util.find_spec("deepspeed") else [])
    rows = []
    for lora in (False, True):
        for mode in modes:
            torch.manual_seed(0)
            settings = models.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]) \
                if lora else None
            policy, _ = models.load_model(args.model, dtype="float32", lora=settings)
            ref = reference.TrustRegionReference(policy, alpha=0.5, tau=1)
            sharded = shard(policy, mode)
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                t = time.perf_counter()
                ref.update(sharded)
                dist.barrier()
                times.append(time.perf_counter() - t)
            rows.append((("lora" if lora else "full"), mode, statistics.median(times)))
            del policy, ref, sharded
    if rank == 0:
        print(f"{args.model}, {dist.get_world_size()} processes, median of {args.repeats} updates")
        print("| policy | sharding | s / update | vs unsharded |\n|---|---|---|---|")
        base = {kind: s for kind, mode, s in rows if mode == "none"}
        for kind, mode, s in rows:
            print(f"| {kind} | {mode} | {s:.3f} | {s / base[kind]:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
