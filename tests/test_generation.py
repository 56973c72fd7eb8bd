"""Sampling: log-likelihoods against an independent forward, reproducibility, runs and LoRA, prompt sources."""

import json

import pytest
import torch

from entangle import config, models
from entangle.errors import DataError, ModelError
from entangle.generation import completion_logps, generate, load_initial, load_policy, load_prompts, resolve
from entangle.loop import train
from conftest import write_jsonl

PROMPTS = "synthetic:sentiment?config=short&n=6"


def naive_logp(model, prompt_ids, completion_ids) -> float:
    """Textbook log pi(y|x): one sequence alone, full logits, log-softmax, the completion's tokens summed."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logits.gather(1, targets[:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1 :].sum())


def test_logp_is_the_sequence_log_likelihood_at_temperature_one():
    """Sampling at temperature 0.7 and top-p 0.9 changes which tokens are drawn, not how logp is computed:
    the sum of log pi(y_t | x, y_<t) under the model itself, checked one sequence at a time."""
    model, tok = models.load_model("tiny", dtype="float64")
    model.eval()
    rows = generate(model, tok, load_prompts(PROMPTS), n=2, max_new_tokens=6, temperature=0.7, top_p=0.9,
                    seed=3, batch_size=5)
    assert len(rows) == 12 and [r["sample"] for r in rows[:4]] == [0, 1, 0, 1]
    with torch.no_grad():
        for r in rows:
            assert r["tokens"] == len(r["completion_ids"]) >= 1
            # float64 model; the KV-cache path and the full forward differ only in rounding (RoPE runs in float32)
            assert r["logp"] == pytest.approx(naive_logp(model, r["prompt_ids"], r["completion_ids"]), abs=1e-6)


def test_same_seed_and_batch_size_give_identical_samples():
    model, tok = models.load_model("tiny")
    model.eval()
    prompts = load_prompts(PROMPTS)
    a = generate(model, tok, prompts, n=2, max_new_tokens=8, seed=1, batch_size=4)
    b = generate(model, tok, prompts, n=2, max_new_tokens=8, seed=1, batch_size=4)
    c = generate(model, tok, prompts, n=2, max_new_tokens=8, seed=2, batch_size=4)
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    assert [r["completion_ids"] for r in a] != [r["completion_ids"] for r in c]


def test_generation_stops_at_eos_and_greedy_is_deterministic():
    model, tok = models.load_model("tiny")
    model.eval()
    eos = tok.eos_token_id
    with torch.no_grad():   # make EOS the most likely next token everywhere
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
        model.lm_head.bias[eos] = 100.0
    rows = generate(model, tok, load_prompts(PROMPTS)[:2], max_new_tokens=8, temperature=0)
    assert all(r["completion_ids"] == [eos] and r["finished"] and r["completion"] == "" for r in rows)


def cfg(out, *extra):
    return config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=32",
                              "data.max_length=64", "optimizer.lr=1e-2", "train.batch_size=4", "train.max_steps=3",
                              "tracking.progress=false", f"train.output_dir={out}", *extra])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_run_generates_from_its_final_weights(tmp_path, lora):
    """A run directory loads as base + its final weights (LoRA: the base plus the adapter): the same
    log-likelihoods as the trained model object, and different ones from the initial policy."""
    extra = ["model.lora.r=4"] if lora else []
    train(cfg(tmp_path / "run", *extra))
    policy = load_policy(str(tmp_path / "run"))
    assert policy.lora == lora and policy.started_from == "tiny"
    if lora:
        from peft import PeftModel

        base, _ = models.load_model("tiny")
        direct = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final")).eval()
    else:
        from transformers import AutoModelForCausalLM

        direct = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    rows = generate(policy.model, policy.tokenizer, load_prompts(PROMPTS), max_new_tokens=6, seed=0)
    pad = policy.tokenizer.pad_token_id
    # logp comes from the sampling forward (KV cache), the check from one full forward: float32 rounding apart
    torch.testing.assert_close(completion_logps(direct, rows, pad), torch.tensor([r["logp"] for r in rows],
                                                                                 dtype=torch.float64), rtol=1e-5, atol=1e-5)
    initial = load_initial(policy)
    assert not torch.allclose(completion_logps(initial.model, rows, pad), completion_logps(policy.model, rows, pad))
    # a checkpoint folder of the same run loads too
    train(cfg(tmp_path / "ck", *extra, "train.save_every=2"))
    assert resolve(str(tmp_path / "ck" / "checkpoints" / "step-2"))[0] == "checkpoint"
    load_policy(str(tmp_path / "ck" / "checkpoints" / "step-2"))


def test_prompt_sources(tmp_path):
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": [{"role": "user", "content": "Hi"}]}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": "b"},
                                                   {"chosen": [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}],
                                                    "rejected": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "z"}]}])
    assert load_prompts(plain) == ["Hello", [{"role": "user", "content": "Hi"}]]
    assert load_prompts(pairs) == ["Q?", [{"role": "user", "content": "x"}]]
    assert len(load_prompts(PROMPTS, limit=2)) == 2
    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": "no prompt here"}])
    with pytest.raises(DataError, match="e.jsonl:1: field 'prompt' is missing"):
        load_prompts(empty)
    with pytest.raises(DataError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_a_chat_prompt_goes_through_the_chat_template():
    model, tok = models.load_model("tiny")
    rows = generate(model.eval(), tok, [[{"role": "user", "content": "Hi"}]], max_new_tokens=2)
    assert tok.decode(rows[0]["prompt_ids"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_run_without_final_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: {name: tiny}\n")
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ModelError, match="has no final/"):
        load_policy(str(out))


def test_samples_file_rows_are_json(tmp_path):
    from entangle.api import generate as api_generate

    rows = api_generate("tiny", PROMPTS, out=str(tmp_path / "s.jsonl"), n=1, max_new_tokens=4, progress=False)
    written = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(written) == len(rows) == 6
    assert {"prompt", "completion", "sample", "tokens", "logp"} <= set(written[0])


def test_a_moving_reference_is_rebuilt_with_its_update_count_from_a_run_and_a_checkpoint(tmp_path):
    from entangle.generation import load_moving_reference

    out = tmp_path / "run"
    train(config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=32", "data.eval=null",
                             "train.batch_size=4", "train.max_steps=4", "train.save_every=2", "reference.type=hard",
                             "reference.tau=2", "tracking.progress=false", f"train.output_dir={out}"]))
    checkpoint = str(out / "checkpoints" / "step-2")
    assert load_moving_reference(checkpoint, load_policy(checkpoint)).updates == 1
    assert load_moving_reference(str(out), load_policy(str(out))).updates == 2


def test_a_run_folder_cannot_turn_on_remote_code_and_old_keys_are_ignored(tmp_path, caplog):
    """A run whose saved config asks for trust_remote_code is refused in one line unless the caller turns it on;
    a saved config with a key this version no longer has loads, with one warning naming the key."""
    from entangle.config import load_saved

    train(cfg(tmp_path / "run"))
    path = tmp_path / "run" / "config.yaml"
    text = path.read_text()
    path.write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    with pytest.raises(ModelError, match="a run folder cannot turn remote code on"):
        load_policy(str(tmp_path / "run"))
    path.write_text(text.replace("train:\n", "train:\n  removed_option: 3\n") + "gone_section:\n  x: 1\n")
    with caplog.at_level("WARNING"):
        saved = load_saved(str(tmp_path / "run"))
    assert saved.train.max_steps == 3 and "removed_option" not in saved.train
    assert "train.removed_option, gone_section" in caplog.text
    assert load_policy(str(tmp_path / "run")).model is not None
