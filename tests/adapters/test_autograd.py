"""Gradients through a compressed forward: every method keeps the graph to the parameters before its drop.

A choice of tokens has no gradient, but the tokens that go on carry theirs: the vision tower, the projector and the
language-model layers before an in-LLM drop get gradients through the survivors (an interpretability probe or a
saliency map over a compressed model relies on it). Keeping every token must give the plain model's gradients.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import vtc
from vtc.tiny import tiny_llava, tiny_llava_inputs

OPTIONS = {"dart": {"merge": True}}  # merging averages tokens: its gradient flows to every merged token


@pytest.fixture(scope="module")
def llava():
    model = tiny_llava(image_size=112, text_layers=4)
    return model, tiny_llava_inputs(model, images_per_sample=(1, 2), seed=3)


def gradients(model, batch) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(**batch).logits[:, -1].pow(2).sum().backward()
    return {name: parameter.grad for name, parameter in model.named_parameters()}


@pytest.fixture(scope="module")
def plain(llava):
    return gradients(*llava)


@pytest.mark.parametrize("method", vtc.list_methods(images=True))
def test_keeping_every_token_gives_the_plain_gradients(llava, plain, method):
    model, batch = llava
    with vtc.compress(model, method, ratio=1.0, **OPTIONS.get(method, {})):
        compressed = gradients(model, batch)
    assert compressed.keys() == plain.keys()
    for name, grad in plain.items():
        assert (grad is None) == (compressed[name] is None), name
        if grad is not None:
            assert torch.allclose(compressed[name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("method", vtc.list_methods(images=True))
def test_every_parameter_before_the_drop_still_gets_a_gradient(llava, plain, method):
    model, batch = llava
    with vtc.compress(model, method, keep=8, **OPTIONS.get(method, {})) as handle:
        compressed = gradients(model, batch)
    after = handle.stats["visual_tokens_after"]
    assert after == [8, 16] or (method == "adaptive" and 8 <= after[0] < 64 and 16 <= after[1] < 128)
    reached = {name for name, grad in compressed.items() if grad is not None and bool(grad.abs().sum() > 0)}
    expected = {name for name, grad in plain.items() if grad is not None and bool(grad.abs().sum() > 0)}
    assert expected - reached == set()
    assert any(name.startswith("model.vision_tower.") for name in reached)
    assert all(bool(torch.isfinite(grad).all()) for grad in compressed.values() if grad is not None)


def test_no_grad_forward_builds_no_graph(llava):
    model, batch = llava
    with vtc.compress(model, ["dart", "fastv"], keep=[32, 8]), torch.no_grad():
        assert not model(**batch).logits.requires_grad


@pytest.mark.parametrize("method", ["divprune", "fastv", ["dart", "pdrop"]])
def test_gradient_checkpointing_gives_the_same_gradients_or_is_refused(method):
    """transformers 5 checkpoints a layer's forward, outside vtc's hooks: the same gradients as without. 4.x
    recomputes the whole call, hooks included, after the prefill: refused for in-LLM methods before any layer runs."""
    model = tiny_llava(image_size=112, text_layers=4)
    batch = tiny_llava_inputs(model, images_per_sample=(1, 2), seed=3)
    keep = [32, 8] if isinstance(method, list) else 8
    with vtc.compress(model, method, keep=keep):
        expected = gradients(model, batch)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "divprune" and int(transformers.__version__.split(".")[0]) < 5:
            with pytest.raises(ValueError, match="cannot run under gradient checkpointing on transformers 4"):
                gradients(model, batch)
            with torch.no_grad():  # inference needs no recompute
                model(**batch)
            return
        checkpointed = gradients(model, batch)
    for name, grad in expected.items():
        assert (grad is None) == (checkpointed[name] is None), name
        if grad is not None:
            assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7), name
