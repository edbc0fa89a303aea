"""Built-in environments: the calculator's safe evaluation, tool calls, answers, config."""

import pytest

from psirl.envs import build_env_factory, resolve_env_class
from psirl.envs.calculator import CalculatorEnv, safe_eval
from psirl.envs.python_tool import PythonToolEnv
from psirl.rollout.episode import Environment


def test_safe_eval_values():
    assert safe_eval("12+34+56") == 102
    assert safe_eval("(3 - 5) * 4") == -8
    assert safe_eval("7 / 2") == 3.5
    assert safe_eval("6 / 3") == 2 and isinstance(safe_eval("6 / 3"), int)
    assert safe_eval("2 ** 10 % 1000") == 24
    assert safe_eval("-(-3)") == 3


@pytest.mark.parametrize("bad", ["__import__('os')", "x + 1", "(1).real", "2 ** 100",
                                 "10 ** 12 * 10", "1 / 0", "[1, 2]", "'a' * 3", "1 +", "9" * 300])
def test_safe_eval_rejects(bad):
    with pytest.raises(ValueError):
        safe_eval(bad)


def test_calculator_episode_steps():
    env = CalculatorEnv()
    assert isinstance(env, Environment)
    assert env.reset({"prompt": "12+34+56=", "answer": "102"}) == "12+34+56="
    call = env.step("<calc>12+34+56</calc>")
    assert (call.observation, call.done, call.reward) == ("<result>102</result>", False, 0.0)
    assert call.metrics == {"tool_call": 1.0, "tool_ok": 1.0}
    bad = env.step("<calc>12+x")  # a turn cut by the token cap: no close tag, still parsed
    assert bad.observation == "<result>error</result>" and bad.metrics["tool_ok"] == 0.0
    right = env.step("102\nmore text")
    assert (right.done, right.reward) == (True, 1.0)
    assert env.step("103").reward == 0.0
    short = CalculatorEnv(open_tag="[", close_tag="]", result_template="={value}\n",
                          call_bonus=0.1)
    short.reset({"prompt": "1+2=", "answer": "3"})
    assert short.stop == ("]",)
    step = short.step("[1+2]")
    assert (step.observation, step.reward) == ("=3\n", 0.1)


def test_python_tool_runs_in_the_sandbox():
    env = PythonToolEnv()
    env.reset({"prompt": "sum of squares 1..20?", "answer": "2870"})
    out = env.step("<tool>python: print(sum(i*i for i in range(1, 21)))</tool>")
    assert out.observation == "<output>2870</output>" and out.metrics["tool_ok"] == 1.0
    crash = env.step("<tool>python: 1/0</tool>")
    assert crash.metrics["tool_ok"] == 0.0 and not crash.done
    calc = env.step("<tool>calc: 2870 - 70</tool>")
    assert calc.observation == "<output>2800</output>"
    unknown = env.step("<tool>shell: ls</tool>")
    assert "unknown tool 'shell'" in unknown.observation
    assert env.step("2870").reward == 1.0


def test_factories_and_errors():
    make = build_env_factory("calculator", {"open_tag": "["})
    a, b = make(), make()
    assert a is not b and a.open_tag == "["
    assert resolve_env_class("psirl.envs.python_tool:PythonToolEnv") is PythonToolEnv
    with pytest.raises(ValueError, match="env.name"):
        resolve_env_class("nosuchenv")
    with pytest.raises(ValueError, match="no attribute"):
        resolve_env_class("psirl.envs.calculator:Nope")
    with pytest.raises(ValueError, match="env.kwargs"):
        build_env_factory("calculator", {"colour": "red"})
    with pytest.raises(ValueError, match="env.kwargs.tools"):
        build_env_factory("python_tool", {"tools": ["shell"]})


def test_env_config_section(tmp_path):
    from pathlib import Path

    from psirl.train.config import load_config

    example = Path(__file__).resolve().parents[2] / "examples" / "multiturn_calculator.yaml"
    cfg = load_config(example, [f"output_dir={tmp_path}"])
    assert cfg.env.name == "calculator" and cfg.env.max_turns == 3
    assert cfg.env.kwargs["close_tag"] == "]"
    with pytest.raises(Exception, match="env.name|nosuch"):
        load_config(example, [f"output_dir={tmp_path}", "env.name=nosuch"])
    with pytest.raises(Exception, match="max_turns"):
        load_config(example, [f"output_dir={tmp_path}", "env.max_turns=0"])
