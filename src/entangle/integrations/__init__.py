"""entangle inside other trainers: `entangle.integrations.trl` (TRL's DPOTrainer callbacks; needs `pip install
entangle[trl]`)."""
