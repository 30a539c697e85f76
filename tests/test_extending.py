"""README's "Adding a method" and "Adding a model family" recipes, run as written: their code blocks are read from
README.md, so a recipe that stops working fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import vtc
from vtc import registry
from vtc.tiny import tiny_llava, tiny_llava_inputs

README = Path(__file__).resolve().parents[1] / "README.md"


def recipe(title: str) -> str:
    text = README.read_text()
    start = text.index(f"### {title}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test end with it (the registry's tables are module globals)."""
    for table in ("METHODS", "LAYERWISE_METHODS", "ADAPTERS"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))


def test_adding_a_method_as_the_readme_shows(scratch_registry):
    exec(recipe("Adding a method"), {})
    assert "norm_topk" in vtc.list_methods("pre")
    features = torch.randn(2, 30, 8)
    expected = features.norm(dim=-1).topk(5).indices.sort().values
    assert torch.equal(vtc.select("norm_topk", keep=5, features=features), expected)

    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    projected = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))
    try:
        with torch.no_grad(), vtc.compress(model, "norm_topk", keep=5) as handle:
            model(**inputs)
    finally:
        hook.remove()
    (features,) = projected  # [images, N, D], one image per sample
    for b, kept in enumerate(handle.last_kept):
        assert torch.equal(kept, features[b].norm(dim=-1).topk(5).indices.sort().values)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_adding_a_family_as_the_readme_shows(scratch_registry, method):
    """The recipe's family, on a LLaVA-1.5 model renamed to its model_type, does what vtc's LLaVA adapter does."""
    exec(recipe("Adding a model family"), {})
    assert "my_llava" in vtc.list_models()
    model = tiny_llava()
    inputs = tiny_llava_inputs(model, images_per_sample=(1, 2))
    options = {"layer": 1} if method == "fastv" else {}
    with torch.no_grad(), vtc.compress(model, method, keep=6, **options) as handle:
        expected = model(**inputs).logits
    expected_kept = handle.last_kept
    model.config.model_type = "my_llava"
    with torch.no_grad(), vtc.compress(model, method, keep=6, **options) as handle:
        logits = model(**inputs).logits
    assert type(handle._adapter).__name__ == "MyLlava"
    assert torch.equal(logits, expected)
    assert all(torch.equal(a, b) for a, b in zip(handle.last_kept, expected_kept, strict=True))
    assert [k.numel() for k in handle.last_kept] == [6, 12]


def test_registration_refuses_what_it_cannot_serve(scratch_registry):
    from dataclasses import dataclass

    from vtc.adapters import Adapter

    def scored(name):
        cls = type("Scored", (vtc.ScoredMethod,), {"name": name, "score": lambda self, signals, keep: None})
        return dataclass(cls)

    with pytest.raises(ValueError, match="'none' is reserved"):
        vtc.register(scored("none"))
    with pytest.raises(ValueError, match="a method named 'dart' is already registered"):
        vtc.register(scored("dart"))
    first = vtc.register(scored("mine"))
    assert vtc.register(scored("mine")) is not first  # the same class again (a reload, a re-run cell) replaces it
    with pytest.raises(TypeError, match="takes a vtc.Method or vtc.LayerwiseMethod"):
        vtc.register(int)

    family = {"model_types": {"mine": "Mine"}, "modules": ("vision_tower", "language_model")}
    with pytest.raises(TypeError, match=r"needs layout = one of \['grid', 'anyres', 'merged_grid', 'tiles'\]"):
        vtc.register_family(type("NoLayout", (Adapter,), family))
    with pytest.raises(TypeError, match="needs modules"):
        vtc.register_family(type("NoModules", (Adapter,), {**family, "layout": "grid", "modules": ()}))
    with pytest.raises(ValueError, match=r"model_type\(s\) \['llava'\] already have an adapter"):
        vtc.register_family(type("Again", (Adapter,), {**family, "layout": "grid", "model_types": {"llava": "x"}}))
