"""entangle's TRL callbacks: per-pair numbers against the exact API, training unchanged, PEFT, accumulation,
the report, and the trust-region reference against its closed form."""

import json
import os

import pytest
import torch

trl = pytest.importorskip("trl")

from entangle import models, reference, synthetic  # noqa: E402
from entangle.diagnostics import entanglement_stats  # noqa: E402
from entangle.errors import ConfigError  # noqa: E402
from entangle.integrations.trl import EntanglementCallback, TrustRegionCallback, pair_batch, split_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return models.save_tiny(str(tmp_path_factory.mktemp("tiny") / "base"), models.byte_tokenizer())


def make_trainer(folder, out, callbacks=(), lr=1e-3, steps=2, batch=4, accum=1, peft=False, **extra):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    pairs = synthetic.from_source("synthetic:sentiment?config=short&n=16")
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    settings = {"save_strategy": "no", **extra}
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                         max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", logging_steps=1,
                         report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, seed=0, max_length=96, **settings)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if peft else None
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args, train_dataset=data,
                             processing_class=models.byte_tokenizer(), callbacks=list(callbacks), peft_config=lora)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def rows(out, name):
    return [json.loads(x) for x in open(os.path.join(out, name))]


@pytest.mark.parametrize("peft,accum", [(False, 1), (True, 1), (False, 2)], ids=["full", "peft", "accumulation"])
def test_per_pair_numbers_equal_the_exact_api(tiny_folder, tmp_path, peft, accum):
    """lr 0: the parameters at step 1 are the initial ones, so the step's pairs can be measured again exactly."""
    trainer = make_trainer(tiny_folder, tmp_path, [EntanglementCallback(every=1)], lr=0.0, steps=1,
                           batch=4 // accum, accum=accum, peft=peft)
    loader = trainer.get_train_dataloader()
    pairs = [p for batch, _ in zip(loader, range(accum)) for p in split_rows(pair_batch(batch))]
    trainer.train()
    got = [r for r in rows(tmp_path, "entanglement.jsonl") if r["step"] == 1]
    assert len(got) == 4 == len(pairs)
    lm = trainer.accelerator.unwrap_model(trainer.model)
    exact = entanglement_stats(lm, pairs, "exact", trainer.processing_class.pad_token_id)
    for key in ("inner", "norm_w2", "norm_l2", "cos"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got], dtype=torch.float64), exact[key].double(),
                                   rtol=2e-4, atol=1e-6)
    for r in got:   # policy = reference at step 1: DPO's d = beta * sigma(0) on both sides
        assert r["d_w"] == pytest.approx(0.05, rel=1e-4) and r["d_l"] == pytest.approx(0.05, rel=1e-4)
    logged = [h for h in trainer.state.log_history if "entanglement/cos" in h]
    assert logged and logged[0]["entanglement/cos"] == pytest.approx(sum(r["cos"] for r in got) / 4, rel=1e-5)


def test_training_is_unchanged_by_the_callback(tiny_folder, tmp_path):
    plain = make_trainer(tiny_folder, tmp_path / "a", steps=3)
    plain.train()
    watched = make_trainer(tiny_folder, tmp_path / "b", [EntanglementCallback(every=1)], steps=3)
    watched.train()
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        a = [h[key] for h in plain.state.log_history if key in h]
        b = [h[key] for h in watched.state.log_history if key in h]
        assert len(a) == 3 and a == pytest.approx(b, rel=1e-5, abs=1e-7), key


def test_a_trl_run_renders_as_an_entangle_report(tiny_folder, tmp_path):
    from entangle.report import write_report

    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "mine": true}\n')     # a user's file from before
    make_trainer(tiny_folder, tmp_path, [EntanglementCallback(every=1, tokens=1)], steps=2).train()
    assert len(rows(tmp_path, "metrics.jsonl")) == 2 and (tmp_path / "entanglement_tokens" / "step-2.json").exists()
    assert rows(tmp_path, "metrics.jsonl.1") == [{"step": 7, "mine": True}]          # set aside, never deleted
    page = open(write_report([str(tmp_path)], str(tmp_path / "report"))).read()
    assert "Gradient entanglement" in page and "case" in page and page.count("data:image/png;base64,") >= 3


