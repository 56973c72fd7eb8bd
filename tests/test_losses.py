"""Every loss against an independent closed form, d_w/d_l against finite differences, invariants."""

import math

import pytest
import torch

from entangle import losses

# Fixed inputs: two pairs. Lengths are token counts.
PC, PR = [-10.0, -12.0], [-11.0, -9.0]
RC, RR = [-10.5, -11.0], [-10.8, -9.5]
LC, LR = [5.0, 8.0], [4.0, 7.0]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def ls(x):  # log sigmoid, plain math
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def dpo_z(i):
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


# Independent per-pair closed forms (TRL's formulas where TRL has the loss), written with `math`.
CLOSED = {
    "dpo": ({"beta": 0.1}, lambda i: -ls(0.1 * dpo_z(i))),
    "ipo": ({"beta": 0.1}, lambda i: ((PC[i] - RC[i]) / LC[i] - (PR[i] - RR[i]) / LR[i] - 1 / 0.2) ** 2),
    "slic": ({"beta": 0.1}, lambda i: max(0.0, 1 - 0.1 * dpo_z(i))),
    "cpo": ({"beta": 0.1, "lam": 1.0}, lambda i: -ls(0.1 * (PC[i] - PR[i])) - PC[i] / LC[i]),
    "simpo": ({"beta": 2.0, "gamma_beta_ratio": 0.5},
              lambda i: -ls(2.0 * (PC[i] / LC[i] - PR[i] / LR[i]) - 2.0 * 0.5)),
    "rdpo": ({"beta": 0.1, "alpha": 0.2}, lambda i: -ls(0.1 * dpo_z(i) + 0.2 * (LC[i] - LR[i]))),
    "dpop": ({"beta": 0.1, "lam": 50.0},
             lambda i: -ls(0.1 * (dpo_z(i) - 50.0 * max(0.0, RC[i] - PC[i])))),
    "rrhf": ({"lam": 1.0}, lambda i: max(0.0, PR[i] / LR[i] - PC[i] / LC[i]) - PC[i] / LC[i]),
    "robust": ({"beta": 0.1, "label_smoothing": 0.1},
               lambda i: (-0.9 * ls(0.1 * dpo_z(i)) + 0.1 * ls(-0.1 * dpo_z(i))) / 0.8),
    "nca": ({"beta": 0.1}, lambda i: -ls(0.1 * (PC[i] - RC[i])) - 0.5 * ls(-0.1 * (PC[i] - RC[i]))
            - 0.5 * ls(-0.1 * (PR[i] - RR[i]))),
    "bco": ({"beta": 0.1}, lambda i: -ls(0.1 * (PC[i] - RC[i])) - ls(-0.1 * (PR[i] - RR[i]))),
    "apo_zero": ({"beta": 0.1}, lambda i: 1 - sig(0.1 * (PC[i] - RC[i])) + sig(0.1 * (PR[i] - RR[i]))),
    "apo_down": ({"beta": 0.1}, lambda i: sig(0.1 * (PC[i] - RC[i])) + 1 - sig(0.1 * dpo_z(i))),
    "exo": ({"beta": 0.1}, lambda i: sig(0.1 * dpo_z(i)) * (ls(0.1 * dpo_z(i)) - math.log(1 - 1e-3))
            + sig(-0.1 * dpo_z(i)) * (ls(-0.1 * dpo_z(i)) - math.log(1e-3))),
    "discopop": ({"beta": 0.1, "discopop_tau": 0.05},
                 lambda i: -ls(0.1 * dpo_z(i)) * (1 - sig(0.1 * dpo_z(i) / 0.05))
                 + math.exp(-0.1 * dpo_z(i)) * sig(0.1 * dpo_z(i) / 0.05)),
    "sppo": ({"beta": 0.1}, lambda i: (PC[i] - RC[i] - 5.0) ** 2 + (PR[i] - RR[i] + 5.0) ** 2),
    "sft": ({}, lambda i: -PC[i] / LC[i]),
}


def orpo_closed(i):
    def odds(m):
        return m - math.log(1 - math.exp(m))
    return -0.1 * ls(odds(PC[i] / LC[i]) - odds(PR[i] / LR[i])) - PC[i] / LC[i]


CLOSED["orpo"] = ({"beta": 0.1}, orpo_closed)

PAIRED = [n for n in losses.names() if n != "kto"]


def call(fn, pc=PC, pr=PR, rc=RC, rr=RR):
    return fn(t(pc), t(pr), t(rc), t(rr), t(LC), t(LR))


def test_every_paired_loss_has_a_closed_form_test():
    assert sorted(CLOSED) == sorted(PAIRED)


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_loss_matches_closed_form(name):
    params, closed = CLOSED[name]
    got = call(losses.get(name, **params))
    assert got.shape == (2,)
    torch.testing.assert_close(got, t([closed(0), closed(1)]), rtol=1e-9, atol=1e-12)


