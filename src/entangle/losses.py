"""The margin-based loss family as data: one `LossSpec` per loss, one registry, one call path.

    fn = losses.get("dpo", beta=0.1)
    per_pair = fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths, rejected_lengths)                  # each [n_pairs] -> [n_pairs]
    d_w, d_l = losses.coefficients(fn, ...same arguments...)        # -dl/dlogp_w, +dl/dlogp_l

Log-probs are *summed* response log-probs. Every loss is written against `Pair`, whose
`ratio_w`/`ratio_l` are `log pi - log pi_ref` (or `log pi` for reference-free losses), optionally
divided by the response length. Adding a loss is one `register(LossSpec(...))` call below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from entangle.errors import ConfigError

logsig = F.logsigmoid


@dataclass
class Pair:
    """The inputs of a paired loss, shapes [n_pairs]; refs are None for reference-free losses."""

    pc: Tensor
    pr: Tensor
    rc: Tensor | None
    rr: Tensor | None
    lc: Tensor | None
    lr: Tensor | None
    normalize: bool = False

    def _ratio(self, logp: Tensor, ref: Tensor | None, length: Tensor | None) -> Tensor:
        r = logp if ref is None else logp - ref
        return r / length if self.normalize else r

    @property
    def ratio_w(self) -> Tensor:  # log pi_w - log pi_ref,w  (/|y_w| when length-normalised)
        return self._ratio(self.pc, self.rc, self.lc)

    @property
    def ratio_l(self) -> Tensor:
        return self._ratio(self.pr, self.rr, self.lr)

    @property
    def z(self) -> Tensor:  # the DPO logit: (log pi_w/pi_ref,w) - (log pi_l/pi_ref,l)
        return self.ratio_w - self.ratio_l

    def nll_w(self) -> Tensor:  # mean token NLL of the chosen response
        return -self.pc / self.lc


Flag = bool | Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True)
class LossSpec:
    """One loss: `loss(pair, **params) -> [n_pairs]`, its published defaults and properties."""

    name: str
    loss: Callable[..., Tensor]
    defaults: Mapping[str, Any]
    uses_reference: Flag
    length_normalized: Flag
    citation: str
    aliases: tuple[str, ...] = ()
    needs_lengths: bool = False
    # Running state (BCO's reward baseline). `batch_stats(pair, params) -> Tensor [k]` are sums over a batch
    # (no host sync); once per optimisation step the sums of every micro-batch on every process are added up
    # and `merge_state(state, sums: list[float]) -> state` folds them in. The loss reads the state as of the
    # step's start, so one process with batch 2B and two processes with B each train the same numbers.
    batch_stats: Callable[[Pair, Mapping[str, Any]], Tensor] | None = None
    merge_state: Callable[[dict, list], dict] | None = None
    initial_state: Mapping[str, float] = field(default_factory=dict)
    ranges: Mapping[str, Range] = field(default_factory=dict)   # beyond `RANGES`, or replacing an entry

    def range(self, key: str) -> Range | None:
        return self.ranges.get(key, RANGES.get(key))


@dataclass(frozen=True)
class Range:
    """The valid values of a hyper-parameter: `low`..`high`, each end open or closed."""

    low: float
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False

    def __contains__(self, x: float) -> bool:
        return (self.low <= x if self.low_closed else self.low < x) and (x <= self.high if self.high_closed
                                                                         else x < self.high)

    def __str__(self) -> str:
        if self.high == math.inf and self.low_closed and self.low != 0:
            return f"at least {self.low:.12g}"
        return f"in {'[' if self.low_closed else '('}{self.low:.12g}, {self.high:.12g}{']' if self.high_closed else ')'}"


# Valid ranges by hyper-parameter name (a spec's own `ranges` override these). beta <= 0 would learn nothing
# or prefer the rejected responses; label_smoothing >= 0.5 flips the labels (robust DPO divides by 1 - 2 eps).
RANGES = {
    "beta": Range(0.0), "label_smoothing": Range(0.0, 0.5, low_closed=True),
    "delta": Range(-math.inf),   # SLiC's hinge margin: any real number (<= 0: pairs past a zero margin stop learning)
    "lam": Range(0.0, low_closed=True), "gamma_beta_ratio": Range(0.0, low_closed=True),
    "alpha": Range(0.0, low_closed=True), "discopop_tau": Range(0.0), "desirable_weight": Range(0.0),
    "undesirable_weight": Range(0.0),
}

_REGISTRY: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add a spec to the registry, validating it first."""
    for n in (spec.name, *spec.aliases):
        if n in _REGISTRY or n in _ALIASES:
            raise ValueError(f"loss name {n!r} is already registered")
    if not callable(spec.loss):
        raise ValueError(f"loss {spec.name!r}: `loss` must be callable")
    for key, default in spec.defaults.items():
        if isinstance(default, bool):
            continue
        r = spec.range(key)
        if r is None or default not in r:
            raise ValueError(f"loss {spec.name!r}: hyper-parameter {key} needs a valid range that holds its "
                             f"default {default} (losses.RANGES or the spec's ranges)")
    _REGISTRY[spec.name] = spec
    for a in spec.aliases:
        _ALIASES[a] = spec.name
    return spec


