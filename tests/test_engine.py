"""engine and sharding: the distributed details behind one adapter, and full parameters from any wrapper (the
multi-process behaviour itself is tested through launches in test_loop, test_kto and test_trust_region)."""

import contextlib
from types import SimpleNamespace

import torch

from entangle import engine, models
from entangle.sharding import clean_name, full_parameters, inner, sharding


def fake(kind):
    flags = []
    acc = SimpleNamespace(distributed_type=SimpleNamespace(name=kind), flags=flags,
                          gradient_state=SimpleNamespace(_set_sync_gradients=flags.append),
                          no_sync=lambda model: contextlib.nullcontext(flags.append("no_sync")))
    return acc


def test_the_engine_says_how_a_step_accumulates_on_each_kind():
    for kind, sharded, scale in (("NO", False, 1), ("MULTI_GPU", False, 1), ("FSDP", True, 1), ("DEEPSPEED", True, 4)):
        acc = fake(kind)
        assert engine.is_sharded(acc) is sharded and engine.loss_scale(acc, 4) == scale
        with engine.accumulating(acc, None, last=True):   # the last micro-batch synchronises: nothing to switch off
            pass
        assert acc.flags == []
        with engine.accumulating(acc, None, last=False):
            pass
        assert acc.flags == ([False, True] if kind == "DEEPSPEED" else ["no_sync"])


def test_full_parameters_of_a_plain_model_are_its_own_under_clean_names():
    model, _ = models.load_model("tiny")
    assert sharding(model) == "none" and inner(model) is model
    wrapped = SimpleNamespace(module=model)
    assert inner(torch.nn.ModuleDict({"x": model})) is not None
    got = dict(full_parameters(model, keep=lambda n: n.endswith("weight"), prefix="model."))
    own = {n[len("model."):]: p for n, p in model.named_parameters() if n.startswith("model.") and n.endswith("weight")}
    assert got.keys() == own.keys() and all(torch.equal(got[k], own[k]) for k in own)
    assert clean_name("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.weight") == \
        "model.layers.0.mlp.weight"
    assert wrapped.module is model
