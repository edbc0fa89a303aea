"""Multi-turn episodes are token-exact, and environment tokens never reach the loss.

The tokenizer here is built so that decode-then-encode changes ids: "a" and "b" are tokens, and
so is the merge "ab". A model that samples "a" then "b" (two ids) decodes to "ab", which
re-encodes to ONE id; an episode rebuilt from text would train on tokens nobody sampled.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from psirl.algorithms import resolve_preset
from psirl.core.aggregate import step_normaliser
from psirl.core.objective import policy_loss
from psirl.models.backbone import completion_hidden_states, split_backbone_and_head
from psirl.models.logprobs import token_logprobs
from psirl.models.tiny import CHAT_TEMPLATE, char_vocab, make_char_tokenizer
from psirl.rollout.batch import SamplingParams
from psirl.rollout.episode import EnvStep, ObservationEncoder, run_episodes
from psirl.rollout.hf_engine import HFEngine


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over "abc" with the merge a+b -> "ab" (id 7): decode(encode) round-trips
    text, but encode(decode([a, b])) = [ab] != [a, b]."""
    vocab = dict(char_vocab("abc"))
    vocab["ab"] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", padding_side="left",
    )


@pytest.fixture(scope="module")
def merge_policy():
    tokenizer = merging_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.config._attn_implementation = "sdpa"
    return model.eval(), tokenizer


class EchoEnv:
    """Deterministic: answers every turn with "ab" + "c" * turn (tokenised once: [ab, c, ...]),
    rewards 0.25 per turn and 1 when it ends after ``turns`` turns."""

    def __init__(self, turns: int = 3):
        self.turns, self.seen = turns, 0

    def reset(self, record):
        return record["prompt"]

    def step(self, turn):
        self.seen += 1
        if self.seen == self.turns:
            return EnvStep(reward=1.0, done=True, metrics={"tool_call": 0.0})
        return EnvStep(observation="ab" + "c" * self.seen, reward=0.25,
                       metrics={"tool_call": 1.0})


class SpyEngine:
    """Records what each turn was asked to continue and what the engine sampled."""

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.pad_token_id = engine.pad_token_id
        self.calls = []

    def encode_prompts(self, prompts):
        return self.engine.encode_prompts(prompts)

    def generate_ids(self, prompt_ids, params, **streams):
        out = self.engine.generate_ids(prompt_ids, params, **streams)
        lengths = out.completion_mask.sum(1).long().tolist()
        sampled = [row[:n] for row, n in zip(out.completion_ids.tolist(), lengths, strict=True)]
        self.calls.append(([list(p) for p in prompt_ids], sampled,
                           [row[:n] for row, n in zip(out.behaviour_logprobs.tolist(), lengths,
                                                      strict=True)]))
        return out


def run_echo(model, tokenizer, *, n=3, seed=0, max_new_tokens=5, budget=None):
    spy = SpyEngine(HFEngine(model, tokenizer))
    records = [{"prompt": "abc"}, {"prompt": "cab"}]
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=n, seed=seed)
    episodes = run_episodes(spy, lambda: EchoEnv(3), records, params, max_turns=4,
                            max_episode_tokens=budget)
    return spy, episodes


def test_loss_sees_exactly_the_sampled_ids_across_turns(merge_policy):
    model, tokenizer = merge_policy
    spy, ep = run_echo(model, tokenizer)
    batch = ep.batch
    assert len(spy.calls) == 3  # EchoEnv ends every episode after its third model turn
    p = batch.prompt_len
    rows_changed_by_retokenising = 0
    for row in range(len(batch)):
        ids = batch.completion_ids[row].tolist()
        mask = batch.completion_mask[row].tolist()
        spans = ep.model_turn_spans[row]
        assert len(spans) == 3
        for turn, (start, end) in enumerate(spans):
            _, sampled, logps = spy.calls[turn]
            # Every episode is live in every turn here, so row order is kept.
            assert ids[start:end] == sampled[row]
            assert mask[start:end] == [1.0] * (end - start)
            assert batch.behaviour_logprobs[row, start:end].tolist() == pytest.approx(logps[row])
            if turn < 2:  # the observation follows, tokenised once: "ab" is ONE id
                obs = ids[end : spans[turn + 1][0]]
                assert obs == tokenizer("ab" + "c" * (turn + 1), add_special_tokens=False)[
                    "input_ids"]
                assert obs[0] == 7 and mask[end : spans[turn + 1][0]] == [0.0] * len(obs)
            # The next turn continued from exactly the ids so far (no text round trip).
            if turn < 2:
                context = spy.calls[turn + 1][0][row]
                prompt_ids = batch.input_ids[row, :p][batch.attention_mask[row, :p] > 0].tolist()
                assert context == prompt_ids + ids[: spans[turn + 1][0]]
        length = int(batch.attention_mask[row, p:].sum())
        text = tokenizer.decode(ids[:length])
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids[:length]:
            rows_changed_by_retokenising += 1
    # The test has teeth: text round trips would have changed the ids of some episodes.
    assert rows_changed_by_retokenising > 0
    # The loss's log-probs of those ids, from one forward over the whole episode, are the
    # engine's behaviour log-probs.
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_len)
    m = batch.completion_mask > 0
    assert torch.allclose(logp[m], batch.behaviour_logprobs[m], atol=1e-5)