def _flag(flag: Flag, params: Mapping[str, Any]) -> bool:
    return bool(flag(params)) if callable(flag) else bool(flag)


class Loss:
    """A spec bound to hyper-parameters; call it on summed log-probs to get per-pair losses."""

    def __init__(self, spec: LossSpec, params: Mapping[str, Any]):
        self.spec = spec
        self.params = dict(params)
        self.state: dict[str, float] = dict(spec.initial_state)
        self.pending: Tensor | None = None      # this step's batch_stats, summed over its micro-batches

    name = property(lambda self: self.spec.name)
    uses_reference = property(lambda self: _flag(self.spec.uses_reference, self.params))
    length_normalized = property(lambda self: _flag(self.spec.length_normalized, self.params))
    needs_lengths = property(lambda self: self.spec.needs_lengths or self.length_normalized)
    paired = True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"losses.get({self.name!r}, {args})"

    def pair(self, pc, pr, rc=None, rr=None, lc=None, lr=None) -> Pair:
        if self.uses_reference and (rc is None or rr is None):
            raise ValueError(f"loss {self.name!r} uses a reference: pass ref_chosen_logps and ref_rejected_logps")
        if not self.uses_reference:
            rc = rr = None
        if self.needs_lengths and (lc is None or lr is None):
            raise ValueError(f"loss {self.name!r} needs chosen_lengths and rejected_lengths")
        to = (lambda t: None if t is None else torch.as_tensor(t, dtype=pc.dtype, device=pc.device))
        return Pair(pc, pr, to(rc), to(rr), to(lc), to(lr), normalize=self.length_normalized)

    def __call__(self, pc, pr, rc=None, rr=None, lc=None, lr=None) -> Tensor:
        """Per-pair loss, shape [n_pairs]."""
        return self.spec.loss(self.pair(pc, pr, rc, rr, lc, lr), **self.params, **self.state)

    def observe(self, pc, pr, rc=None, rr=None, lc=None, lr=None) -> None:
        """Add a training batch to this step's running statistics (BCO's rewards); a no-op for most losses.
        The state changes only at `commit`."""
        if self.spec.batch_stats is not None:
            with torch.no_grad():
                stats = self.spec.batch_stats(self.pair(pc, pr, rc, rr, lc, lr), self.params).detach().float()
            self.pending = stats if self.pending is None else self.pending + stats

    def commit(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """End of an optimisation step: fold this step's statistics into the state. `reduce` sums them across
        processes (every process must call it, with or without statistics of its own); a non-finite sum (a
        skipped step) is dropped."""
        if self.spec.batch_stats is None:
            return
        pending, self.pending = self.pending, None
        if pending is None:
            pending = torch.zeros(len(self.spec.initial_state))
        total = reduce(pending) if reduce is not None else pending
        if bool(torch.isfinite(total).all()):
            self.state = self.spec.merge_state(self.state, total.tolist())

    def rewards(self, pc, pr, rc=None, rr=None, lc=None, lr=None) -> tuple[Tensor, Tensor]:
        """Implicit rewards as TRL logs them: beta * (log pi - log pi_ref) (normalised where the loss is)."""
        p = self.pair(pc, pr, rc, rr, lc, lr)
        beta = float(self.params.get("beta", 1.0))
        return beta * p.ratio_w.detach(), beta * p.ratio_l.detach()


def names() -> list[str]:
    """Registered loss names (aliases excluded), sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> LossSpec:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        valid = ", ".join(names() + sorted(_ALIASES))
        raise ConfigError(f"unknown loss {name!r}; valid names: {valid}")
    return _REGISTRY[key]


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"loss {name!r}: {key} must be true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"loss {name!r}: {key} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"loss {name!r}: {key} must be finite, got {value!r}")
    return float(value)


def get(name: str, **params: Any) -> Loss:
    """The loss `name` with hyper-parameters overriding the published defaults.

    Unknown names or hyper-parameters raise ValueError (ConfigError) naming the valid ones."""
    s = spec(name)
    unknown = sorted(set(params) - set(s.defaults))
    if unknown:
        valid = ", ".join(sorted(s.defaults)) or "none"
        raise ConfigError(f"loss {s.name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; valid: {valid}")
    bound = {k: _coerce(s.name, k, params.get(k, d), d) for k, d in s.defaults.items()}
    for k, v in bound.items():
        r = s.range(k)
        if r is not None and v not in r:
            raise ConfigError(f"loss {s.name!r}: {k} must be {r} (got {v:g}); the default is {s.defaults[k]:g}")
    if s.name == "kto":
        return UnpairedLoss(s, bound)
    return Loss(s, bound)


def coefficients(fn: Loss, pc, pr, rc=None, rr=None, lc=None, lr=None) -> tuple[Tensor, Tensor]:
    """`d_w = -dl/dlog pi_w` and `d_l = +dl/dlog pi_l` per pair, by autograd of the loss itself.

    Each pair's loss depends only on its own log-probs (running state is held fixed), so one
    backward of the summed loss gives every pair's coefficients. Shapes [n_pairs]."""
    pc = pc.detach().clone().requires_grad_(True)
    pr = pr.detach().clone().requires_grad_(True)
    rc = None if rc is None else rc.detach()
    rr = None if rr is None else rr.detach()
    with torch.enable_grad():
        total = fn(pc, pr, rc, rr, lc, lr).sum()
        gw, gl = torch.autograd.grad(total, [pc, pr], allow_unused=True)
    gw = torch.zeros_like(pc) if gw is None else gw
    gl = torch.zeros_like(pr) if gl is None else gl
    return -gw.detach(), gl.detach()


# --------------------------------------------------------------------------------------------
# The family. Each `loss` returns the per-pair loss; equations are from the cited papers and
# follow TRL's DPOTrainer where TRL has the loss, so configs and numbers carry over.
# --------------------------------------------------------------------------------------------

register(LossSpec(  # DPO, Rafailov et al. eq. 7; label_smoothing is conservative DPO (cDPO)
    "dpo", aliases=("sigmoid",), uses_reference=True, length_normalized=False,
    citation="arXiv:2305.18290 eq. 7",
    defaults={"beta": 0.1, "label_smoothing": 0.0},
    loss=lambda p, beta, label_smoothing: -(1 - label_smoothing) * logsig(beta * p.z)
    - label_smoothing * logsig(-beta * p.z),
))

register(LossSpec(  # IPO, Azar et al. eq. 17; TRL divides log-probs by length (length_normalize)
    "ipo", uses_reference=True, length_normalized=lambda hp: hp["length_normalize"], needs_lengths=False,
    citation="arXiv:2310.12036 eq. 17",
    defaults={"beta": 0.1, "length_normalize": True},
    loss=lambda p, beta, length_normalize: (p.z - 1 / (2 * beta)) ** 2,
))

register(LossSpec(  # SLiC-HF hinge, Zhao et al. eq. 3 (+ lam * log pi_w); TRL's `hinge` with reference
    "slic", aliases=("hinge",), uses_reference=lambda hp: hp["reference"], length_normalized=False,
    citation="arXiv:2305.10425 eq. 3",
    defaults={"beta": 0.1, "delta": 1.0, "lam": 0.0, "reference": True},
    loss=lambda p, beta, delta, lam, reference: F.relu(delta - beta * p.z) - lam * p.pc,
))

register(LossSpec(  # CPO, Xu et al. eq. 6: reference-free sigmoid + NLL on the chosen
    "cpo", uses_reference=False, length_normalized=False, needs_lengths=True,
    citation="arXiv:2401.08417 eq. 6",
    defaults={"beta": 0.1, "lam": 1.0},
    loss=lambda p, beta, lam: -logsig(beta * p.z) + lam * p.nll_w(),
))

register(LossSpec(  # SimPO, Meng et al. eq. 6: length-normalised, reference-free, margin gamma
    "simpo", uses_reference=False, length_normalized=True,
    citation="arXiv:2405.14734 eq. 6",
    defaults={"beta": 2.0, "gamma_beta_ratio": 0.5},
    loss=lambda p, beta, gamma_beta_ratio: -logsig(beta * (p.z - gamma_beta_ratio)),
))

register(LossSpec(  # R-DPO, Park et al. eq. 9: DPO with an explicit length term
    "rdpo", uses_reference=True, length_normalized=False, needs_lengths=True,
    citation="arXiv:2403.19159 eq. 9",
    defaults={"beta": 0.1, "alpha": 0.2},
    loss=lambda p, beta, alpha: -logsig(beta * p.z + alpha * (p.lc - p.lr)),
))

register(LossSpec(  # DPO-Positive (Smaug), Pal et al. eq. 3: penalise the chosen below its reference
    "dpop", uses_reference=True, length_normalized=False,
    citation="arXiv:2402.13228 eq. 3",
    defaults={"beta": 0.1, "lam": 50.0},
    loss=lambda p, beta, lam: -logsig(beta * (p.z - lam * F.relu(-p.ratio_w))),
))

register(LossSpec(  # RRHF, Yuan et al. eq. 2-4: ranking hinge on mean log-probs + SFT on the chosen
    "rrhf", uses_reference=False, length_normalized=True,
    citation="arXiv:2304.05302 eq. 2-4",
    defaults={"lam": 1.0},
    loss=lambda p, lam: F.relu(-p.z) + lam * p.nll_w(),
))


def _log_odds(mean_logp: Tensor) -> Tensor:  # log(p / (1 - p)) for p = exp(mean_logp) < 1
    return mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-7))