def test_dpo_hand_worked():
    """beta = 0.1, log-ratios +1 and -1: z = 2, loss = -log sigma(0.2) = log(1 + e^-0.2) = 0.598139."""
    fn = losses.get("dpo", beta=0.1)
    got = fn(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]))
    assert abs(got.item() - 0.5981388693815918) < 1e-12


def test_aliases_resolve_to_the_same_loss():
    for alias, name in [("sigmoid", "dpo"), ("hinge", "slic"), ("nca_pair", "nca"), ("bco_pair", "bco"),
                        ("exo_pair", "exo"), ("sppo_hard", "sppo")]:
        assert losses.get(alias).spec is losses.get(name).spec


def test_unknown_name_and_hyperparameter_are_value_errors_naming_valid_ones():
    with pytest.raises(ValueError, match="simpo"):
        losses.get("nope")
    with pytest.raises(ValueError, match="beta, label_smoothing"):
        losses.get("dpo", gamma=1.0)
    with pytest.raises(ValueError, match="number"):
        losses.get("dpo", beta="big")


def test_ipo_unnormalised_flag():
    fn = losses.get("ipo", beta=0.1, length_normalize=False)
    expected = [(dpo_z(i) - 5.0) ** 2 for i in range(2)]
    torch.testing.assert_close(call(fn), t(expected))
    assert not fn.length_normalized and losses.get("ipo").length_normalized


def test_slic_reference_free_with_lambda_is_slic_hf():
    fn = losses.get("slic", beta=1.0, delta=1.0, lam=0.5, reference=False)
    assert not fn.uses_reference
    expected = [max(0.0, 1 - (PC[i] - PR[i])) - 0.5 * PC[i] for i in range(2)]
    torch.testing.assert_close(call(fn), t(expected))


@pytest.mark.parametrize("name", PAIRED)
def test_coefficients_match_finite_differences(name):
    fn = losses.get(name)
    d_w, d_l = losses.coefficients(fn, t(PC), t(PR), t(RC), t(RR), t(LC), t(LR))
    h = 1e-6
    for i in range(2):
        up, dn = list(PC), list(PC)
        up[i] += h
        dn[i] -= h
        fd_w = -(call(fn, pc=up)[i] - call(fn, pc=dn)[i]) / (2 * h)
        up, dn = list(PR), list(PR)
        up[i] += h
        dn[i] -= h
        fd_l = (call(fn, pr=up)[i] - call(fn, pr=dn)[i]) / (2 * h)
        assert abs(d_w[i] - fd_w) < 1e-5 * max(1, abs(fd_w)), (name, i, d_w[i], fd_w)
        assert abs(d_l[i] - fd_l) < 1e-5 * max(1, abs(fd_l)), (name, i, d_l[i], fd_l)


def test_dpo_identity_dw_equals_dl_equals_beta_sigmoid_minus_z():
    fn = losses.get("dpo", beta=0.3)
    d_w, d_l = losses.coefficients(fn, t(PC), t(PR), t(RC), t(RR))
    expected = t([0.3 * sig(-0.3 * dpo_z(i)) for i in range(2)])
    torch.testing.assert_close(d_w, expected)
    torch.testing.assert_close(d_l, expected)


# Invariants over the whole registry, at policy == reference with the chosen less likely than the
# rejected (so hinge-type losses are active).
INV_PC, INV_PR = [-12.0, -20.0], [-8.0, -9.0]


@pytest.mark.parametrize("name", PAIRED)
def test_registry_invariants(name):
    fn = losses.get(name)
    pc, pr = t(INV_PC), t(INV_PR)
    out = fn(pc, pr, pc.clone(), pr.clone(), t(LC), t(LR))
    assert out.shape == (2,) and torch.isfinite(out).all()
    d_w, d_l = losses.coefficients(fn, pc, pr, pc.clone(), pr.clone(), t(LC), t(LR))
    if name == "discopop":
        # DiscoPOP's blend is non-convex: for tau = 0.05 its slope at z = 0 is reversed,
        # dl/dz = -0.25 - ln2 * 0.25/tau + (-0.5 + 0.25/tau) = +0.78 (so d_w = d_l = -0.078 at beta 0.1).
        torch.testing.assert_close(d_w, torch.full_like(d_w, -0.1 * (-0.25 - math.log(2) * 5 + 4.5)))
        return
    if name == "sft":  # the warm-up: the chosen's mean token NLL, d_w = 1/|y_w|, the rejected ignored
        torch.testing.assert_close(d_w, 1 / t(LC))
        assert (d_l == 0).all()
        return
    assert (d_l > 0).all(), "every loss pushes the rejected log-prob down"
    if name != "apo_down":  # APO-down lowers the chosen by design (arXiv:2408.06266 §3)
        assert (d_w > 0).all(), "the loss pushes the chosen log-prob up"
    if not fn.uses_reference:
        other = fn(pc, pr, pc - 3.0, pr + 7.0, t(LC), t(LR))
        torch.testing.assert_close(out, other, msg="reference-free losses ignore the reference")
    assert isinstance(fn.spec.citation, str) and "arXiv" in fn.spec.citation


