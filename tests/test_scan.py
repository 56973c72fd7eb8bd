"""`entangle scan`: per-pair rows against the exact API and a direct CHES, filters, formats, bad input."""

import json

import pytest
import torch

from conftest import write_jsonl
from entangle import data, models, scanning, synthetic
from entangle.api import scan as scan_api
from entangle.cli import main
from entangle.diagnostics import entanglement_stats


def pairs_for(tok, n=6):
    examples = synthetic.from_source(f"synthetic:sentiment?config=short&n={n}")
    return tokenize(tok, examples)


def tokenize(tok, examples):
    return data.tokenize_pairs(examples, tok, 96)[0]


@pytest.mark.parametrize("name,lora", [("tiny", 0), ("tiny-gpt2", 0), ("tiny", 4), ("tiny-gpt2", 4)],
                         ids=["llama", "gpt2-tied", "llama-lora", "gpt2-lora"])
def test_rows_equal_the_exact_per_pair_api(name, lora):
    targets = ["q_proj", "v_proj"] if name == "tiny" else ["c_attn", "c_proj"]
    model, tok = models.load_model(name, lora=models.LoraConfig(r=lora, target_modules=targets) if lora else None)
    if lora:   # fresh adapters have B = 0; move them so that every adapter matrix has a gradient
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    pairs = pairs_for(tok)
    rows = scanning.scan(model, tok, pairs, "dpo", method="fast", batch_size=4)
    exact = entanglement_stats(model, pairs, "exact", tok.pad_token_id)
    assert [r["index"] for r in rows] == [p.index for p in pairs]
    for key in ("inner", "norm_w2", "norm_l2", "cos"):
        torch.testing.assert_close(torch.tensor([r[key] for r in rows], dtype=torch.float64), exact[key].double(),
                                   rtol=2e-4, atol=1e-6)
    for r in rows:   # at the start policy = reference: DPO's d = beta * sigma(0) on both sides
        assert r["d_w"] == pytest.approx(0.05) and r["d_l"] == pytest.approx(0.05)
        pred_w = 0.05 * (r["norm_w2"] - r["inner"])
        pred_l = 0.05 * (r["inner"] - r["norm_l2"])
        assert r["pred_dlogp_w"] == pytest.approx(pred_w, rel=1e-6) and r["pred_dlogp_l"] == pytest.approx(pred_l, rel=1e-6)
        assert r["case"] == {(True, False): 1, (False, False): 2, (True, True): 3, (False, True): 0}[
            (pred_w > 0, pred_l > 0)]


@pytest.mark.parametrize("name,method", [("tiny", "fast"), ("tiny-gpt2", "fast"), ("tiny", "exact")])
def test_ches_equals_a_direct_computation_from_hidden_states(name, method):
    """Razin et al. eq. 3 from `output_hidden_states`, one pair at a time, no shared code with the scan
    (fast: read off the LM head's input during the recorded pass; exact: a separate forward)."""
    model, tok = models.load_model(name)
    model.eval()
    pairs = pairs_for(tok, 4)
    rows = scanning.scan(model, tok, pairs, "dpo", method=method, batch_size=3)
    for p, r in zip(pairs, rows):
        sums = []
        for response in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + response])
            with torch.no_grad():
                h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double()   # [T, d]
            P = len(p.prompt_ids)
            sums.append((h[P - 1 : P - 1 + len(response)].sum(0), len(response)))
        (hw, nw), (hl, nl) = sums
        assert r["ches"] == pytest.approx(float(hw @ hl - hw @ hw), rel=1e-4)
        assert r["ches_norm"] == pytest.approx(float((hw / nw) @ (hl / nl) - (hw / nw) @ (hw / nw)), rel=1e-4)
        assert (r["len_w"], r["len_l"]) == (nw, nl)