register(LossSpec(  # ORPO, Hong et al. eq. 6-7 (beta is the paper's lambda, as in TRL)
    "orpo", uses_reference=False, length_normalized=True,
    citation="arXiv:2403.07691 eq. 6-7",
    defaults={"beta": 0.1},
    loss=lambda p, beta: -beta * logsig(_log_odds(p.ratio_w) - _log_odds(p.ratio_l)) + p.nll_w(),
))

register(LossSpec(  # Robust DPO, Chowdhury et al. eq. 7: unbiased under label-flip rate eps
    "robust", uses_reference=True, length_normalized=False,
    citation="arXiv:2403.00409 eq. 7",
    defaults={"beta": 0.1, "label_smoothing": 0.1},
    loss=lambda p, beta, label_smoothing: (-(1 - label_smoothing) * logsig(beta * p.z)
                                           + label_smoothing * logsig(-beta * p.z)) / (1 - 2 * label_smoothing),
))

register(LossSpec(  # NCA, Chen et al. eq. 11 (pairwise form, TRL's nca_pair)
    "nca", aliases=("nca_pair",), uses_reference=True, length_normalized=False,
    citation="arXiv:2402.05369 eq. 11",
    defaults={"beta": 0.1},
    loss=lambda p, beta: -logsig(beta * p.ratio_w) - 0.5 * logsig(-beta * p.ratio_w)
    - 0.5 * logsig(-beta * p.ratio_l),
))


