"""Sampling from a policy: batched, left-padded, with the KV cache, seeded; and completion log-likelihoods.

    policy = load_policy("runs/x")                 # a run (its final/), a checkpoint folder, or any model.name
    rows = generate(policy.model, policy.tokenizer, prompts, n=2, max_new_tokens=64, seed=0)
    # rows[i]: {"prompt", "completion", "sample", "tokens", "logp", "finished", "prompt_ids", "completion_ids"}
    logp = completion_logps(other_model, rows, pad_id)     # [len(rows)]: the same completions under another model

`logp` is log pi(y|x) at temperature 1, the sum over the completion's tokens, whatever the sampling
temperature, read off the raw logits of the sampling forward; `completion_logps` computes the same
quantity for any model with one right-padded forward over prompt + completion.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from omegaconf import OmegaConf

from entangle import memory, synthetic
from entangle.checkpoint import load_weights
from entangle.config import load_saved, trust_region
from entangle.data import Text, encode_prompt, missing_file, read_prompts
from entangle.batching import Batch, pad_sequences
from entangle.errors import DataError, ModelError
from entangle.logps import sequence_logps
from entangle.models import LoraConfig, load_model
from entangle.reference import Reference, TrustRegionReference

log = logging.getLogger(__name__)


@dataclass
class LoadedPolicy:
    model: object
    tokenizer: object
    source: str            # what was asked for
    started_from: str | None   # how to load the policy it started from (a run's model.name), None for a plain model
    seed: int = 0          # the run's train.seed (tiny models are built from it)
    lora: bool = False


def resolve(spec: str) -> tuple[str, str | None, str | None]:
    """`(kind, run_dir, weights_folder)`: kind is run | checkpoint | model."""
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "trainer_state.json")):
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(spec)))
        if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
            raise ModelError(f"{spec}: a checkpoint folder outside its run directory (no ../../config.yaml)")
        return "checkpoint", run_dir, os.path.join(spec, "model")
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.yaml")) \
            and os.path.isfile(os.path.join(spec, "metrics.jsonl")):
        if not os.path.isdir(os.path.join(spec, "final")):
            raise ModelError(f"{spec}: the run has no final/ (it did not finish); give one of its checkpoints, "
                             f"{os.path.join(spec, 'checkpoints', 'step-N')}, or resume it first")
        return "run", spec, os.path.join(spec, "final")
    return "model", None, None


def load_policy(spec: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False) -> LoadedPolicy:
    """A policy to sample from: a run directory (its `final/`, full or LoRA: base + adapter), one of its
    checkpoint folders, or anything `model.name` accepts."""
    kind, run_dir, folder = resolve(spec)
    if kind == "model":
        model, tok = load_model(spec, dtype, device, None, trust_remote_code)
        return LoadedPolicy(model.eval(), tok, spec, None)
    cfg = load_saved(run_dir)
    mc = cfg.model
    if mc.trust_remote_code and not trust_remote_code:
        # a run folder is data from elsewhere: it cannot turn on code execution by itself
        raise ModelError(f"{os.path.join(run_dir, 'config.yaml')} asks for model.trust_remote_code; a run folder "
                         "cannot turn remote code on: pass trust_remote_code=True yourself, only for a model you trust")
    lora = LoraConfig(**OmegaConf.to_container(mc.lora))
    model, tok = load_model(mc.name, dtype, device, lora, trust_remote_code, seed=cfg.train.seed)
    load_weights(model, folder)
    return LoadedPolicy(model.eval(), tok, spec, mc.name, cfg.train.seed, lora.r > 0)


def load_moving_reference(spec: str, policy: "LoadedPolicy"):
    """The trust-region reference where a run (its final state) or a checkpoint left it, or None when the
    run's reference never moved. Rebuilt exactly: full weights, or the LoRA base plus its dense deltas."""
    from safetensors import safe_open

    kind, run_dir, folder = resolve(spec)
    if kind == "model":
        return None
    path = os.path.join(run_dir, "reference-final.safetensors") if kind == "run" else \
        os.path.join(spec, "reference.safetensors")
    if not os.path.exists(path):
        return None
    cfg = load_saved(run_dir)
    alpha, tau = trust_region(cfg)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    updates = meta.get("ref_updates")
    if updates is None and kind == "checkpoint":   # a checkpoint keeps the count in its trainer_state.json
        import json

        with open(os.path.join(spec, "trainer_state.json")) as f:
            updates = json.load(f).get("ref_updates", 0)
    ref = TrustRegionReference(policy.model, alpha, tau)
    ref.load_state_tensors(tensors, int(updates or 0))
    return ref


