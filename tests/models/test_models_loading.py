"""load_policy / save_policy: safetensors only, clear errors, pad token, plain-transformers roundtrip."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from psirl.models import CheckpointError, load_policy, save_policy


def test_load_policy_returns_eval_model_and_tokenizer(tiny_dir):
    model, tok = load_policy(tiny_dir)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id == 0 and model.config.pad_token_id == 0


def test_load_policy_casts_dtype(tiny_dir):
    model, _ = load_policy(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        load_policy(tiny_dir, dtype="float64")


def test_pickle_only_folder_is_refused_naming_the_file(tmp_path, tiny_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    # never unpickled: the check happens before anything is read
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-real-pickle")
    with pytest.raises(CheckpointError) as err:
        load_policy(folder)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "arbitrary code" in message


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_policy(tmp_path / "empty")


def test_folder_without_weights_is_refused(tmp_path, tiny_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_policy(folder)


def test_pad_token_set_from_eos_when_missing(tmp_path, tiny_dir):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    _, loaded = load_policy(folder)
    assert loaded.pad_token_id == loaded.eos_token_id == 2


def test_save_policy_roundtrip_with_plain_transformers(tmp_path, tiny_dir):
    model, tok = load_policy(tiny_dir)
    with torch.no_grad():  # change the model so the roundtrip is not trivially the input
        model.lm_head.weight.mul_(1.5)
    out = save_policy(model, tok, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 76, 7, 8]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("1+2")["input_ids"] == tok("1+2")["input_ids"]
    assert not list(out.glob("*.bin"))