def _bco_stats(p: Pair, params: Mapping[str, Any]) -> Tensor:
    """[sum of the batch's rewards (chosen and rejected), their count]."""
    r = params["beta"] * torch.cat([p.ratio_w, p.ratio_l]).float()
    return torch.stack([r.sum(), torch.tensor(float(r.numel()), device=r.device)])


def _bco_merge(state: dict, sums: list) -> dict:
    # Running mean of all rewards of the steps before this one (TRL's RunningMoments includes the current
    # micro-batch; here the baseline is fixed within a step, exact under accumulation and DDP).
    total, n_new = sums
    n_old = state["count"]
    if n_new == 0:
        return state
    return {"delta": (state["delta"] * n_old + total) / (n_old + n_new), "count": n_old + int(n_new)}


register(LossSpec(  # BCO, Jung et al. eq. 9 (pairwise form), reward baseline delta = running mean
    "bco", aliases=("bco_pair",), uses_reference=True, length_normalized=False,
    citation="arXiv:2404.04656 eq. 9",
    defaults={"beta": 0.1},
    batch_stats=_bco_stats, merge_state=_bco_merge, initial_state={"delta": 0.0, "count": 0},
    loss=lambda p, beta, delta, count: -logsig(beta * p.ratio_w - delta) - logsig(-(beta * p.ratio_l - delta)),
))

