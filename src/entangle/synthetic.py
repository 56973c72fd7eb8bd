"""Generated preference data, so the demo and tests need no download.

    examples = sentiment_pairs(n=256, config="long", split="train", seed=0)
    examples = from_source("synthetic:sentiment?config=short&n=128&split=test")
    examples = from_source("synthetic:verdict?n=512&split=train")      # SFT demonstrations, varied lengths

Statements with a true sentiment; chosen states it, rejected states the opposite, with the three
response formats of the gradient-entanglement paper (GE §4.2). Train and test statements never overlap.

`verdict` is the over-optimisation task: the response is a label word then 0-8 filler words, written with
the right label 3 times in 4 (so an SFT policy on it has entropy in label, length and words, and KL from
it grows gradually). `gold` scores a completion by a documented rule and `proxy` adds a length bonus (the
biased labeller of the positive control); both are `python:` scorers:
`python:entangle.synthetic:gold`, `python:entangle.synthetic:proxy`.
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


VERDICT_LABELS = ("positive", "negative")
VERDICT_WORDS = ("clearly", "mostly", "overall", "fairly", "really", "simply", "quite", "truly", "certainly",
                 "largely", "plainly", "broadly", "surely", "frankly", "openly", "wholly")
VERDICT_MAX_WORDS = 8        # filler words after the label in the demonstrations: uniform in 0..8 (mean 4)
VERDICT_P_CORRECT = 0.75     # demonstrations with the statement's true label
GOLD_TARGET_WORDS = 6        # gold: the best number of filler words ...
GOLD_WORD_COST = 0.25        # ... and the cost of each filler word more or fewer
GOLD_UNKNOWN_COST = 0.5      # gold: a word that is neither a label nor a filler word
PROXY_LENGTH_BONUS = 0.5     # proxy = gold + this per word after the label


def _verdict_response(rng: random.Random, positive: bool) -> str:
    correct = rng.random() < VERDICT_P_CORRECT
    words = [rng.choice(VERDICT_WORDS) for _ in range(rng.randint(0, VERDICT_MAX_WORDS))]
    return " " + " ".join([VERDICT_LABELS[0] if positive == correct else VERDICT_LABELS[1], *words])


def verdict_pairs(n: int = 512, split: str = "train", seed: int = 0) -> list[PreferenceExample]:
    """SFT demonstrations of the verdict task as pairs (chosen: one demonstration, rejected: another draw;
    `loss.name=sft` reads the chosen). Prompts: `Statement: ...\nVerdict:`."""
    rng = random.Random(seed + 7919)
    return [PreferenceExample(f"Statement: {text}\nVerdict:", _verdict_response(rng, positive),
                              _verdict_response(rng, positive), where=f"synthetic:verdict[{split}]:{i + 1}")
            for i, (text, positive) in enumerate(statements(n, split, seed))]


_POLARITY = {**{w: True for w in _POSITIVE}, **{w: False for w in _NEGATIVE}}


def statement_polarity(prompt: str) -> bool | None:
    """The true sentiment of a generated statement (its adjective's), None when it has no known adjective."""
    for word in reversed(prompt.replace(",", " ").replace(".", " ").split()):
        if word in _POLARITY:
            return _POLARITY[word]
    return None


def _prompt_string(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m.get("content", "") for m in prompt)


def gold_score(prompt, completion: str) -> float:
    """The verdict task's gold rule: +1 for the statement's true label as the first word, -1 for any other
    first word (or none); minus GOLD_WORD_COST per filler word more or fewer than GOLD_TARGET_WORDS; minus
    GOLD_UNKNOWN_COST per word that is neither a label nor a filler word. Best: the right label and six
    filler words (+1); the demonstrations (0-8 words, right label 3 times in 4) average about -0.2."""
    words = [w.strip(".,!?").lower() for w in completion.split()]
    truth = statement_polarity(_prompt_string(prompt))
    right = truth is not None and bool(words) and words[0] == VERDICT_LABELS[0 if truth else 1]
    rest = words[1:]
    unknown = sum(w not in VERDICT_WORDS and w not in VERDICT_LABELS for w in rest)
    return (1.0 if right else -1.0) - GOLD_WORD_COST * abs(len(rest) - GOLD_TARGET_WORDS) \
        - GOLD_UNKNOWN_COST * unknown


def gold(prompts, completions) -> list[float]:
    """`python:entangle.synthetic:gold`: `gold_score` of each completion."""
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


def proxy(prompts, completions) -> list[float]:
    """`python:entangle.synthetic:proxy`: gold + PROXY_LENGTH_BONUS per word after the first, a labeller
    biased towards length (as reward models are). It agrees with gold up to six filler words and keeps
    rewarding length past them, where gold falls: the positive control of the over-optimisation study."""
    return [gold_score(p, c) + PROXY_LENGTH_BONUS * max(0, len(c.split()) - 1) for p, c in zip(prompts, completions)]


# The displacement mix (scan-filter study): four pair types, assigned in turn (pair i has type i % 4).
# label L / opposite O: Positive / Negative; synonym S: Good / Bad (same polarity as L, also acceptable).
DISPLACEMENT_TYPES = ("opposite", "suffix", "synonym", "format")
_SUFFIX = " sentiment based on my judgement."
_SYNONYM = {"Positive": "Good", "Negative": "Bad"}
_UNSURE = " I cannot tell from one sentence."


def _label(positive: bool, opposite: bool = False) -> str:
    return "Positive" if positive != opposite else "Negative"


def displacement_pairs(n: int = 256, split: str = "train", seed: int = 0, part: str = "pairs") -> list[PreferenceExample]:
    """`part=pairs`: the mix of pair types (`DISPLACEMENT_TYPES[i % 4]`): opposite single words (" L." vs " O."),
    a long shared suffix (" L sentiment based on my judgement." vs the same with O), same-polarity near-synonyms
    (" L." vs " S.": both acceptable) and dissimilar formats (" L." vs " I cannot tell from one sentence.").
    `part=sft`: demonstrations with the true polarity, " L.", " S." or the suffix form in turn (chosen; the
    rejected is the next form, unused by `loss.name=sft`)."""
    out = []
    for i, (text, positive) in enumerate(statements(n, split, seed)):
        label, other = _label(positive), _label(positive, opposite=True)
        if part == "sft":
            forms = [f" {label}.", f" {_SYNONYM[label]}.", f" {label}{_SUFFIX}"]
            chosen, rejected = forms[i % 3], forms[(i + 1) % 3]
        else:
            kind = DISPLACEMENT_TYPES[i % len(DISPLACEMENT_TYPES)]
            chosen, rejected = {"opposite": (f" {label}.", f" {other}."),
                                "suffix": (f" {label}{_SUFFIX}", f" {other}{_SUFFIX}"),
                                "synonym": (f" {label}.", f" {_SYNONYM[label]}."),
                                "format": (f" {label}.", _UNSURE)}[kind]
        out.append(PreferenceExample(f"Statement: {text}\nSentiment:", chosen, rejected,
                                     where=f"synthetic:displacement[{split}]:{i + 1}"))
    return out


def wrong_polarity_words(positive: bool) -> tuple[str, str]:
    """The first words of a wrong-polarity answer to a statement of this polarity."""
    other = _label(positive, opposite=True)
    return other, _SYNONYM[other]


SOURCES = {"sentiment": {"n", "config", "split", "seed"}, "verdict": {"n", "split", "seed"},
           "displacement": {"n", "split", "seed", "part"}}


def from_source(source: str) -> list[PreferenceExample]:
    """Parse `synthetic:NAME?key=value&...` (NAME: sentiment with keys n, config, split, seed; verdict with
    keys n, split, seed; displacement with keys n, split, seed, part)."""
    body = source.split(":", 1)[1]
    name, _, query = body.partition("?")
    if name not in SOURCES:
        raise DataError(f"{source}: unknown synthetic data set {name!r}; valid: {', '.join(SOURCES)}")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - SOURCES[name]
    if unknown:
        raise DataError(f"{source}: unknown option(s) {', '.join(sorted(unknown))}; valid: "
                        f"{', '.join(sorted(SOURCES[name]))}")
    try:
        n, seed = int(opts.get("n", 256)), int(opts.get("seed", 0))
    except ValueError:
        raise DataError(f"{source}: n and seed must be whole numbers") from None
    if n < 1:
        raise DataError(f"{source}: n must be at least 1 (got {n})")
    if name == "verdict":
        return verdict_pairs(n, opts.get("split", "train"), seed)
    if name == "displacement":
        if opts.get("part", "pairs") not in ("pairs", "sft"):
            raise DataError(f"{source}: part must be pairs or sft")
        return displacement_pairs(n, opts.get("split", "train"), seed, opts.get("part", "pairs"))
    return sentiment_pairs(n, opts.get("config", "long"), opts.get("split", "train"), seed)
