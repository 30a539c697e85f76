"""Fixtures for the demo tests: random-weight checkpoints of the shipped organisms' architectures, saved like the
organisms (weights, tokenizer, processor, chat template), so the demo loads them through vtc.loading offline."""

from __future__ import annotations

import pytest
import torch

from training import build


def make_organism(directory, family: str, seed: int = 0) -> str:
    """An untrained organism checkpoint in ``directory``. Special tokens get zero logits, so greedy answers are
    scene words that depend on the input (like vtc.tiny's models) rather than an immediate end of turn."""
    tokenizer = build.tokenizer(family)
    model = build.model(family, len(tokenizer), seed=seed)
    special = len(build.SPECIAL) + len(build.LLAVA_SPECIAL if family == "llava" else build.QWEN_SPECIAL)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # an untrained model's logits are near-ties; spread them
        model.lm_head.weight[:special] = 0
    model.save_pretrained(directory)
    build.save_processor(family, directory)
    return str(directory)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> str:
    return make_organism(tmp_path_factory.mktemp("organism-llava"), "llava")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> str:
    return make_organism(tmp_path_factory.mktemp("organism-qwen2vl"), "qwen2vl")