register(LossSpec(  # APO-zero, D'Oosterlinck et al. eq. 5: push the chosen up, the rejected down
    "apo_zero", uses_reference=True, length_normalized=False,
    citation="arXiv:2408.06266 eq. 5",
    defaults={"beta": 0.1},
    loss=lambda p, beta: (1 - torch.sigmoid(beta * p.ratio_w)) + torch.sigmoid(beta * p.ratio_l),
))

register(LossSpec(  # APO-down, D'Oosterlinck et al. eq. 6: push both down, the rejected more
    "apo_down", uses_reference=True, length_normalized=False,
    citation="arXiv:2408.06266 eq. 6",
    defaults={"beta": 0.1},
    loss=lambda p, beta: torch.sigmoid(beta * p.ratio_w) + (1 - torch.sigmoid(beta * p.z)),
))


def _exo(p: Pair, beta: float, label_smoothing: float) -> Tensor:
    eps = label_smoothing if label_smoothing > 0 else 1e-3  # TRL: eps 1e-3 when label_smoothing is 0
    x = beta * p.z
    return torch.sigmoid(x) * (logsig(x) - math.log(1 - eps)) + torch.sigmoid(-x) * (logsig(-x) - math.log(eps))


register(LossSpec(  # EXO, Ji et al. eq. 10 (pairwise form, TRL's exo_pair)
    "exo", aliases=("exo_pair",), uses_reference=True, length_normalized=False,
    citation="arXiv:2402.00856 eq. 10",
    defaults={"beta": 0.1, "label_smoothing": 0.0},
    loss=_exo,
))


def _discopop(p: Pair, beta: float, discopop_tau: float) -> Tensor:
    x = beta * p.z
    mod = torch.sigmoid(x / discopop_tau)  # blends the logistic and exponential losses
    return -logsig(x) * (1 - mod) + torch.exp(-x) * mod


