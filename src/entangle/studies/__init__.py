"""The papers' experiments, each a small module that drives the training loop and writes a report."""
