"""Readers, formats, bad records, tokenisation edge cases, collation."""

import json

import pytest
import torch

from conftest import write_jsonl
from entangle import batching, data
from entangle.errors import DataError


def test_explicit_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    ex, skipped = data.read_examples(p)
    assert skipped == 0 and (ex[0].prompt, ex[0].chosen, ex[0].rejected) == ("Q?", " yes", " no")
    assert ex[0].where == "d.jsonl:1"


@pytest.mark.parametrize("row, field_msg", [
    ({"prompt": "Q", "rejected": "b"}, "field 'chosen' is missing"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is an empty response"),
    ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "are identical"),
    ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or a list"),
    ('{"prompt": "Q", "chosen": ', "invalid JSON"),
    ([1, 2], "expected an object"),
])
def test_bad_record_names_file_line_and_field(tmp_path, row, field_msg):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    p = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        data.read_examples(p)
    assert str(e.value).startswith("bad.jsonl:2: ") and field_msg in str(e.value)
    ex, skipped = data.read_examples(p, skip_bad=True)
    assert len(ex) == 1 and skipped == 1


def test_column_remapping(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": "Q?", "good": "a", "bad": "b"}])
    ex, _ = data.read_examples(p, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (ex[0].prompt, ex[0].chosen, ex[0].rejected) == ("Q?", "a", "b")
    with pytest.raises(DataError, match="data.columns.chosen"):
        data.read_examples(p)


def test_implicit_prompt_strings_cut_at_whitespace():
    """HH-style: the shared prefix ends inside 'Assistant: ' -> prompt ends before the space."""
    ex = data.parse_pair({"chosen": "\n\nHuman: hi\n\nAssistant: Hello there",
                          "rejected": "\n\nHuman: hi\n\nAssistant: Hey"}, "x:1")
    assert ex.prompt == "\n\nHuman: hi\n\nAssistant:"
    assert (ex.chosen, ex.rejected) == (" Hello there", " Hey")


def test_implicit_prompt_messages():
    convo = [{"role": "user", "content": "hi"}]
    ex = data.parse_pair({"chosen": convo + [{"role": "assistant", "content": "hello"}],
                          "rejected": convo + [{"role": "assistant", "content": "go away"}]}, "x:1")
    assert ex.prompt == convo and ex.chosen == [{"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match="differ before the final assistant turn"):
        data.parse_pair({"chosen": convo + [{"role": "assistant", "content": "a"}],
                         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
                        "x:1")


def test_chat_template_prompt_is_every_message_before_the_final_assistant_turn(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    p_ids, r_ids = data.encode_prompt_response(tok, prompt, [{"role": "assistant", "content": "4"}])
    assert tok.decode(p_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    assert tok.decode(r_ids) == "4<|im_end|>"  # the template's trailing newline after EOS is cut


@pytest.mark.parametrize("response", [" yes", " yes<|im_end|>"])
def test_exactly_one_eos_and_no_bos_in_the_middle(tok, response):
    p, r = data.encode_prompt_response(tok, "Q:", response)
    assert r[-1] == tok.eos_token_id and r.count(tok.eos_token_id) == 1
    assert tok.bos_token_id not in r


def test_bos_prepended_once_when_the_tokenizer_adds_one(tok):
    import copy

    t2 = copy.deepcopy(tok)
    t2.add_bos_token = True
    p, r = data.encode_prompt_response(t2, "Q:", " a")
    assert p[0] == t2.bos_token_id and p.count(t2.bos_token_id) == 1 and t2.bos_token_id not in r


def test_unicode_round_trips(tok):
    p, r = data.encode_prompt_response(tok, "Émoji? ", "Oui 🙂 — très bien")
    assert tok.decode(p) == "Émoji? " and tok.decode(r[:-1]) == "Oui 🙂 — très bien"


def test_truncation_keeps_end_of_prompt_and_start_of_responses():
    prompt, responses = list(range(10)), [[100, 101, 102, 103], [200, 201]]
    p, (c, r), cut = data.truncate(prompt, responses, max_length=8, max_prompt_length=5)
    assert p == [5, 6, 7, 8, 9] and c == [100, 101, 102] and r == [200, 201] and cut
    p, (c, r), cut = data.truncate(prompt, responses, max_length=20, max_prompt_length=None)
    assert p == prompt and not cut


def test_tokenize_reports_truncated_and_dropped(tok):
    """Byte tokens, max_length 12, so a pair that does not fit keeps its last 12 // 2 = 6 prompt tokens:
    40 x's -> 6, leaving 6 for " aaaa" + EOS (5 + 1): kept, truncated. 8 y's -> 6, leaving 6 of
    " abcdefgh"/" abcdefgX" + EOS (10 each): both become " abcde", identical: dropped."""
    exs = [data.PreferenceExample("short", " a", " b"),
           data.PreferenceExample("x" * 40, " aaaa", " bbbb"),
           data.PreferenceExample("y" * 8, " abcdefgh", " abcdefgX")]
    pairs, stats = data.tokenize_pairs(exs, tok, max_length=12)
    assert [p.index for p in pairs] == [0, 1] and pairs[1].prompt_ids == tok("x" * 6)["input_ids"]
    assert len(pairs[1].chosen_ids) == 6
    assert stats.n_dropped == 1 and stats.n_truncated == 1 and stats.n_examples == 3
    # an explicit max_prompt_length cuts every longer prompt ("short": 5 -> 2 tokens, fits otherwise), and the
    # response gets the rest of max_length 10: " long answer" + EOS (13) -> 8
    pairs, stats = data.tokenize_pairs(exs[:1] + [data.PreferenceExample("z" * 6, " long answer", " no")], tok,
                                       max_length=10, max_prompt_length=2)
    assert stats.n_truncated == 2 and len(pairs[1].prompt_ids) == 2 and len(pairs[1].chosen_ids) == 8


def test_json_parquet_and_datasets_folder(tmp_path):
    rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "c", "rejected": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert len(data.read_examples(str(tmp_path / "d.json"))[0]) == 2
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ex, _ = data.read_examples(str(tmp_path / "d.parquet"))
    assert ex[1].chosen == "c"
    ds.save_to_disk(str(tmp_path / "folder"))
    ex, _ = data.read_examples(str(tmp_path / "folder"))
    assert ex[0].rejected == "b"
    bad = [{"prompt": "P", "chosen": "a"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="bad.json:record 1: field 'rejected' is missing"):
        data.read_examples(str(tmp_path / "bad.json"))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a file or folder"):
        data.read_examples(str(tmp_path / "nope.jsonl"))


def test_unpaired_rows_for_kto(tmp_path, tok):
    p = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Q", "completion": " a", "label": True},
                                           {"prompt": "Q", "completion": " b", "label": "yes"}])
    with pytest.raises(DataError, match="u.jsonl:2: field 'label' must be true or false"):
        data.read_examples(p, unpaired=True)
    ex, skipped = data.read_examples(p, unpaired=True, skip_bad=True)
    items, _ = data.tokenize_unpaired(ex, tok)
    batch = batching.collate(items * 2, tok.pad_token_id)
    assert batch.n_rows == 4 and batch.extra["labels"].tolist() == [True, True]


def test_collate_layout(tok):
    pairs = [data.TokenizedPair([1, 2], [3, 4, 5], [6], 0), data.TokenizedPair([7], [8], [9, 10], 1)]
    b = batching.collate(pairs, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert b.response_mask.sum(1).tolist() == [3, 1, 1, 2]
    assert b.attention_mask.sum(1).tolist() == [5, 2, 3, 3]
    assert torch.equal(b.index, torch.tensor([0, 1]))


def test_synthetic_sentiment_is_seeded_and_splits_are_disjoint():
    from entangle import synthetic

    a = synthetic.sentiment_pairs(50, "short", "train", seed=1)
    b = synthetic.sentiment_pairs(50, "short", "train", seed=1)
    test = synthetic.sentiment_pairs(30, "short", "test", seed=1)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert not {x.prompt for x in a} & {x.prompt for x in test}
    assert {x.chosen for x in a} == {" Positive sentiment.", " Negative sentiment."}
    with pytest.raises(DataError, match="valid: sentiment"):
        synthetic.from_source("synthetic:nope")


def test_synthetic_statements_are_varied_and_balanced():
    from entangle import synthetic

    rows = synthetic.statements(400, "train", seed=0)
    assert len({t for t, _ in rows}) == 400
    positive = sum(p for _, p in rows)
    assert 150 < positive < 250
    # the label follows the adjective: every statement holds exactly one word of its own polarity
    for text, pos in rows[:100]:
        words = set(text.rstrip(".").replace(",", "").split())
        assert words & set(synthetic._POSITIVE if pos else synthetic._NEGATIVE)
        assert not words & set(synthetic._NEGATIVE if pos else synthetic._POSITIVE)
    assert synthetic.RESPONSES["long"] == ("Positive sentiment based on my judgement.",
                                          "Negative sentiment based on my judgement.")
