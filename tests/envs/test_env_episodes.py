"""run_env_episodes / evaluate_env with a scripted engine: a policy that always uses the
calculator and copies its value succeeds on every problem; one that answers directly does not."""

import torch

from psirl.data.tasks import get_task
from psirl.envs import evaluate_env
from psirl.models.tiny import make_char_tokenizer
from psirl.rollout.batch import RolloutBatch
from psirl.train.config import EnvConfig


class ScriptedEngine:
    """generate_ids that writes a fixed turn chosen from the context text (no model)."""

    def __init__(self, use_tool: bool):
        self.tokenizer = make_char_tokenizer()
        self.pad_token_id = self.tokenizer.pad_token_id
        self.use_tool = use_tool

    def turn(self, context: str) -> str:
        if context.endswith("="):  # the prompt: call the calculator, or guess
            expr = context[:-1]
            return f"[{expr}]" if self.use_tool else "0"
        return context.rsplit("=", 1)[1].strip()  # copy the calculator's value

    def generate_ids(self, prompt_ids, params, **streams):
        tok = self.tokenizer
        turns = [tok(self.turn(tok.decode(ids)), add_special_tokens=False)["input_ids"]
                 + [tok.eos_token_id] for ids in prompt_ids]
        width_p, width_c = max(map(len, prompt_ids)), max(map(len, turns))
        rows = []
        for ids, out in zip(prompt_ids, turns, strict=True):
            rows.append([0] * (width_p - len(ids)) + list(ids) + out + [0] * (width_c - len(out)))
        input_ids = torch.tensor(rows)
        mask = torch.tensor([[0] * (width_p - len(i)) + [1] * (len(i) + len(o)) + [0] * (
            width_c - len(o)) for i, o in zip(prompt_ids, turns, strict=True)])
        cmask = mask[:, width_p:].float()
        b = len(prompt_ids)
        return RolloutBatch(
            input_ids=input_ids, attention_mask=mask, completion_ids=input_ids[:, width_p:],
            completion_mask=cmask, behaviour_logprobs=-0.5 * cmask,
            group_ids=torch.arange(b), prompt_index=torch.arange(b),
            truncated=torch.zeros(b, dtype=torch.bool), prompt_len=width_p,
            prompts=[""] * b, completions=[""] * b,
        )


def test_tool_user_succeeds_and_guesser_fails():
    records = get_task("addition", digits=3).make(6, seed=0)
    config = EnvConfig(name="calculator", max_turns=3,
                       kwargs={"open_tag": "[", "close_tag": "]", "result_template": "={value}\n"})
    tool = evaluate_env(config, ScriptedEngine(True), records, max_new_tokens=12)
    assert tool["eval/env_success"] == 1.0 and tool["eval/env_turns"] == 2.0
    assert tool["eval/env_tool_call"] == 0.5 and tool["eval/env_tool_ok"] == 1.0
    guess = evaluate_env(config, ScriptedEngine(False), records, max_new_tokens=12)
    assert guess["eval/env_success"] == 0.0 and guess["eval/env_turns"] == 1.0


def test_a_call_bonus_is_not_success():
    """With call_bonus the return is positive for every tool call; success counts only the
    final answer's reward."""
    records = get_task("addition", digits=3).make(4, seed=0)
    config = EnvConfig(name="calculator", max_turns=3,
                       kwargs={"open_tag": "[", "close_tag": "]", "result_template": "={value}\n",
                               "call_bonus": 0.5})
    engine = ScriptedEngine(True)
    engine.turn = lambda context: (f"[{context[:-1]}]" if context.endswith("=") else "0")
    out = evaluate_env(config, engine, records, max_new_tokens=12)
    assert out["eval/env_return"] == 0.5 and out["eval/env_success"] == 0.0
    assert out["eval/env_correct"] == 0.0
