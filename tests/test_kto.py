"""KTO and TR-KTO: data, the reference point z0, the per-example loss, training, references, resume, DDP."""

import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import write_jsonl
from entangle import batching, config, data, losses
from entangle.assembly import build
from entangle.cli import main
from entangle.errors import ConfigError
from conftest import naive_logps
from entangle.loop import fit, train
from entangle.step import unpaired_forward

TIMING = {"tokens_per_s", "examples_per_s", "step_time_s"}
TOPICS = ["the weather", "my garden", "a new phone", "the train", "dinner", "the match", "a book", "the office"]


def distinct_rows(n=64, seed=0):
    """Desirable and undesirable completions that share no words: KTO should raise one and lower the other."""
    rng = random.Random(seed)
    out = []
    for _ in range(n // 2):
        t = rng.choice(TOPICS)
        out.append({"prompt": f"Tell me about {t}.", "completion": f" Happy to help: {t} is lovely today.",
                    "label": True})
        out.append({"prompt": f"Tell me about {t}.", "completion": " No. Go away.", "label": False})
    return out


def distinct_files(folder):
    """Training (32 rows) and held-out (8 rows) files of `distinct_rows` in `folder`."""
    train_path, eval_path = os.path.join(folder, "kto-train.jsonl"), os.path.join(folder, "kto-eval.jsonl")
    if not os.path.exists(train_path):
        write_jsonl(train_path, distinct_rows(32))
        write_jsonl(eval_path, distinct_rows(8, seed=1))
    return train_path, eval_path


def kto_cfg(out, *overrides):
    train_path, eval_path = distinct_files(os.path.dirname(str(out)))
    base = ["model.name=tiny", "loss.name=kto", f"data.train={train_path}", f"data.eval={eval_path}",
            "data.max_length=64", "optimizer.lr=1e-3", "train.batch_size=4", "train.max_steps=6",
            "tracking.progress=false", "train.eval_at_start=false", f"train.output_dir={out}"]
    return config.load(None, base + list(overrides))


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def test_preference_pairs_split_in_two_and_kl_rows_are_other_examples(tmp_path, tok):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"}
                                           for i in range(5)])
    examples, _ = data.read_examples(p, unpaired=True)
    assert [e.label for e in examples] == [True, False] * 5
    assert examples[0].completion == " good 0" and examples[1].completion == " bad 0" and examples[1].where == "p.jsonl:1"
    items, _ = data.tokenize_unpaired(examples, tok, seed=3)
    completions = [tuple(it.completion_ids) for it in items]
    kl = [tuple(it.kl_ids) for it in items]
    assert sorted(kl) == sorted(completions)                      # a permutation of the completions ...
    assert all(k != c for k, c in zip(kl, completions))            # ... never the example's own
    again, _ = data.tokenize_unpaired(examples, tok, seed=3)
    assert [it.kl_ids for it in again] == [it.kl_ids for it in items]   # fixed by the seed
    batch = batching.collate(items[:3], tok.pad_token_id)
    assert batch.n_rows == 6 and batch.extra["labels"].tolist() == [True, False, True]
    kl_row = batch.input_ids[3][batch.response_mask[3]].tolist()
    assert kl_row == items[0].kl_ids


