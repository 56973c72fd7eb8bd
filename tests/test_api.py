"""api: the Python functions the commands run; options are the typed settings' fields, checked before anything
loads, and `entangle.generate` etc. resolve lazily."""

import pytest

import entangle
from entangle import api
from entangle.errors import ConfigError, ModelError


def test_the_package_exposes_the_commands_lazily():
    assert entangle.generate is api.generate and entangle.scan is api.scan and entangle.evaluate is api.evaluate
    assert callable(entangle.train) and callable(entangle.fit) and callable(entangle.build)
    with pytest.raises(AttributeError):
        entangle.no_such_thing


def test_unknown_or_out_of_range_options_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ModelError, match="sampling: unknown option 'temprature'; valid: n, max_new_tokens"):
        api.generate("tiny", ["hi"], temprature=0.5)
    with pytest.raises(ModelError, match="--top-p must be in"):
        api.evaluate("tiny", ["hi"], top_p=0)
    with pytest.raises(ConfigError, match="scan: unknown option 'batchsize'"):
        api.scan("tiny", "synthetic:sentiment?n=4", batchsize=2)
    with pytest.raises(ConfigError, match="--max-cos must be in"):
        api.scan("tiny", "synthetic:sentiment?n=4", max_cos=2.0)
    with pytest.raises(ConfigError, match="--noise must be >= 0"):
        api.label("tiny", ["hi"], noise=-1)


def test_generate_returns_rows_and_writes_them(tmp_path):
    rows = api.generate("tiny", ["Q: hi", "Q: there"], out=str(tmp_path / "s.jsonl"), n=2, max_new_tokens=3,
                        device="cpu")
    assert len(rows) == 4 and [r["sample"] for r in rows] == [0, 1, 0, 1]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 4
