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

    def unsupported(self, coef):
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
