"""Evaluation: scorers, KL from samples, win rates, the judge, in-training sampling, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from entangle import config, models
from entangle.errors import ConfigError, ModelError
from entangle.evaluation import Judge, checked_scores, distinct_2, get_scorer, sample_figures, score_samples
from entangle.loop import train
from conftest import write_jsonl

PROMPTS = "synthetic:sentiment?config=short&n=6"


def test_vader_is_the_compound_sentiment():
    s = get_scorer("vader")
    good, bad, flat = s.score(["", "", ""], ["What a wonderful, lovely day!", "This is awful and sad.", "a b"])
    assert good > 0.5 and bad < -0.5 and flat == 0.0


def test_summary_figures_by_hand():
    """Scores 1, 0, 0.5 -> mean 0.5, se = sd/sqrt(3) = 0.5/sqrt(3); KL from logp - logp_initial = -1, -3, -2
    -> 2 (sign: the estimator is log pi - log pi_init); wins 1, 0.5, 0 -> 0.5; distinct-2 of "a b a b" and
    "a b": bigrams (a b),(b a),(a b),(a b) -> 2 distinct of 4."""
    samples = [{"score": 1.0, "logp": -1.0, "logp_initial": -2.0, "win": 1.0, "tokens": 4, "completion": "a b a b"},
               {"score": 0.0, "logp": -1.0, "logp_initial": -4.0, "win": 0.5, "tokens": 2, "completion": "a b"},
               {"score": 0.5, "logp": -2.0, "logp_initial": -4.0, "win": 0.0, "tokens": 3, "completion": ""}]
    f = sample_figures(samples)
    assert f["gold/mean"] == pytest.approx(0.5) and f["gold/mean_se"] == pytest.approx(0.5 / 3 ** 0.5)
    assert f["kl/initial"] == pytest.approx(2.0) and f["kl/initial_n"] == 3
    assert f["win_rate"] == pytest.approx(0.5) and f["length/mean"] == pytest.approx(3.0)
    assert f["distinct_2"] == pytest.approx(0.5) and distinct_2([]) == 0.0


def test_win_rate_counts_ties_half():
    class Fixed:
        pairwise = False

        def score(self, prompts, completions):
            return [float(len(c)) for c in completions]

    samples = [{"prompt": "p", "completion": c} for c in ("aaa", "a", "aa")]
    baseline = [{"prompt": "p", "completion": c} for c in ("a", "aaa", "aa")]
    score_samples(samples, Fixed(), baseline)
    assert [s["win"] for s in samples] == [1.0, 0.0, 0.5]
    assert samples[0]["baseline_completion"] == "a" and samples[0]["baseline_score"] == 1.0


def test_a_model_against_itself_has_zero_kl_and_even_win_rate(tmp_path):
    from entangle.api import evaluate

    f = evaluate("tiny", PROMPTS, "vader", out=str(tmp_path / "ev"), n=1, max_new_tokens=6, seed=0, progress=False)
    assert f["kl/initial"] == 0.0 and f["win_rate"] == 0.5 and f["win_rate_n"] == 6
    assert f["gold/baseline"] == f["gold/mean"] and f["gold/baseline_n"] == 6   # the initial policy's gold, beside
    written = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert written["kl/initial"] == 0.0 and written["scorer"] == "vader"
    rows = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert all({"score", "logp", "logp_initial", "win"} <= set(r) for r in rows)
    # re-scoring the samples file gives the same figures without sampling again
    again = evaluate("tiny", None, "vader", samples=str(tmp_path / "ev" / "samples.jsonl"), max_new_tokens=6,
                     progress=False)
    assert again["kl/initial"] == 0.0 and again["gold/mean"] == f["gold/mean"]


def test_after_training_the_kl_to_the_initial_policy_is_positive(tmp_path):
    from entangle.api import evaluate

    train(config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=32",
                             "data.max_length=64", "optimizer.lr=1e-2", "train.batch_size=4", "train.max_steps=4",
                             "tracking.progress=false", f"train.output_dir={tmp_path / 'run'}"]))
    f = evaluate(str(tmp_path / "run"), PROMPTS, "vader", n=2, max_new_tokens=6, progress=False)
    assert f["kl/initial"] > 0 and f["kl/initial_n"] == 12


def _reward_model(folder, labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = models.byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=labels,
                      pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_reward_model_scores_do_not_depend_on_batching(tmp_path):
    rm = get_scorer(f"rm:{_reward_model(tmp_path / 'rm')}")
    prompts = ["Hi", "Tell me something longer than that", "x"] * 2
    completions = ["a", "a much longer completion with words", "b c", "d", "e f g h", "i"]
    rm.batch_size = 1
    one = rm.score(prompts, completions)
    rm.batch_size = 4
    four = rm.score(prompts, completions)
    assert one == pytest.approx(four, abs=1e-5) and len(set(one)) > 1


def test_reward_model_with_two_labels_is_refused(tmp_path):
    with pytest.raises(ModelError, match="has 2 labels"):
        get_scorer(f"rm:{_reward_model(tmp_path / 'rm2', labels=2)}")


def test_python_scorer(tmp_path, monkeypatch):
    (tmp_path / "myscore.py").write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_scorer("python:myscore:length").score(["p", "q"], ["abc", ""]) == [3.0, 0.0]
    with pytest.raises(ConfigError, match="cannot import"):
        get_scorer("python:myscore:nothing")


def test_the_judge_shows_both_orders_and_a_position_bias_is_a_tie():
    """A judge that always answers "A" prefers whatever is shown first: in both orders it contradicts
    itself, so every verdict is a tie; one that reads the answers' content wins consistently."""
    judge = Judge("tiny")
    shown = []

    def always_first(prompt, first, second):
        shown.append((first, second))
        return True

    judge._prefers_first = always_first
    assert judge.compare(["p", "q"], ["x", "y"], ["u", "v"]) == [0.5, 0.5]
    assert shown == [("x", "u"), ("u", "x"), ("y", "v"), ("v", "y")]
    judge._prefers_first = lambda prompt, first, second: len(first) > len(second)
    assert judge.compare(["p"], ["long answer"], ["short"]) == [1.0]
    assert judge.compare(["p"], ["short"], ["long answer"]) == [0.0]


