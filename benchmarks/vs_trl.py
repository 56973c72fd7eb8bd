"""entangle vs TRL's DPOTrainer: the same pairs, model, dtype, batch, max length, beta, learning rate,
optimiser and static frozen reference, each side in its own process (a fresh interpreter per run: no state one
trainer leaves behind can flatter the other).

    pip install -e ".[bench]"          # TRL and psutil
    python benchmarks/vs_trl.py                                   # SmolLM2-135M, HH, 256/512 x batch 2/4, tiny
    python benchmarks/vs_trl.py --model tiny --lengths 128 --batches 2 --steps 3 --rounds 1

Prints per setting: median step time, pairs/s, tokens/s, the child process's peak RSS (`os.wait4`), the step-1 loss
and log-probs of each (they must agree), model FLOPs utilisation against a measured float32 matmul
peak, and the ratio. Pairs are HH helpful-base pairs whose longer sequence fits `max_length` and
exceeds half of it (no truncation on either side, so both see the same tokens).
Not a test: run it by hand; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base.train.jsonl")


class PeakRSS:
    """Samples the process's resident memory every 50 ms while active."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def matmul_peak(n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul FLOP/s in `dtype` on this machine (best of `reps`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def select_pairs(tokenizer, path: str, max_length: int, n: int) -> list[dict]:
    """HH pairs (string prompt/chosen/rejected) with max_length/2 < longest sequence <= max_length, whose
    prompt and responses tokenise the same apart as together (TRL tokenises prompt + response in one
    go, entangle each part alone: on these pairs both give the same token ids)."""
    from entangle.data import encode_prompt_response, read_examples

    examples, _ = read_examples(path, {}, True, "train", None)
    out = []
    for e in examples:
        if not isinstance(e.prompt, str):
            continue
        p, c = encode_prompt_response(tokenizer, e.prompt, e.chosen)
        _, r = encode_prompt_response(tokenizer, e.prompt, e.rejected)
        longest = len(p) + max(len(c), len(r))
        joint = [tokenizer(e.prompt + x, add_special_tokens=False)["input_ids"] for x in (e.chosen, e.rejected)]
        same = joint == [p + c[:-1], p + r[:-1]]          # c and r end with the EOS entangle appends
        if same and max_length // 2 < longest <= max_length:
            out.append({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected,
                        "tokens": 2 * len(p) + len(c) + len(r), "packed_tokens": len(p) + len(c) + len(r)})
        if len(out) == n:
            break
    if len(out) < n:
        sys.exit(f"{path}: only {len(out)} pairs fit max_length {max_length} (need {n})")
    return out


def run_trl(folder: str, pairs: list[dict], a) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps,
                         learning_rate=a.lr, lr_scheduler_type="constant", beta=a.beta, max_length=a.max_length,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                         dataloader_drop_last=True, disable_tqdm=True, max_grad_norm=1.0, warmup_steps=0,
                         optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                         # float32 weights, bf16 autocast only with --precision bf16-mixed (TRL's default),
                         # and no activation checkpointing (TRL's default recomputes the forward: slower, less
                         # memory) unless --checkpointing
                         bf16=a.precision == "bf16-mixed", gradient_checkpointing=a.checkpointing)
        ds = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        trainer._get_train_sampler = lambda *x, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        with PeakRSS() as rss:
            trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
    first = logs[0]
    return {"times": times, "rss": rss.peak, "loss1": first["loss"], "chosen1": first.get("logps/chosen"),
            "rejected1": first.get("logps/rejected"), "loss2": logs[1]["loss"] if len(logs) > 1 else None}


def run_entangle(model: str, pairs: list[dict], a) -> dict:
    from entangle import config
    from entangle.loop import train

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as out:
        path = os.path.join(out, "pairs.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in pairs)
        cfg = config.load(None, [f"model.name={model}", f"model.dtype={a.precision}", f"data.train={path}",
                                 f"data.max_length={a.max_length}", "loss.name=dpo", f"loss.params.beta={a.beta}",
                                 "reference.type=frozen", "reference.kl_to_init=false", f"optimizer.lr={a.lr}",
                                 "schedule.decay=constant", "schedule.warmup_steps=0", f"train.batch_size={a.batch}",
                                 f"train.max_steps={a.steps}", "train.max_grad_norm=1.0", "tracking.progress=false",
                                 f"train.output_dir={out}/run", "train.save_every=0",
                                 f"train.prefix_sharing={str(a.prefix_sharing).lower()}",
                                 f"train.activation_checkpointing={str(a.checkpointing).lower()}",
                                 "diagnostics.entanglement.every=0"])
        sequential(cfg)
        with PeakRSS() as rss:
            train(cfg, callbacks=[lambda row, stop: rows.append(row)])
    return {"times": [r["step_time_s"] for r in rows], "rss": rss.peak, "loss1": rows[0]["loss"],
            "chosen1": rows[0]["logps/chosen"], "rejected1": rows[0]["logps/rejected"],
            "loss2": rows[1]["loss"] if len(rows) > 1 else None}


def sequential(cfg) -> None:
    """Both trainers take the pairs in file order: entangle's seeded permutation is replaced here."""
    import entangle.batching as batching

    batching.batch_indices = lambda n, step, global_batch, seed: list(range(step * global_batch,
                                                                        (step + 1) * global_batch))


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def child(a) -> None:
    """One side of one setting, in this (fresh) process: prints its result as one JSON line."""
    pairs = json.load(open(a.pairs_file))
    torch.set_num_threads(os.cpu_count() or 1)
    if a.allocator == "both" or (a.allocator == "entangle" and a.side == "entangle"):
        from entangle.memory import use_huge_pages

        use_huge_pages()       # what the `entangle` command line does for itself
    result = run_entangle(a.folder, pairs, a) if a.side == "entangle" else run_trl(a.folder, pairs, a)
    if torch.cuda.is_available():
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result), flush=True)


