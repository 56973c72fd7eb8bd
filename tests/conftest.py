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
