"""Bad input to `psirl train` fails with one clear line and a non-zero exit code, never a Python
traceback: malformed YAML, unknown keys, wrong types, empty or malformed data files, and prompts
over the token limits. Each message names the file and the line / key / field at fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from psirl.cli import app

TINY = "{tiny: {hidden_size: 32, num_layers: 1, num_heads: 4, intermediate_size: 32}}"


def sft_yaml(run_dir, data="data: {task: addition, task_kwargs: {digits: 1}}", extra=""):
    return (
        f"loop: sft\noutput_dir: {run_dir}\nmax_steps: 2\ndevice: cpu\n"
        f"model: {TINY}\n{data}\noptim: {{batch_size: 2}}\n{extra}"
    )


def psirl_train(*args: str) -> tuple[str, int]:
    """`psirl train ARGS` through typer's runner: (output, exit code). Asserts the command ended
    through its own error path (SystemExit), i.e. no exception escaped to print a traceback."""
    result = CliRunner().invoke(app, ["train", *args, "--quiet"])
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert "Traceback" not in result.output
    return result.output, result.exit_code


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def write(tmp_path):
    def _write(name: str, text: str):
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


# --------------------------------------------------------------------------- config errors


def test_malformed_yaml_names_file_line_and_column(write, tmp_path):
    cfg = write("cfg.yaml", f"loop: sft\noutput_dir: {tmp_path}/run\nmax_steps: 2: 3\n")
    out, code = psirl_train(str(cfg))
    assert code == 2
    line = one_error_line(out)
    assert line == f"error: {cfg}:3:13: malformed YAML: mapping values are not allowed here"
    assert not (tmp_path / "run").exists()  # nothing is created for a config that does not load


def test_unknown_key_names_the_key_and_suggests_the_right_one(write, tmp_path):
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", extra="optim: {lrr: 0.01}\n").replace(
        "optim: {batch_size: 2}\n", ""))
    out, code = psirl_train(str(cfg))
    assert code == 2
    line = one_error_line(out)
    assert f"{cfg}: optim.lrr: unknown key (did you mean 'lr'?)" in line


def test_wrong_type_in_the_file_and_in_an_override(write, tmp_path):
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", extra="seed: zero\n"))
    out, code = psirl_train(str(cfg))
    assert code == 2
    line = one_error_line(out)
    assert f"{cfg}: seed:" in line and "valid integer" in line and "'zero'" in line

    cfg = write("ok.yaml", sft_yaml(tmp_path / "run"))
    out, code = psirl_train(str(cfg), "optim.lr=fast")
    assert code == 2
    line = one_error_line(out)
    assert f"{cfg} (override 'optim.lr=fast'): optim.lr:" in line and "valid number" in line


def test_missing_config_file_and_missing_run_folder(tmp_path):
    out, code = psirl_train(str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: config file not found" in one_error_line(out)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "no-run")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "no-run: no config.yaml here" in one_error_line(result.output)


# --------------------------------------------------------------------------- data errors


def test_empty_dataset(write, tmp_path):
    data = write("empty.jsonl", "\n\n")
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", f"data: {{train_path: {data}}}"))
    out, code = psirl_train(str(cfg))
    assert code == 2
    assert one_error_line(out) == f"error: {data}: file has no records"


def test_bad_jsonl_line_names_the_line(write, tmp_path):
    good = json.dumps({"prompt": "1+2=", "completion": "3"})
    data = write("bad.jsonl", f"{good}\n{good}\n{{\"prompt\": \"2+2=\", \"completion\": \n")
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", f"data: {{train_path: {data}}}"))
    out, code = psirl_train(str(cfg))
    assert code == 2
    line = one_error_line(out)
    assert f"{data}:3: invalid JSON" in line


def test_missing_field_names_the_line_and_the_field(write, tmp_path):
    data = write("d.jsonl", json.dumps({"prompt": "1+2=", "completion": "3"}) + "\n"
                 + json.dumps({"prompt": "1+2="}) + "\n")
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", f"data: {{train_path: {data}}}"))
    out, code = psirl_train(str(cfg))
    assert code == 2
    line = one_error_line(out)
    assert f"{data}:2" in line and "completion" in line


def test_example_longer_than_sft_max_seq_len(write, tmp_path):
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "11+22=", "completion": "33"}]
    data = write("d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    # "1+2=" + "3" + EOS = 6 tokens fits; "11+22=" + "33" + EOS = 9 does not
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", f"data: {{train_path: {data}}}",
                                     extra="sft: {max_seq_len: 8}\n"))
    out, code = psirl_train(str(cfg))
    assert code == 2
    assert one_error_line(out) == (
        f"error: {data}:2: prompt + completion: 9 tokens (EOS included), more than "
        "sft.max_seq_len=8")


def test_prompt_longer_than_max_prompt_tokens_in_sft(write, tmp_path):
    rows = [{"prompt": "1+2=", "completion": "3"}] * 2 + [{"prompt": "100+200=", "completion": "3"}]
    data = write("d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", f"data: {{train_path: {data}, "
                                     "max_prompt_tokens: 6}"))
    out, code = psirl_train(str(cfg))
    assert code == 2
    assert one_error_line(out) == (
        f"error: {data}:3: field 'prompt': 8 tokens, more than data.max_prompt_tokens=6")


def test_task_example_longer_than_the_limit_names_the_task(write, tmp_path):
    # 2-digit addition: the longest example "99+99=" + "198" + EOS is 10 tokens
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", "data: {task: addition, n_train: 200}",
                                     extra="sft: {max_seq_len: 9}\n"))
    out, code = psirl_train(str(cfg))
    assert code == 2
    line = one_error_line(out)
    assert line.startswith("error: task addition: example ") and "sft.max_seq_len=9" in line


def test_prompt_longer_than_max_prompt_tokens_in_the_online_loop(write, tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "1000+2000=", "answer": "3000"}]
    data = write("p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = (f"loop: online\noutput_dir: {tmp_path / 'run'}\nmax_steps: 1\ndevice: cpu\n"
            f"model: {TINY}\ndata: {{train_path: {data}, max_prompt_tokens: 8}}\n"
            "reward: {kind: verifier}\noptim: {batch_size: 2}\n")
    cfg = write("cfg.yaml", text)
    out, code = psirl_train(str(cfg))
    assert code == 2
    assert one_error_line(out) == (
        f"error: {data}:2: field 'prompt': 10 tokens, more than max_prompt_tokens=8")


def test_a_run_folder_with_checkpoints_is_not_overwritten(write, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "checkpoints" / "step-00000001" / "state.json").write_text('{"step": 1}')
    cfg = write("cfg.yaml", sft_yaml(run))
    out, code = psirl_train(str(cfg))
    assert code == 2
    line = one_error_line(out)
    assert f"output_dir {run} already holds checkpoints" in line and "--resume" in line


# --------------------------------------------------------------------------- the real command


def test_the_installed_command_prints_no_traceback(write, tmp_path):
    """The same path in a real process: rich's pretty traceback would show up on stderr."""
    data = write("bad.jsonl", '{"prompt": "1+2=", "completion": "3"}\nnot json\n')
    cfg = write("cfg.yaml", sft_yaml(tmp_path / "run", f"data: {{train_path: {data}}}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "psirl.cli", "train", str(cfg), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "│" not in proc.stderr
    assert f"error: {data}:2: invalid JSON" in proc.stderr


# --------------------------------------------------------------------------- finding 12: bad input


def test_a_20_mb_prompt_line_is_rejected_before_parsing(tmp_path):
    import time

    from psirl.data.errors import DataError
    from psirl.data.records import MAX_LINE_BYTES, load_records

    data = tmp_path / "p.jsonl"
    with open(data, "w") as fh:
        fh.write(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
        fh.write(json.dumps({"prompt": "x" * (20 << 20), "answer": "3"}) + "\n")
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        load_records(data, kind="prompt")
    assert time.monotonic() - t0 < 5  # was 160 s through JSON parsing and tokenization
    assert str(err.value).startswith(f"{data}:2: line longer than {MAX_LINE_BYTES} bytes")
    # A line of exactly the limit (its newline not counted) is read as usual.
    exact = tmp_path / "exact.jsonl"
    head = '{"prompt": "'
    tail = '", "answer": "3"}'
    exact.write_text(head + "y" * (MAX_LINE_BYTES - len(head) - len(tail)) + tail + "\r\n")
    assert len(load_records(exact, kind="prompt")[0]["prompt"]) == MAX_LINE_BYTES - 29


def test_fewer_prompts_than_batch_size_is_an_error(write, tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)]
    data = write("p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = (f"loop: online\noutput_dir: {tmp_path / 'run'}\nmax_steps: 1\ndevice: cpu\n"
            f"model: {TINY}\ndata: {{train_path: {data}}}\n"
            "reward: {kind: verifier}\noptim: {batch_size: 4}\n")
    out, code = psirl_train(str(write("cfg.yaml", text)))
    assert code == 2
    assert one_error_line(out) == (
        f"error: {data}: 3 prompts, fewer than optim.batch_size=4; each step needs that many "
        "distinct prompts")


def _config_error(overrides):
    from psirl.train.config import ConfigError, config_from_dict

    raw = {"loop": "online", "output_dir": "x", "model": {"tiny": {}},
           "data": {"task": "addition", "n_train": 16}, "optim": {"batch_size": 2}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, overrides)
    return str(err.value)


def test_task_with_fewer_examples_than_batch_size(tmp_path):
    assert _config_error(["data.n_train=1"]).endswith(
        "data.n_train: 1 examples of the task, fewer than optim.batch_size=2; each step needs "
        "that many distinct examples")


def test_more_minibatches_than_rollout_rows_is_an_error():
    # grpo: group_size 8 x batch_size 2 = 16 rows; 17 minibatches used to be clamped to 16
    line = _config_error(["algorithm.knobs={sampling: {group_size: 8, minibatches: 17}}"])
    assert ("algorithm.knobs.sampling.minibatches: 17 minibatches, but a step's rollout has only "
            "16 rows (optim.batch_size=2 x group_size=8); use at most 16") in line


def test_eval_every_without_an_eval_set_names_the_key(tmp_path):
    from psirl.train.config import ConfigError, config_from_dict

    raw = {"loop": "sft", "output_dir": "x", "model": {"tiny": {}},
           "data": {"train_path": str(tmp_path / "d.jsonl")}, "eval": {"every": 5}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).endswith(
        "eval.every: 5, but there is no eval set (neither data.eval_path nor data.task is set); "
        "give one, or set eval.every=0")
    raw["data"]["eval_path"] = str(tmp_path / "e.jsonl")
    assert config_from_dict(raw).eval.every == 5


def test_a_preference_pair_with_chosen_equal_to_rejected_names_the_line(tmp_path):
    from psirl.data.errors import DataError
    from psirl.data.records import load_records

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "chosen": "3", "rejected": "4"}) + "\n"
                    + json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"}) + "\n")
    with pytest.raises(DataError) as err:
        load_records(data, kind="preference")
    assert str(err.value) == (f"{data}:2: fields 'chosen' and 'rejected' are identical; a "
                              "preference pair needs two different completions")


def test_a_weights_file_missing_a_tensor_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from psirl.models.loading import CheckpointError, load_policy
    from psirl.models.tiny import make_tiny_model

    folder = tmp_path / "model"
    make_tiny_model(folder, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=32)
    load_policy(folder)  # complete: loads
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_policy(folder)
    assert str(err.value) == (
        f"{folder}: the weight files have no tensor for model.layers.0.mlp.down_proj.weight "
        "(they would be left randomly initialised); the checkpoint is incomplete or for another "
        "architecture")