def in_child(side: str, folder: str, pairs: list[dict], a) -> dict:
    """Run one side in its own process; its result and its peak RSS (the child's own, from wait4)."""
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(pairs, f)
    cmd = [sys.executable, __file__, "--side", side, "--folder", folder, "--pairs-file", f.name,
           "--max-length", str(a.max_length), "--batch", str(a.batch), "--steps", str(a.steps), "--lr", str(a.lr),
           "--beta", str(a.beta), "--allocator", a.allocator, "--precision", a.precision] + \
        ([] if a.prefix_sharing else ["--no-prefix-sharing"]) + (["--checkpointing"] if a.checkpointing else [])
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, _, usage = os.wait4(proc.pid, 0)          # this child's own resources (peak RSS in KiB on Linux)
        proc.returncode = 0
        err.seek(0)
        message = err.read()[-1500:]
    os.unlink(f.name)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{side} failed: {message}")
    result = json.loads(line[len("RESULT "):])
    result["rss"] = max(result["rss"], usage.ru_maxrss * 1024)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny")
    ap.add_argument("--data", default=HH)
    ap.add_argument("--lengths", default="256,512")
    ap.add_argument("--batches", default="2,4")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps per run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side per setting, alternating")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing in both trainers (TRL's default; off by default here)")
    ap.add_argument("--precision", choices=("float32", "bf16-mixed"), default="float32",
                    help="both sides: float32, or float32 weights under bf16 autocast (TRL's bf16=True, entangle's "
                         "model.dtype=bf16-mixed)")
    ap.add_argument("--allocator", choices=("entangle", "both", "neither"), default="entangle",
                    help="which side puts large tensors on transparent huge pages (memory.use_huge_pages): "
                         "entangle (as each tool runs from its command line), both, or neither")
    ap.add_argument("--side", help=argparse.SUPPRESS)            # the child processes
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return child(a)
    from entangle import models

    if a.model == "smollm2-135m":
        folder = models.smollm2_folder()
    else:
        folder = tempfile.mkdtemp(prefix="entangle-bench-")
        m, tok = models.load_model(a.model, dtype="float32")
        m.save_pretrained(folder)
        tok.save_pretrained(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    peak = matmul_peak(dtype=torch.bfloat16 if a.precision == "bf16-mixed" else torch.float32)
    print(f"# {time.strftime('%Y-%m-%d')} | {a.model} ({n_params / 1e6:.1f}M parameters) {a.precision} | "
          f"activation checkpointing {'on' if a.checkpointing else 'off'} | each side in its own process | "
          f"{os.cpu_count()} CPU threads | {'bf16' if a.precision == 'bf16-mixed' else 'float32'} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s | torch {torch.__version__}")
    print("| max_length | batch | trainer | median step s | pairs/s | tokens/s | peak RSS GiB | step-1 loss | "
          "step-1 logp chosen / rejected | step-2 loss | MFU | speed-up | memory vs TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for L in (int(x) for x in a.lengths.split(",")):
        for B in (int(x) for x in a.batches.split(",")):
            a.max_length, a.batch = L, B
            report_setting(folder, tok, n_params, peak, a)


def report_setting(folder: str, tok, n_params: int, peak: float, a) -> None:
    """Both sides of one (max_length, batch) setting, each in its own process; one table row each."""
    L, B = a.max_length, a.batch
    pairs = select_pairs(tok, a.data, L, B * a.steps)
    tokens_per_step = statistics.mean(p["tokens"] for p in pairs) * B          # both responses with the prompt
    packed_per_step = statistics.mean(p["packed_tokens"] for p in pairs) * B   # the prompt once
    res: dict[str, list[dict]] = {"TRL": [], "entangle": []}
    for _ in range(a.rounds):
        for name in ("entangle", "TRL"):
            res[name].append(in_child(name.lower() if name == "TRL" else name, folder, pairs, a))
    med = {name: statistics.median(t for r in runs for t in (r["times"][1:] if a.steps >= 3 else r["times"]))
           for name, runs in res.items()}
    rss = {name: max(x["rss"] for x in runs) for name, runs in res.items()}
    for name, runs in res.items():
        r, m = runs[0], med[name]
        # model FLOPs: policy forward+backward (6N) and reference forward (2N) per token the trainer runs
        # through the model (entangle with prefix sharing runs the prompt once)
        ran = packed_per_step if name == "entangle" and a.prefix_sharing else tokens_per_step
        mfu = 8 * n_params * ran / m / peak
        up = f"{med['TRL'] / m:.2f}x" if name == "entangle" else ""
        mem = f"{rss[name] / rss['TRL']:.2f}x" if name == "entangle" else ""
        print(f"| {L} | {B} | {name} | {m:.2f} | {B / m:.3f} | {tokens_per_step / m:.0f} | "
              f"{rss[name] / 2**30:.2f} | {r['loss1']:.6f} | {_f(r['chosen1'])} / {_f(r['rejected1'])} | "
              f"{_f(r['loss2'], 6)} | {mfu:.1%} | {up} | {mem} |", flush=True)
    t, e = res["TRL"][0], res["entangle"][0]
    agree = abs(t["loss1"] - e["loss1"]) < 1e-4 and None not in (t["chosen1"], e["chosen1"]) and \
        abs(t["chosen1"] - e["chosen1"]) < 1e-3 * abs(t["chosen1"])
    if not agree:
        print(f"WARNING: step-1 numbers differ at max_length {L}, batch {B}", flush=True)


if __name__ == "__main__":
    main()