def test_unsupported_loss_types_are_refused(tiny_folder, tmp_path):
    trainer = make_trainer(tiny_folder, tmp_path, [EntanglementCallback()], loss_type=["aot"])
    with pytest.raises(ConfigError, match="loss_type \\['aot'\\] is not supported; one of: apo_down"):
        trainer.train()
    with pytest.raises(ConfigError, match="every must be an integer >= 1"):
        EntanglementCallback(every=0)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_trust_region_reference_is_the_closed_form_blend(tiny_folder, tmp_path, peft):
    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        seen = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.append(reference.lora_deltas(model) if peft else
                             {n: p.detach().float().clone() for n, p in model.named_parameters()})

    a, k = 0.5, 3
    snap, tr = Snap(), TrustRegionCallback(alpha=a, tau=1)
    snap.seen = []
    trainer = make_trainer(tiny_folder, tmp_path, [snap, tr], steps=k, lr=1e-2, peft=peft)
    start = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    got = tr.reference.delta if peft else dict(tr.reference.model.named_parameters())
    for name, value in got.items():
        init = 0.0 if peft else start[name]
        expected = (1 - a) ** k * init + sum(a * (1 - a) ** (k - i) * snap.seen[i - 1][name] for i in range(1, k + 1))
        torch.testing.assert_close(value.float(), expected, rtol=1e-5, atol=1e-6)
    assert tr.reference.updates == k
    logged = [h for h in trainer.state.log_history if "ref/updates" in h]
    assert [h["ref/updates"] for h in logged] == [1, 2, 3]


def test_peft_tr_dpo_trains(tiny_folder, tmp_path):
    trainer = make_trainer(tiny_folder, tmp_path, [TrustRegionCallback(alpha=0.3, tau=2)], steps=8, lr=3e-2, peft=True)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h]
    assert log[-1]["rewards/margins"] != 0 and log[-1]["ref/updates"] == 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in log)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_a_resumed_tr_dpo_run_continues_the_reference(tiny_folder, tmp_path, peft):
    whole = TrustRegionCallback(alpha=0.5, tau=1)
    make_trainer(tiny_folder, tmp_path / "a", [whole], steps=4, lr=1e-2, peft=peft).train()
    first = TrustRegionCallback(alpha=0.5, tau=1)
    make_trainer(tiny_folder, tmp_path / "b", [first], steps=4, lr=1e-2, peft=peft, save_strategy="steps",
                 save_steps=2).train()
    resumed = TrustRegionCallback(alpha=0.5, tau=1)
    trainer = make_trainer(tiny_folder, tmp_path / "b", [resumed], steps=4, lr=1e-2, peft=peft)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed.reference.updates == whole.reference.updates == 4
    a, b = whole.reference.state()[1], resumed.reference.state()[1]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_the_private_trainer_hooks_are_in_one_place_and_checked():
    """The TRL these tests run against is a tested release (add it to TESTED_TRL when upgrading), and a trainer
    without the private parts entangle uses is refused in one line."""
    import re

    from entangle.integrations import trl as integration

    assert ".".join(trl.__version__.split(".")[:2]) in integration.TESTED_TRL

    class NotATrainer:
        _metrics = {}

    with pytest.raises(ConfigError, match=r"has no trainer\._compute_loss; entangle's callbacks were tested"):
        integration.TrainerHooks(NotATrainer(), "EntanglementCallback")
    source = open(integration.__file__).read()
    outside = source[source.index("class EntanglementCallback"):]
    assert not re.search(r"trainer\._compute_loss\s*=|_metrics\[", outside)   # only TrainerHooks touches them
