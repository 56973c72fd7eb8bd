"""A hostile user's walk of every command (generate, eval, label, scan, report, the studies) through the CLI:
each bad input or fault is one line on stderr and exit 2 (or handled as documented), never a traceback, and
nothing already on disk is overwritten. In-process (`cli.main`): a traceback would fail the test."""

import json
import os
import sys

import pytest

from conftest import write_jsonl
from entangle.cli import main

SCORERS = '''
import sys
def raises(p, c): raise RuntimeError("boom")
def none(p, c): return None
def strings(p, c): return ["good"] * len(c)
def short(p, c): return [1.0] * (len(c) - 1)
def nan(p, c): return [float("nan")] * len(c)
def exits(p, c): sys.exit(0)
def one_arg(p): return [0.0]
not_a_function = 3
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    (root / "walk_scorers.py").write_text(SCORERS)
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"Statement {i}: the film was"} for i in range(3)])
    write_jsonl(root / "pairs.jsonl", [{"prompt": "Q: hi", "chosen": " good answer", "rejected": " bad"}] * 4)
    write_jsonl(root / "empty-prompt.jsonl", [{"prompt": ""}])
    (root / "a-file").write_text("not a folder")
    assert main(["-q", "generate", "tiny", "--prompts", str(root / "prompts.jsonl"), "--out",
                 str(root / "samples.jsonl"), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in open(root / "samples.jsonl")]
    edited = dict(rows[1], completion=rows[1]["completion"] + " EDITED")
    write_jsonl(root / "edited.jsonl", [rows[0], edited, rows[2]])
    write_jsonl(root / "bad-ids.jsonl", [rows[0], dict(rows[1], completion_ids="x"), rows[2]])
    (root / "good-run").mkdir()
    (root / "good-run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 0.7}\n\xff\xfe\n{"step": 2, "loss": 0.6}\n')
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


P, S, D = "PROMPTS", "SAMPLES", "PAIRS"
CASES = {
    # user scorers: one line naming the scorer and the first bad value
    "scorer raises": (["eval", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:raises"], "RuntimeError: boom"),
    "scorer returns None": (["eval", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:none"], "walk_scorers:none"),
    "scorer returns strings": (["eval", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:strings"],
                               "score 0 is 'good', not a number"),
    "scorer wrong count": (["eval", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:short"], "returned 2 scores"),
    "scorer NaN": (["label", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:nan", "--out", "OUT/l.jsonl"],
                   "must be a finite number"),
    "scorer exits": (["eval", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:exits"], "SystemExit"),
    "scorer of one argument": (["eval", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:one_arg"], "TypeError"),
    "scorer not callable": (["eval", "tiny", "--prompts", P, "--scorer", "python:walk_scorers:not_a_function"],
                            "is not a function"),
    "scorer module missing": (["eval", "tiny", "--prompts", P, "--scorer", "python:no_such_mod:f"], "cannot import it"),
    # model paths: one resolver
    "rm path missing": (["eval", "tiny", "--prompts", P, "--scorer", "rm:/no/such/rm"], "no such folder"),
    "judge path missing": (["eval", "tiny", "--prompts", P, "--scorer", "judge:./no-judge"], "no such folder"),
    "initial path missing": (["eval", "tiny", "--prompts", P, "--initial", "/no/such/model"], "--initial '/no/such/model'"),
    "initial with another tokenizer": (["eval", "tiny", "--prompts", P, "--initial", "smollm2-135m"],
                                       "its tokenizer differs from the policy's"),
    "model is a file": (["generate", "A_FILE", "--prompts", P, "--out", "OUT/s.jsonl"], "is a file"),
    "scan model missing": (["scan", "../no/model", "--data", D, "--out", "OUT/scan"], "no such folder"),
    # prompts the model cannot take
    "empty prompt": (["generate", "tiny", "--prompts", "EMPTY", "--out", "OUT/s.jsonl"], "field 'prompt' is empty"),
    "no room for a prompt": (["generate", "tiny-gpt2", "--prompts", P, "--out", "OUT/s.jsonl", "--max-new-tokens",
                              "5000"], "leaves no room for a prompt"),
    "scan past the context": (["scan", "tiny-gpt2", "--data", D, "--out", "OUT/scan", "--max-length", "9000"],
                              "longer than the model's context"),
    # output paths
    "generate over its prompts": (["generate", "tiny", "--prompts", P, "--out", P], "writing it would destroy the input"),
    "label over its prompts": (["label", "tiny", "--prompts", P, "--out", P], "writing it would destroy the input"),
    "scan keep over its data": (["scan", "tiny", "--data", D, "--out", "OUT/scan", "--keep", D, "--max-cos", "0.5"],
                                "writing it would destroy the input"),
    "out is a file": (["eval", "tiny", "--prompts", P, "--out", "A_FILE"], "a-file"),
    "out under a file": (["generate", "tiny", "--prompts", P, "--out", "A_FILE/s.jsonl"], "a-file"),
    "report out is a file": (["report", "GOOD_RUN", "--out", "A_FILE"], "a-file"),
    "study out is a file": (["study", "compare", "--quick", "--out", "A_FILE"], "a-file"),
    "study out under a file": (["study", "sentiment", "--out", "A_FILE/x"], "is a file, not a folder"),
    # files read back
    "report of damaged metrics": (["report", "RUN", "--out", "OUT/rep"], "metrics.jsonl:2: not a JSON object"),
    "edited samples": (["eval", "tiny", "--samples", "EDITED"], "the completion text is not what its completion_ids"),
    "samples with bad ids": (["eval", "tiny", "--samples", "BAD_IDS"], "field 'completion_ids'"),
    "samples and prompts": (["eval", "tiny", "--samples", S, "--prompts", P], "not both"),
    # options out of range or that would be ignored
    "temperature nan": (["generate", "tiny", "--prompts", P, "--out", "OUT/s.jsonl", "--temperature", "nan"],
                        "--temperature"),
    "limit 0": (["generate", "tiny", "--prompts", P, "--out", "OUT/s.jsonl", "--limit", "0"], "--limit"),
    "max prompt length 0": (["eval", "tiny", "--prompts", P, "--max-prompt-length", "0"], "--max-prompt-length"),
    "top-p 2": (["generate", "tiny", "--prompts", P, "--out", "OUT/s.jsonl", "--top-p", "2"], "--top-p"),
    "noise -1": (["label", "tiny", "--prompts", P, "--out", "OUT/l.jsonl", "--noise", "-1"], "--noise"),
    "label --n": (["label", "tiny", "--prompts", P, "--out", "OUT/l.jsonl", "--n", "3"], "--n does not apply"),
    "judge template with vader": (["eval", "tiny", "--prompts", P, "--judge-template", "t.txt"], "applies to a judge"),
    "memory budget 0": (["scan", "tiny", "--data", D, "--out", "OUT/scan", "--memory-gib", "0"], "--memory-gib"),
    "memory too small": (["generate", "tiny", "--prompts", P, "--out", "OUT/s.jsonl", "--memory-gib", "0.0001"],
                         "weights alone take"),
    "scan limit 0": (["scan", "tiny", "--data", D, "--out", "OUT/scan", "--limit", "0"], "--limit must be"),
    "scan limit -1": (["scan", "tiny", "--data", D, "--out", "OUT/scan", "--limit", "-1"], "--limit must be"),
    "scan batch 0": (["scan", "tiny", "--data", D, "--out", "OUT/scan", "--batch-size", "0"], "--batch-size"),
    # studies: every setting checked before any work; a 0 is refused, never replaced
    "trust-region hard tau 0": (["study", "trust-region", "--hard-tau", "0", "--out", "OUT/st"], "hard_tau"),
    "trust-region soft alpha 2": (["study", "trust-region", "--soft-alpha", "2", "--out", "OUT/st"], "soft_alpha"),
    "overoptimization noise -1": (["study", "overoptimization", "--noise", "-1", "--out", "OUT/st"], "noise"),
    "compare mitigate bogus": (["study", "compare", "--quick", "--mitigate", "bogus", "--out", "OUT/st"],
                               "--mitigate bogus"),
    "compare steps 0": (["study", "compare", "--quick", "--steps", "0", "--out", "OUT/st"], "steps = 0"),
    "sentiment lr nan": (["study", "sentiment", "--lr", "nan", "--out", "OUT/st"], "lr = nan"),
    "sentiment n-train 0": (["study", "sentiment", "--n-train", "0", "--out", "OUT/st"], "n_train = 0"),
    "sentiment n-test 0": (["study", "sentiment", "--n-test", "0", "--out", "OUT/st"], "n_test = 0"),
    "sentiment no configs": (["study", "sentiment", "--configs", ",", "--out", "OUT/st"], "configs = ()"),
    "compare no losses": (["study", "compare", "--quick", "--losses", ",", "--out", "OUT/st"], "losses = ()"),
    "compare unknown loss": (["study", "compare", "--quick", "--losses", "dpo,nope", "--out", "OUT/st"], "nope"),
    "scan-filter seeds 0": (["study", "scan-filter", "--seeds", "0", "--out", "OUT/st"], "seeds = 0"),
}


def resolve(args, world, out):
    table = {"PROMPTS": world / "prompts.jsonl", "SAMPLES": world / "samples.jsonl", "PAIRS": world / "pairs.jsonl",
             "EMPTY": world / "empty-prompt.jsonl", "EDITED": world / "edited.jsonl", "BAD_IDS": world / "bad-ids.jsonl",
             "RUN": world / "run", "GOOD_RUN": world / "good-run"}
    out_args = [] if any(a in ("--out",) for a in args) or args[0] not in ("eval",) else ["--out", str(out / "ev")]
    resolved = []
    for a in args:
        a = str(table.get(a, a)).replace("OUT", str(out)).replace("A_FILE", str(world / "a-file"))
        resolved.append(a)
    return ["-q", *resolved, *out_args]


def snapshot(folder):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(folder) for f in fs
            if "__pycache__" not in d}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_bad_input_is_one_line_exit_2_and_nothing_is_overwritten(case, world, tmp_path, capsys):
    args, message = CASES[case]
    before = snapshot(world)
    code = main(resolve(args, world, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in err if x.startswith("entangle: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], (code, err[-5:])
    assert "Traceback" not in "\n".join(err)
    assert snapshot(world) == before          # no input, output or earlier file was changed
