"""Preference data: read records, parse the formats TRL users have, tokenise once (batching.py collates).

    examples, skipped = read_examples("pairs.jsonl")                    # -> [PreferenceExample]
    pairs, stats = tokenize_pairs(examples, tokenizer, max_length=512)   # -> [TokenizedPair]

Formats: explicit `prompt/chosen/rejected` strings; chat message lists (the prompt is every message
before the final assistant turn); implicit prompts (chosen and rejected share a prefix); unpaired
`prompt/completion/label` rows for KTO. Column names can be remapped with `columns`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from entangle.errors import DataError

log = logging.getLogger(__name__)

Text = str | list[dict[str, str]]  # a plain string or a list of chat messages


@dataclass
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    where: str = ""  # "file:line" for error messages


@dataclass
class UnpairedExample:
    prompt: Text
    completion: Text
    label: bool
    where: str = ""


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int  # position in the source, stable across runs (keys the reference cache)

    def rows(self) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        """The two `(prompt, response)` rows of this item in a batch: chosen, then rejected."""
        return (self.prompt_ids, self.chosen_ids), (self.prompt_ids, self.rejected_ids)


@dataclass
class TokenStats:
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_skipped: int = 0  # bad records skipped at read time

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


DEFAULT_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                   "completion": "completion", "label": "label"}


# ------------------------------------------------------------------------------------ reading


def missing_file(source: str) -> bool:
    """A source that names a local file or folder (a data-file extension, or a path) that does not exist;
    hub ids and `synthetic:` sources are not files."""
    return (not source.startswith("synthetic:") and not os.path.exists(source)
            and (source.endswith((".jsonl", ".json", ".parquet", ".gz")) or source.startswith((".", "/"))))


def iter_records(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield `(where, record)` from a JSONL/JSON/Parquet file, a `datasets` folder or a hub id."""
    if os.path.isfile(source):
        name = os.path.basename(source)
        if source.endswith((".jsonl", ".jsonl.gz")):
            yield from _iter_jsonl(source, name)
        elif source.endswith(".json"):
            yield from _iter_json(source, name)
        elif source.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(source)
            except Exception as e:   # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
                raise DataError(f"{name}: not a Parquet file ({str(e).splitlines()[0][:120]}); check the file "
                                "or its extension") from None
            for i, row in enumerate(table.to_pylist()):
                yield f"{name}:row {i + 1}", row
        else:
            raise DataError(f"{source}: unknown file type; use .jsonl, .json or .parquet")
    elif os.path.isdir(source):
        yield from _iter_datasets_folder(source, split)
    else:
        yield from _iter_hub(source, split)


def _iter_jsonl(path: str, name: str) -> Iterator[tuple[str, Any]]:
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{name}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{name}:{n}", _Invalid(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(path: str, name: str) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert the "
                        "file to UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg}); fix the file or convert it to JSONL") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of records")
    for i, rec in enumerate(data):
        yield f"{name}:record {i + 1}", rec


def _iter_datasets_folder(path: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception:  # not a save_to_disk folder: a folder of data files
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:
            raise DataError(f"{path}: cannot read it as a datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    name = os.path.basename(os.path.normpath(path))
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:row {i + 1}", row


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{name}: not a file or folder, and the hub dataset could not be loaded "
                        f"({type(e).__name__}); check the path, or the network for hub ids") from None
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:row {i + 1}", row


class _Invalid:
    def __init__(self, why: str):
        self.why = why


# ------------------------------------------------------------------------------------ parsing


def _text(rec: Mapping, col: str, field_name: str, where: str) -> Text:
    if col not in rec or rec[col] is None:
        raise DataError(f"{where}: field {col!r} is missing; map it with data.columns.{field_name}=NAME")
    v = rec[col]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(m, Mapping) for m in v):
        for i, m in enumerate(v):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field {col!r} message {i}: needs string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in v]
    raise DataError(f"{where}: field {col!r} must be a string or a list of chat messages, got {type(v).__name__}")


