"""Entanglement statistics against brute force (independent per-sequence autograd), in and out of training."""

import json
import os

import pytest
import torch

from entangle import config, losses, models
from entangle.diagnostics import classify, entanglement_stats, predicted_changes
from entangle.loop import train

TEXTS = [("Statement: the food was lovely.\nSentiment:", " Positive sentiment based on my judgement.",
          " Negative sentiment based on my judgement."),
         ("Hi", " a much longer chosen answer", " no"),
         ("A longer prompt, so that prompt lengths differ in the batch:", " ok", " fine then")]


def pairs_of(tok):
    enc = (lambda s: tok(s, add_special_tokens=False)["input_ids"])
    return [{"prompt_ids": enc(p), "chosen_ids": enc(c), "rejected_ids": enc(r)} for p, c, r in TEXTS]


def independent_grad(model, prompt, response):
    """Flattened gradient of log pi(response | prompt) from a plain full-logits forward of one sequence."""
    ids = torch.tensor([prompt + response])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[len(prompt) - 1:].sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp, params)]).double()


def brute(model, pairs):
    out = {"inner": [], "norm_w2": [], "norm_l2": []}
    for p in pairs:
        gw = independent_grad(model, p["prompt_ids"], p["chosen_ids"])
        gl = independent_grad(model, p["prompt_ids"], p["rejected_ids"])
        out["inner"].append(gw @ gl)
        out["norm_w2"].append(gw @ gw)
        out["norm_l2"].append(gl @ gl)
    return {k: torch.stack(v) for k, v in out.items()}


