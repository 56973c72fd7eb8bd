"""step: one optimisation step calls the step hooks in order, skips a non-finite step without moving anything,
and hands the hooks the optimiser's outcome."""

import torch

from entangle import config
from entangle.hooks import StepHook
from entangle.loop import build


class Order(StepHook):
    def __init__(self, poison=False):
        self.calls, self.poison = [], poison

    def on_step_start(self, step, lr):
        self.calls.append("start")

    def before_forward(self, batch):
        self.calls.append("forward")

    def on_logps(self, scored):
        self.calls.append("logps")

    def after_backward(self, batch, logps, loss_fn):
        self.calls.append("backward")

    def before_optimizer(self, accelerator, n_pairs):
        self.calls.append("optimizer")
        if self.poison:   # a non-finite gradient: the step must be skipped
            p = next(q for q in self.model.parameters() if q.grad is not None)
            p.grad.fill_(float("nan"))

    def finish(self, policy, micro_batches, stepped):
        self.calls.append(("finish", stepped, len(micro_batches)))
        return super().finish(policy, micro_batches, stepped)


def one_step(tmp_path, poison):
    from entangle.loop import step_batches
    from entangle.step import train_step

    hook = Order(poison)
    run = build(config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=16",
                                   "data.max_length=48", "train.batch_size=2", "train.grad_accum=2",
                                   "train.max_steps=2", "tracking.progress=false", "optimizer.lr=1e-2",
                                   f"train.output_dir={tmp_path / 'run'}"]), hooks=[hook])
    hook.model = run.accelerator.unwrap_model(run.policy)
    before = [p.detach().clone() for p in hook.model.parameters()]
    metrics, _ = train_step(run.step_parts, step_batches(run, 1)[1], 1)
    after = list(hook.model.parameters())
    run.lock.release()
    return hook.calls, metrics, [torch.equal(a, b) for a, b in zip(before, after)]


def test_the_step_calls_its_hooks_in_order_and_moves_the_weights(tmp_path):
    calls, metrics, same = one_step(tmp_path, poison=False)
    assert calls == ["start", "forward", "logps", "backward", "forward", "logps", "backward", "optimizer",
                     ("finish", True, 2)]
    assert not all(same) and float(metrics["skipped"]) == 0.0


def test_a_non_finite_step_is_skipped_and_the_hooks_are_told(tmp_path):
    calls, metrics, same = one_step(tmp_path, poison=True)
    assert calls[-1] == ("finish", False, 2) and all(same) and float(metrics["skipped"]) == 1.0