def _nonempty(t: Text) -> bool:
    if isinstance(t, str):
        return bool(t.strip())
    return bool(t) and bool(t[-1]["content"].strip())


def _split_implicit(chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text]:
    """Find the shared prompt of two full conversations (strings or message lists)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'chosen'/'rejected': the last message must be the assistant's")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: field 'chosen'/'rejected': the conversations differ before the final "
                            "assistant turn; give an explicit 'prompt'")
        return chosen[:-1], chosen[-1:], rejected[-1:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = len(os.path.commonprefix([chosen, rejected]))
        # Cut at the last whitespace of the shared prefix so no word is split between prompt and response.
        cut = max((i for i in range(k) if chosen[i].isspace()), default=0)
        if cut == 0:
            raise DataError(f"{where}: field 'prompt' is missing and chosen/rejected share no prefix; "
                            "give an explicit 'prompt'")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")


def _columns(rec: Any, where: str, columns: Mapping[str, str] | None, expected: str) -> dict[str, str]:
    """The column names to read, once the record is known to be an object (else a DataError)."""
    if isinstance(rec, _Invalid):
        raise DataError(f"{where}: {rec.why}")
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object with {expected}, got {type(rec).__name__}")
    return {**DEFAULT_COLUMNS, **(columns or {})}


def parse_pair(rec: Any, where: str, columns: Mapping[str, str] | None = None) -> PreferenceExample:
    """One record -> PreferenceExample, or DataError naming the place and field."""
    cols = _columns(rec, where, columns, "prompt/chosen/rejected")
    chosen = _text(rec, cols["chosen"], "chosen", where)
    rejected = _text(rec, cols["rejected"], "rejected", where)
    if rec.get(cols["prompt"]) is None:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
    else:
        prompt = _text(rec, cols["prompt"], "prompt", where)
        if isinstance(prompt, list):  # a plain-string answer to a chat prompt is the assistant's turn
            chosen = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
            rejected = [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else rejected
    for key, v in (("chosen", chosen), ("rejected", rejected)):
        if not _nonempty(v):
            raise DataError(f"{where}: field {cols[key]!r} is an empty response")
    if chosen == rejected:
        raise DataError(f"{where}: fields {cols['chosen']!r} and {cols['rejected']!r} are identical")
    return PreferenceExample(prompt, chosen, rejected, where)


def parse_unpaired(rec: Any, where: str, columns: Mapping[str, str] | None = None) -> UnpairedExample:
    cols = _columns(rec, where, columns, "prompt/completion/label")
    prompt = _text(rec, cols["prompt"], "prompt", where)
    completion = _text(rec, cols["completion"], "completion", where)
    if isinstance(prompt, list) and isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    label = rec.get(cols["label"])
    if not isinstance(label, bool):
        raise DataError(f"{where}: field {cols['label']!r} must be true or false, got {label!r}")
    if not _nonempty(completion):
        raise DataError(f"{where}: field {cols['completion']!r} is an empty response")
    return UnpairedExample(prompt, completion, label, where)


def parse_kto(rec: Any, where: str, columns: Mapping[str, str] | None = None) -> list[UnpairedExample]:
    """The KTO examples of one record: a `prompt/completion/label` row, or a preference pair split in two
    (its chosen response desirable, its rejected one undesirable), as TRL users run KTO on paired data."""
    cols = _columns(rec, where, columns, "prompt/completion/label or prompt/chosen/rejected")
    if cols["label"] not in rec and cols["chosen"] in rec and cols["rejected"] in rec:
        pair = parse_pair(rec, where, columns)
        return [UnpairedExample(pair.prompt, pair.chosen, True, where),
                UnpairedExample(pair.prompt, pair.rejected, False, where)]
    return [parse_unpaired(rec, where, columns)]


def parse_prompt(rec: Any, where: str, columns: Mapping[str, str] | None = None) -> Text:
    """The prompt of one record: its `prompt` field, or the shared prompt of chosen/rejected conversations."""
    cols = _columns(rec, where, columns, "a 'prompt' field")
    if rec.get(cols["prompt"]) is None and cols["chosen"] in rec and cols["rejected"] in rec:
        return parse_pair(rec, where, columns).prompt
    prompt = _text(rec, cols["prompt"], "prompt", where)
    if not _nonempty(prompt):
        raise DataError(f"{where}: field {cols['prompt']!r} is empty")
    return prompt


def read_prompts(source: str, columns: Mapping[str, str] | None = None, split: str = "train",
                 limit: int | None = None) -> list[Text]:
    """Prompts of any source entangle reads: `{"prompt": ...}` rows (strings or chat messages), the prompts
    of a preference file. A bad record is a DataError naming file, line and field."""
    prompts = []
    for where, rec in iter_records(source, split):
        prompts.append(parse_prompt(rec, where, columns))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError(f"{source}: no prompts; give records with a 'prompt' field (or prompt/chosen/rejected)")
    return prompts


def read_examples(source: str, columns: Mapping[str, str] | None = None, skip_bad: bool = False,
                  split: str = "train", limit: int | None = None, unpaired: bool = False):
    """Read and validate every record; returns `(examples, n_skipped)`. `unpaired`: KTO examples
    (`parse_kto`: unpaired rows, or preference pairs split in two), `limit` counting examples.

    A bad record raises DataError naming file, line and field, unless `skip_bad` (then counted)."""
    parse = parse_kto if unpaired else (lambda *a: [parse_pair(*a)])
    out, skipped = [], 0
    for where, rec in iter_records(source, split):
        try:
            out.extend(parse(rec, where, columns))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{source}: no usable records" + (f" ({skipped} skipped as bad)" if skipped else ""))
    return out[:limit] if limit is not None else out, skipped


# ------------------------------------------------------------------------------------ tokenising


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_prompt(tokenizer, prompt: Text, where: str = "") -> list[int]:
    """Token ids of a prompt as training sees it: chat messages through the chat template with the
    generation prompt (the template carries any BOS), a string with the tokenizer's BOS if it adds one."""
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: chat messages need a tokenizer with a chat template")
        return _encode(tokenizer, _chat_text(tokenizer, prompt, True))
    ids = _encode(tokenizer, prompt)
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def encode_prompt_response(tokenizer, prompt: Text, response: Text, where: str = "") -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of one response, with exactly one EOS ending the response."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one before training")
    prompt_ids = encode_prompt(tokenizer, prompt, where)
    if isinstance(prompt, list):
        if isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        prompt_text = _chat_text(tokenizer, prompt, True)
        full = _chat_text(tokenizer, prompt + response, False)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template renders the prompt differently with and without the "
                            "response; give prompt/chosen/rejected as strings")
        response_ids = _encode(tokenizer, full[len(prompt_text):])
    else:
        if isinstance(response, list):
            raise DataError(f"{where}: a string prompt needs string responses")
        response_ids = _encode(tokenizer, response)
    if eos in response_ids:  # the template's own end-of-turn: cut what follows it (e.g. a newline)
        last = len(response_ids) - 1 - response_ids[::-1].index(eos)
        response_ids = response_ids[: last + 1]
    else:
        response_ids = response_ids + [eos]
    if not prompt_ids:
        raise DataError(f"{where}: field 'prompt' tokenises to nothing; give a non-empty prompt")
    return prompt_ids, response_ids


