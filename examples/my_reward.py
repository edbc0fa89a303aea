"""A custom reward for examples/custom_reward.yaml: 1 for the right answer, minus 0.1 per
extra token after it (so the policy learns to stop)."""


def answer_then_stop(prompts, completions, records, tokenizer):
    rewards = []
    for completion, record in zip(completions, records, strict=True):
        answer = record["answer"]
        text = completion.strip()
        if not text.startswith(answer):
            rewards.append(0.0)
            continue
        extra = len(tokenizer(text[len(answer):], add_special_tokens=False)["input_ids"])
        rewards.append(1.0 - 0.1 * extra)
    return rewards
