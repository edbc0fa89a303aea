"""Tiny models for the rollout tests (built once per session, nothing downloaded)."""

import pytest

from psirl.models import load_policy
from psirl.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def policy(tmp_path_factory):
    """(model, tokenizer): Qwen2-style, 260-token character vocabulary, peaked distributions."""
    return load_policy(
        make_tiny_model(tmp_path_factory.mktemp("rollout_qwen2"), initializer_range=0.2)
    )


@pytest.fixture(scope="session")
def ab_policy(tmp_path_factory):
    """(model, tokenizer) over the alphabet "ab": 6 tokens (<pad> <s> </s> <unk> a b), so EOS and
    short stop strings come up within a few steps of sampling."""
    folder = make_tiny_model(
        tmp_path_factory.mktemp("rollout_ab"), alphabet="ab", initializer_range=0.05
    )
    return load_policy(folder)
