"""Tiny models built once per test session (nothing is downloaded)."""

import pytest

from psirl.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A Qwen2-style tiny model folder with peaked (not near-uniform) next-token distributions."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_llama"), arch="llama", initializer_range=0.2
    )