CASES = [("tiny", None), ("tiny-gpt2", None), ("tiny", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn"])]


def spy_on_unpacking(monkeypatch) -> list[int]:
    """How many recorded modules each prefix-shared forward unpacked into two rows per pair (one entry per forward)."""
    from entangle.diagnostics.ghost import GradientRecorder

    seen, side_pass = [], GradientRecorder.side_pass

    def spy(self, scored):
        seen.append(len(self.packed_uses))
        return side_pass(self, scored)

    monkeypatch.setattr(GradientRecorder, "side_pass", spy)
    return seen


@pytest.mark.parametrize("pack", [True, False], ids=["prefix-shared", "two-rows"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-6), ("float32", 1e-3)])
@pytest.mark.parametrize("arch, lora", CASES, ids=["llama", "gpt2-tied", "llama-lora", "gpt2-lora"])
def test_fast_path_matches_brute_force(tok, arch, lora, dtype, tol, pack, caplog, monkeypatch):
    """Llama's RMSNorm computes in float32 even in a float64 model; on prefix-shared rows the rejected side's prompt
    gradients are the training gradient minus the chosen side's, which exposes that rounding (up to 4e-7 relative
    measured), still well inside the float64 tolerance."""
    unpacked = spy_on_unpacking(monkeypatch)
    settings = models.LoraConfig(r=4, target_modules=lora) if lora else None
    model, _ = models.load_model(arch, dtype=dtype, tokenizer=tok, lora=settings)
    if lora:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    pairs = pairs_of(tok)
    stats = entanglement_stats(model, pairs, pad_id=tok.pad_token_id, pack=pack)
    assert "exact slow path" not in caplog.text  # the fast path applied
    assert (len(unpacked) == 1 and unpacked[0] > 0) if pack else unpacked in ([], [0])
    ref = brute(model, pairs)
    for k in ("inner", "norm_w2", "norm_l2"):
        rel = ((stats[k].double() - ref[k]).abs() / ref[k].abs()).max()
        assert rel <= tol, (k, float(rel))
    assert stats["cos"].shape == (3,) and (stats["cos"].abs() <= 1 + 1e-6).all()


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
def test_fast_path_on_a_single_prefix_shared_pair(tok, arch, monkeypatch):
    """One pair: the packed batch has one row, which the recorder must not take for GPT-2's batch-broadcast position
    embedding (its position ids are given explicitly there)."""
    unpacked = spy_on_unpacking(monkeypatch)
    model, _ = models.load_model(arch, dtype="float64", tokenizer=tok)
    pairs = pairs_of(tok)[:1]
    stats, ref = entanglement_stats(model, pairs, pad_id=tok.pad_token_id), brute(model, pairs)
    assert len(unpacked) == 1 and unpacked[0] > 0
    for k in ("inner", "norm_w2", "norm_l2"):
        torch.testing.assert_close(stats[k].double(), ref[k], rtol=1e-6, atol=0)


def test_exact_method_matches_brute_force(tok):
    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    pairs = pairs_of(tok)
    stats, ref = entanglement_stats(model, pairs, method="exact", pad_id=tok.pad_token_id), brute(model, pairs)
    torch.testing.assert_close(stats["inner"], ref["inner"], rtol=1e-9, atol=0)


def test_case_classification_agrees_with_a_small_sgd_step(tok):
    """For each pair alone: SGD on the DPO loss with a small step; the realised changes of both
    log-probs have the signs (and, to first order, the sizes) that the statistics predict."""
    eta = 1e-6
    fn = losses.get("dpo", beta=0.5)
    seen = set()
    for seed in range(4):
        model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok, seed=seed)
        for p in pairs_of(tok):
            stats = entanglement_stats(model, [p], pad_id=tok.pad_token_id)
            params = [q for q in model.parameters() if q.requires_grad]

            def logps():
                ids_w = torch.tensor([p["prompt_ids"] + p["chosen_ids"]])
                ids_l = torch.tensor([p["prompt_ids"] + p["rejected_ids"]])
                n = len(p["prompt_ids"])

                def lp(ids):
                    return model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[n - 1:].sum()
                return lp(ids_w), lp(ids_l)

            w, l = logps()
            ref_w, ref_l = w.detach(), l.detach()
            loss = fn(w[None], l[None], ref_w[None], ref_l[None]).sum()
            d_w, d_l = losses.coefficients(fn, w.detach()[None], l.detach()[None], ref_w[None], ref_l[None])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for q, g in zip(params, grads):
                    q.sub_(eta * g)
                w2, l2 = logps()
            pred_w, pred_l = predicted_changes(stats, d_w, d_l, eta)
            case = int(classify(pred_w, pred_l)[0])
            real_w, real_l = float(w2 - ref_w), float(l2 - ref_l)
            assert case == int(classify(torch.tensor([real_w]), torch.tensor([real_l]))[0])
            assert real_w == pytest.approx(float(pred_w[0]), rel=0.02)
            assert real_l == pytest.approx(float(pred_l[0]), rel=0.02)
            seen.add(case)
            with torch.no_grad():
                for q, g in zip(params, grads):
                    q.add_(eta * g)
    assert seen  # at least one case observed; which ones depends on the random models


def run_cfg(out, *extra):
    return config.load(None, ["model.name=tiny", "model.dtype=float64",
                              "data.train=synthetic:sentiment?config=long&n=32", "data.max_length=96",
                              "data.max_prompt_length=96",   # whole prompts, responses cut to fit (the pairs
                                                             # these tests' tolerances were worked out on)
                              "train.batch_size=2", "train.grad_accum=2", "train.max_steps=2",
                              "optimizer.lr=1e-3", "tracking.progress=false", f"train.output_dir={out}",
                              "diagnostics.entanglement.every=1", *extra])


def pair_rows(out):
    with open(os.path.join(out, "entanglement.jsonl")) as f:
        return [json.loads(x) for x in f]


@pytest.mark.parametrize("extra", [[], ["model.name=tiny-gpt2"], ["model.lora.r=4"], ["loss.name=simpo"],
                                   ["loss.token_mask=sparse", "loss.mask_lr=0.05"]],
                         ids=["dpo", "gpt2-tied", "lora", "simpo", "sparse-mask"])
