"""The hook protocol, the metric reductions and the assembly (`build` / `fit`)."""

import json

import pytest
import torch

from entangle import config
from entangle.assembly import build
from entangle.hooks import StepHook
from entangle.loop import fit, train
from entangle.metrics import Metrics


class _OneProcess:
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def reduce(t, reduction="sum"):
        return t


class _TwoProcesses(_OneProcess):
    """Stands in for an Accelerator of 2 processes whose other process holds the same sums."""

    num_processes = 2

    @staticmethod
    def reduce(t, reduction="sum"):
        return 2 * t


def test_metric_reductions_by_hand():
    """Two micro-batches: losses 1+2 over 2 pairs and 3 over 1 pair -> mean (1+2+3)/3 = 2; n_pairs sums to 3;
    grad_norm keeps the last value; a process mean of 5 stays 5 whatever the number of processes."""
    m = Metrics()
    m.add("loss", torch.tensor(3.0))
    m.add("n_pairs", 2.0, "sum")
    m.add("grad_norm", 7.0, "last")
    m.add("entanglement/batch_cos", 5.0, "process_mean")
    more = Metrics()
    more.add("loss", torch.tensor(3.0))
    more.add("n_pairs", 1.0, "sum")
    more.add("grad_norm", 0.5, "last")
    m.update(more)
    assert m.reduce(_OneProcess) == {"loss": 2.0, "n_pairs": 3.0, "grad_norm": 0.5, "entanglement/batch_cos": 5.0}
    # two identical processes: sums double, means and the process mean do not
    assert m.reduce(_TwoProcesses) == {"loss": 2.0, "n_pairs": 6.0, "grad_norm": 0.5, "entanglement/batch_cos": 5.0}
    with pytest.raises(ValueError):
        m.add("loss", 1.0, "sum")   # one name, one reduction


def cfg(out, *extra):
    return config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=16",
                              "data.max_length=64", "optimizer.lr=1e-3", "train.batch_size=2", "train.grad_accum=2",
                              "train.max_steps=4", "tracking.progress=false", "train.eval_at_start=false",
                              f"train.output_dir={out}", *extra])


class ChosenLogps(StepHook):
    """The hook of the README: every other step, the summed chosen log-probs it saw, and a row per pair."""

    def __init__(self):
        self.calls, self.seen = [], []

    def due(self, step):
        return step % 2 == 0

    def on_step_start(self, step, lr):
        self.calls.append(("start", step))

    def after_backward(self, batch, logps, loss_fn):
        assert logps.policy_chosen_logps.shape == (2,) and logps.reference_chosen_logps.shape == (2,)
        self.seen.append(logps.policy_chosen_logps.detach())

    def finish(self, policy, micro_batches, stepped):
        self.calls.append(("stepped" if stepped else "skipped", len(micro_batches)))
        m = Metrics()
        m.add("my/chosen", torch.cat(self.seen).sum())
        rows = [{"pair": i, "logp": float(x)} for i, x in enumerate(torch.cat(self.seen))]
        self.seen = []
        return m, rows


def test_a_new_diagnostic_is_one_hook_class(tmp_path):
    hook = ChosenLogps()
    result = fit(build(cfg(tmp_path / "run"), hooks=[hook]))
    assert hook.calls == [("start", 2), ("stepped", 2), ("start", 4), ("stepped", 2)]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("my/chosen" in r) for r in rows] == [False, True, False, True]
    # a per-pair mean: the same as logps/chosen, which the step computes from the same forward
    for r in rows[1::2]:
        assert r["my/chosen"] == pytest.approx(r["logps/chosen"], rel=1e-5)
    pair_rows = [json.loads(x) for x in (tmp_path / "run" / "entanglement.jsonl").read_text().splitlines()]
    assert [r["step"] for r in pair_rows] == [2] * 4 + [4] * 4
    assert result.status == "finished"


def test_build_assembles_once_and_fit_equals_train(tmp_path):
    run = build(cfg(tmp_path / "a"))
    assert run.total_steps == 4 and run.global_batch == 4 and run.reference.kind == "frozen"
    assert run.initial is run.reference     # a static reference is the initial policy
    fit(run)
    train(cfg(tmp_path / "b"))
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_stateful_loss_learns_from_training_batches_only(tmp_path):
    """BCO's running reward baseline: evaluating held-out pairs every step must not change training."""
    common = ["loss.name=bco", "data.eval=synthetic:sentiment?config=short&n=8&split=test"]
    plain = train(cfg(tmp_path / "plain", *common))
    evaluated = train(cfg(tmp_path / "eval", *common, "train.eval_every=1"))
    keys = ("loss", "rewards/margins", "grad_norm")
    rows = [[json.loads(x) for x in open(r.run_dir + "/metrics.jsonl")]
            for r in (plain, evaluated)]
    assert len(rows[0]) == len(rows[1]) == 4
    for x, y in zip(*rows):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}
    assert "eval/loss" in rows[1][0] and "eval/loss" not in rows[0][0]


def test_auto_precision_is_mixed_on_cuda_and_float32_on_cpu():
    """Pure bf16 loses small updates (no float32 master copy): `auto` trains float32 weights under bf16 autocast
    on CUDA; an explicit dtype is taken as asked."""
    from entangle.assembly import precision

    assert precision("auto", cuda=True) == ("float32", "bf16")
    assert precision("auto", cuda=False) == ("float32", "no")
    assert precision("bfloat16", cuda=True) == ("bfloat16", "no")


def test_in_memory_data_trains_and_an_object_in_the_config_is_refused(tmp_path):
    import datasets

    from entangle.errors import ConfigError

    rows = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(8)]
    run = build(cfg(tmp_path / "run", "train.max_steps=2"), train_data=datasets.Dataset.from_list(rows),
                eval_data=rows[:2])
    assert len(run.train_pairs) == 8 and len(run.eval_pairs) == 2
    fit(run)
    bad = cfg(tmp_path / "x")
    bad.data.train = datasets.Dataset.from_list(rows)        # OmegaConf keeps str() of the object
    with pytest.raises(ConfigError, match="holds the text of a Python object"):
        build(bad)


def test_step_hooks_and_loop_callbacks_are_two_protocols_of_few_call_points(tmp_path):
    """A loop callback is called after every step and at evaluations, never inside a step; a step hook only inside
    the steps it is due for; an object may be both."""
    from entangle import hooks

    step_points = {n for n in vars(hooks.StepHook) if not n.startswith("_") and callable(getattr(hooks.StepHook, n))}
    loop_points = {n for n in vars(hooks.LoopCallback) if not n.startswith("_")}
    assert len(step_points - {"due"}) <= 6 and len(loop_points - {"evaluates"}) <= 6
    assert not step_points & loop_points

    class Both(hooks.StepHook, hooks.LoopCallback):
        def __init__(self):
            self.calls = []

        def due(self, step):
            return step == 2

        def on_step_start(self, step, lr):
            self.calls.append(("step", step))

        def after_step(self, ctx, rows):
            self.calls.append(("after", ctx.step))

        def evaluates(self, step):
            return step == 3

        def on_evaluate(self, ctx):
            self.calls.append(("evaluate", ctx.step))
            return {"eval/mine": 1.0}

    both = Both()
    result = fit(build(cfg(tmp_path / "run", "train.max_steps=3"), hooks=[both]))
    assert both.calls == [("after", 1), ("step", 2), ("after", 2), ("after", 3), ("evaluate", 3)]
    rows = [json.loads(x) for x in open(result.metrics_path)]
    assert rows[-1]["eval/mine"] == 1.0 and "eval/mine" not in rows[0]
