"""The base model's self-verification baseline (issue 26): eval.jsonl's aha_by_level, the report's verdict against
step 0, and the model's own text when budget forcing inserts a wait (a forced " Wait" is itself a phrase).

References: hand-made eval rows and completions whose phrases and solved flags are known; the verdict's sentences
as written for them.
"""

import json


def _aha(frac, with_aha, without):
    return {"aha_frac": frac, "solved_with_aha": with_aha, "solved_without_aha": without}


def test_aha_against_the_base_model(tmp_path):
    """Reference: eval.jsonl rows with aha_by_level (the step-0 eval is the base model). The verdict says per
    level whether the share of phrases rose beyond the baseline and whether it goes with solving (OAT-Zero's
    superficial self-reflection: a phrase, a wrong answer); the chart draws each level's share from step 0."""
    from grpo.report.analysis import aha_verdict
    from grpo.report.charts import chart_specs
    from grpo.report.reading import load_run

    evals = [{"step": 0, "eval_solved_frac": 0.1, "aha_by_level": {"2x1-9": _aha(0.30, 0.1, 0.2),
                                                                    "3x1-30": _aha(0.10, 0.0, 0.05)}},
             {"step": 10, "eval_solved_frac": 0.2, "aha_by_level": {"2x1-9": _aha(0.50, 0.6, 0.3),
                                                                     "3x1-30": _aha(0.12, 0.0, 0.2)}}]
    verdict = aha_verdict(evals)
    assert verdict[0] == ("2x1-9: the share of held-out completions with a verification phrase rose from 0.30 at "
                          "step 0 to 0.50 at step 10; completions with a phrase solve more often (0.60 vs 0.30 "
                          "without).")
    assert "stayed at the base model's level (0.10 at step 0, 0.12 at step 10)" in verdict[1]
    assert "superficial: completions with a phrase solve no more often (0.00 vs 0.20 without)" in verdict[1]
    assert aha_verdict(evals[:1]) == ["Only the base model's eval (step 0) so far: the comparison comes with the "
                                      "next eval."]
    later = [{**evals[0], "step": 5}, evals[1]]  # no step-0 record (an older run's): a trained model is no baseline
    assert aha_verdict(later)[0].startswith("No step-0 eval recorded aha_by_level (the first is at step 5)")
    assert aha_verdict([]) == []
    odd = [evals[0], {"step": 10, "aha_by_level": {"2x1-9": 0.3, "3x1-30": None, "x": _aha(0.5, 0.5, 0.5)}}]
    # entries that are not objects are left out, not a crash; a level first seen later has no baseline
    assert aha_verdict(odd) == ["x: no step-0 baseline for this level (or no later number), so nothing to compare."]
    # each level is read at its latest eval with a number: a last eval without aha_by_level numbers changes nothing
    assert aha_verdict([*evals, {"step": 20, "aha_by_level": {}}]) == verdict
    # superficial means phrases that mostly fail; a handful of phrases says nothing either way
    both = {"aha_frac": 0.5, "solved_with_aha": 1.0, "solved_without_aha": 1.0, "num_with_aha": 8,
            "num_completions": 16}
    few = {**both, "aha_frac": 0.12, "solved_with_aha": 0.0, "num_with_aha": 2}
    tail = [evals[0], {"step": 10, "aha_by_level": {"2x1-9": both, "3x1-30": few}}]
    assert aha_verdict(tail)[0].endswith("completions with a phrase solve no more often than those without (1.00 vs "
                                         "1.00).")
    assert aha_verdict(tail)[1].endswith("only 2 of 16 completions had a phrase, too few to say whether it goes "
                                         "with solving.")
    damaged = [evals[0], {"step": 10, "aha_by_level": {"2x1-9": {**few, "num_completions": "16"}}}]
    assert aha_verdict(damaged)[0].endswith("only 2 completions had a phrase, too few to say whether it goes with "
                                            "solving.")
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    spec = next(s for s in chart_specs(load_run(run)) if s.id == "aha_by_level")
    assert [(line.label, line.xs, line.ys) for line in spec.lines] == [("2x1-9", [0, 10], [0.30, 0.50]),
                                                                     ("3x1-30", [0, 10], [0.10, 0.12])]
    assert spec.title.endswith("(step 0: base model)")
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in later))  # no step 0: no base model named
    assert next(s for s in chart_specs(load_run(run)) if s.id == "aha_by_level").title.endswith("phrase")


