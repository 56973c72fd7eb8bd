"""TRL's DPOTrainer on the tiny model, with entangle's entanglement diagnostics and a soft trust-region reference.

    python examples/trl_dpo_with_entanglement.py && entangle report runs/trl-example --out runs/trl-example/report
"""
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from entangle import models, synthetic
from entangle.integrations.trl import EntanglementCallback, TrustRegionCallback

models.save_tiny("runs/tiny-base", models.byte_tokenizer())               # any causal LM folder or hub id
model, tokenizer = AutoModelForCausalLM.from_pretrained("runs/tiny-base"), models.byte_tokenizer()
pairs = [vars(e) for e in synthetic.from_source("synthetic:sentiment?config=long&n=64")]
dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
args = DPOConfig(output_dir="runs/trl-example", per_device_train_batch_size=8, max_steps=20, learning_rate=1e-3,
                 logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no")
trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                     callbacks=[EntanglementCallback(every=1), TrustRegionCallback(alpha=0.6, tau=1)])
trainer.train()
print({k: round(v, 4) for k, v in trainer.state.log_history[-2].items() if k.startswith(("entanglement/", "ref/"))})
