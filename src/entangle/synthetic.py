"""Generated preference data, so the demo and tests need no download.

    examples = sentiment_pairs(n=256, config="long", split="train", seed=0)
    examples = from_source("synthetic:sentiment?config=short&n=128&split=test")

Statements with a true sentiment; chosen states it, rejected states the opposite, with the three
response formats of the gradient-entanglement paper (GE §4.2). Train and test statements never overlap.
"""

from __future__ import annotations

import random
from urllib.parse import parse_qsl

from entangle.data import PreferenceExample
from entangle.errors import DataError

RESPONSES = {
    "single": ("Positive.", "Negative."),
    "short": ("Positive sentiment.", "Negative sentiment."),
    "long": ("Positive sentiment based on my judgement.", "Negative sentiment based on my judgement."),
}

_SUBJECTS = ["the movie", "this phone", "the hotel", "our waiter", "the new album", "the laptop", "this book",
             "the concert", "the coffee", "my landlord", "the update", "the museum", "the bus service",
             "the salad", "this game", "the course", "the neighbourhood", "the headphones", "the lecture",
             "the airline", "the bakery", "the software", "the park", "the show", "the team"]
_POSITIVE = ["wonderful", "delightful", "excellent", "brilliant", "charming", "superb", "lovely", "fantastic",
             "impressive", "pleasant", "reliable", "generous", "refreshing", "outstanding", "friendly"]
_NEGATIVE = ["terrible", "awful", "disappointing", "dreadful", "boring", "rude", "broken", "miserable",
             "unreliable", "noisy", "overpriced", "dull", "frustrating", "horrible", "sloppy"]
_ADVERBS = ["really", "truly", "quite", "absolutely", "honestly", "surprisingly", "genuinely", "rather"]
_TEMPLATES = [
    "{S} was {adv} {adj}.",
    "I found {s} {adv} {adj}.",
    "Honestly, {s} is {adj}.",
    "{S} turned out {adv} {adj} this time.",
    "Everyone agreed that {s} was {adj}.",
    "After a week, {s} still feels {adj}.",
    "{S} is {adj}, {adv}.",
    "My friends think {s} is {adv} {adj}.",
]


def _statement(rng: random.Random, positive: bool) -> str:
    s = rng.choice(_SUBJECTS)
    adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
    return rng.choice(_TEMPLATES).format(S=s[0].upper() + s[1:], s=s, adj=adj, adv=rng.choice(_ADVERBS))


def statements(n: int, split: str = "train", seed: int = 0) -> list[tuple[str, bool]]:
    """`n` distinct (statement, is_positive) of one split; the two splits are disjoint by construction."""
    if split not in ("train", "test"):
        raise DataError(f"synthetic split {split!r}: valid: train, test")
    rng = random.Random(seed)
    out, seen = [], set()
    budget = 200 * n + 1000
    while len(out) < n and budget:
        budget -= 1
        positive = rng.random() < 0.5
        text = _statement(rng, positive)
        # A stable hash of the text assigns every statement to exactly one split (about 1 in 5 to test).
        in_test = sum(map(ord, text)) % 5 == 0
        if text in seen or in_test != (split == "test"):
            continue
        seen.add(text)
        out.append((text, positive))
    if len(out) < n:
        raise DataError(f"synthetic sentiment: only {len(out)} distinct {split} statements exist (asked {n})")
    return out


def sentiment_pairs(n: int = 256, config: str = "long", split: str = "train", seed: int = 0) -> list[PreferenceExample]:
    if config not in RESPONSES:
        raise DataError(f"synthetic sentiment config {config!r}: valid: {', '.join(RESPONSES)}")
    pos, neg = RESPONSES[config]
    out = []
    for i, (text, positive) in enumerate(statements(n, split, seed)):
        chosen, rejected = (pos, neg) if positive else (neg, pos)
        out.append(PreferenceExample(f"Statement: {text}\nSentiment:", " " + chosen, " " + rejected,
                                     where=f"synthetic:sentiment[{split}]:{i + 1}"))
    return out


def from_source(source: str) -> list[PreferenceExample]:
    """Parse `synthetic:NAME?key=value&...` (NAME: sentiment; keys: n, config, split, seed)."""
    body = source.split(":", 1)[1]
    name, _, query = body.partition("?")
    if name != "sentiment":
        raise DataError(f"{source}: unknown synthetic data set {name!r}; valid: sentiment")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - {"n", "config", "split", "seed"}
    if unknown:
        raise DataError(f"{source}: unknown option(s) {', '.join(sorted(unknown))}; valid: n, config, split, seed")
    try:
        n, seed = int(opts.get("n", 256)), int(opts.get("seed", 0))
    except ValueError:
        raise DataError(f"{source}: n and seed must be whole numbers") from None
    return sentiment_pairs(n, opts.get("config", "long"), opts.get("split", "train"), seed)