def test_the_judge_runs_on_a_tiny_model():
    verdicts = get_scorer("judge:tiny").compare(["Is the sky blue?"] * 2, ["Yes.", "No."], ["No.", "Yes."])
    assert all(v in (0.0, 0.5, 1.0) for v in verdicts)


def test_sampling_during_training_logs_gold_kl_and_win_rate(tmp_path):
    out = tmp_path / "run"
    train(config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=32",
                             "data.eval=synthetic:sentiment?config=short&n=8&split=test", "data.max_length=64",
                             "optimizer.lr=1e-2", "train.batch_size=4", "train.max_steps=4", "train.eval_at_start=true",
                             "eval.generate.every=2", "eval.generate.n_prompts=4", "eval.generate.max_new_tokens=5",
                             "tracking.progress=false", f"train.output_dir={out}"]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/kl/initial" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    # step 0: the policy is the initial policy (its log-probs from the sampling forward, the initial copy's
    # from a separate forward: equal up to float32 rounding), and its samples are the baseline's
    assert abs(evals[0]["eval/kl/initial"]) < 1e-4 and evals[0]["eval/win_rate"] == 0.5
    assert evals[-1]["eval/kl/initial"] > 0
    for r in evals:
        assert {"eval/gold/mean", "eval/gold/mean_se", "eval/length/mean", "eval/logps/chosen"} <= set(r)
    samples = [json.loads(x) for x in (out / "samples" / "step-4.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("baseline_completion" in s for s in samples)
    # the samples of step 4 are the final policy's: entangle eval of final/ on them gives the logged KL
    from entangle.api import evaluate

    write_jsonl(tmp_path / "s.jsonl", samples)
    f = evaluate(str(out), None, "vader", samples=str(tmp_path / "s.jsonl"), progress=False)
    assert f["kl/initial"] == pytest.approx(evals[-1]["eval/kl/initial"], rel=1e-6)


def test_sampling_during_mixed_precision_training_runs_in_its_arithmetic_with_the_reference_as_initial(tmp_path):
    """`model.dtype=bf16-mixed`: the in-training samples' KL is `entangle eval --dtype bf16-mixed`'s on the same
    samples (it ran in float32 before: the policy's arithmetic was not the run's), and the initial policy is the
    frozen reference's own copy, not one more model in memory."""
    from entangle.api import evaluate
    from entangle.evaluation import GenerationEval
    from entangle.loop import build, fit

    out = tmp_path / "run"
    run = build(config.load(None, ["model.name=tiny", "model.dtype=bf16-mixed",
                                   "data.train=synthetic:sentiment?config=short&n=32", "data.max_length=64",
                                   "optimizer.lr=1e-2", "train.batch_size=4", "train.max_steps=3",
                                   "eval.generate.every=3", "eval.generate.n_prompts=4", "eval.generate.max_new_tokens=5",
                                   "eval.generate.prompts=synthetic:sentiment?config=short&n=8&split=test",
                                   "tracking.progress=false", f"train.output_dir={out}"]))
    sampler = next(h for h in run.loop_callbacks if isinstance(h, GenerationEval))
    assert sampler.initial_model is run.reference.model
    fit(run)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "eval/kl/initial" in r][-1]
    assert last["step"] == 3 and last["eval/kl/initial"] != 0
    samples = [json.loads(x) for x in (out / "samples" / "step-3.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "s.jsonl", samples)
    for dtype, same in (("bf16-mixed", True), ("float32", False)):
        f = evaluate(str(out), None, "vader", samples=str(tmp_path / "s.jsonl"), progress=False, dtype=dtype)
        assert (f["kl/initial"] == pytest.approx(last["eval/kl/initial"], rel=1e-6)) == same, dtype


def test_report_shows_the_gold_kl_path_and_escaped_samples(tmp_path):
    from entangle.report import write_report

    out = tmp_path / "run"
    train(config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=32",
                             "data.max_length=64", "optimizer.lr=1e-2", "train.batch_size=4", "train.max_steps=2",
                             "eval.generate.every=1", f"eval.generate.prompts={write_jsonl(tmp_path / 'p.jsonl', [{'prompt': '<script>x</script>'}])}",
                             "eval.generate.max_new_tokens=4", "tracking.progress=false", f"train.output_dir={out}"]))
    page = open(write_report([str(out)], str(tmp_path / "rep"))).read()
    assert "gold_vs_kl.png" in page or "Gold reward and win rate against KL" in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    assert "Samples: run" in page


@pytest.mark.slow   # one process start each
@pytest.mark.parametrize("args, message", [
    (["eval", "tiny", "--prompts", "EMPTY", "--out", "OUT"], "field 'prompt' is missing"),
    (["eval", "tiny", "--prompts", PROMPTS, "--scorer", "bleu", "--out", "OUT"], "unknown scorer 'bleu'"),
    (["eval", "tiny", "--prompts", PROMPTS, "--scorer", "rm:RM2", "--out", "OUT"], "has 2 labels"),
    (["eval", "NOFINAL", "--prompts", PROMPTS, "--out", "OUT"], "has no final/"),
    (["generate", "tiny", "--prompts", "missing.jsonl", "--out", "OUT/s.jsonl"], "missing.jsonl: no such file"),
    (["generate", "tiny", "--prompts", PROMPTS, "--top-p", "0", "--out", "OUT/s.jsonl"], "--top-p must be in (0, 1]"),
], ids=["no-prompts", "unknown-scorer", "rm-two-labels", "run-without-final", "missing-file", "bad-top-p"])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": "x"}])
    nofinal = tmp_path / "nofinal"
    nofinal.mkdir()
    (nofinal / "config.yaml").write_text("model: {name: tiny}\n")
    (nofinal / "metrics.jsonl").write_text("")
    subs = {"EMPTY": empty, "OUT": str(tmp_path / "out"), "NOFINAL": str(nofinal),
            "rm:RM2": f"rm:{_reward_model(tmp_path / 'rm2', labels=2)}" if "rm:RM2" in args else "rm:RM2",
            "missing.jsonl": str(tmp_path / "missing.jsonl")}
    argv = [a.replace("OUT", subs["OUT"]) if a.startswith("OUT") else subs.get(a, a) for a in args]
    proc = subprocess.run([sys.executable, "-m", "entangle.cli", "-q", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-800:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kl_to_the_moved_reference(tmp_path, lora):
    """A hard update (alpha 1) after the last step makes the reference the final policy: kl/reference is 0
    (float64, up to the rounding between the sampling forward and a full forward), kl/initial is not."""
    from entangle.api import evaluate

    extra = ["model.lora.r=4"] if lora else []
    train(config.load(None, ["model.name=tiny", "model.dtype=float64", "data.train=synthetic:sentiment?config=short&n=32",
                             "data.max_length=64", "optimizer.lr=1e-2", "train.batch_size=4", "train.max_steps=4",
                             "reference.type=hard", "reference.tau=2", "tracking.progress=false",
                             f"train.output_dir={tmp_path / 'run'}", *extra]))
    assert (tmp_path / "run" / "reference-final.safetensors").exists()
    f = evaluate(str(tmp_path / "run"), PROMPTS, "vader", n=1, max_new_tokens=6, dtype="float64", progress=False)
    assert f["kl/reference"] == pytest.approx(0.0, abs=1e-6) and f["kl/initial"] > 1e-3


BAD_SCORERS = {
    "raises": ("def f(p, c):\n    raise RuntimeError('boom')\n", "failed on 2 completions: RuntimeError: boom"),
    "exits": ("def f(p, c):\n    raise SystemExit(0)\n", "failed on 2 completions: SystemExit"),
    "none": ("def f(p, c):\n    return None\n", "failed on 2 completions: TypeError"),
    "strings": ("def f(p, c):\n    return ['1.5', '2']\n", "score 0 is '1.5', not a number"),
    "count": ("def f(p, c):\n    return [1.0]\n", "returned 1 scores for 2 completions"),
    "nan": ("def f(p, c):\n    return [1.0, float('nan')]\n", "score 1 is nan"),
    "inf": ("def f(p, c):\n    return [float('inf'), 1.0]\n", "score 0 is inf"),
    "not_callable": ("f = 3\n", "f is not a function of"),          # refused when the scorer is made
}


@pytest.mark.parametrize("kind", sorted(BAD_SCORERS))
def test_a_user_scorer_that_misbehaves_is_one_line_naming_it(kind, tmp_path, monkeypatch):
    """A user's scorer is user code: whatever it does wrong is a ConfigError naming it and the first bad value,
    never a traceback, a silent exit, or a non-finite score averaged into gold."""
    source, message = BAD_SCORERS[kind]
    (tmp_path / f"bad_{kind}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        checked_scores(get_scorer(f"python:bad_{kind}:f"), ["p", "q"], ["a", "b"])
    assert f"python:bad_{kind}:f" in str(e.value) and "\n" not in str(e.value)


def test_a_non_finite_score_never_reaches_the_labels(tmp_path, monkeypatch):
    from entangle.api import label

    (tmp_path / "nanscore.py").write_text("def f(p, c):\n    return [float('nan')] * len(c)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="score 0 is nan"):
        label("tiny", ["Hello", "Hi"], "python:nanscore:f", out=str(tmp_path / "p.jsonl"), max_new_tokens=4)
    assert not (tmp_path / "p.jsonl").exists()


def test_kl_of_a_bf16_model_against_a_separate_copy_of_itself_is_zero():
    """bfloat16 on CPU: the policy and the initial policy are two loads of the same weights. Both sides are
    scored by the same teacher-forced forward in the same batches, so the KL estimate is 0 (the sampling
    forward's own log-probs differ from a full forward's by ~1e-2 per token in bf16: a biased KL)."""
    from entangle.evaluation import evaluate_policy as evaluate
    from entangle.generation import load_policy, load_prompts

    policy, initial = load_policy("tiny", dtype="bfloat16"), load_policy("tiny", dtype="bfloat16")
    assert policy.model is not initial.model and next(policy.model.parameters()).dtype == torch.bfloat16
    figures, samples = evaluate(policy, load_prompts(PROMPTS), get_scorer("vader"), initial=initial, n=2,
                                max_new_tokens=8, seed=0, batch_size=4)
    assert figures["kl/initial"] == 0.0 and all(s["logp"] == s["logp_initial"] for s in samples)


def test_eval_json_records_what_the_sampling_settings_made(tmp_path):
    """With a samples file the policy's samples were made elsewhere: the settings made only the baseline's."""
    from entangle.api import evaluate

    evaluate("tiny", PROMPTS, "vader", out=str(tmp_path / "a"), max_new_tokens=4, temperature=0.7, progress=False)
    first = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert first["settings"]["temperature"] == 0.7 and "baseline_sampling" not in first
    evaluate("tiny", None, "vader", samples=str(tmp_path / "a" / "samples.jsonl"), out=str(tmp_path / "b"),
             max_new_tokens=4, temperature=0.7, progress=False)
    again = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert again["baseline_sampling"]["temperature"] == 0.7 and "settings" not in again
    assert again["samples_file"].endswith("samples.jsonl")


def test_a_baseline_sampled_under_autocast_has_its_own_cache_entry(tok):
    """The baseline's samples are cached by weights, prompts, settings and arithmetic: a float32 evaluation never
    reuses samples drawn under bf16 autocast."""
    import os

    from entangle.evaluation import baseline_samples
    from entangle.models import cache_dir

    model, _ = models.load_model("tiny", tokenizer=tok)
    gen = {"n": 1, "max_new_tokens": 4, "temperature": 1.0, "seed": 0, "batch_size": 2, "progress": False}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = baseline_samples(model, tok, ["Hello", "The film"], gen)
    plain = baseline_samples(model, tok, ["Hello", "The film"], gen)
    again = baseline_samples(model, tok, ["Hello", "The film"], gen)
    assert len(os.listdir(os.path.join(cache_dir(), "samples"))) == 2
    assert again == plain and len(mixed) == len(plain) == 2
