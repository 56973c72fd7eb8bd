"""Frozen, LoRA-disabled and precomputed references; the on-disk cache is reused and invalidated."""

import os

import torch

from entangle import batching, data, models, reference


def pairs_for(tok, max_length=None):
    exs = [data.PreferenceExample(f"Prompt number {i} says", f" yes {i}", " no") for i in range(5)]
    return data.tokenize_pairs(exs, tok, max_length=max_length)[0]


def test_frozen_reference_does_not_move_with_the_policy(tok):
    model, _ = models.load_model("tiny", tokenizer=tok)
    ref = reference.make_reference("frozen", model)
    batch = batching.collate(pairs_for(tok), tok.pad_token_id)
    before = ref.logps(batch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(ref.logps(batch), before)
    assert not before.is_inference()


def test_lora_reference_is_the_base_model_without_a_copy(tok):
    model, _ = models.load_model("tiny", tokenizer=tok, lora=models.LoraSettings(r=4))
    ref = reference.make_reference("frozen", model)
    assert ref.model is model  # no second copy in memory
    batch = batching.collate(pairs_for(tok), tok.pad_token_id)
    base = ref.logps(batch)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    from entangle.logps import sequence_logps

    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, batch).logps, base)
    torch.testing.assert_close(ref.logps(batch), base)


def test_precomputed_cache_is_reused_and_invalidated_by_tokenisation(tok, monkeypatch):
    model, _ = models.load_model("tiny", tokenizer=tok)
    pairs = pairs_for(tok)
    r1 = reference.precompute_reference(model, pairs, tok.pad_token_id, batch_size=2)
    assert os.path.exists(r1.path)
    batch = batching.collate(pairs[1:3], tok.pad_token_id)
    torch.testing.assert_close(r1.logps(batch), reference.FrozenReference(model).logps(batch))

    computed = []
    real = reference.FrozenReference
    monkeypatch.setattr(reference, "FrozenReference", lambda m: computed.append(1) or real(m))
    r2 = reference.precompute_reference(model, pairs, tok.pad_token_id)
    assert r2.path == r1.path and computed == []            # second run: reused, nothing computed
    r3 = reference.precompute_reference(model, pairs_for(tok, max_length=26), tok.pad_token_id)
    assert r3.path != r1.path and computed == [1]           # changed truncation: new key, recomputed
    other, _ = models.load_model("tiny", tokenizer=tok, seed=1)
    r4 = reference.precompute_reference(other, pairs, tok.pad_token_id)
    assert r4.path not in (r1.path, r3.path)                # changed weights: new key