def test_shared_tokens_and_filters_keep_exactly_the_rows_they_should():
    assert scanning.shared_tokens([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(2 * 2 / 7)
    rows = [{"index": i, "case": c, "cos": cos, "ches": ch, "ches_norm": -ch}
            for i, (c, cos, ch) in enumerate([(1, 0.1, 1.0), (2, 0.2, 2.0), (1, 0.95, 3.0), (3, 0.5, 4.0), (1, 0.3, 5.0)])]
    assert scanning.keep(rows, drop_case=[2]) == [0, 2, 3, 4]
    assert scanning.keep(rows, max_cos=0.9) == [0, 1, 3, 4]
    assert scanning.keep(rows, max_ches_quantile=0.75) == [0, 1, 2, 3]          # q75 of 1..5 is 4
    assert scanning.keep(rows, max_ches_norm_quantile=0.5) == [2, 3, 4]         # -ch <= median -3
    assert scanning.keep(rows, drop_case=[2], max_cos=0.9, max_ches_quantile=0.75) == [0, 3]


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_filtered_file_keeps_the_input_format_and_trains(tmp_path, ext):
    records = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}", "extra": i} for i in range(6)]
    src = tmp_path / f"pairs.{ext}"
    if ext == "jsonl":
        write_jsonl(src, records)
    elif ext == "json":
        src.write_text(json.dumps(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), src)
    out = tmp_path / f"kept.{ext}"
    assert scanning.filtered_name(str(src)) == f"kept.{ext}"
    assert scanning.write_filtered(str(src), [1, 4], str(out)) == 2
    assert [rec for _, rec in data.iter_records(str(out))] == [records[1], records[4]]   # every field kept


def test_the_api_writes_rows_report_and_the_kept_pairs(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Statement {i}.", "chosen": f" good {i}",
                                                  "rejected": f" bad thing {i}"} for i in range(8)])
    out = tmp_path / "scan"
    result = scan_api("tiny", src, out=str(out), max_cos=0.0, tokens=1, device="cpu")
    rows = [json.loads(x) for x in (out / "scan.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"inner", "norm_w2", "norm_l2", "cos", "d_w", "d_l", "case", "ches", "ches_norm",
                               "shared_tokens", "len_w", "len_l", "index"} <= set(rows[0])
    kept = [r["index"] for r in rows if r["cos"] <= 0.0]
    assert result["kept"] == kept and (out / "kept.jsonl").exists()
    assert len((out / "kept.jsonl").read_text().splitlines()) == len(kept)
    page = (out / "report.html").read_text()
    assert "most entangled pairs" in page and "Token view" in page and page.count("<img") >= 3
    assert json.loads((out / "summary.json").read_text())["filter"]["kept"] == len(kept)


def test_bad_input_is_one_line(tmp_path, capsys):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    not_lm = tmp_path / "not-lm"
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=300, dim=16, n_layers=1, n_heads=2,
                                                         hidden_dim=32)).save_pretrained(not_lm)
    models.byte_tokenizer().save_pretrained(not_lm)
    capsys.readouterr()   # the save's own progress bar
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"}])
    for args, message in (([str(not_lm), "--data", good], "is not a causal language model (DistilBertConfig)"),
                          (["tiny", "--data", str(empty)], "empty.jsonl: no usable records"),
                          (["tiny", "--data", good, "--max-cos", "2"], "--max-cos must be in [-1, 1]"),
                          (["tiny", "--data", good, "--loss", "kto"], "the scan scores preference pairs"),
                          (["tiny", "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file")):
        rc = main(["-q", "scan", *args, "--out", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_a_partial_scan_measures_the_last_layers_exactly(name):
    model, tok = models.load_model(name)
    what = scanning.last_layers_only(model, 1)
    assert what == "the last 1 of 2 decoder layers and the final norm"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".0." in n or "embed" in n or "wte" in n or "lm_head" in n for n in trainable)
    assert any(".1." in n for n in trainable) and any(n.endswith(("model.norm.weight", "ln_f.weight")) for n in trainable)
    pairs = pairs_for(tok, 4)
    rows = scanning.scan(model, tok, pairs, "dpo", batch_size=4)
    exact = entanglement_stats(model, pairs, "exact", tok.pad_token_id)   # over the same (trainable) parameters
    torch.testing.assert_close(torch.tensor([r["inner"] for r in rows], dtype=torch.float64), exact["inner"].double(),
                               rtol=2e-4, atol=1e-6)
    with pytest.raises(Exception, match="--layers must be in \\[1, 2\\]"):
        scanning.last_layers_only(model, 3)