register(LossSpec(  # DiscoPOP (log-ratio modulated loss), Chris Lu et al. eq. 5
    "discopop", uses_reference=True, length_normalized=False,
    citation="arXiv:2406.08414 eq. 5",
    defaults={"beta": 0.1, "discopop_tau": 0.05},
    loss=_discopop,
))

register(LossSpec(  # SPPO (hard labels), Wu et al. eq. 3.5; not a margin loss
    "sppo", aliases=("sppo_hard",), uses_reference=True, length_normalized=False,
    citation="arXiv:2405.00675 eq. 3.5",
    defaults={"beta": 0.1},
    loss=lambda p, beta: (p.ratio_w - 0.5 / beta) ** 2 + (p.ratio_l + 0.5 / beta) ** 2,
))


# --------------------------------------------------------------------------------------------
# KTO: unpaired. Same conventions; labels True = desirable.
# --------------------------------------------------------------------------------------------


class UnpairedLoss(Loss):
    """KTO (Ethayarajh et al., arXiv:2402.01306 eq. 8; TRL's KTOTrainer): one completion per row with a label.

        fn = losses.get("kto", beta=0.1)
        z0 = fn.reference_point(kl_log_ratio_sum, n_kl_rows)      # detached, clamped at 0
        per_row = fn(policy_logps, reference_logps, labels, z0)    # [n]
    The reference point z0 estimates KL(pi || pi_ref) from mismatched (x, y') rows: the mean of
    log pi(y'|x) - log pi_ref(y'|x) over them (the step's whole batch in training), clamped at 0."""

    paired = False

    def __call__(self, policy_logps, reference_logps, labels, z0=0.0) -> Tensor:
        return kto_loss(policy_logps, reference_logps, labels, z0, **self.params)

    @staticmethod
    def reference_point(kl_log_ratio_sum, n_kl_rows) -> Tensor:
        mean = torch.as_tensor(kl_log_ratio_sum, dtype=torch.float32) / max(float(n_kl_rows), 1.0)
        return mean.clamp(min=0).detach()

    def rewards(self, policy_logps, reference_logps) -> Tensor:
        """Implicit rewards as TRL logs them: beta * (log pi - log pi_ref) per row."""
        return self.params["beta"] * (policy_logps - reference_logps).detach()


def kto_loss(policy_logps, reference_logps, labels, z0, beta, desirable_weight, undesirable_weight) -> Tensor:
    """lambda_D (1 - sigma(beta (r - z0))) for a desirable row, lambda_U (1 - sigma(beta (z0 - r))) for an
    undesirable one, with r = log pi - log pi_ref; shapes [n]."""
    r = policy_logps - reference_logps
    labels = torch.as_tensor(labels, dtype=torch.bool, device=r.device)
    z0 = torch.as_tensor(z0, dtype=r.dtype, device=r.device)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(labels, desirable, undesirable)


register(LossSpec(  # SFT on the chosen response (mean token NLL): the warm-up before preference training.
    # In the family's form m = 0 and Lambda = log pi_w / |y_w|, so d_l = 0: the rejected is ignored.
    "sft", uses_reference=False, length_normalized=False, needs_lengths=True,
    citation="arXiv:2203.02155 sec. 3.5 (supervised fine-tuning stage)",
    defaults={},
    loss=lambda p: p.nll_w(),
))


register(LossSpec(
    "kto", uses_reference=True, length_normalized=False,
    citation="arXiv:2402.01306 eq. 8",
    defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    loss=kto_loss,
))


def unpaired_coefficients(fn: UnpairedLoss, policy_logps, reference_logps, labels, z0=0.0) -> Tensor:
    """`d = -dl/dlog pi` per row for KTO (z0 held fixed, as it is detached in the loss)."""
    x = policy_logps.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(x, reference_logps.detach(), labels, z0).sum(), [x])
    return -g