def test_in_training_statistics_equal_the_exact_path(tmp_path, extra):
    """The training backward carries each row's loss coefficient; divided out, the statistics equal
    the exact per-row computation, under accumulation and padding."""
    train(run_cfg(tmp_path / "fast", *extra))
    train(run_cfg(tmp_path / "exact", "diagnostics.entanglement.method=exact", *extra))
    fast, exact = pair_rows(tmp_path / "fast"), pair_rows(tmp_path / "exact")
    assert len(fast) == len(exact) == 8  # 2 steps x 2 micro-batches x 2 pairs
    for a, b in zip(fast, exact):
        assert a["pair"] == b["pair"] and a["case"] == b["case"]
        for k in ("inner", "norm_w2", "norm_l2", "cos", "d_w", "d_l", "pred_dlogp_w"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
    metrics = [json.loads(x) for x in open(tmp_path / "fast" / "metrics.jsonl")]
    m = metrics[0]
    assert m["entanglement/exact_fallback"] == 0
    assert m["entanglement/case1"] + m["entanglement/case2"] + m["entanglement/case3"] <= 1 + 1e-9
    assert m["entanglement/inner"] == pytest.approx(sum(r["inner"] for r in fast[:4]) / 4, rel=1e-5)


def test_diagnostic_steps_read_the_prefix_shared_rows_and_agree_with_two_rows(tmp_path, monkeypatch):
    """The step keeps one row [prompt, chosen, rejected] per pair while the probe measures (every micro-batch's
    modules are unpacked), and every per-pair quantity equals the run on two rows per pair."""
    unpacked = spy_on_unpacking(monkeypatch)
    extra = ["diagnostics.entanglement.positions=true"]
    train(run_cfg(tmp_path / "packed", *extra))
    assert len(unpacked) == 4 and min(unpacked) > 10          # 2 steps x 2 micro-batches, all prefix-shared
    train(run_cfg(tmp_path / "rows", "train.prefix_sharing=false", *extra))
    assert len(unpacked) == 8 and unpacked[4:] == [0] * 4
    packed, rows = pair_rows(tmp_path / "packed"), pair_rows(tmp_path / "rows")
    assert len(packed) == len(rows) == 8
    for a, b in zip(packed, rows):
        assert a["pair"] == b["pair"] and a["case"] == b["case"]
        for k in ("inner", "norm_w2", "norm_l2", "pred_dlogp_w"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
        for k in ("step_dlogp_w", "step_dlogp_l"):   # along AdamW's update, which the layouts' rounding moves (3e-6)
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
    views = [json.loads((tmp_path / run / "entanglement_positions" / "step-2.json").read_text())
             for run in ("packed", "rows")]
    for a, b in zip(*views):
        torch.testing.assert_close(torch.tensor(a["chosen"]), torch.tensor(b["chosen"]), rtol=1e-5,
                                   atol=1e-7 * abs(a["inner"]))
        torch.testing.assert_close(torch.tensor(a["rejected"]), torch.tensor(b["rejected"]), rtol=1e-5,
                                   atol=1e-7 * abs(a["inner"]))
    first = [json.loads(x) for x in open(tmp_path / "packed" / "metrics.jsonl")][0]
    again = [json.loads(x) for x in open(tmp_path / "rows" / "metrics.jsonl")][0]
    for k in ("entanglement/batch_inner", "entanglement/batch_cos", "loss"):
        assert first[k] == pytest.approx(again[k], rel=1e-6), k


def test_zero_coefficient_falls_back_to_the_exact_path_and_says_so(tmp_path, caplog):
    """SLiC with delta = -100 is past its margin: every coefficient is 0, nothing to divide out."""
    train(run_cfg(tmp_path / "run", "loss.name=slic", "loss.params.delta=-100", "diagnostics.entanglement.realised=true"))
    assert "fast path not applicable" in caplog.text and "zero loss coefficient" in caplog.text
    m = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert m["entanglement/exact_fallback"] == 2 and m["entanglement/norm_w"] > 0
    rows = pair_rows(tmp_path / "run")
    assert all(r["d_w"] == 0 and "real_dlogp_w" in r for r in rows)


def test_token_view_sums_to_the_pair_inner_product(tok):
    from entangle.diagnostics.tokens import token_gradients

    model, _ = models.load_model("tiny-gpt2", dtype="float64", tokenizer=tok)
    p = pairs_of(tok)[0]
    view = token_gradients(model, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], tok)
    ref = brute(model, [p])
    assert view["inner"].shape == (len(p["chosen_ids"]), len(p["rejected_ids"]))
    assert view["total_inner"] == pytest.approx(float(ref["inner"][0]), rel=1e-9)
    assert view["chosen_tokens"][0] == " " and "".join(view["rejected_tokens"]).startswith(" Negative")
    # identical suffix tokens: the same token at the same offset from the end has cosine near 1 ...
    assert float(view["cos"][-1, -1]) > 0.5
    assert (view["cos"].abs() <= 1 + 1e-9).all()


def test_token_views_are_saved_during_training(tmp_path):
    train(run_cfg(tmp_path / "run", "diagnostics.entanglement.every=2", "diagnostics.entanglement.tokens=1"))
    views = json.loads((tmp_path / "run" / "entanglement_tokens" / "step-2.json").read_text())
    assert len(views) == 1 and len(views[0]["cos"]) == len(views[0]["chosen_tokens"])


def test_token_view_float32_path_matches_float64(tok):
    """Large models hold the rejected tokens' gradients in float32 (max_bytes); same numbers to ~1e-5."""
    from entangle.diagnostics.tokens import token_gradients

    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    p = pairs_of(tok)[0]
    exact = token_gradients(model, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"])
    n = sum(q.numel() for q in model.parameters()) * len(p["rejected_ids"])
    small = token_gradients(model, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], max_bytes=4 * n)
    assert exact["method"] == small["method"] == "exact"
    torch.testing.assert_close(small["cos"], exact["cos"], atol=1e-5, rtol=1e-4)
    assert small["pair_cos"] == pytest.approx(exact["pair_cos"], abs=1e-5)
    assert -1 <= exact["pair_cos"] <= 1


def test_token_view_past_its_memory_budget_is_a_sketch_within_its_stated_error(tok):
    """A budget smaller than the rejected tokens' gradients: each token gradient is sketched into k = 8192
    buckets as it is made. Its stated error sqrt(2 / k) = 0.0156 bounds a cosine's standard deviation; every
    cosine is within 5 of them of the exact one, the typical error within 1.5, and the same seed repeats."""
    from entangle.diagnostics.tokens import token_gradients

    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    p = pairs_of(tok)[0]
    exact = token_gradients(model, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"])
    sketch = token_gradients(model, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], max_bytes=1, sketch_dim=8192)
    assert sketch["method"] == "sketch" and sketch["sketch_error"] == pytest.approx((2 / 8192) ** 0.5)
    err = (sketch["cos"] - exact["cos"]).abs()
    assert float(err.max()) < 5 * sketch["sketch_error"] and float(err.mean()) < 1.5 * sketch["sketch_error"]
    again = token_gradients(model, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], max_bytes=1, sketch_dim=8192)
    assert torch.equal(again["cos"], sketch["cos"])


