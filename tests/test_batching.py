"""batching: the pair layout (chosen rows, then rejected), the step's seeded indices and each process's share."""

import torch

from entangle import batching, data, models
from entangle.logps import sequence_logps

TEXTS = [("Q: the film?", " lovely", " awful and long"), ("A much longer prompt here:", " yes", " no"),
         ("Hi", " hello there friend", " bye")]


def pairs(tok):
    return data.tokenize_pairs([data.PreferenceExample(*t) for t in TEXTS], tok)[0]


def test_collate_lays_out_chosen_rows_then_rejected_rows_right_padded(tok):
    ps = pairs(tok)
    b = batching.collate(ps, tok.pad_token_id)
    assert b.n_rows == 6 and b.input_ids.shape[0] == 6
    for i, p in enumerate(ps):
        for row, response in ((i, p.chosen_ids), (3 + i, p.rejected_ids)):
            n = len(p.prompt_ids) + len(response)
            assert b.input_ids[row, :n].tolist() == p.prompt_ids + response
            assert int(b.attention_mask[row].sum()) == n                       # right padding only
            assert b.response_mask[row].nonzero().flatten().tolist() == list(range(len(p.prompt_ids), n))
    assert b.index.tolist() == [p.index for p in ps]


def test_the_packed_layout_gives_the_two_row_log_probs(tok):
    """One row [prompt, chosen, rejected] per pair gives each response's log-prob as if it had its own row."""
    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    two_rows = sequence_logps(model, batching.collate(pairs(tok), tok.pad_token_id), pack=False).logps
    packed = sequence_logps(model, batching.collate(pairs(tok), tok.pad_token_id, pack=True)).logps
    torch.testing.assert_close(packed, two_rows, rtol=1e-9, atol=1e-9)


def test_the_packed_layout_maps_back_to_the_concatenated_rows(tok):
    """`unpack` takes every real position of a concatenated row from the packed row of its pair (padding -1), and
    each scored token sits at `out_pos` of row `out_row` there, predicting the next token of that row."""
    ps = pairs(tok)
    b = batching.collate(ps, tok.pad_token_id, pack=True)
    packed = b.extra["packed"]
    B, T = packed.input_ids.shape
    assert packed.unpack.shape == b.input_ids.shape
    real = b.attention_mask.bool()
    assert torch.equal(packed.unpack >= 0, real)
    flat = packed.input_ids.reshape(-1)
    assert torch.equal(flat[packed.unpack[real]], b.input_ids[real])
    rows = packed.unpack[real] // T
    assert torch.equal(rows, torch.arange(2 * B).remainder(B)[:, None].expand_as(real)[real])   # pair i's row
    assert torch.equal(b.input_ids[packed.out_row, packed.out_pos + 1], packed.targets)
    assert torch.equal(b.response_mask[packed.out_row, packed.out_pos + 1], torch.ones_like(packed.targets).bool())
    assert int(packed.lengths.sum()) == packed.targets.numel() == int(b.response_mask[:, 1:].sum())


def test_step_indices_are_a_seeded_permutation_per_epoch_and_processes_split_them():
    n, global_batch = 12, 4
    epoch0 = [i for s in range(3) for i in batching.batch_indices(n, s, global_batch, seed=7)]
    assert sorted(epoch0) == list(range(n))                                # each example once per epoch
    assert epoch0 == [i for s in range(3) for i in batching.batch_indices(n, s, global_batch, seed=7)]
    epoch1 = [i for s in range(3, 6) for i in batching.batch_indices(n, s, global_batch, seed=7)]
    assert sorted(epoch1) == list(range(n)) and epoch1 != epoch0           # a new order next epoch
    step = batching.batch_indices(n, 0, global_batch, seed=7)
    shares = [batching.process_share(step, r, 2) for r in range(2)]
    assert shares[0] + shares[1] == step and len(shares[0]) == len(shares[1]) == 2
    micro = batching.micro_batches(pairs_of_ints(n), step, 3, 0, False, "cpu")
    assert [m.n_rows // 2 for m in micro] == [3, 1]


def pairs_of_ints(n):
    return [data.TokenizedPair([1, 2], [3], [4, 5], i) for i in range(n)]