def test_reference_losses_require_a_reference():
    with pytest.raises(ValueError, match="reference"):
        losses.get("dpo")(t(PC), t(PR))


def test_bco_running_baseline_is_mean_of_all_rewards_seen():
    fn = losses.get("bco", beta=1.0)
    fn.observe(t([1.0]), t([0.0]), t([0.0]), t([0.0]))   # rewards 1, 0
    fn.observe(t([2.0]), t([3.0]), t([0.0]), t([0.0]))   # rewards 2, 3
    assert fn.state == {"delta": 0.0, "count": 0}        # fixed within a step
    fn.commit()
    assert fn.state["delta"] == pytest.approx(1.5) and fn.state["count"] == 4
    got = fn(t([0.5]), t([0.2]), t([0.0]), t([0.0]))
    assert got.item() == pytest.approx(-ls(0.5 - 1.5) - ls(-(0.2 - 1.5)))


def test_bco_commit_sums_across_processes_and_drops_a_skipped_step():
    fn = losses.get("bco", beta=1.0)
    fn.observe(t([1.0]), t([3.0]), t([0.0]), t([0.0]))   # this process: rewards 1, 3
    fn.commit(lambda sums: sums * 2)                     # another process saw the same sums
    assert fn.state == {"delta": pytest.approx(2.0), "count": 4}
    fn.observe(t([float("nan")]), t([0.0]), t([0.0]), t([0.0]))
    fn.commit()
    assert fn.state == {"delta": pytest.approx(2.0), "count": 4} and fn.pending is None
    fn.commit(lambda sums: sums + torch.tensor([8.0, 2.0]))   # no batch here; others had rewards summing to 8
    assert fn.state == {"delta": pytest.approx(16 / 6), "count": 6}


def test_kto_closed_form_and_coefficients():
    """beta=0.1; rewards r = [1, -2]; KL rows give mean log-ratio 0.5 -> z0 = 0.5.
    desirable: 1 - sigma(0.1 * 0.5); undesirable: 1 - sigma(0.1 * (0.5 + 2))."""
    fn = losses.get("kto", beta=0.1)
    policy, ref = t([-4.0, -7.0]), t([-5.0, -5.0])
    kl_p, kl_r = t([-3.0, -6.0]), t([-3.5, -6.5])
    z0 = fn.reference_point((kl_p - kl_r).sum(), 2)
    assert float(z0) == 0.5 and float(fn.reference_point(t([-3.0]).sum(), 2)) == 0.0   # clamped at 0
    got = fn(policy, ref, [True, False], z0)
    torch.testing.assert_close(got, t([1 - sig(0.05), 1 - sig(0.25)]))
    weighted = losses.get("kto", beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)(policy, ref, [True, False], z0)
    torch.testing.assert_close(weighted, t([2 * (1 - sig(0.05)), 0.5 * (1 - sig(0.25))]))
    d = losses.unpaired_coefficients(fn, policy, ref, [True, False], z0)
    assert d[0] > 0 and d[1] < 0  # desirable pushed up, undesirable down
    torch.testing.assert_close(d, t([0.1 * sig(0.05) * (1 - sig(0.05)), -0.1 * sig(0.25) * (1 - sig(0.25))]))


def test_names_lists_the_registry():
    expected = {"dpo", "ipo", "slic", "cpo", "simpo", "rdpo", "dpop", "rrhf", "orpo", "robust", "nca", "bco",
                "apo_zero", "apo_down", "exo", "discopop", "sppo", "sft", "kto"}
    assert set(losses.names()) == expected


def test_adding_a_loss_is_one_register_call():
    spec = losses.LossSpec("test_square", uses_reference=False, length_normalized=False, citation="arXiv:0000",
                           defaults={"beta": 1.0}, loss=lambda p, beta: (beta * p.z) ** 2)
    losses.register(spec)
    try:
        fn = losses.get("test_square", beta=2.0)
        assert fn(t([1.0]), t([0.0])).item() == pytest.approx(4.0)
        with pytest.raises(ValueError, match="already registered"):
            losses.register(spec)
    finally:
        losses._REGISTRY.pop("test_square")
