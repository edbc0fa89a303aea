"""Hub ids: "org/name" that is not a local path goes to transformers' download and cache; with
no network (HF_HUB_OFFLINE) the error says so and names the id, instead of "no such folder"."""

import pytest

from psirl.models.loading import CheckpointError, is_hub_id, load_policy


def test_hub_id_detection(tmp_path):
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("runs/x/final/model")  # nested path
    assert not is_hub_id("./final")
    assert not is_hub_id(str(tmp_path))  # absolute path
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert not is_hub_id("org/name")  # exists locally: a folder, not a hub id
    finally:
        os.chdir(cwd)


def test_offline_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import: set its constant too, so no request
    # (and no network timeout) is attempted.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    with pytest.raises(CheckpointError) as err:
        load_policy("psirl-test-org/no-such-model")
    message = str(err.value)
    assert message.startswith("psirl-test-org/no-such-model: no such local folder")
    assert "HF_HUB_OFFLINE is set" in message and "psirl import" in message