@pytest.mark.parametrize("lr, extra", [("1e-6", []), ("1e-7", ["model.name=tiny-gpt2"]),
                                       ("1e-6", ["model.lora.r=4", "model.lora.alpha=64"])],
                         ids=["llama", "gpt2-tied", "lora"])
def test_first_order_change_along_the_actual_update_matches_the_realised_change(tmp_path, lr, extra):
    """`step_dlogp = <grad log pi, theta_after - theta_before>` for AdamW's own update (accumulated
    over 2 micro-batches) equals the realised change up to second order: for GPT-2 the gap shrinks
    tenfold from lr 1e-6 (1.4e-3 relative) to 1e-7. Llama's RMSNorm computes in float32 even in a
    float64 model, which puts a ~1e-7 floor under the realised differences, hence lr 1e-6 there.
    The plain-SGD prediction is far smaller than either: Adam's step is not lr * gradient."""
    train(run_cfg(tmp_path / "run", f"optimizer.lr={lr}", "train.max_steps=1", "schedule.warmup_steps=0",
                  "diagnostics.entanglement.realised=true", *extra))
    rows = pair_rows(tmp_path / "run")
    assert len(rows) == 4
    for r in rows:
        for side in ("w", "l"):
            assert r[f"step_dlogp_{side}"] == pytest.approx(r[f"real_dlogp_{side}"], rel=1e-3, abs=1e-12)
        assert abs(r["pred_dlogp_w"]) < abs(r["step_dlogp_w"])
    m = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert m["entanglement/step_dlogp_w"] == pytest.approx(sum(r["step_dlogp_w"] for r in rows) / 4, rel=1e-6)
    assert sum(m[f"entanglement/step_case{c}"] for c in (1, 2, 3)) <= 1 + 1e-9