def test_aha_split_of_held_out_records():
    """Reference: four hand-made completions, two with a verification phrase (one solved), two without (one
    solved); a set with no phrase has no solved_with_aha (None, not 0)."""
    from grpo.evaluation import aha_split

    rows = [{"completion": "3 + 4 = 7. Wait, let me check: yes", "solved": True},
            {"completion": "hmm, 2 * 9", "solved": False},
            {"completion": "3 + 4", "solved": True},
            {"completion": "9 - 1", "solved": False}]
    assert aha_split(rows) == {"aha_frac": 0.5, "solved_with_aha": 0.5, "solved_without_aha": 0.5,
                               "num_with_aha": 2, "num_completions": 4}
    assert aha_split(rows[2:]) == {"aha_frac": 0.0, "solved_with_aha": None, "solved_without_aha": 0.5,
                                   "num_with_aha": 0, "num_completions": 2}
    # budget forcing's " Wait" is not the model's: the eval keeps its own tokens' text beside the completion
    forced = [{**rows[2], "completion": "3 + 4 Wait", "completion_unforced": "3 + 4"}, rows[3]]
    assert aha_split(forced)["aha_frac"] == 0.0


def test_eval_records_the_completion_without_forced_tokens(monkeypatch):
    """Reference: a hand-made generate result whose first row holds a forced " Wait" (budget forcing) and whose
    second row wrote "Wait" itself; the eval's completion_unforced drops exactly the forced tokens, so aha_split
    counts the second row's phrase and not the first's."""
    import types

    import numpy as np

    import grpo.evaluation as ev
    from grpo.rollout import RolloutConfig
    from grpo.tasks import Scored
    from model.sampler import SampleResult

    words = {1: "Try", 2: " 3 + 4", 3: " Wait", 4: "</think>", 0: "", 5: " let me", 6: " check"}

    class Task:
        eos_ids = ()

        def encode_prompt(self, item):
            return [5, 6]

        def decode(self, tokens):
            return "".join(words[int(t)] for t in tokens)

        def score(self, item, tokens):
            return Scored(reward=0.0, solved=False, format=True, text=self.decode(tokens))

    tokens = np.array([[1, 2, 3, 4, 0], [1, 3, 2, 4, 0]], np.int32)
    forced = np.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
    result = SampleResult(tokens, np.array([4, 4]), np.zeros((2, 5), np.float32), np.zeros(2, bool), forced)
    monkeypatch.setattr(ev, "generate_in_chunks", lambda *a, **k: result)
    monkeypatch.setattr(ev, "task_think_forcing", lambda *a: object())
    cfg = types.SimpleNamespace(vocab_size=7)
    records = ev.evaluate_items({}, cfg, Task(), ["p", "q"], RolloutConfig(stop_at_answer=False))
    assert [r["completion"] for r in records] == ["Try 3 + 4 Wait</think>", "Try Wait 3 + 4</think>"]
    # each run of the model's own tokens is decoded apart and joined by a space
    assert [r["completion_unforced"] for r in records] == ["Try 3 + 4 </think>", "Try Wait 3 + 4</think>"]
    assert [r["forced_tokens"] for r in records] == [1, 0]
    assert ev.aha_split(records)["aha_frac"] == 0.5
    # a phrase cannot be made of words from both sides of a forced token: " let me" [forced " check"] " check"...
    assert ev.own_text(Task(), np.array([5, 6, 2]), np.array([0, 1, 0], bool)) == " let me  3 + 4"
    assert ev.own_text(Task(), np.array([3, 3]), np.array([1, 1], bool)) == ""
    # the report reads the same own text: the forced row is no "first solved completion with a phrase"
    from grpo.report.analysis import first_aha
    from grpo.report.reading import parse_sample

    rows = [{**r, "step": 0, "solved": True} for r in records]
    assert first_aha([parse_sample(r) for r in rows]).group == 1