def test_rewards_turns_and_metrics(merge_policy):
    model, tokenizer = merge_policy
    _, ep = run_echo(model, tokenizer)
    for row, spans in enumerate(ep.model_turn_spans):
        expected = torch.zeros(ep.batch.completion_len)
        for reward, (_, end) in zip((0.25, 0.25, 1.0), spans, strict=True):
            expected[end - 1] += reward
        assert torch.equal(ep.token_rewards[row], expected)
    assert ep.rewards.tolist() == [1.5] * 6
    assert ep.turns.tolist() == [3] * 6
    assert not ep.batch.truncated.any()
    assert ep.batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert ep.metrics["episode/turns_mean"] == 3.0
    assert ep.metrics["env/tool_call"] == pytest.approx(4 / 6)  # 2 of 3 steps per episode
    assert ep.metrics["episode/done_frac"] == 1.0
    env_tokens = 1 + 1 + 1 + 2  # [ab, c] then [ab, c, c]
    assert ep.metrics["episode/env_tokens_mean"] == env_tokens


def test_token_budget_ends_episodes_and_is_respected(merge_policy):
    model, tokenizer = merge_policy
    _, ep = run_echo(model, tokenizer, max_new_tokens=4, budget=7)
    lengths = ep.batch.attention_mask[:, ep.batch.prompt_len :].sum(1)
    assert int(lengths.max()) <= 7
    # Three turns need at least 3 model tokens + 5 env tokens = 8 > 7: no episode is done.
    assert ep.batch.truncated.all() and ep.metrics["episode/done_frac"] == 0.0


def test_one_turn_episode_is_plain_generation(merge_policy):
    model, tokenizer = merge_policy
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=1, seed=3)
    prompts = ["abc", "cab", "a"]
    plain = engine.generate(prompts, params)
    ep = run_episodes(engine, lambda: EchoEnv(3), [{"prompt": p} for p in prompts], params,
                      max_turns=1)
    t = plain.completion_len
    assert torch.equal(ep.batch.completion_ids[:, :t], plain.completion_ids)
    assert torch.equal(ep.batch.completion_mask[:, :t], plain.completion_mask)
    assert torch.equal(ep.batch.input_ids[:, :ep.batch.prompt_len], plain.input_ids[:, :plain.prompt_len])


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "ppo", "rloo"])
def test_environment_tokens_get_exactly_zero_gradient(merge_policy, preset):
    """d loss / d logp is exactly 0 on environment tokens in every aggregation mode, the
    normaliser counts model tokens only, and the model's gradient is bitwise the one of a loss
    whose environment-token log-probs are cut from the graph."""
    model, tokenizer = merge_policy
    _, ep = run_echo(model, tokenizer, seed=1)
    batch = ep.batch
    env = (batch.attention_mask[:, batch.prompt_len :] > 0) & (batch.completion_mask == 0)
    assert env.any()
    knobs = resolve_preset(preset).loss
    mask = batch.completion_mask
    for aggregation in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"):
        loss_knobs = type(knobs)(**{**knobs.__dict__, "aggregation": aggregation,
                                    "constant_normaliser": 8.0, "kl_placement": "loss", "kl_estimator": "k3",
                                    "kl_coef": 0.1, "entropy_coef": 0.01})
        normaliser = step_normaliser(mask, aggregation, 8.0)
        if aggregation == "token_mean":
            assert normaliser == float(mask.sum()) < float(env.sum() + mask.sum())
        adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
        model.zero_grad()
        logp, entropy = token_logprobs(model, batch.input_ids, batch.attention_mask,
                                       batch.completion_len, with_entropy=True)
        logp.retain_grad()
        ref = batch.behaviour_logprobs - 0.1
        loss, _ = policy_loss(logp, batch.behaviour_logprobs, adv, mask, loss_knobs, normaliser,
                              ref_logp=ref, entropy=entropy, kl_coef=0.1)
        loss.backward()
        assert logp.grad[env].abs().max() == 0.0
        assert logp.grad[mask > 0].abs().max() > 0.0
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        logp2, entropy2 = token_logprobs(model, batch.input_ids, batch.attention_mask,
                                         batch.completion_len, with_entropy=True)
        cut = torch.where(env, logp2.detach(), logp2)
        cut_entropy = torch.where(env, entropy2.detach(), entropy2)
        loss2, _ = policy_loss(cut, batch.behaviour_logprobs, adv, mask, loss_knobs, normaliser,
                               ref_logp=ref, entropy=cut_entropy, kl_coef=0.1)
        loss2.backward()
        for g, p in zip(grads, model.parameters(), strict=True):
            assert torch.equal(g, p.grad)


