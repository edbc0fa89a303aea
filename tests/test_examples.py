"""Every YAML in examples/ runs with `psirl train` and the max_steps= / output_dir= overrides."""

from __future__ import annotations

import json
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from psirl.track.metrics import read_metrics
from psirl.train import run_config
from psirl.train.config import load_config

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def test_there_is_one_example_per_preset():
    from psirl.algorithms import PRESETS

    assert {p.stem for p in EXAMPLES} >= set(PRESETS)


def test_there_is_an_example_per_loop_and_reward_kind():
    import yaml

    from psirl.train.config import TrainConfig

    configs = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    loops = {c["loop"] for c in configs}
    assert loops == set(typing.get_args(TrainConfig.model_fields["loop"].annotation))

    def kinds(reward):
        yield reward.get("kind", "task")
        for comp in reward.get("components", []):
            yield from kinds(comp["reward"])

    reward_kinds = {k for c in configs for k in kinds(c.get("reward", {}))}
    assert reward_kinds >= {"task", "code", "judge", "reward_model", "python", "length", "weighted"}
    losses = {c["preference"]["loss"] for c in configs if c["loop"] == "preference"}
    assert losses == {"dpo", "ipo", "kto", "simpo", "orpo"}
    methods = {c["self_training"]["method"] for c in configs if c["loop"] == "self_training"}
    assert methods == {"star", "rest", "raft"}


@pytest.fixture(scope="module")
def judge_url():
    """A local OpenAI-compatible endpoint whose judge always answers "Score: 7"."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                           "content": "Score: 7"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


SHRINK = ["max_steps=1", "eval.every=0", "device=cpu", "model.tiny.hidden_size=32",
          "model.tiny.num_layers=1", "model.tiny.intermediate_size=64", "optim.batch_size=2"]


def _run(path: Path, out: Path, extra: list[str] = ()) -> Path:
    cfg = load_config(path, [f"output_dir={out}", *SHRINK, *extra])
    return run_config(cfg, quiet=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_one_step(path, tmp_path, monkeypatch, request):
    # Shrink only what costs time here; the example's algorithm and task are used as written.
    extra: list[str] = []
    if path.stem == "judge_grpo":
        extra.append(f"reward.base_url={request.getfixturevalue('judge_url')}")
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    if path.stem == "ppo_reward_model":  # its reward model comes from the reward_model example
        rm = _run(EXAMPLES_DIR / "reward_model.yaml", tmp_path / "rm")
        extra.append(f"reward.path={rm / 'final'}")
    if path.stem == "custom_reward":
        monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    if path.stem == "code_grpo":
        extra.append(f"data.train_path={EXAMPLES_DIR / 'data' / 'code_prompts.jsonl'}")
    run_dir = _run(path, tmp_path / path.stem, extra)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1]
    assert (run_dir / "final" / "config.json").exists()
