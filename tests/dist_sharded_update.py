"""Run under `torch.distributed.run --nproc_per_node 2` (gloo, CPU): a trust-region update from a sharded
policy equals the closed-form blend computed from the unsharded one, on every rank, gathering one piece
at a time. Usage: dist_sharded_update.py MODE... with MODE in fsdp, fsdp-flat (no original parameters),
fsdp2, zero3."""

import contextlib
import os
import sys

import torch
import torch.distributed as dist

from entangle import models, reference, sharding

ALPHA = 0.3
gathers = []      # numel of each gather, as it happens
active = [0, 0]   # [now, most at once]


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


@contextlib.contextmanager
def counted(numel):
    gathers.append(numel)
    active[0] += 1
    active[1] = max(active)
    try:
        yield
    finally:
        active[0] -= 1


def instrument(modes):
    """Count every gather and how many are held at once."""
    if {"fsdp", "fsdp-flat"} & set(modes):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        real_summon = FSDP.summon_full_params

        @contextlib.contextmanager
        def summon(module, *a, **k):
            assert k.get("recurse") is False, "a recursive gather would hold nested units at once"
            handle = module._handle
            with counted(handle.flat_param._unpadded_unsharded_size.numel() if handle else 0), \
                    real_summon(module, *a, **k):
                yield

        FSDP.summon_full_params = staticmethod(summon)
    if "fsdp2" in modes:
        from torch.distributed.tensor import DTensor

        real_full = DTensor.full_tensor

        def full_tensor(self, *a, **k):
            with counted(self.numel()):
                return real_full(self, *a, **k)

        DTensor.full_tensor = full_tensor
    if "zero3" in modes:
        import deepspeed

        real_gathered = deepspeed.zero.GatheredParameters

        @contextlib.contextmanager
        def gathered(params, *a, **k):
            with counted(sum(p.ds_numel for p in params)), real_gathered(params, *a, **k):
                yield

        deepspeed.zero.GatheredParameters = gathered


def shard(model, mode):
    base = model.get_base_model() if models.is_peft(model) else model
    blocks = [m for m in base.modules() if type(m).__name__ in base._no_split_modules]  # decoder layers
    if mode in ("fsdp", "fsdp-flat"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}), device_id=torch.device("cpu"),
                    use_orig_params=mode == "fsdp")
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in blocks:
            fully_shard(layer)
        fully_shard(model)
        return model
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    deepspeed.zero.Init(module=model, config_dict_or_path=cfg)
    return model


def check(mode: str, lora: bool, name: str = "tiny"):
    tok = models.byte_tokenizer()
    settings = models.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]) if lora else None
    torch.manual_seed(0)  # the LoRA A init draws from the global generator: the same on every rank
    policy, _ = models.load_model(name, dtype="float32", tokenizer=tok, lora=settings)
    ref = reference.TrustRegionReference(policy, alpha=ALPHA, tau=1)
    before = ref.state_tensors()
    perturb(policy, seed=7)
    after = reference.lora_deltas(policy) if lora else {n: p.detach().clone() for n, p in policy.named_parameters()}
    total = sum(p.numel() for p in policy.parameters())
    start = len(gathers)
    ref.update(shard(policy, mode))
    got = ref.state_tensors()
    assert set(got) == set(after), sorted(set(got) ^ set(after))[:4]
    for n, want in after.items():
        expected = (1 - ALPHA) * before.get(n, torch.zeros_like(want)) + ALPHA * want.float()
        torch.testing.assert_close(got[n], expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{mode} {n}: {m}")
    mine = gathers[start:]
    assert mine, "nothing was gathered"
    assert active[1] == 1, f"{active[1]} pieces gathered at once"
    assert max(mine) < total, f"one gather held {max(mine)} of {total} elements: the whole model"
    # every rank holds the same reference
    flat = torch.cat([t.flatten() for _, t in sorted(got.items())])
    both = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1])
    return len(mine), max(mine), total


if __name__ == "__main__":
    dist.init_process_group("gloo")
    instrument(sys.argv[1:])
    assert sharding.sharding(torch.nn.Linear(2, 2)) == "none"
    for mode in sys.argv[1:]:
        full = check(mode, lora=False)
        check(mode, lora=False, name="tiny-gpt2")   # tied embeddings and head: one parameter, read once
        # FSDP1 without original parameters cannot wrap a unit that mixes frozen and trainable weights
        lora = check(mode, lora=True) if mode != "fsdp-flat" else ("-", "-", "-")
        if dist.get_rank() == 0:
            print(f"OK {mode} full gathers={full[0]} largest={full[1]}/{full[2]} lora gathers={lora[0]} "
                  f"largest={lora[1]}/{lora[2]}")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo/DeepSpeed threads at exit sometimes abort the process