def load_initial(policy: LoadedPolicy, dtype: str = "auto", device: str = "cpu") -> LoadedPolicy:
    """The policy a run started from (its config's model, no adapter); a plain model is its own initial policy."""
    if policy.started_from is None:
        return policy
    model, tok = load_model(policy.started_from, dtype, device, None, seed=policy.seed)
    return LoadedPolicy(model.eval(), tok, policy.started_from, None)


def load_prompts(source: str, split: str = "train", limit: int | None = None, columns=None) -> list[Text]:
    """Prompts of a data source (`synthetic:NAME` included), in file order."""
    if source.startswith("synthetic:"):
        prompts = [ex.prompt for ex in synthetic.from_source(source)]
        return prompts[:limit] if limit else prompts
    if missing_file(source):
        raise DataError(f"{source}: no such file")
    return read_prompts(source, columns, split, limit)


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, T - len(r):] = 1
    return ids, attn


def _cut(tokens: list[int], eos: int | None, pad: int) -> tuple[list[int], bool]:
    """Up to and including the first EOS; `finished` says whether one came."""
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1], True
    return [t for t in tokens if t != pad] if pad != eos else tokens, False


@dataclass
class SamplingSettings:
    """The sampling options of `generate`, `eval` and `label` (CLI and Python): the one place of their defaults
    and valid ranges."""

    n: int = 1                           # samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0             # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16                 # sequences per forward (shrinks to fit memory_gib)
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens
    memory_gib: float | None = None      # memory budget (default: 90 % of what is free)
    progress: bool = False

    @classmethod
    def of(cls, options: dict) -> "SamplingSettings":
        """Settings from keyword options, checked; an unknown option is one line naming the valid ones."""
        names = list(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ModelError(f"sampling: unknown option {unknown[0]!r}; valid: {', '.join(names)}")
        return cls(**options).validate()

    def validate(self) -> "SamplingSettings":
        """Each option in its range, one line each, before anything loads."""
        whole = {"--n": self.n, "--max-new-tokens": self.max_new_tokens, "--batch-size": self.batch_size,
                 "--max-prompt-length": self.max_prompt_length}
        for name, v in whole.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ModelError(f"{name} must be a whole number >= 1 (got {v!r})")
        t, top_p, seed = self.temperature, self.top_p, self.seed
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ModelError(f"--temperature must be a finite number >= 0 (0: greedy; got {t!r})")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ModelError(f"--top-p must be in (0, 1] (got {top_p!r})")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            raise ModelError(f"--seed must be a whole number >= 0 (got {seed!r})")
        memory.check_gib(self.memory_gib)
        return self


def check_sampling(limit: int | None = None, **options) -> SamplingSettings:
    """`--limit` (None: no limit) and the sampling options (`SamplingSettings`), before anything loads."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ModelError(f"--limit must be a whole number >= 1 (got {limit!r})")
    return SamplingSettings.of(options)


def _encode_prompts(model, tokenizer, prompts: Sequence[Text], s: SamplingSettings) -> list[list[int]]:
    """Each prompt's ids, cut from the left to fit (`prompt_room`); one log line counts the cut ones."""
    keep = prompt_room(model, s.max_new_tokens, s.max_prompt_length)
    encoded, cut = [], 0
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, p, f"prompt {i + 1}")
        cut += bool(keep) and len(ids) > keep
        encoded.append(ids[-keep:] if keep else ids)
    if cut:
        log.info("generate: %d of %d prompts keep their last %d tokens (--max-prompt-length, or the model's context "
                 "less --max-new-tokens)", cut, len(prompts), keep)
    return encoded


