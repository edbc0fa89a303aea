"""SFT cold start on tool use: the calculator's oracle episodes, the mix with plain answers
(sft.demonstration_share), the loss mask that keeps observation tokens out of the SFT loss, and
the three-term addition task the demo trains on."""

import pytest
import torch

from psirl.data.tasks import get_task
from psirl.envs import demonstration_examples
from psirl.envs.calculator import CalculatorEnv
from psirl.models import load_policy
from psirl.models.tiny import make_char_tokenizer, make_tiny_model
from psirl.train.config import EnvConfig, config_from_dict
from psirl.train.sft import build_sft, encode_segments
from psirl.train.sft_update import sft_update

BRACKETS = {"open_tag": "[", "close_tag": "]", "result_template": "={value}\n"}


def test_calculator_demonstration_is_the_oracle_episode():
    record = {"prompt": "12+34+56=", "answer": "102"}
    assert CalculatorEnv().demonstration(record) == [
        ("<calc>12+34+56</calc>", True), ("<result>102</result>", False), ("102", True)]
    assert CalculatorEnv(**BRACKETS).demonstration({**record, "expression": "56+46"}) == [
        ("[56+46]", True), ("=102\n", False), ("102", True)]
    with pytest.raises(ValueError, match="not the answer '103'"):
        CalculatorEnv().demonstration({"prompt": "12+34+56=", "answer": "103"})


def test_the_demonstration_replays_as_a_successful_episode():
    """Fed back turn by turn, the model's segments get the environment's segments back and
    the final answer is rewarded: the demonstration is what run_episodes would record."""
    record = get_task("addition", digits=3, terms=3).make(1, seed=0)[0]
    env = CalculatorEnv(**BRACKETS)
    env.reset(record)
    (call, _), (observation, _), (answer, _) = env.demonstration(record)
    assert env.step(call).observation == observation
    last = env.step(answer)
    assert last.done and last.reward == 1.0


def test_demonstration_share_mixes_in_plain_answers():
    records = get_task("addition", digits=3, terms=3).make(4, seed=0)
    config = EnvConfig(name="calculator", kwargs=BRACKETS)
    examples = demonstration_examples(config, records, share=0.5)
    assert [len(e["segments"]) for e in examples] == [3, 3, 1, 1]
    assert examples[3] == {"prompt": records[3]["prompt"],
                           "segments": [(records[3]["answer"], True)]}
    with pytest.raises(ValueError, match="field 'answer'"):
        demonstration_examples(config, [{"prompt": "1+2="}], share=0.0)


def test_an_environment_without_demonstrations_is_refused_by_name():
    config = EnvConfig(name="psirl.envs.calculator:ToolCallEnv")  # reset/step, no demonstration
    with pytest.raises(ValueError, match="env.name: 'psirl.envs.calculator:ToolCallEnv' has no "
                                         "demonstration"):
        demonstration_examples(config, [{"prompt": "p", "answer": "1"}])


def test_python_tool_demonstration_runs_the_tool_and_replays():
    """The python tool's oracle episode: the call really runs in the sandbox, the observation is
    its output, and the episode replays to reward 1; a program whose output is not the answer,
    and a program without the python tool, are refused naming the record."""
    from psirl.envs.python_tool import PythonToolEnv

    env = PythonToolEnv()
    record = {"prompt": "12+34=", "answer": "46"}
    segments = env.demonstration(record)
    assert segments == [("<tool>python: print(12+34)</tool>", True),
                        ("<output>46</output>", False), ("46", True)]
    env.reset(record)
    assert env.step(segments[0][0]).observation == segments[1][0]
    assert env.step(segments[2][0]).reward == 1.0
    program = {"prompt": "Sum of squares 1..20?", "answer": "2870",
               "program": "print(sum(i * i for i in range(1, 21)))"}
    assert env.demonstration(program)[1] == ("<output>2870</output>", False)
    with pytest.raises(ValueError, match="'Sum of squares 1..20\\?'.*not the answer '2871'"):
        env.demonstration({**program, "answer": "2871"})
    assert PythonToolEnv(tools=["calc"]).demonstration(record)[0] == ("<tool>calc: 12+34</tool>",
                                                                        True)
    with pytest.raises(ValueError, match="needs the python tool"):
        PythonToolEnv(tools=["calc"]).demonstration(program)


def test_addition_terms():
    task = get_task("addition", digits=3, terms=3)
    record = task.make(1, seed=0)[0]
    numbers = record["prompt"].removesuffix("=").split("+")
    assert len(numbers) == 3 and str(sum(map(int, numbers))) == record["answer"]
    # terms=2 draws exactly the problems of the two-term task as it was.
    assert get_task("addition", digits=2, terms=2).make(5, seed=3) == \
        get_task("addition", digits=2).make(5, seed=3)
    with pytest.raises(ValueError, match="terms"):
        get_task("addition", terms=1)


def test_encode_segments_masks_the_environment_tokens():
    tokenizer = make_char_tokenizer()
    ids, mask = encode_segments(tokenizer, [("[1+2]", True), ("=3\n", False), ("3", True)])
    assert tokenizer.decode(ids[:-1]) == "[1+2]=3\n3" and ids[-1] == tokenizer.eos_token_id
    assert mask == [1.0] * 5 + [0.0] * 3 + [1.0, 1.0]


def _masked_update(tmp_path, loss_masks):
    torch.manual_seed(0)
    model, tokenizer = load_policy(make_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.0)
    prompts = [tokenizer("1+2=", add_special_tokens=False)["input_ids"]]
    completion, mask = encode_segments(tokenizer, [("[1+2]", True), ("=3\n", False), ("3", True)])
    out = sft_update(model, params, optimizer, None, prompts, [completion],
                     pad_id=tokenizer.pad_token_id,
                     loss_masks=None if loss_masks is None else [mask])
    return out, mask


def test_sft_update_leaves_masked_tokens_out_of_the_loss_and_the_count(tmp_path):
    full, mask = _masked_update(tmp_path, None)
    masked, _ = _masked_update(tmp_path, "mask")
    assert full["tokens"] == len(mask) and masked["tokens"] == sum(mask)
    assert masked["loss"] != pytest.approx(full["loss"])
    with pytest.raises(ValueError, match="loss_masks"):
        sft_update(None, [], None, None, [[1]], [[1, 2]], pad_id=0, loss_masks=[[1.0]])


def test_sft_with_env_trains_on_demonstrations(tmp_path):
    config = config_from_dict({
        "loop": "sft", "output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu",
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                           "intermediate_size": 64}},
        "data": {"task": "addition", "task_kwargs": {"digits": 3, "terms": 3}, "n_train": 8},
        "env": {"name": "calculator", "kwargs": BRACKETS, "max_turns": 3},
        "sft": {"demonstration_share": 0.5},
        "optim": {"batch_size": 4},
        "eval": {"every": 1, "n": 4, "greedy": True, "sampled": True, "max_new_tokens": 16},
    })
    (tmp_path / "run").mkdir()
    spec = build_sft(config, tmp_path / "run")
    metrics = spec.step(0, torch.Generator().manual_seed(0))
    assert metrics["tokens"] > 0
    evaluated = spec.evaluate(1)
    assert {"eval/env_success", "eval/env_success_sampled", "eval/env_turns",
            "eval/env_turns_sampled"} <= set(evaluated)
    raw = config.model_dump()
    with pytest.raises(Exception, match="demonstration_share"):
        config_from_dict({**raw, "sft": {"demonstration_share": 1.5}})
    with pytest.raises(Exception, match="sft.demonstration_share: only the SFT loop with an env"):
        config_from_dict({**raw, "env": None})
