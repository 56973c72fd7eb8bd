import os

import pytest

from entangle import models

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def tok():
    return models.byte_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own reference-log-prob cache; the SmolLM2 model cache stays shared."""
    real = models.cache_dir()
    os.makedirs(os.path.join(real, "models"), exist_ok=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(os.path.join(real, "models"))
    monkeypatch.setenv("ENTANGLE_CACHE", str(cache))


def write_jsonl(path, rows):
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def naive_logps(model, batch):
    """The textbook computation, one row at a time over full logits: the oracle of the log-prob tests."""
    import torch

    from entangle.logps import upcast

    out = []
    for i in range(batch.n_rows):
        n = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i : i + 1, :n]
        logits = upcast(model(input_ids=ids).logits[0, :-1]).log_softmax(-1)                    # [n-1, V]
        lp = logits.gather(1, ids[0, 1:, None])[:, 0]
        out.append(lp[batch.response_mask[i, 1:n]].sum())
    return torch.stack(out)
