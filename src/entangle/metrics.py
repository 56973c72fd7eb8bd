"""Step metrics that stay on the device until one reduction per step, each with a declared reduction.

    m = Metrics()
    m.add("loss", per_pair.sum())                 # "mean": summed over pairs, divided by the global pair count
    m.add("n_pairs", torch.tensor(4.0), "sum")    # counts add up over micro-batches and processes
    m.add("grad_norm", norm, "last")              # this process's value (the same on every process)
    m.add("rewards/chosen", s, per="count/chosen")  # a mean over another count (absent while it is 0)
    means = m.reduce(accelerator)                 # {name: float}: one collective, one host sync

`process_mean` averages a per-process quantity over processes (the batch-mean gradient statistics).
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "last", "process_mean")


class Metrics:
    """Named metric tensors with their reductions (`REDUCTIONS`); adding the same name accumulates."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self.how: dict[str, str] = {}
        self.per: dict[str, str] = {}

    def add(self, name: str, value, how: str = "mean", per: str = "n_pairs") -> None:
        """`per`: the "sum" metric a "mean" divides by (the global pair, or example, count by default)."""
        if per != "n_pairs":
            self.per[name] = per
        if how not in REDUCTIONS:
            raise ValueError(f"metric {name!r}: reduction {how!r} is not one of {REDUCTIONS}")
        if self.how.setdefault(name, how) != how:
            raise ValueError(f"metric {name!r} is declared {self.how[name]!r} and {how!r}")
        v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if name in self.values and how != "last":
            v = self.values[name] + v.to(self.values[name].device)
        self.values[name] = v

    def update(self, other: "Metrics") -> None:
        for name, v in other.values.items():
            self.add(name, v, other.how[name], other.per.get(name, "n_pairs"))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def zeros_like(self) -> "Metrics":
        """The same names and reductions with zero values (a process without data still joins the reduction)."""
        out = Metrics()
        for name, v in self.values.items():
            out.add(name, torch.zeros_like(v), self.how[name], self.per.get(name, "n_pairs"))
        return out

    def reduce(self, accelerator) -> dict[str, float]:
        """One sum over processes for everything but `last`; means divide by the global `n_pairs` (or their
        `per` count; a mean over a count that is 0 is left out)."""
        keys = sorted(k for k, h in self.how.items() if h != "last")
        out: dict[str, float] = {}
        if keys:
            vec = torch.stack([self.values[k].to(accelerator.device) for k in keys])
            total = dict(zip(keys, accelerator.reduce(vec, reduction="sum").tolist()))
            for k in keys:
                how, count = self.how[k], total.get(self.per.get(k, "n_pairs"), 1.0)
                if how == "mean" and k in self.per and count == 0:
                    continue
                out[k] = total[k] / max(count, 1.0) if how == "mean" else \
                    total[k] / accelerator.num_processes if how == "process_mean" else total[k]
        for k, h in self.how.items():
            if h == "last":
                out[k] = float(self.values[k])
        return out
