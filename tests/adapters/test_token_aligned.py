"""Arguments of the language model with a token axis: shortened with the tokens when the family declares them,
refused when it does not (keeping their full length would misalign them with the tokens)."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.llm.prefill import drop
from vtc.tiny import tiny_llava, tiny_llava_inputs


def test_a_declared_token_aligned_argument_is_shortened_with_the_tokens():
    embeds = torch.randn(2, 5, 3)
    extra = torch.arange(2 * 5 * 4, dtype=torch.float32).view(2, 5, 4)
    flags = torch.ones(2, 5, dtype=torch.bool)
    keep = torch.tensor([[True, False, True, True, False], [True, True, True, True, False]])
    kwargs = {"inputs_embeds": embeds, "extra": extra, "flags": flags}
    out, dropped = drop(kwargs, embeds, keep, token_aligned=("extra", "flags"))
    # Row 0 keeps 3 tokens, row 1 keeps 4: row 0 is left-padded by one.
    assert out["extra"].shape == (2, 4, 4) and out["flags"].shape == (2, 4)
    assert torch.equal(out["extra"][0, 1:], extra[0, [0, 2, 3]]) and not out["extra"][0, 0].any()
    assert torch.equal(out["extra"][1], extra[1, :4])
    assert out["flags"].tolist() == [[False, True, True, True], [True, True, True, True]]
    assert torch.equal(out["inputs_embeds"][1], embeds[1, :4])
    assert dropped.source.tolist() == [[-1, 0, 2, 3], [0, 1, 2, 3]]


def test_an_undeclared_token_aligned_argument_is_refused():
    embeds = torch.randn(1, 4, 3)
    keep = torch.tensor([[True, False, True, True]])
    with pytest.raises(ValueError, match=r"argument 'visual_pos_masks' has a token axis \(1, 4\)"):
        drop({"inputs_embeds": embeds, "visual_pos_masks": torch.ones(1, 4, dtype=torch.bool)}, embeds, keep)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_the_model_refuses_an_undeclared_token_aligned_argument(method):
    """E.g. Qwen3-VL's visual_pos_masks reaching an adapter that does not shorten it: a clear error, not a
    language model that reads a mask of the wrong length."""
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    language = model.model.language_model if method == "divprune" else model.model.language_model.layers[1]

    def add_mask(module, args, kwargs):
        hidden = kwargs.get("inputs_embeds", kwargs.get("hidden_states", args[0] if args else None))
        return args, {**kwargs, "visual_pos_masks": torch.ones(hidden.shape[:2], dtype=torch.bool)}

    with vtc.compress(model, method, keep=4, **({"layer": 1} if method == "fastv" else {})):
        extra = language.register_forward_pre_hook(add_mask, with_kwargs=True, prepend=True)
        try:
            with pytest.raises(ValueError, match="'visual_pos_masks' has a token axis"):
                model(**inputs)
        finally:
            extra.remove()
