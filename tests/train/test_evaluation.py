"""Held-out gold metrics: greedy pass@1 and sampled pass@k from a scripted engine (exact values),
and evaluator_from_config on a data.eval_path file with the run's verifier reward."""

import json

import pytest

from psirl.core.passk import pass_at_k
from psirl.models.tiny import make_tiny_model
from psirl.rewards.verifiers import AnswerVerifier
from psirl.train.config import config_from_dict
from psirl.train.evaluation import evaluate_records, evaluator_from_config, gold_reward, ks_for


class ScriptedEngine:
    """Returns scripted completions: greedy -> `greedy[prompt]`, sampled -> `sampled[prompt]`."""

    def __init__(self, greedy, sampled):
        self.greedy, self.sampled, self.calls = greedy, sampled, []

    def generate(self, prompts, params):
        from types import SimpleNamespace

        self.calls.append((list(prompts), params.n, params.temperature))
        if params.temperature == 0.0:
            completions = [self.greedy[p] for p in prompts]
        else:
            completions = [c for p in prompts for c in self.sampled[p][: params.n]]
        return SimpleNamespace(completions=completions)

    def sync(self, model):
        pass


RECORDS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"},
           {"prompt": "3+3=", "answer": "6"}]


def test_greedy_and_sampled_metrics_match_the_closed_form():
    engine = ScriptedEngine(
        greedy={"1+1=": "2", "2+2=": "5", "3+3=": "6"},
        sampled={"1+1=": ["2", "2", "3", "2"], "2+2=": ["1", "4", "0", "0"],
                 "3+3=": ["0", "0", "0", "0"]},
    )
    details = []
    metrics = evaluate_records(engine, None, RECORDS, AnswerVerifier(), chat=False, n_samples=4,
                               batch_size=8, details=details)
    assert metrics["eval/accuracy_greedy"] == pytest.approx(2 / 3)
    assert metrics["eval/pass@1_greedy"] == pytest.approx(2 / 3)
    assert metrics["eval/accuracy"] == pytest.approx(4 / 12)
    for k in (1, 2, 4):
        expected = (pass_at_k(4, 3, k) + pass_at_k(4, 1, k) + pass_at_k(4, 0, k)) / 3
        assert metrics[f"eval/pass@{k}"] == pytest.approx(expected)
    assert metrics["eval/pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert [d["sampled_correct"] for d in details] == [3, 1, 0]
    # batch_size 8 / n_samples 4 = 2 prompts per sampled call
    assert [len(p) for p, n, t in engine.calls if t > 0] == [2, 1]


def test_partial_rewards_count_toward_accuracy_not_pass():
    def half(prompts, completions, records):
        return [0.5 if c == "half" else 1.0 for c in completions]

    engine = ScriptedEngine(greedy={"a": "half", "b": "full"}, sampled={})
    metrics = evaluate_records(engine, None, [{"prompt": "a"}, {"prompt": "b"}], half,
                               chat=False)
    assert metrics == {"eval/accuracy_greedy": 0.75, "eval/pass@1_greedy": 0.5}


def test_ks_for():
    assert ks_for(8) == [1, 2, 4, 8]
    assert ks_for(6) == [1, 2, 4, 6]
    assert ks_for(1) == [1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=16, num_layers=1,
                           num_heads=2, intermediate_size=32, alphabet="0123456789+=\n", seed=0)


def run_config_dict(tiny_dir, tmp_path, **over):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = {
        "loop": "online", "output_dir": str(tmp_path / "run"), "seed": 0, "max_steps": 1,
        "device": "cpu", "model": {"path": str(tiny_dir)},
        "data": {"train_path": str(eval_file), "eval_path": str(eval_file)},
        "reward": {"kind": "verifier", "shuffle": True},
        "eval": {"every": 1, "n": 3, "greedy": True, "sampled": True, "max_new_tokens": 2},
    }
    cfg.update(over)
    return config_from_dict(cfg)


def test_evaluator_from_config_scores_an_eval_file_with_the_unshuffled_reward(tiny_dir, tmp_path):
    from psirl.models.loading import load_policy

    config = run_config_dict(tiny_dir, tmp_path)
    model, tokenizer = load_policy(tiny_dir)
    reward = gold_reward(config, None)
    # The control's shuffle is off for the gold metric: a right answer scores 1 every time.
    assert reward(["p"] * 3, ["2", "4", "6"], RECORDS) == [1.0, 1.0, 1.0]
    evaluate = evaluator_from_config(config, model, tokenizer, None)
    metrics = evaluate(0)
    assert set(metrics) == {"eval/accuracy_greedy", "eval/pass@1_greedy", "eval/accuracy",
                            "eval/pass@1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert evaluate(1) == metrics  # seeded: the same weights give the same numbers


def test_no_gold_metric_for_a_reward_model_on_records_without_answers(tiny_dir, tmp_path):
    from psirl.models.loading import load_policy

    config = run_config_dict(tiny_dir, tmp_path, reward={"kind": "reward_model", "path": "x"})
    model, tokenizer = load_policy(tiny_dir)
    assert evaluator_from_config(config, model, tokenizer, None) is not None  # has answers
    no_answers = tmp_path / "plain.jsonl"
    no_answers.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    config = config.model_copy(update={"data": config.data.model_copy(
        update={"eval_path": str(no_answers)})})
    assert evaluator_from_config(config, model, tokenizer, None) is None


def test_cli_eval_on_a_file_reports_greedy_and_pass_at_k(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from psirl.cli import app

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    details = tmp_path / "details.jsonl"
    result = CliRunner().invoke(app, [
        "eval", str(tiny_dir), "--data", str(data), "--reward", "verifier", "--n-samples", "2",
        "--max-new-tokens", "2", "--out", str(details)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])  # stderr warnings mix into output
    assert {"eval/pass@1_greedy", "eval/pass@1", "eval/pass@2", "eval/n"} <= set(metrics)
    assert metrics["eval/n"] == 3.0
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all("greedy_completion" in r and "sampled_correct" in r for r in rows)
    result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--data", str(data), "--reward",
                                      "judge"])
    assert result.exit_code == 2 and "reward: expected one of" in result.output


def test_best_checkpoint_step_only_counts_saved_steps():
    from psirl.train.evaluation import best_checkpoint_step

    records = [{"step": 0, "eval/accuracy_greedy": 0.2}, {"step": 10, "eval/accuracy_greedy": 0.9},
               {"step": 20, "eval/accuracy_greedy": 0.6}, {"step": 30, "eval/accuracy_greedy": 0.6},
               {"step": 40, "eval/accuracy_greedy": 0.5}]
    # step 10 was best but its checkpoint was pruned: 20 and 30 tie, the earlier wins
    assert best_checkpoint_step(records, [20, 30, 40]) == (20, "eval/accuracy_greedy", 0.6)
    assert best_checkpoint_step(records, [10, 40]) == (10, "eval/accuracy_greedy", 0.9)
    assert best_checkpoint_step(records, [5]) is None
    assert best_checkpoint_step(records, [40], metric="eval/pass@1_greedy") is None