def test_every_backbone_layout_reads_environment_tokens(merge_policy):
    """plain, packed and kv_cache passes give the same hidden states on episodes (environment
    tokens are attended, so the layouts feed them like completion tokens)."""
    model, tokenizer = merge_policy
    _, ep = run_echo(model, tokenizer, seed=2)
    batch = ep.batch
    decoder, _ = split_backbone_and_head(model)
    with torch.no_grad():
        states = {
            layout: completion_hidden_states(decoder, batch.input_ids, batch.attention_mask,
                                             batch.completion_len, layout=layout)
            for layout in ("plain", "packed", "kv_cache")
        }
    live = batch.attention_mask[:, batch.prompt_len :] > 0
    for layout in ("packed", "kv_cache"):
        assert torch.allclose(states[layout][live], states["plain"][live], atol=1e-5), layout


def test_observation_turn_markers_from_the_chat_template():
    tokenizer = make_char_tokenizer()
    assert tokenizer.chat_template == CHAT_TEMPLATE
    encoder = ObservationEncoder(tokenizer, role="user")
    # "assistant: <turn>\n" then "user: <obs>\n" then the generation prompt "assistant: ".
    assert encoder.text("42", "12</s>") == "\nuser: 42\nassistant: "
    assert encoder.text("42", "12\n") == "user: 42\nassistant: "
    ids = encoder.encode("42", "12</s>")
    assert ids == tokenizer("\nuser: 42\nassistant: ", add_special_tokens=False)["input_ids"]
    assert encoder.encode([5, 6], "x") == [5, 6]
    plain = ObservationEncoder(tokenizer, chat=False)
    assert plain.text("42", "12</s>") == "42"

    im = make_char_tokenizer()
    im.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    qwen_like = ObservationEncoder(im, role="tool")
    # The model sampled its end-of-turn marker: only the newline after it is added.
    assert qwen_like.text("7", "x<|im_end|>") == "\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n"
    # A turn cut by a stop string is closed by the environment.
    assert qwen_like.text("7", "</tool>").startswith("<|im_end|>\n<|im_start|>tool\n7")


def test_bad_inputs_name_the_setting(merge_policy):
    model, tokenizer = merge_policy
    params = SamplingParams(max_new_tokens=2)

    class NoIds:
        tokenizer = merging_tokenizer()

    with pytest.raises(TypeError, match="generate_ids"):
        run_episodes(NoIds(), lambda: EchoEnv(), [{"prompt": "a"}], params)
    with pytest.raises(ValueError, match="max_turns"):
        run_episodes(HFEngine(model, tokenizer), lambda: EchoEnv(), [{"prompt": "a"}], params,
                     max_turns=0)

    class BadEnv(EchoEnv):
        def step(self, turn):
            return 1.0

    with pytest.raises(TypeError, match="BadEnv.step returned float"):
        run_episodes(HFEngine(model, tokenizer), lambda: BadEnv(), [{"prompt": "a"}], params)


def test_token_rewards_follow_rows_through_select_and_cat(merge_policy):
    model, tokenizer = merge_policy
    _, ep = run_echo(model, tokenizer, seed=4)
    batch = ep.batch
    assert batch.token_rewards is ep.token_rewards
    picked = batch.select([5, 0])
    assert torch.equal(picked.token_rewards, batch.token_rewards[[5, 0]])
    plain = HFEngine(model, tokenizer).generate(["abc"], SamplingParams(max_new_tokens=2, seed=0))
    both = type(batch).cat([picked, plain])
    assert torch.equal(both.token_rewards[:2, : batch.completion_len], picked.token_rewards)
    assert both.token_rewards[2:].abs().sum() == 0
    assert plain.token_rewards is None and plain.to("cpu").token_rewards is None
    with pytest.raises(ValueError, match="token_rewards"):
        type(batch)(**{**batch.__dict__, "token_rewards": torch.zeros(1, 1)})