def truncate(prompt: list[int], responses: Sequence[list[int]], max_length: int | None,
             max_prompt_length: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Keep the end of the prompt, then the start of each response, within the limits. Without a
    `max_prompt_length`, a pair that does not fit keeps the last max_length // 2 prompt tokens (as TRL)."""
    cut = False
    longest = max(len(r) for r in responses)
    if max_length is not None and len(prompt) + longest > max_length:
        keep = max_prompt_length if max_prompt_length is not None else max_length // 2
        if len(prompt) > keep:
            prompt, cut = prompt[-keep:], True
        room = max_length - len(prompt)
        if room < longest:
            responses, cut = [r[: max(room, 0)] for r in responses], True
    elif max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = prompt[-max_prompt_length:], True
    return prompt, list(responses), cut


def tokenize_pairs(examples: Sequence[PreferenceExample], tokenizer, max_length: int | None = None,
                   max_prompt_length: int | None = None) -> tuple[list[TokenizedPair], TokenStats]:
    """Tokenise once; pairs whose responses truncate to nothing, or become identical, are dropped."""
    stats, out = TokenStats(n_examples=len(examples)), []
    for i, ex in enumerate(examples):
        p, c = encode_prompt_response(tokenizer, ex.prompt, ex.chosen, ex.where)
        p2, r = encode_prompt_response(tokenizer, ex.prompt, ex.rejected, ex.where)
        if p != p2:
            raise DataError(f"{ex.where}: the prompt tokenises differently for chosen and rejected")
        p, (c, r), cut = truncate(p, [c, r], max_length, max_prompt_length)
        if not c or not r or c == r:
            stats.n_dropped += 1
            continue
        stats.n_truncated += cut
        out.append(TokenizedPair(p, c, r, i))
    return out, stats


@dataclass
class TokenizedCompletion:
    """One KTO example, and the mismatched completion its KL row scores (`kl_ids`: another example's
    completion after this prompt, fixed once per dataset as TRL's KL dataset is)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool   # True: desirable
    index: int
    kl_ids: list[int] = field(default_factory=list)

    def rows(self) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        """The two `(prompt, response)` rows of this item in a batch: the example, then its KL row."""
        return (self.prompt_ids, self.completion_ids), (self.prompt_ids, self.kl_ids)


def tokenize_unpaired(examples: Sequence[UnpairedExample], tokenizer, max_length: int | None = None,
                      max_prompt_length: int | None = None, seed: int = 0) -> tuple[list[TokenizedCompletion], TokenStats]:
    """Tokenise once, then give each example its KL completion: in a seeded permutation of the examples,
    the next one's completion (truncated to fit `max_length` after this prompt)."""
    stats, out = TokenStats(n_examples=len(examples)), []
    for i, ex in enumerate(examples):
        p, c = encode_prompt_response(tokenizer, ex.prompt, ex.completion, ex.where)
        p, (c,), cut = truncate(p, [c], max_length, max_prompt_length)
        if not c:
            stats.n_dropped += 1
            continue
        stats.n_truncated += cut
        out.append(TokenizedCompletion(p, c, ex.label, i))
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()
    for k, j in enumerate(order):
        item, partner = out[j], out[order[(k + 1) % len(order)]]
        room = len(partner.completion_ids) if max_length is None else max(max_length - len(item.prompt_ids), 1)
        item.kl_ids = partner.completion_ids[:room]
    return out, stats


def check_labels(items: Sequence[TokenizedCompletion], source: str, desirable_weight: float,
                 undesirable_weight: float) -> tuple[int, int]:
    """(desirable, undesirable) counts; a set with one kind only is a DataError. Warns when the weighted
    ratio lies outside [1, 4/3], the KTO paper's advice for imbalanced data (sec. 4.3)."""
    n_d = sum(1 for it in items if it.label)
    n_u = len(items) - n_d
    if not n_d or not n_u:
        kind = "desirable (label true)" if n_u == 0 else "undesirable (label false)"
        raise DataError(f"{source}: all {len(items)} examples are {kind}; KTO needs both desirable and "
                        "undesirable examples")
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if not 1.0 <= ratio <= 4 / 3:
        log.warning("%s: %d desirable and %d undesirable examples; desirable_weight * %d / (undesirable_weight * %d)"
                    " = %.2f lies outside [1, 4/3], the KTO paper's advice; adjust loss.params.desirable_weight or "
                    "undesirable_weight", source, n_d, n_u, n_d, n_u, ratio)
    return n_d, n_u
