"""Memory budgets: estimated before the work, a one-line error (exit 2) when over, batches shrunk to fit."""

import logging
import os
import subprocess
import sys

import pytest

from conftest import write_jsonl
from entangle import api, memory, models
from entangle.errors import OverBudget
from test_cli import entangle


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny")[0]


def one_line_error(p, message):
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.strip().splitlines() if "INFO" not in x]
    assert "Traceback" not in p.stderr and len(lines) == 1 and message in lines[0], p.stderr[-2000:]


def test_estimates_count_weights_gradients_logits_and_cache(tiny):
    s = memory.shape(tiny)
    assert memory.weights(tiny) == sum(p.numel() * 4 for p in tiny.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny.buffers())
    assert memory.trainable(tiny) == sum(p.numel() * 4 for p in tiny.parameters())
    # logits: float32 [rows, positions, vocab], kept with log-softmax (x2 without grad, x3 with)
    no_grad = memory.forward(tiny, 2, 10, grad=False)
    assert no_grad >= 2 * 10 * s["vocab"] * 4 * 2
    assert memory.forward(tiny, 2, 10, grad=True) > no_grad           # every layer's activations kept
    assert memory.forward(tiny, 4, 10, grad=True) == 2 * memory.forward(tiny, 2, 10, grad=True)
    assert memory.kv_cache(tiny, 3, 7) == 2 * s["layers"] * 3 * 7 * s["kv_heads"] * (s["hidden"] // s["heads"]) * 4


def test_largest_batch_halves_until_it_fits_and_refuses_when_one_does_not(caplog):
    with caplog.at_level(logging.WARNING):
        assert memory.largest_batch(lambda b: 100 * b, 450, 16, "sampling", "--batch-size") == 4
    assert "--batch-size 16 does not fit" in caplog.text and "using 4" in caplog.text
    assert memory.largest_batch(lambda b: 100 * b, 10_000, 16, "sampling", "--batch-size") == 16
    with pytest.raises(OverBudget, match="sampling .batch 1. needs about .* over its budget"):
        memory.largest_batch(lambda b: 100 * b, 50, 16, "sampling", "--batch-size")
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(OverBudget, match="--memory-gib must be a number > 0"):
            memory.check_gib(bad)


def test_generation_shrinks_its_batch_to_the_budget_and_samples_all(tiny, caplog):
    from entangle.generation import generate

    tok = models.load_model("tiny")[1]
    need_one = memory.forward(tiny, 1, 40, grad=False, logits_rows=1) + memory.kv_cache(tiny, 1, 40) + \
        memory.shape(tiny)["vocab"] * 4 * 8
    gib = (memory.weights(tiny) + 2.5 * need_one) / memory.GIB
    with caplog.at_level(logging.WARNING):
        rows = generate(tiny, tok, ["a" * 30] * 4, max_new_tokens=8, batch_size=4, memory_gib=gib)
    assert len(rows) == 4 and "using 2" in caplog.text


@pytest.mark.slow
def test_commands_over_budget_stop_in_one_line_before_the_work(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": "Q: hi", "chosen": " good answer", "rejected": " bad"}] * 4)
    out = tmp_path / "scan"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    one_line_error(entangle("scan", "tiny", "--data", str(pairs), "--out", str(out), "--memory-gib", "0.001"),
                   "scan of 4 pairs of up to")
    assert sorted(os.listdir(out)) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    one_line_error(entangle("generate", "tiny", "--prompts", str(pairs), "--out", str(tmp_path / "s.jsonl"),
                            "--memory-gib", "0.0001"), "the model's weights alone take")
    assert not (tmp_path / "s.jsonl").exists()
    one_line_error(entangle("train", "configs/tiny-dpo.yaml", f"train.output_dir={tmp_path / 'run'}",
                            "train.memory_gib=0.001", "tracking.progress=false"), "training (batch 8 pairs")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    one_line_error(entangle("train", "configs/tiny-dpo.yaml", "train.memory_gib=-1"), "train.memory_gib")


def test_scan_api_over_budget_refuses_before_any_row(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": "Q: hi", "chosen": " good answer", "rejected": " bad"}] * 2)
    with pytest.raises(OverBudget, match="scan of 2 pairs"):
        api.scan("tiny", str(pairs), out=str(tmp_path / "o"), memory_gib=0.001, device="cpu")
    assert not (tmp_path / "o" / "scan.jsonl").exists()


def test_the_training_estimate_counts_what_a_gradient_recorder_keeps(tiny, tmp_path):
    """Every module with trainable parameters keeps its output gradient (and the shared rows are rewritten as two):
    rows x length x (inputs + outputs) x 4 bytes; a budget between the two estimates admits the plain run and
    refuses the diagnostic one in one line, before any step."""
    import torch

    per_token = 0
    for m in tiny.modules():
        if isinstance(m, torch.nn.Embedding):
            per_token += m.embedding_dim + 1
        elif isinstance(m, torch.nn.Linear):
            per_token += m.in_features + m.out_features
        elif any(True for _ in m.parameters(recurse=False)):                   # the norms: input and output
            per_token += 2 * sum(p.numel() for p in m.parameters(recurse=False))
    assert memory.recorded(tiny, 3, 7) == 3 * 7 * per_token * 4
    lora = models.load_model("tiny", lora=models.LoraConfig(r=2, target_modules=["q_proj"]))[0]
    assert 0 < memory.recorded(lora, 3, 7) < memory.recorded(tiny, 3, 7)
    plain = 3 * memory.trainable(tiny) + memory.forward(tiny, 16, 128, grad=True)
    gib = (plain + memory.recorded(tiny, 16, 128) / 2) / 2**30     # admits the plain step, not the recorded one
    common = ["train", "configs/tiny-dpo.yaml", "model.name=tiny", "data.max_length=128", "train.batch_size=8",
              "train.max_steps=1", "data.eval=null", f"train.memory_gib={gib}", "tracking.progress=false"]
    one_line_error(entangle(*common, f"train.output_dir={tmp_path / 'diag'}", "diagnostics.entanglement.every=1"),
                   "training (batch 8 pairs")
    assert not (tmp_path / "diag" / "metrics.jsonl").exists()
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from entangle.assembly import check_training_memory

    tc = OmegaConf.create({"batch_size": 8, "activation_checkpointing": False, "memory_gib": gib})
    check_training_memory(tiny, tc, 128, SimpleNamespace(device=torch.device("cpu")))      # the plain step fits
    with pytest.raises(OverBudget):
        check_training_memory(tiny, tc, 128, SimpleNamespace(device=torch.device("cpu")), recorder=True)


FAULTS_AFTER_REUSE = """
import resource, sys
import torch
from entangle import memory
if sys.argv[1] == "huge":
    assert memory.use_huge_pages()
for _ in range(2):                                  # a large tensor, freed, then one of the same size again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)                     # 64 MiB: beyond glibc's largest mmap threshold (32 MiB)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


@pytest.mark.skipif(not memory.huge_pages_granted(), reason="the kernel grants no transparent huge pages")
def test_use_huge_pages_faults_a_large_tensor_in_far_fewer_pages():
    def faults(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        out = subprocess.run([sys.executable, "-c", FAULTS_AFTER_REUSE, mode], capture_output=True, text=True,
                             check=True, env=env)
        return int(out.stdout.split()[-1])

    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert faults("default") > pages // 2          # mapped afresh on every allocation: every 4 KiB page faults
    assert faults("huge") < pages // 10            # 2 MiB pages: 512x fewer faults
