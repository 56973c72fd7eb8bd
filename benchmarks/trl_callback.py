"""TRL's DPOTrainer with and without entangle's EntanglementCallback (every step): median step time and ratio.

    pip install -e ".[bench]"
    python benchmarks/trl_callback.py [--model smollm2-135m] [--steps 6] [--batch 2] [--max-length 256] [--lora-r 0]

The two runs use the same pairs (HH helpful-base), model, batch, seed and settings, one after the other in one
process; the first step of each is dropped (warm-up). Prints the medians, the ratio, and the last step's
entanglement means. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base.train.jsonl")


def run(folder: str, data, args, callbacks) -> tuple[list[float], list[dict]]:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                           learning_rate=5e-6, beta=0.1, max_length=args.max_length, logging_steps=1, save_strategy="no",
                           report_to=[], use_cpu=True, seed=0, bf16=False, disable_tqdm=True, gradient_checkpointing=False)
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]) if args.lora_r else None
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=config,
                             train_dataset=data, processing_class=AutoTokenizer.from_pretrained(folder),
                             callbacks=[Clock(), *callbacks], peft_config=lora)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        trainer.train()
        return times[1:], [h for h in trainer.state.log_history if "loss" in h]


def main() -> None:
    from datasets import Dataset

    from entangle import models
    from entangle.data import read_examples
    from entangle.integrations.trl import EntanglementCallback

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=HH)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=0)
    args = ap.parse_args()
    folder = models.smollm2_folder() if args.model == "smollm2-135m" else args.model
    examples, _ = read_examples(args.data, limit=args.batch * args.steps)
    data = Dataset.from_list([{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples])
    plain, _ = run(folder, data, args, [])
    watched, log = run(folder, data, args, [EntanglementCallback(every=1)])
    a, b = statistics.median(plain), statistics.median(watched)
    print(f"{args.model}, {'LoRA r ' + str(args.lora_r) if args.lora_r else 'full'}, batch {args.batch}, max length "
          f"{args.max_length}, {args.steps - 1} timed steps each: without {a:.2f} s/step, with the callback every step "
          f"{b:.2f} s/step: {b / a:.2f}x")
    last = log[-1]
    print({k: round(v, 4) for k, v in last.items() if k.startswith("entanglement/")})


if __name__ == "__main__":
    main()
