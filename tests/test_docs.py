"""The documentation set: the generated reference pages match the code, every config key and loss is in them,
the README stays short and its links resolve."""

import os
import re

import pytest

from entangle import config, docgen, losses

ROOT = os.path.join(os.path.dirname(__file__), "..")


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("page", sorted(docgen.PAGES))
def test_the_committed_reference_is_what_the_code_generates(page):
    assert read("docs", "reference", f"{page}.md") == docgen.PAGES[page](), \
        f"docs/reference/{page}.md is stale: run `make docs`"


def test_every_config_key_and_every_loss_is_in_the_reference():
    keys = read("docs", "reference", "config.md")
    missing = [k for k in config.all_keys() if f"| `{k}` |" not in keys]
    assert not missing, missing
    table = read("docs", "reference", "losses.md")
    assert not [n for n in losses.names() if f"| `{n}` |" not in table]
    assert "`beta` = 0.1 (in (0, inf))" in table and "| `simpo` |" in table


def test_a_new_key_reaches_the_generated_page(monkeypatch):
    """The page is made from the dataclasses: a key added to them is in it with its range and comment."""
    monkeypatch.setitem(config.RANGES, "train.seed", losses.Range(0.0, 7.0, low_closed=True))
    assert "| `train.seed` | `0` | in [0, 7); model init (tiny), data order, dropout |" in docgen.config_reference()


def test_the_readme_is_short_and_every_local_link_resolves():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    for page in ("getting-started.md", "concepts.md", "reference/config.md", "reference/losses.md"):
        assert f"docs/{page}" in readme
    for md in [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "docs")) for f in fs if f.endswith(".md")] \
            + [os.path.join(ROOT, "README.md")]:
        text = open(md, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert os.path.exists(os.path.normpath(os.path.join(os.path.dirname(md), target))), (md, target)


def test_every_code_block_in_the_docs_is_closed():
    """An unclosed ``` fence renders the rest of its page as code (getting-started.md's command list did)."""
    pages = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "docs")) for f in fs if f.endswith(".md")]
    for md in pages + [os.path.join(ROOT, "README.md")]:
        fences = [n for n, line in enumerate(open(md, encoding="utf-8"), 1) if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{md}: the fence on line {fences[-1]} is never closed"