def _sampling_batch(model, encoded, jobs: int, s: SamplingSettings, logps: bool) -> int:
    """The largest batch <= `s.batch_size` whose prefill, KV cache and kept logits fit the budget."""
    length = max((len(e) for e in encoded), default=1) + s.max_new_tokens
    vocab_bytes = memory.shape(model)["vocab"] * 4 * s.max_new_tokens if logps else 0
    device = str(next(model.parameters()).device)
    return memory.largest_batch(
        lambda b: memory.forward(model, b, length, grad=False, logits_rows=1) + memory.kv_cache(model, b, length)
        + b * vocab_bytes, memory.work_budget(model, device, s.memory_gib), min(s.batch_size, max(jobs, 1)),
        f"sampling {jobs} completions of up to {length} tokens", "--batch-size")


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Text], logps: bool = True, **options) -> list[dict]:
    """`n` samples per prompt (`options`: `SamplingSettings`), returned in prompt-major order, stopping at EOS.
    Prompts run in batches of similar length (longest first: little padding in the prefill), each batch seeded,
    so the same seed and batch size give the same samples. Prompts longer than `max_prompt_length` keep their last
    tokens. `temperature` 0 is greedy. `logp` comes from the raw logits of the sampling forward (no extra pass).
    `batch_size` is lowered (one warning) to the largest that fits the memory budget; a one-line error before
    any sampling when one sequence does not fit."""
    s = SamplingSettings.of(options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = _encode_prompts(model, tokenizer, prompts, s)
    jobs = sorted(((i, k) for i in range(len(prompts)) for k in range(s.n)), key=lambda j: -len(encoded[j[0]]))
    device = next(model.parameters()).device
    batch_size = _sampling_batch(model, encoded, len(jobs), s, logps)
    sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s.temperature > 0 \
        else {"do_sample": False}
    bar = None
    if s.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="generate", unit="sample", dynamic_ncols=True)
    rows = {}
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b : b + batch_size]
        ids, attn = _left_pad([encoded[i] for i, _ in chunk], pad)
        torch.manual_seed(s.seed * 1_000_003 + b // batch_size)
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=s.max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             output_logits=logps, return_dict_in_generate=True, **sampling)
        new = out.sequences[:, ids.shape[1]:]                                                       # [b, steps]
        token_logps = _token_logps(out.logits, new) if logps else None                              # [b, steps]
        for r, ((i, k), toks) in enumerate(zip(chunk, new.tolist())):
            completion, finished = _cut(toks, tokenizer.eos_token_id, pad)
            rows[i, k] = {"prompt": prompts[i], "completion": tokenizer.decode(completion, skip_special_tokens=True),
                          "sample": k, "prompt_index": i, "tokens": len(completion), "finished": finished,
                          "prompt_ids": encoded[i], "completion_ids": completion}
            if logps:
                rows[i, k]["logp"] = float(token_logps[r, : len(completion)].sum())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [rows[i, k] for i in range(len(prompts)) for k in range(s.n)]


def prompt_room(model, max_new_tokens: int, max_prompt_length: int | None) -> int | None:
    """The most prompt tokens a sample may keep: `max_prompt_length`, and the model's context less
    `max_new_tokens` (prompts are cut from the left, as training cuts them); one line when no room is left."""
    from entangle.models import context_length

    context = context_length(model)
    if context is None:
        return max_prompt_length
    if max_new_tokens >= context:
        raise ModelError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens; lower it")
    room = context - max_new_tokens
    return min(room, max_prompt_length) if max_prompt_length else room


def _token_logps(logits: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) of each generated token at temperature 1 from the raw logits of each step: [b, steps],
    float64 on the CPU."""
    per_step = [torch.log_softmax(step.double(), -1).gather(1, tokens[:, t : t + 1])[:, 0]
                for t, step in enumerate(logits)]
    return torch.stack(per_step, 1).cpu()


@torch.no_grad()
def completion_logps(model, rows: Sequence[dict], pad_id: int, batch_size: int = 8,
                     memory_gib: float | None = None) -> torch.Tensor:
    """log pi(completion | prompt) of each row (`prompt_ids`, `completion_ids`) under `model`: [len(rows)],
    float64 on the CPU, from right-padded forwards of rows of similar length. An empty completion has
    log-probability 0. `model` may also be a `reference.Reference` (its `logps` of each batch). `batch_size` is
    lowered to fit the memory budget as in `generate`."""
    if isinstance(model, Reference):
        reference, model = model, model.model
    else:
        reference = None
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda k: -(len(rows[k]["prompt_ids"]) + len(rows[k]["completion_ids"])))
    length = max((len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows), default=1)
    batch_size = memory.largest_batch(lambda b: memory.forward(model, b, length, grad=False),
                                      memory.work_budget(model, str(device), memory_gib),
                                      min(batch_size, max(len(rows), 1)),
                                      f"scoring {len(rows)} samples of up to {length} tokens", "--batch-size")
    out = torch.zeros(len(rows), dtype=torch.float64)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        ids, attn, resp = pad_sequences([(rows[k]["prompt_ids"], rows[k]["completion_ids"]) for k in chunk], pad_id)
        batch = Batch(ids, attn, resp, torch.arange(len(chunk))).to(device)
        lp = reference.logps(batch) if reference is not None else sequence_logps(model, batch, pack=False).logps
        out[chunk] = lp.double().cpu()
    return out


def write_samples(path: str, rows: Sequence[dict]) -> None:
    """Samples as JSON lines, written atomically (the token ids stay, so a samples file re-scores exactly)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def standard_error(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
