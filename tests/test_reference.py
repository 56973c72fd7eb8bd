"""Frozen, LoRA-disabled and precomputed references; the on-disk cache is reused and invalidated."""

import os

import pytest
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


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_a_frozen_reference_made_under_autocast_holds_its_linear_layers_rounded_with_the_same_numbers(tok, name):
    """Under mixed precision the frozen copy keeps its linear weights in bf16 (autocast would round them to that at
    every forward): bit for bit the log-probs of a float32 copy under the same autocast, with or without one
    around the call, in fewer bytes; a tied LM head (GPT-2's) is untied so the embeddings keep float32."""
    from entangle.logps import sequence_logps

    model, _ = models.load_model(name, tokenizer=tok)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embed.weight) == (name == "tiny-gpt2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference.make_reference("frozen", model)
    plain = reference.make_reference("frozen", model)
    assert ref.autocast == torch.bfloat16 and plain.autocast is None
    linears = [m for m in ref.model.modules() if models.module_kind(m) in ("linear", "conv1d")]
    assert len(linears) > 4 and all(p.dtype == torch.bfloat16 for m in linears for p in m.parameters())
    copy_head, copy_embed = ref.model.get_output_embeddings(), ref.model.get_input_embeddings()
    assert copy_head.weight.dtype == torch.bfloat16 and copy_embed.weight.dtype == torch.float32
    torch.testing.assert_close(copy_embed.weight, embed.weight, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())    # the policy is untouched

    def nbytes(m):
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values())

    rounded = sum(p.numel() for m in plain.model.modules() if models.module_kind(m) in ("linear", "conv1d")
                  for p in m.parameters(recurse=False))
    tied = head.weight.numel() if name == "tiny-gpt2" else 0           # the untied head: one more bf16 copy
    assert nbytes(ref.model) == nbytes(plain.model) - 2 * (rounded - tied) + 2 * tied
    batch = batching.collate(pairs_for(tok), tok.pad_token_id)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sequence_logps(plain.model, batch).logps
        inside = ref.logps(batch)
    assert torch.equal(inside, expected)
    assert torch.equal(ref.logps(batch), expected)                      # its own autocast when called outside one
    with torch.inference_mode():
        assert not torch.equal(sequence_logps(plain.model, batch).logps, expected)   # bf16 is really in use


def test_a_table_precomputed_under_autocast_is_not_reused_without_it(tok):
    """The cache key holds the arithmetic: a bf16-mixed run's table never serves a float32 run (whose step-1 loss
    would then start from a margin of bf16 noise), and each table is its own arithmetic's log-probs."""
    model, _ = models.load_model("tiny", tokenizer=tok)
    pairs = pairs_for(tok)
    batch = batching.collate(pairs, tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = reference.precompute_reference(model, pairs, tok.pad_token_id, batch_size=2)
        frozen_mixed = reference.FrozenReference(model, torch.bfloat16).logps(batch)
    plain = reference.precompute_reference(model, pairs, tok.pad_token_id, batch_size=2)
    assert mixed.path != plain.path
    torch.testing.assert_close(plain.logps(batch), reference.FrozenReference(model).logps(batch))
    torch.testing.assert_close(mixed.logps(batch), frozen_mixed)
    assert not torch.allclose(mixed.logps(batch), plain.logps(batch), rtol=0, atol=1e-6)


def test_lora_reference_is_the_base_model_without_a_copy(tok):
    model, _ = models.load_model("tiny", tokenizer=tok, lora=models.LoraConfig(r=4))
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
    monkeypatch.setattr(reference, "FrozenReference", lambda m, *a: computed.append(1) or real(m, *a))
    r2 = reference.precompute_reference(model, pairs, tok.pad_token_id)
    assert r2.path == r1.path and computed == []            # second run: reused, nothing computed
    r3 = reference.precompute_reference(model, pairs_for(tok, max_length=26), tok.pad_token_id)
    assert r3.path != r1.path and computed == [1]           # changed truncation: new key, recomputed
    other, _ = models.load_model("tiny", tokenizer=tok, seed=1)
    r4 = reference.precompute_reference(other, pairs, tok.pad_token_id)
    assert r4.path not in (r1.path, r3.path)                # changed weights: new key


@pytest.mark.parametrize("alpha,tau,message", [(1.5, 1, "alpha must be in [0, 1]"), (float("nan"), 1, "alpha"),
                                               (0.5, 0, "tau must be a whole number at least 1"),
                                               (0.5, 2.5, "tau must be a whole number")])
def test_one_check_of_a_moving_references_settings_everywhere(alpha, tau, message):
    from entangle import config, models
    from entangle.errors import ConfigError
    from entangle.reference import TrustRegionReference

    with pytest.raises(ConfigError, match=r"reference\." + message.replace("[", r"\[").replace("]", r"\]")):
        config.check_trust_region(alpha, tau)
    model, _ = models.load_model("tiny")
    with pytest.raises(ConfigError, match="trust-region reference: " + message.split(" must")[0]):
        TrustRegionReference(model, alpha, tau)
    trl = pytest.importorskip("trl")   # noqa: F841
    from entangle.integrations.trl import TrustRegionCallback

    with pytest.raises(ConfigError, match="TrustRegionCallback: " + message.split(" must")[0]):
        TrustRegionCallback(alpha, tau)