def test_small_modules_per_row_gradients_serve_the_update_and_the_batch_sums(tmp_path, monkeypatch):
    """The norms' per-row gradients, made once for the pair products, also give step_dlogp and the batch sums (no
    second pass through those modules); recomputing them there instead (nothing kept) gives the same numbers."""
    from entangle.diagnostics.ghost import GradientRecorder

    calls = []
    for name in ("_generic_along", "_generic_sum"):
        original = getattr(GradientRecorder, name)
        monkeypatch.setattr(GradientRecorder, name,
                            lambda self, *a, _o=original, _n=name: calls.append(_n) or _o(self, *a))

    def run(out):
        train(run_cfg(out, "train.max_steps=1"))
        return pair_rows(out), json.loads(open(out / "metrics.jsonl").readline())

    kept_rows, kept_metrics = run(tmp_path / "kept")
    assert calls == [] and all("step_dlogp_w" in r for r in kept_rows)
    monkeypatch.setattr(GradientRecorder, "KEEP_DENSE", 0)
    again_rows, again_metrics = run(tmp_path / "again")
    assert "_generic_along" in calls and "_generic_sum" in calls
    for a, b in zip(kept_rows, again_rows):
        for k in ("step_dlogp_w", "step_dlogp_l", "inner"):
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-15)
    for k in ("entanglement/batch_inner", "entanglement/batch_norm_w", "entanglement/batch_norm_l"):
        assert kept_metrics[k] == pytest.approx(again_metrics[k], rel=1e-9)