def test_bad_labels_and_one_kind_only_are_one_line_errors(tmp_path, capsys):
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Q", "completion": " a"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "completion": " a", "label": "true"}])
    only = write_jsonl(tmp_path / "o.jsonl", [{"prompt": f"Q{i}", "completion": " a", "label": True}
                                              for i in range(8)])
    for path, message in ((missing, "m.jsonl:1: field 'label' must be true or false, got None"),
                          (text, "t.jsonl:1: field 'label' must be true or false, got 'true'"),
                          (only, "all 8 examples are desirable (label true); KTO needs both")):
        rc = main(["-q", "train", "model.name=tiny", "loss.name=kto", f"data.train={path}", "data.eval=null",
                   f"train.output_dir={tmp_path / 'run'}", "train.overwrite=true"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_diagnostics_that_need_pairs_are_refused_with_kto():
    for key in ("diagnostics.entanglement.every=1", "optimizer.pairwise_normalized=true", "loss.token_mask=sparse"):
        with pytest.raises(ConfigError, match="needs preference pairs in one batch"):
            config.load(None, ["loss.name=kto", key])


def test_the_step_loss_is_the_papers_formula_with_z0_from_the_kl_rows(tmp_path):
    """By hand: naive log-probs of the example and KL rows, z0 = max(0, mean KL log-ratio), then eq. 8."""
    run = build(kto_cfg(tmp_path / "r", "reference.type=frozen", "loss.params.beta=0.5",
                        "loss.params.desirable_weight=1.5", "loss.params.undesirable_weight=0.75"))
    model = run.accelerator.unwrap_model(run.policy).model
    initial = copy.deepcopy(model)
    batch = batching.collate(run.train_pairs[:4], run.tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():   # move the policy off the (frozen) reference so that z0 and the rewards are not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ref_all, pol_all = naive_logps(initial, batch), naive_logps(model, batch)
    B = 4
    z0 = max(0.0, float((pol_all[B:] - ref_all[B:]).mean()))
    r = pol_all[:B] - ref_all[:B]
    labels = batch.extra["labels"]
    sig = torch.sigmoid
    want = torch.where(labels, 1.5 * (1 - sig(0.5 * (r - z0))), 0.75 * (1 - sig(0.5 * (z0 - r))))
    loss, metrics, logps = unpaired_forward(run.policy, run.loss_fn, run.reference, batch)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert float(logps.z0) == pytest.approx(z0, abs=1e-5)
    assert float(metrics["count/chosen"]) == int(labels.sum())


def test_a_tiny_kto_run_raises_desirable_and_lowers_undesirable(tmp_path):
    cfg = kto_cfg(tmp_path / "r", "data.eval=null", "train.max_steps=20", "train.batch_size=8")
    result = fit(build(cfg, train_data=distinct_rows(64), eval_data=distinct_rows(16, seed=1)))   # in-memory data
    last = rows(result.run_dir)[-1]
    assert last["eval/rewards/chosen"] > 0.5 and last["eval/rewards/rejected"] < 0   # beta * (log pi - log pi_ref)
    assert last["eval/ref/margin_vs_init"] > 5 and last["count/chosen"] + last["count/rejected"] == 8
    assert {"kl", "logps/chosen", "logps/rejected", "rewards/margins", "eval/kl"} <= set(last)


def test_gradient_accumulation_matches_a_large_batch_with_one_z0_per_step(tmp_path):
    big = rows(train(kto_cfg(tmp_path / "big", "train.batch_size=4")).run_dir)
    acc = rows(train(kto_cfg(tmp_path / "acc", "train.batch_size=2", "train.grad_accum=2")).run_dir)
    assert any(r["kl"] > 0 for r in big)
    for x, y in zip(big, acc):
        for k in ("loss", "kl", "rewards/margins", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_precomputed_reference_trains_the_same_numbers_as_frozen(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTANGLE_CACHE", str(tmp_path / "cache"))
    frozen = rows(train(kto_cfg(tmp_path / "f", "reference.type=frozen")).run_dir)
    pre = rows(train(kto_cfg(tmp_path / "p", "reference.type=precomputed")).run_dir)
    for x, y in zip(frozen, pre):
        for k in ("loss", "kl", "rewards/chosen", "eval/rewards/rejected"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)


@pytest.mark.parametrize("extra", [[], ["model.lora.r=4", "optimizer.lr=1e-2"]], ids=["full", "lora"])
def test_tr_kto_moves_its_reference_and_alpha_zero_is_static(tmp_path, extra):
    hard = rows(train(kto_cfg(tmp_path / "h", "reference.type=hard", "reference.tau=2", *extra)).run_dir)
    assert [r["ref/updates"] for r in hard] == [0, 1, 1, 2, 2, 3]   # the reference is the policy at steps 2, 4, 6
    soft = rows(train(kto_cfg(tmp_path / "s", "reference.type=soft", "reference.alpha=0.5", *extra)).run_dir)
    assert soft[-1]["ref/updates"] == 6 and soft[-1]["ref/drift"] > 0
    static = rows(train(kto_cfg(tmp_path / "z0", "reference.type=frozen", *extra)).run_dir)
    zero = rows(train(kto_cfg(tmp_path / "z", "reference.type=trust_region", "reference.alpha=0",
                              "reference.tau=1", *extra)).run_dir)
    assert [r["loss"] for r in static] == [r["loss"] for r in zero]
    assert soft[-1]["loss"] != static[-1]["loss"]


@pytest.mark.parametrize("extra", [["reference.type=frozen"], ["reference.type=soft", "model.lora.r=4"]],
                         ids=["kto", "tr-kto-lora"])
def test_resumed_kto_run_equals_uninterrupted(tmp_path, extra):
    train(kto_cfg(tmp_path / "a", "train.eval_every=2", *extra))

    def stop_at_3(row, stop):
        if row["step"] == 3:
            stop()

    train(kto_cfg(tmp_path / "b", "train.eval_every=2", *extra), callbacks=[stop_at_3])
    train(kto_cfg(tmp_path / "b", "train.eval_every=2", "train.resume=latest", *extra))
    assert rows(tmp_path / "a") == rows(tmp_path / "b")


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path):
    common = ["data.eval=null", "train.max_steps=4", "train.device=cpu"]
    one = rows(train(kto_cfg(tmp_path / "one", "train.batch_size=4", *common)).run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "entangle.cli",
           "-q", "train", "model.name=tiny", "loss.name=kto", f"data.train={distinct_files(str(tmp_path))[0]}",
           "data.max_length=64", "optimizer.lr=1e-3", "train.batch_size=2", "tracking.progress=false",
           f"train.output_dir={tmp_path / 'two'}", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = rows(tmp_path / "two")
    assert len(one) == len(two) == 4 and any(r["kl"] > 0 for r in one)
    for x, y in zip(one, two):
        for k in ("loss", "kl", "rewards/chosen", "logps/rejected", "grad_norm", "count/chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_kto_loss_rejects_out_of_range_weights():
    with pytest.raises(ValueError, match="desirable_weight must be"):
        losses.get("kto", desirable_weight=-1.0)
