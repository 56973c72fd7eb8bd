"""Model and tokenizer loading: the trained word-level tokenizer and tiny model folders."""

import pytest

from entangle import models
from entangle.errors import ModelError


def test_trained_tokenizer_makes_words_single_tokens_and_is_deterministic(tmp_path):
    texts = ["Statement: the movie was lovely.\nSentiment: Positive sentiment based on my judgement."] * 20 + \
            ["Statement: the phone was awful.\nSentiment: Negative sentiment based on my judgement."] * 20
    a, b = models.trained_tokenizer(texts, 400), models.trained_tokenizer(texts, 400)
    ids = a(" Positive sentiment based on my judgement.", add_special_tokens=False)["input_ids"]
    assert [a.decode([i]) for i in ids] == [" Positive", " sentiment", " based", " on", " my", " judgement", "."]
    assert ids == b(" Positive sentiment based on my judgement.", add_special_tokens=False)["input_ids"]
    assert a.decode(a("unseen wörds", add_special_tokens=False)["input_ids"]) == "unseen wörds"  # bytes fall back
    assert a.eos_token == "<|im_end|>" and a.pad_token_id is not None


def test_save_tiny_folder_loads_like_any_local_model(tmp_path):
    tok = models.trained_tokenizer(["a b c d e f"] * 4, 280)
    folder = models.save_tiny(str(tmp_path / "base"), tok, seed=3)
    model, loaded = models.load_model(folder)
    assert loaded("a b", add_special_tokens=False)["input_ids"] == tok("a b", add_special_tokens=False)["input_ids"]
    assert model.config.vocab_size == len(tok) and not (tmp_path / "base.tmp").exists()
    fresh = models.tiny_model(tok, seed=3)
    assert all((p == q).all() for p, q in zip(model.parameters(), fresh.parameters()))


def test_an_unknown_hub_id_fails_at_once_with_one_line(monkeypatch):
    """No retries: an id that is neither a folder nor cached needs the hub to answer within seconds."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t = time.time()
    # offline (this machine): "... not in the Hugging Face cache, and the hub is not reachable"; online: "no such model"
    with pytest.raises(ModelError, match="'nobody/no-such-model': no such local folder"):
        models.load_model("nobody/no-such-model")
    assert time.time() - t < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                          # offline: the cache only, no network at all
    assert models.hub_options("nobody/no-such-model") == {"local_files_only": True}
    with pytest.raises(ModelError, match="cannot load"):
        models.load_model("nobody/no-such-model")


def test_dtype_auto_is_one_rule_for_training_and_every_other_command(monkeypatch):
    """`auto`: float32 weights everywhere; bf16 autocast on CUDA for training *and* generate/eval/label/scan."""
    import torch

    from entangle import api
    from entangle.assembly import precision as training_precision

    assert models.precision("auto", "cuda:0") == (torch.float32, torch.bfloat16)
    assert models.precision("auto", "cpu") == (torch.float32, None)
    assert models.precision("bf16", "cuda") == (torch.bfloat16, None)
    assert training_precision("auto", cuda=True) == ("float32", "bf16")
    assert models.precision("bf16-mixed", "cpu") == (torch.float32, torch.bfloat16)   # mixed on any device
    assert training_precision("bf16-mixed", cuda=False) == ("float32", "bf16")
    with pytest.raises(ModelError, match="not one of auto"):
        models.precision("int8")
    model, _ = models.load_model("tiny", "auto", "cpu")
    assert next(model.parameters()).dtype == torch.float32
    seen = []
    monkeypatch.setattr(models, "compute", lambda dtype, device: seen.append((dtype, device)) or
                        __import__("contextlib").nullcontext())
    api.generate("tiny", ["hello"], max_new_tokens=2, device="cpu", dtype="auto")
    assert seen == [("auto", "cpu")]