def test_batch_mean_gradient_quantities_equal_brute_force(tmp_path):
    """One step of 2 micro-batches x 2 pairs: <mean_i grad log pi_w,i, mean_i grad log pi_l,i>, the two
    norms and their cosine, against the sum of independent per-sequence gradients."""
    cfg = run_cfg(tmp_path / "run", "train.max_steps=1")
    train(cfg)
    from entangle.assembly import load_pairs

    model, tok = models.load_model("tiny", dtype="float64")
    by_index = {p.index: p for p in load_pairs(cfg.data.train, tok, cfg.data, "train", None)[0]}
    rows = pair_rows(tmp_path / "run")
    gw = sum(independent_grad(model, by_index[r["pair"]].prompt_ids, by_index[r["pair"]].chosen_ids) for r in rows)
    gl = sum(independent_grad(model, by_index[r["pair"]].prompt_ids, by_index[r["pair"]].rejected_ids) for r in rows)
    gw, gl = gw / len(rows), gl / len(rows)
    m = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert m["entanglement/batch_inner"] == pytest.approx(float(gw @ gl), rel=1e-6)
    assert m["entanglement/batch_norm_w"] == pytest.approx(float(gw.norm()), rel=1e-6)
    assert m["entanglement/batch_norm_l"] == pytest.approx(float(gl.norm()), rel=1e-6)
    assert m["entanglement/batch_cos"] == pytest.approx(float(gw @ gl / (gw.norm() * gl.norm())), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_mean_products_in_pieces_equal_the_whole_products(dtype):
    """`dot3` walks the gradients in pieces (one not a multiple of the piece size here): the same three products
    as float64 products of the whole tensors."""
    from entangle.diagnostics.probe import dot3

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 29, generator=g, dtype=dtype), torch.randn(37, 29, generator=g, dtype=dtype)
    want = torch.stack([a.double().flatten() @ b.double().flatten(), a.double().norm() ** 2, b.double().norm() ** 2])
    for chunk in (100, 1073, 1 << 16):
        got = dot3(a, b, chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_update_and_batch_mean_quantities_can_be_switched_off(tmp_path):
    train(run_cfg(tmp_path / "run", "train.max_steps=1", "diagnostics.entanglement.step_changes=false",
                  "diagnostics.entanglement.batch_mean=false"))
    m = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert "entanglement/inner" in m
    assert not any(k.startswith(("entanglement/step_", "entanglement/batch_")) for k in m)
    assert not any("step_dlogp_w" in r for r in pair_rows(tmp_path / "run"))


def independent_positions(model, prompt, response, other_grads):
    """Per position t of prompt+response: <what position t's activations deposit into grad log pi(response),
    other_grads> (Linear: G_t A_t^T; GPT-2 Conv1D: A_t^T G_t; Embedding: G_t at row id_t), plus the rest
    (modules without a per-position form), from hooks on one plain sequence forward/backward."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    captured = []

    def hook(module, args, out):
        rec = [module, args[0].detach(), None]
        out.register_hook(lambda g: rec.__setitem__(2, g.detach()))
        captured.append(rec)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False))]
    ids = torch.tensor([prompt + response])
    model.zero_grad(set_to_none=True)
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[len(prompt) - 1:].sum()
    logp.backward()
    for h in handles:
        h.remove()
    contrib, rest = torch.zeros(ids.shape[1], dtype=torch.float64), 0.0
    for module, x, g in captured:
        x, g = x[0], g[0]                                                      # drop the batch dim
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            o = other_grads[p]
            if isinstance(module, nn.Linear):
                contrib += ((g @ o) * x).sum(-1) if name == "weight" else g @ o
            elif isinstance(module, Conv1D):
                contrib += ((x @ o) * g).sum(-1) if name == "weight" else g @ o
            elif isinstance(module, nn.Embedding):
                contrib[: x.shape[-1]] += (g * o[x]).sum(-1)
            else:
                rest += float((p.grad * o).sum())
    model.zero_grad(set_to_none=True)
    return contrib, rest


def grads_by_param(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[len(prompt) - 1:].sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return dict(zip(params, torch.autograd.grad(logp, params)))


@pytest.mark.parametrize("extra, arch", [([], "tiny"), (["model.name=tiny-gpt2"], "tiny-gpt2"),
                                          (["model.lora.r=4"], "tiny")], ids=["llama", "gpt2-tied", "lora"])
def test_position_split_equals_independent_per_position_deposits(tmp_path, extra, arch):
    """`entanglement_positions/step-1.json` (training: 2 micro-batches, padding, DPO coefficients
    divided out) against per-position deposits from a plain single-sequence forward; each side's
    positions plus `other` sum to the pair's inner product."""
    cfg = run_cfg(tmp_path / "run", "train.max_steps=1", "diagnostics.entanglement.positions=true", *extra)
    train(cfg)
    from entangle.assembly import load_pairs

    from accelerate.utils import set_seed

    lora = models.LoraConfig(r=4) if "model.lora.r=4" in extra else None
    set_seed(0)  # as the loop does before loading: the same LoRA initialisation
    model, tok = models.load_model(arch, dtype="float64", lora=lora)
    by_index = {p.index: p for p in load_pairs(cfg.data.train, tok, cfg.data, "train", None)[0]}
    views = json.loads((tmp_path / "run" / "entanglement_positions" / "step-1.json").read_text())
    assert len(views) == 4
    for v in views:
        p = by_index[v["pair"]]
        assert "".join(v["chosen_tokens"]) == tok.decode(p.prompt_ids + p.chosen_ids)
        chosen = torch.tensor(v["chosen"], dtype=torch.float64)
        rejected = torch.tensor(v["rejected"], dtype=torch.float64)
        assert float(chosen.sum()) + v["other"] == pytest.approx(v["inner"], rel=1e-8)
        assert float(rejected.sum()) + v["other"] == pytest.approx(v["inner"], rel=1e-8)
        gl = grads_by_param(model, p.prompt_ids, p.rejected_ids)
        gw = grads_by_param(model, p.prompt_ids, p.chosen_ids)
        want_w, rest_w = independent_positions(model, p.prompt_ids, p.chosen_ids, gl)
        want_l, rest_l = independent_positions(model, p.prompt_ids, p.rejected_ids, gw)
        torch.testing.assert_close(chosen, want_w, rtol=1e-6, atol=1e-9 * abs(v["inner"]))
        torch.testing.assert_close(rejected, want_l, rtol=1e-6, atol=1e-9 * abs(v["inner"]))
        assert v["other"] == pytest.approx(rest_w, rel=1e-6, abs=1e-12) and rest_w == pytest.approx(rest_l, rel=1e-6,
                                                                                                      abs=1e-12)


def test_recorded_factors_share_float32_under_mixed_precision(tok):
    """Under autocast a linear's output (and its gradient) is bf16 while its input may stay float32; the recorder
    keeps both in float32 so every product it forms has one dtype (CUDA mixed precision failed on this)."""
    from entangle.diagnostics.ghost import GradientRecorder

    model, _ = models.load_model("tiny", dtype="float32", tokenizer=tok)
    ids = torch.tensor([tok("Statement: x\nSentiment: Positive.", add_special_tokens=False)["input_ids"]] * 2)
    rec = GradientRecorder(model)
    rec.start(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).logits
    out.float().sum().backward()
    uses = [u for us in rec.usages.values() for u in us]
    assert uses and all(u.x[0].dtype in (torch.float32, torch.long, torch.int64) for u in uses)
    assert all(u.g is None or u.g.dtype == torch.float32 for u in uses)
    assert any(u.g is not None for u in uses)


def test_entanglement_stats_takes_text_records_with_a_tokenizer():
    from entangle.data import parse_pair, tokenize_pairs
    from entangle.errors import DataError

    model, tok = models.load_model("tiny")
    records = [{"prompt": "Q: the film?", "chosen": " lovely", "rejected": " awful and long"},
               {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello there", "rejected": "go away"}]
    pairs, _ = tokenize_pairs([parse_pair(r, "x") for r in records], tok)
    from_text = entanglement_stats(model, records, "exact", tokenizer=tok)
    from_ids = entanglement_stats(model, pairs, "exact", tok.pad_token_id)
    for key in ("inner", "norm_w2", "norm_l2", "cos"):
        torch.testing.assert_close(from_text[key], from_ids[key])
    with pytest.raises(DataError, match="pair 1: give prompt_ids/chosen_ids/rejected_ids, or a prompt/chosen/"):
        entanglement_stats(model, records)


def test_position_split_makes_each_modules_per_row_gradients_once_not_per_pair(monkeypatch):
    """Modules without a per-position form (norms) give per-row gradients once for the whole batch: the number of
    such computations does not grow with the number of pairs."""
    from entangle import batching, data
    from entangle.diagnostics.ghost import GradientRecorder, row_layout
    from entangle.logps import sequence_logps

    model, tok = models.load_model("tiny", dtype="float64")
    calls = []
    original = GradientRecorder._dense
    monkeypatch.setattr(GradientRecorder, "_dense", lambda self, u, p: calls.append(1) or original(self, u, p))

    def split_calls(n_pairs):
        exs = [data.PreferenceExample(f"Q{i}: the film", " was lovely", " was awful") for i in range(n_pairs)]
        batch = batching.collate(data.tokenize_pairs(exs, tok)[0], tok.pad_token_id)
        rec = GradientRecorder(model)
        rec.start(batch.n_rows, *row_layout(batch))
        sequence_logps(model, batch, pack=False).logps.sum().backward()
        rec.stop()
        calls.clear()
        parts = rec.position_split(torch.ones(batch.n_rows))
        rec.close()
        model.zero_grad(set_to_none=True)
        return len(calls), len(parts)

    few, many = split_calls(2), split_calls(6)
    assert few[1] == 2 and many[1] == 6 and few[0] > 0
    assert few[0] == many[0]
