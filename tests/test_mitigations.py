"""The pairwise-normalised update (spec sec. 5): direction, case 1 to first order, exact fallback."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from entangle import config
from entangle.diagnostics.ghost import GradientRecorder, Unsupported
from entangle.loop import train


def cfg(out, *extra):
    return config.load(None, ["model.name=tiny", "model.dtype=float64",
                              "data.train=synthetic:sentiment?config=long&n=32", "data.max_length=96",
                              "optimizer.name=sgd", "optimizer.lr=1e-4", "optimizer.pairwise_normalized=true",
                              "schedule.warmup_steps=0", "schedule.decay=constant", "train.max_grad_norm=null",
                              "tracking.progress=false", f"train.output_dir={out}", *extra])


def rows(out):
    with open(os.path.join(out, "entanglement.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_a_single_pair_lands_in_case_1_with_the_closed_form_changes(tmp_path):
    """One pair per step, plain SGD, no clipping: theta moves by lr (d_w g_w/|g_w| - d_l g_l/|g_l|), so to
    first order d log pi_w = lr |g_w| (d_w - d_l cos) > 0 and d log pi_l = lr |g_l| (d_w cos - d_l) < 0."""
    train(cfg(tmp_path / "run", "train.batch_size=1", "train.max_steps=4", "diagnostics.entanglement.every=1"))
    got = rows(tmp_path / "run")
    assert len(got) == 4
    for r in got:
        want_w = 1e-4 * r["norm_w2"] ** 0.5 * (r["d_w"] - r["d_l"] * r["cos"])
        want_l = 1e-4 * r["norm_l2"] ** 0.5 * (r["d_w"] * r["cos"] - r["d_l"])
        assert r["step_dlogp_w"] == pytest.approx(want_w, rel=1e-6)
        assert r["step_dlogp_l"] == pytest.approx(want_l, rel=1e-6)
        assert r["step_dlogp_w"] > 0 > r["step_dlogp_l"]


def test_several_pairs_and_accumulation_match_the_exact_per_row_path(tmp_path, monkeypatch, caplog):
    """2 micro-batches x 2 pairs: the recorder's weighted sums equal per-row backward passes."""
    train(cfg(tmp_path / "fast", "train.batch_size=2", "train.grad_accum=2", "train.max_steps=2"))

    def unsupported(self, coef, sums=False):
        raise Unsupported("forced for the test")

    monkeypatch.setattr(GradientRecorder, "result", unsupported)
    train(cfg(tmp_path / "exact", "train.batch_size=2", "train.grad_accum=2", "train.max_steps=2"))
    assert "pairwise_normalized: fast path not applicable (forced for the test)" in caplog.text
    a = load_file(str(tmp_path / "fast" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "exact" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12)
    from entangle.models import load_model

    start, _ = load_model("tiny", dtype="float64")
    moved = sum(float((a[k] - v.detach()).abs().sum()) for k, v in start.state_dict().items() if k in a)
    assert moved > 0


# ------------------------------------------------------------------------------------ sparse token mask


def mask_cfg(out, *extra):
    return config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=long&n=32",
                              "data.eval=synthetic:sentiment?config=long&n=8&split=test", "data.max_length=96",
                              "optimizer.lr=1e-3", "loss.token_mask=sparse", "loss.mask_lr=0.05",
                              "train.batch_size=4", "train.max_steps=4", "tracking.progress=false",
                              f"train.output_dir={out}", *extra])


def test_the_masked_margin_is_the_weighted_token_sum_with_the_same_weights_on_the_reference():
    """At step 0 every weight is mask_init = 0.9, so the masked sums are 0.9 x the plain sums and the
    DPO logit is 0.9 x the unmasked one; the loss adds mask_l1 x the mean weight (0.9)."""
    from entangle import batching, data, losses, models, reference, synthetic
    from entangle.logps import Policy, sequence_logps
    from entangle.mitigations import TokenMask
    from entangle.step import pair_forward

    model, tok = models.load_model("tiny", dtype="float64")
    pairs, _ = data.tokenize_pairs(synthetic.from_source("synthetic:sentiment?config=short&n=3"), tok, 256)
    batch = batching.collate(pairs, tok.pad_token_id)
    assert batch.n_rows == 6
    policy = Policy(model, TokenMask(model.config.hidden_size, 0.9).double())
    out = sequence_logps(policy, batch, token_level=True)
    torch.testing.assert_close(out.masked, (out.weights * out.token_logps).sum(1))
    torch.testing.assert_close(out.masked, 0.9 * out.logps)
    assert out.weights[~batch.response_mask].abs().max() == 0        # no weight off the responses
    ref = reference.make_reference("frozen", model)
    fn = losses.get("dpo", beta=0.1)
    per_pair, sums, _ = pair_forward(policy, fn, ref, batch, None, mask_l1=0.5)
    pc, pr = out.logps.chunk(2)
    rc, rr = ref.logps(batch).chunk(2)
    want = fn(0.9 * pc, 0.9 * pr, 0.9 * rc, 0.9 * rr) + 0.5 * 0.9
    torch.testing.assert_close(per_pair, want)
    assert float(sums["mask/mean"]) == pytest.approx(0.9 * 3)
    assert float(sums["logps/chosen"]) == pytest.approx(float(pc.sum()))   # logged log-probs are unmasked


def test_masks_are_learned_bounded_and_saved(tmp_path):
    out = tmp_path / "run"
    train(mask_cfg(out, "diagnostics.entanglement.every=2", "diagnostics.entanglement.tokens=1"))
    views = json.loads((out / "token_masks" / "final.json").read_text())
    assert len(views) == 8 and (out / "token_masks" / "step-2.json").exists()
    weights = [w for v in views for side in ("chosen", "rejected") for w in v[f"{side}_mask"]]
    assert all(0.0 <= w <= 1.0 for w in weights)
    assert max(weights) - min(weights) > 0.01                  # learned: no longer 0.9 everywhere
    assert all(len(v["chosen_mask"]) == len(v["chosen_tokens"]) for v in views)
    head = load_file(str(out / "final" / "token_mask.safetensors"))
    assert set(head) == {"proj.weight", "proj.bias"} and float(head["proj.weight"].abs().sum()) > 0
    with open(out / "metrics.jsonl") as f:
        m = [json.loads(x) for x in f][-1]
    assert 0 < m["mask/mean"] < 1 and "eval/mask/mean" in m and 0 <= m["mask/below_0.1"] <= 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")        # the model folder stays a plain HF folder


@pytest.mark.parametrize("extra, message", [
    (["reference.type=precomputed"], "reference.type=precomputed keeps sequence sums"),
    (["loss.mask_init=1.0"], "'loss.mask_init' must be in (0, 1)"),
    (["loss.token_mask=dense"], "'loss.token_mask' is 'dense'; valid: none, sparse"),
])
def test_bad_mask_settings_are_refused_with_one_line(tmp_path, extra, message):
    with pytest.raises(config.ConfigError) as e:
        mask_cfg(tmp_path / "run", *extra)
    assert message in str(e.value) and "\n" not in str(e.value)
