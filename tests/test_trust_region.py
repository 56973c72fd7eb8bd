"""Trust-region references (TR-DPO and friends): closed-form blends, LoRA exactness, schedule, dtype."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from entangle import batching, config, data, models, reference
from entangle.loop import train
from entangle.logps import sequence_logps


def perturb(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def test_full_blend_matches_the_closed_form(tok):
    """After k updates: theta_ref = (1-a)^k theta_0 + sum_i a (1-a)^(k-i) theta_i."""
    a, k = 0.3, 3
    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    ref = reference.TrustRegionReference(model, alpha=a, tau=1)
    snaps = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for i in range(k):
        perturb(model, 0.05, seed=i)
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        ref.update(model)
    for n, p in ref.model.named_parameters():
        expected = (1 - a) ** k * snaps[0][n] + sum(a * (1 - a) ** (k - i) * snaps[i][n] for i in range(1, k + 1))
        torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)
    assert ref.updates == k and ref.drift() > 0


@pytest.mark.parametrize("lora", [False, True])
def test_drift_is_the_distance_from_the_start_read_one_tensor_at_a_time(tok, lora, monkeypatch):
    """`ref/drift` = ||theta_ref - theta_ref,0|| (LoRA: of the deltas), without a second copy of the whole state."""
    model, _ = models.load_model("tiny", tokenizer=tok, lora=models.LoraConfig(r=4) if lora else None)
    ref = reference.TrustRegionReference(model, alpha=0.5, tau=1)
    start = ref.state_tensors()
    perturb(model, 0.05, seed=0)
    ref.update(model)
    now = ref.state_tensors()
    expected = sum(float((now[k].double() - start.get(k, 0)).pow(2).sum()) for k in now) ** 0.5
    monkeypatch.setattr(ref, "state_tensors", lambda: pytest.fail("drift copied the whole state"))
    assert expected > 0 and ref.drift() == pytest.approx(expected, rel=1e-9)


def test_lora_reference_is_base_plus_dense_blended_delta(tok):
    """Delta_ref = sum_i a (1-a)^(k-i) s B_i A_i, not low-rank; the reference forward equals a plain
    model whose adapted weights are W0 + Delta_ref."""
    a = 0.5
    model, _ = models.load_model("tiny", dtype="float64", tokenizer=tok,
                                 lora=models.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    ref = reference.TrustRegionReference(model, alpha=a, tau=1)
    deltas = []
    for i in range(3):
        perturb(model, 0.2, seed=10 + i)
        deltas.append(reference.lora_deltas(model))
        ref.update(model)
    name = next(iter(deltas[0]))
    expected = sum(a * (1 - a) ** (3 - i) * deltas[i - 1][name] for i in range(1, 4))
    torch.testing.assert_close(ref.delta[name], expected.float())
    assert torch.linalg.matrix_rank(ref.delta[name].double()) > 2  # blends of rank-2 deltas are not rank 2

    plain, _ = models.load_model("tiny", dtype="float64", tokenizer=tok)
    with torch.no_grad():
        params = dict(plain.named_parameters())
        for n, d in ref.delta.items():
            params[n.removeprefix("base_model.model.") + ".weight"].add_(d.double())
    exs = [data.PreferenceExample("Statement: nice.\nSentiment:", " Positive.", " Negative.")]
    batch = batching.collate(data.tokenize_pairs(exs, tok)[0], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(ref.logps(batch).double(), sequence_logps(plain, batch).logps,
                                   rtol=1e-5, atol=1e-5)


def test_bf16_reference_with_small_alpha_still_moves(tok):
    model, _ = models.load_model("tiny", dtype="bfloat16", tokenizer=tok)
    ref = reference.TrustRegionReference(model, alpha=1e-3, tau=1)
    start = ref.state_tensors()
    perturb(model, 0.01, seed=3)
    ref.update(model)
    name, p = next((n, p) for n, p in model.named_parameters() if p.ndim == 2)
    expected = (1 - 1e-3) * start[name] + 1e-3 * p.detach().float()
    torch.testing.assert_close(ref.state_tensors()[name], expected)  # the float32 master moved exactly
    naive = ((1 - 1e-3) * start[name].bfloat16() + 1e-3 * p.detach()).bfloat16()
    stuck = (naive == start[name].bfloat16()).float().mean()
    moved = (ref.state_tensors()[name] != start[name]).float().mean()
    assert stuck > 0.75 and moved > 0.99  # a bf16 blend leaves most weights where they were


def tr_cfg(out, *extra):
    return config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=64",
                              "data.max_length=64", "optimizer.lr=3e-3", "train.batch_size=2", "train.max_steps=7",
                              "tracking.progress=false", "train.eval_at_start=false", f"train.output_dir={out}", *extra])


def rows(out):
    drop = {"tokens_per_s", "pairs_per_s", "step_time_s"}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in f]


def test_hard_updates_land_on_multiples_of_tau_under_accumulation(tmp_path):
    out = tmp_path / "hard"
    train(tr_cfg(out, "reference.type=hard", "reference.tau=3", "train.grad_accum=2", "train.save_every=3"))
    assert [r["ref/updates"] for r in rows(out)] == [0, 0, 1, 1, 1, 2, 2]
    ck = out / "checkpoints" / "step-3"
    ref_state = load_file(ck / "reference.safetensors")
    policy = load_file(ck / "model" / "model.safetensors")
    for n, w in policy.items():
        torch.testing.assert_close(ref_state[n], w.float())  # alpha = 1 at step 3: the reference is the policy


def test_alpha_zero_equals_the_static_reference(tmp_path):
    static = rows(train(tr_cfg(tmp_path / "s", "reference.type=frozen")).run_dir)
    zero = rows(train(tr_cfg(tmp_path / "z", "reference.type=trust_region", "reference.alpha=0",
                             "reference.tau=1")).run_dir)
    for a, b in zip(static, zero):
        assert a["loss"] == b["loss"] and a["rewards/margins"] == b["rewards/margins"]
        assert b["ref/updates"] == 0


@pytest.mark.parametrize("extra", [[], ["model.lora.r=4"]], ids=["full", "lora"])
def test_resumed_trust_region_run_equals_uninterrupted(tmp_path, extra):
    train(tr_cfg(tmp_path / "a", "reference.type=soft", *extra))

    def stop_at_4(row, stop):
        if row["step"] == 4:
            stop()

    train(tr_cfg(tmp_path / "b", "reference.type=soft", *extra), callbacks=[stop_at_4])
    train(tr_cfg(tmp_path / "b", "reference.type=soft", "train.resume=latest", *extra))
    assert rows(tmp_path / "a") == rows(tmp_path / "b")


def test_trust_region_config_errors():
    with pytest.raises(config.ConfigError, match="needs reference.alpha and reference.tau"):
        config.load(None, ["reference.type=trust_region", "reference.alpha=0.5"])
    with pytest.raises(config.ConfigError, match="never moves"):
        config.load(None, ["reference.type=precomputed", "reference.alpha=0.5"])
    with pytest.raises(config.ConfigError, match="uses no reference"):
        config.load(None, ["loss.name=simpo", "reference.type=soft"])
    cfg = config.load(None, ["reference.type=hard", "reference.tau=64"])
    assert config.trust_region(cfg) == (1.0, 64)
    assert config.trust_region(config.load(None, ["reference.type=soft"])) == (0.6, 1)


HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH = {"ddp": ["-m", "entangle.cli"],                                   # Accelerate's multi-CPU (DDP)
          "fsdp2": [os.path.join(HERE, "launch_sharded.py"), "fsdp2"],     # FSDP2 over gloo (see that file)
          "zero3": [os.path.join(HERE, "launch_sharded.py"), "zero3"]}     # DeepSpeed ZeRO-3 over gloo
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
ACCUM = ["train.batch_size=1", "train.grad_accum=2"]   # two processes x 1 pair x 2 micro-batches
# 3 pairs fit data.max_length=64: one process evaluates 2, the other 1 and then a dropped stand-in
UNEVEN_EVAL = ["data.eval=synthetic:sentiment?config=short&n=5&seed=3", "train.eval_batch_size=1"]
ONE_EVAL_PAIR = ["data.eval=synthetic:sentiment?config=short&n=5"]   # the second process has no held-out pair


@pytest.mark.distributed
@pytest.mark.parametrize("launcher,extra,two_only", [
    ("ddp", ONE_EVAL_PAIR, []), ("fsdp2", [], []), ("fsdp2", ["model.lora.r=4", *UNEVEN_EVAL], []),
    pytest.param("zero3", [], ACCUM, marks=needs_deepspeed),
    pytest.param("zero3", ["model.lora.r=4"], [], marks=needs_deepspeed)],
    ids=["ddp", "fsdp2-full", "fsdp2-lora", "zero3-full-accum", "zero3-lora"])
def test_two_processes_hold_the_same_moving_reference(tmp_path, launcher, extra, two_only):
    """Two processes of batch 2 (DDP; FSDP2 or ZeRO-3 with the update gathered piece by piece) log what
    one process of batch 4 logs: a rank with a different reference would change the reduced loss."""
    common = ["reference.type=soft", "reference.alpha=0.3", "train.device=cpu", "train.max_steps=4", *extra]
    one = rows(train(tr_cfg(tmp_path / "one", "train.batch_size=4", *common)).run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *LAUNCH[launcher], "-q", "train", "model.name=tiny", "data.train=synthetic:sentiment?config=short&n=64",
           "data.max_length=64", "optimizer.lr=3e-3", "train.batch_size=2", "tracking.progress=false",
           "train.eval_at_start=false", f"train.output_dir={tmp_path / 'two'}", *common, *two_only]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = rows(tmp_path / "two")
    assert len(two) == len(one) == 4
    for x, y in zip(one, two):
        for k in ("loss", "rewards/margins", "ref/drift", "ref/kl_to_init", "eval/loss", "eval/rewards/margins"):
            assert (k in x) == (k in y), (x["step"], k)
            # kl_to_init is a difference of float32 log-prob sums of size ~60, whose ulp is ~4e-6
            tol = 2e-5 if k == "ref/kl_to_init" else 1e-6
            assert k not in x or x[k] == pytest.approx(y[k], rel=1e-4, abs=tol), (x["step"], k)
        assert y["ref/updates"] == x["step"]
    assert ("eval/loss" in one[-1]) == any(x.startswith("data.eval=") for x in extra)
    final = load_file(tmp_path / "two" / "final" / ("adapter_model.safetensors" if "model.lora.r=4" in extra else "model.safetensors"))
    assert final and all(not isinstance(t, torch.distributed.tensor.DTensor) for t in final.values())


@pytest.mark.distributed
def test_sharded_update_gathers_one_piece_at_a_time():
    """FSDP (with and without original parameters), FSDP2 and ZeRO-3 over two gloo processes: the
    update equals the closed-form blend on both ranks, for full and LoRA policies, and no gather ever
    holds the whole model (tests/dist_sharded_update.py counts them)."""
    modes = ["fsdp", "fsdp-flat", "fsdp2"] + (["zero3"] if importlib.util.find_spec("deepspeed") else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_sharded_update.py"), *modes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("OK ")] == modes


def launch(launcher, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *LAUNCH[launcher], "-q", "train", "model.name=tiny", "data.train=synthetic:sentiment?config=short&n=64",
           "data.max_length=64", "optimizer.lr=3e-3", "train.batch_size=2", "tracking.progress=false",
           "train.eval_at_start=false",            "train.device=cpu", f"train.output_dir={out}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher,extra", [
    ("fsdp2", ["model.lora.r=4"]), pytest.param("zero3", [], marks=needs_deepspeed)], ids=["fsdp2-lora", "zero3-full"])
def test_sharded_resumed_trust_region_run_equals_uninterrupted(tmp_path, launcher, extra):
    """A sharded run stopped after its step-2 checkpoint (weights and optimiser state per process,
    the reference beside them) and resumed logs what the uninterrupted run logged."""
    import shutil

    common = ["reference.type=soft", "reference.alpha=0.3", "train.max_steps=4", "train.save_every=2", *extra]
    launch(launcher, tmp_path / "a", *common)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4", ignore_errors=True)   # as if stopped after step 2
    shutil.rmtree(tmp_path / "b" / "final")
    os.remove(tmp_path / "b" / "summary.json")
    assert (tmp_path / "b" / "checkpoints" / "step-2" / "sharded_state").is_dir()
    log = tmp_path / "b" / "metrics.jsonl"
    kept = [json.loads(x) for x in log.read_text().splitlines()[:2]]
    log.write_text("".join(json.dumps({**r, "before_stop": True}) + "\n" for r in kept))  # a fresh start drops these
    launch(launcher, tmp_path / "b", *common, "train.resume=latest")
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r.pop("before_stop", False) for r in b] == [True, True, False, False]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-9, abs=1e-12), x["step"]
