"""Auxiliary open_clip CLIP: hook-recomputed [CLS] attention vs eager weights, resampling, Qwen2-VL patch
inversion, and every error path.

The tests that need only a tower run on two towers: ``tests/open_clip_layout.py``'s stand-in (torch only, so they
run everywhere, CI included) and a tiny random open_clip ViT built from a config (no downloads).
``test_stand_in_matches_open_clip`` proves the stand-in faithful where open_clip is importable. The tests of
open_clip itself (model names, tags, checkpoints, ResNet / CoCa towers) are skipped where it is not.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.open_clip_layout import ResidualAttentionBlock, VisionTransformer, eager_attention
from vtc.aux_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AuxiliaryCLIP, images_from_qwen_patches

try:
    import open_clip
except (ImportError, RuntimeError, OSError) as err:  # RuntimeError / OSError: a torchvision built for another torch
    open_clip = None
    _WHY = f"{type(err).__name__}: {err}"
else:
    _WHY = ""

needs_open_clip = pytest.mark.skipif(open_clip is None, reason=f"open_clip not importable ({_WHY})")

TINY_NAME = "vtc-tiny-vit-test"
VISION = {"width": 64, "layers": 3, "head_width": 16, "patch_size": 8, "image_size": [32, 48]}  # grid 4 x 6
TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
STAND_IN = {"image_size": (32, 48), "patch_size": 8, "width": 64, "layers": 3, "heads": 4, "output_dim": 32}  # VISION


def tiny_clip(**vision) -> nn.Module:
    """A random 3-block open_clip ViT (grid 4 x 6) with non-zero attention biases and peaky attention."""
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(**{**VISION, **vision}),
        text_cfg=open_clip.model.CLIPTextCfg(**TEXT),
    ).eval()
    with torch.no_grad():
        for block in getattr(getattr(model.visual, "transformer", None), "resblocks", []):
            if isinstance(block.attn, nn.MultiheadAttention):
                block.attn.in_proj_weight.mul_(3.0)  # xavier init gives near-uniform attention
                block.attn.in_proj_bias.normal_(0.0, 0.5)  # zero by default: the bias path would go untested
    return model


@pytest.fixture(params=["stand-in", pytest.param("open_clip", marks=needs_open_clip)])
def tower(request) -> nn.Module:
    """A fresh random 3-block ViT visual tower with grid 4 x 6: the torch-only stand-in, or open_clip's own."""
    return VisionTransformer(**STAND_IN) if request.param == "stand-in" else tiny_clip().visual


def normalise(images: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def attn_pre_hooks(visual: nn.Module) -> list[int]:
    return [len(block.attn._forward_pre_hooks) for block in visual.transformer.resblocks]


@pytest.fixture(scope="module")
def registered_name(tmp_path_factory):
    if open_clip is None:
        pytest.skip(f"open_clip not importable ({_WHY})")
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_NAME}.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": VISION, "text_cfg": TEXT}))
    open_clip.add_model_config(path)
    return TINY_NAME


# -- the stand-in ------------------------------------------------------------------------------------------


@needs_open_clip
def test_stand_in_matches_open_clip():
    """Same modules, same state-dict keys and shapes; with the same weights, the same output and the same maps."""
    ours = VisionTransformer(**STAND_IN, seed=1)
    theirs = tiny_clip().visual
    assert [name for name, _ in ours.named_modules()] == [name for name, _ in theirs.named_modules()]
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    theirs.load_state_dict(ours.state_dict())  # strict: every key on both sides
    for attr in ("image_size", "patch_size", "grid_size"):
        assert tuple(getattr(ours, attr)) == tuple(getattr(theirs, attr))
    assert (ours.output_dim, ours.pool_type, ours.attn_pool) == (theirs.output_dim, theirs.pool_type, theirs.attn_pool)
    assert ours.transformer.batch_first == theirs.transformer.batch_first
    for a, b in zip(ours.transformer.resblocks, theirs.transformer.resblocks, strict=True):
        assert type(a.attn) is type(b.attn) is nn.MultiheadAttention
        assert (a.attn.num_heads, a.attn.batch_first) == (b.attn.num_heads, b.attn.batch_first)
        assert type(a.mlp.gelu) is type(b.mlp.gelu)
    ours.eval()
    pixels = normalise(torch.rand(3, 3, 32, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), theirs(pixels), atol=1e-6, rtol=0)
        reference, pooled = eager_attention(theirs, pixels)
        torch.testing.assert_close(pooled, theirs(pixels), atol=1e-5, rtol=0)
        for mine, expected in zip(eager_attention(ours, pixels)[0], reference, strict=True):
            torch.testing.assert_close(mine, expected, atol=1e-6, rtol=0)
    images = [torch.rand(3, 32, 48), torch.rand(3, 50, 20)]
    maps = AuxiliaryCLIP(ours).cls_attention(images)
    torch.testing.assert_close(maps, AuxiliaryCLIP(theirs).cls_attention(images), atol=1e-6, rtol=0)
    assert maps.std() > 0.01
    assert (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def test_stand_in_init_is_seeded_and_not_degenerate():
    torch.manual_seed(123)
    a = VisionTransformer(**STAND_IN, seed=4)
    b = VisionTransformer(**STAND_IN, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.proj, VisionTransformer(**STAND_IN, seed=5).proj)
    for block in a.transformer.resblocks:
        assert block.attn.in_proj_bias.abs().min() > 0 and block.attn.out_proj.bias.abs().min() > 0
        assert not torch.equal(block.ln_1.weight, torch.ones(64))


# -- cls_attention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [None, 1, [0], [-1, 0, 2]], ids=["all", "int", "first", "unordered"])
def test_cls_attention_equals_eager_weights(tower, layers):
    aux = AuxiliaryCLIP.create(tower)
    images = torch.rand(2, 3, 32, 48)  # already the tower's size: no resize on either side
    maps = aux.cls_attention(images, layers=layers)
    weights, pooled = eager_attention(tower, normalise(images))
    with torch.no_grad():
        torch.testing.assert_close(pooled, tower(normalise(images)), atol=1e-5, rtol=0)  # the reference is faithful
    wanted = [0, 1, 2] if layers is None else [layers] if isinstance(layers, int) else [i % 3 for i in layers]
    assert maps.shape == (2, len(wanted), 4, 6) and maps.dtype == torch.float32
    for v, layer in enumerate(wanted):
        row = weights[layer][:, 0]  # [B, 1 + 24]: the [CLS] query over [CLS] + patches
        torch.testing.assert_close(maps[:, v].flatten(1), row[:, 1:], atol=1e-5, rtol=0)
        total = maps[:, v].sum(dim=(-2, -1))
        assert (total < 1).all()
        torch.testing.assert_close(row[:, 0] + total, torch.ones(2), atol=1e-5, rtol=0)
    assert maps.std() > 0.01  # peaky enough that the comparison means something


def test_sequence_first_layout(tower):
    """Older open_clip releases ran the blocks on [L, B, D] with batch_first=False attention: same maps."""
    images = torch.rand(2, 3, 32, 48)
    expected = AuxiliaryCLIP.create(tower).cls_attention(images)
    lnd = copy.deepcopy(tower)
    lnd.transformer.batch_first = False
    for block in lnd.transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad():
        torch.testing.assert_close(lnd(normalise(images)), tower(normalise(images)))
    torch.testing.assert_close(AuxiliaryCLIP.create(lnd).cls_attention(images), expected, atol=1e-6, rtol=0)


def test_resizes_whole_image_and_uses_tower_normalisation(tower):
    aux = AuxiliaryCLIP.create(tower)
    assert (aux.mean, aux.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    big, small = torch.rand(1, 3, 70, 50), torch.rand(1, 3, 20, 90)
    as_list = aux.cls_attention([big[0], small[0]])
    for image, maps in zip((big, small), as_list, strict=True):
        # the whole image, aspect distorted, bilinear with antialiasing: no crop
        resized = F.interpolate(image, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(maps, aux.cls_attention(resized)[0])
        torch.testing.assert_close(maps, aux.cls_attention(image)[0])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    tower.preprocess_cfg = {"mean": mean, "std": std, "size": (32, 48)}  # what open_clip's create_model sets
    custom = AuxiliaryCLIP.create(tower)
    assert (custom.mean, custom.std) == (mean, std)
    images = torch.rand(2, 3, 32, 48)
    weights, _ = eager_attention(tower, normalise(images, mean, std))
    torch.testing.assert_close(custom.cls_attention(images, layers=-1)[:, 0].flatten(1), weights[-1][:, 0, 1:])


def test_stops_after_last_needed_block_and_restores_mode(tower):
    aux = AuxiliaryCLIP.create(tower)
    images = torch.rand(2, 3, 32, 48)
    calls = []
    tower.transformer.resblocks[-1].register_forward_hook(lambda *_: calls.append(1))
    first = aux.cls_attention(images, layers=[0])
    assert calls == []
    torch.testing.assert_close(first, aux.cls_attention(images)[:, :1])
    assert calls == []  # even for every block: the rest of the last block cannot change its attention row
    tower.train()
    aux.cls_attention(images)
    assert tower.training


def test_hooks_removed_after_success_and_error(tower):
    tower.transformer.resblocks[1].attn.register_forward_pre_hook(lambda *_: None)  # the user's own hook stays
    before = attn_pre_hooks(tower)
    aux = AuxiliaryCLIP.create(tower)
    aux.cls_attention(torch.rand(1, 3, 32, 48))
    assert attn_pre_hooks(tower) == before

    def boom(*_):
        raise RuntimeError("boom")

    tower.transformer.resblocks[0].mlp.register_forward_pre_hook(boom)  # after block 0's attention hook ran
    with pytest.raises(RuntimeError, match="boom"):
        aux.cls_attention(torch.rand(1, 3, 32, 48))
    assert attn_pre_hooks(tower) == before


def test_low_precision_tower_returns_fp32(tower):
    images = torch.rand(2, 3, 32, 48)
    expected = AuxiliaryCLIP.create(tower).cls_attention(images)
    maps = AuxiliaryCLIP.create(copy.deepcopy(tower).to(torch.bfloat16)).cls_attention(images)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, expected, atol=2e-2, rtol=0)


def test_cls_attention_rejects_bad_input(tower):
    aux = AuxiliaryCLIP.create(tower)
    for layers in (3, [-4], [], [0.5]):
        with pytest.raises(ValueError, match="layer"):
            aux.cls_attention(torch.rand(1, 3, 32, 48), layers=layers)
    for images in (torch.rand(3, 32, 48), torch.rand(1, 1, 32, 48), [], [torch.rand(1, 3, 8, 8)]):
        with pytest.raises(ValueError, match="images must be"):
            aux.cls_attention(images)
    with pytest.raises(ValueError, match="float RGB"):
        aux.cls_attention(torch.zeros(1, 3, 32, 48, dtype=torch.uint8))


class DropLastToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :-1]


def test_cls_attention_rejects_towers_that_change_the_tokens(tower):
    aux = AuxiliaryCLIP.create(tower)
    tower.patch_dropout = DropLastToken()  # what open_clip's PatchDropout does in training
    with pytest.raises(ValueError, match=r"block 0 of .* sees 24 tokens where \[CLS\] \+ 24 patches"):
        aux.cls_attention(torch.rand(1, 3, 32, 48))
    assert attn_pre_hooks(tower) == [0, 0, 0]


def test_cls_attention_rejects_masked_attention():
    tower = VisionTransformer(**STAND_IN)
    block = tower.transformer.resblocks[1]
    mask = torch.zeros(25, 25)
    block.forward = lambda x, attn_mask=None: ResidualAttentionBlock.forward(block, x, attn_mask=mask)
    with pytest.raises(ValueError, match="masked attention is not supported"):
        AuxiliaryCLIP(tower).cls_attention(torch.rand(1, 3, 32, 48), layers=[0, 1])


def test_cls_attention_needs_the_towers_own_attention():
    tower = VisionTransformer(**STAND_IN)
    tower.forward = lambda pixels: pixels  # a forward that never reaches the blocks
    with pytest.raises(RuntimeError, match=r"never called the attention of blocks \[0, 2\]"):
        AuxiliaryCLIP(tower).cls_attention(torch.rand(1, 3, 32, 48), layers=[0, 2])
    assert attn_pre_hooks(tower) == [0, 0, 0]


# -- create ------------------------------------------------------------------------------------------------


class Holder(nn.Module):
    """A model that is not a vision tower but holds one as ``.visual``, like open_clip's CLIP."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


class StrVisual(nn.Module):
    visual = "not a module"


def test_create_from_instances():
    tower = VisionTransformer(**STAND_IN).train()
    aux = AuxiliaryCLIP.create(tower)
    assert aux.visual is tower and not tower.training
    assert (aux.name, aux.image_size, aux.grid_size, aux.num_layers) == ("VisionTransformer", (32, 48), (4, 6), 3)
    assert "grid_size=(4, 6)" in repr(aux)
    held = AuxiliaryCLIP.create(Holder(tower), device="cpu")
    assert held.visual is tower and held.name == "Holder"
    assert AuxiliaryCLIP.create(aux) is aux
    assert AuxiliaryCLIP(tower, name="mine").name == "mine"
    with pytest.raises(ValueError, match=r"StrVisual.visual is a str, not a module"):
        AuxiliaryCLIP.create(StrVisual())


def _remove(attr: str):
    def mutate(tower: nn.Module) -> None:
        delattr(tower, attr)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t: setattr(t, "class_embedding", None), "VisionTransformer tower without a class token"),
        (_remove("conv1"), "without a class token or transformer blocks"),
        (_remove("grid_size"), "without a class token or transformer blocks"),
        (lambda t: setattr(t, "attn_pool", nn.Identity()), "attentional pooling"),
        (lambda t: setattr(t, "pool_type", "avg"), "pool_type='avg'"),
        (lambda t: setattr(t.transformer.resblocks[2], "attn", nn.Identity()), "block 2 uses Identity attention"),
        (
            lambda t: setattr(t.transformer.resblocks[1], "attn", nn.MultiheadAttention(64, 4, add_bias_kv=True)),
            "block 1's attention adds bias_k",
        ),
        (
            lambda t: setattr(t.transformer.resblocks[0], "attn", nn.MultiheadAttention(64, 4, add_zero_attn=True)),
            "block 0's attention adds bias_k / zero-attention",
        ),
    ],
    ids=["no-cls", "no-conv1", "no-grid", "attn-pool", "avg-pool", "custom-attention", "bias-k", "zero-attn"],
)
def test_create_rejects_unusable_towers(mutate, match):
    tower = VisionTransformer(**STAND_IN)
    mutate(tower)
    with pytest.raises(ValueError, match=f"needs an open_clip ViT.*{match}"):
        AuxiliaryCLIP.create(tower)


@needs_open_clip
def test_create_from_name_checkpoint_and_instances(registered_name, tmp_path):
    aux = AuxiliaryCLIP.create(registered_name)
    assert (aux.name, aux.image_size, aux.grid_size, aux.num_layers) == (registered_name, (32, 48), (4, 6), 3)
    assert not aux.visual.training
    source = open_clip.create_model(registered_name, pretrained=None)
    torch.save(source.state_dict(), tmp_path / "weights.bin")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    for file in ("weights.bin", "weights.safetensors"):
        loaded = AuxiliaryCLIP.create((registered_name, str(tmp_path / file)))
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.visual.parameters(), source.visual.parameters(), strict=True)
        )
    loaded = AuxiliaryCLIP.create((registered_name, tmp_path / "weights.bin"))  # a Path works too
    assert torch.equal(loaded.visual.class_embedding, source.visual.class_embedding)
    assert AuxiliaryCLIP.create(source).visual is source.visual
    assert AuxiliaryCLIP.create(source.visual).visual is source.visual
    assert AuxiliaryCLIP.create(aux) is aux


@pytest.mark.parametrize("spec", [123, ["ViT-B-16"], ("ViT-B-16",), ("ViT-B-16", 5), "ViT-B-16:", ":openai"])
def test_create_rejects_bad_spec_types(spec):
    with pytest.raises(ValueError, match="expected a model name"):
        AuxiliaryCLIP.create(spec)


@needs_open_clip
def test_create_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-61'.*'ViT-B-16'"):
        AuxiliaryCLIP.create("ViT-B-61")


@needs_open_clip
def test_create_unknown_pretrained_tag_lists_tags(registered_name):
    with pytest.raises(ValueError, match="neither one of its tags"):
        AuxiliaryCLIP.create(f"{registered_name}:no-such-tag")
    with pytest.raises(ValueError, match="'openai'"):
        AuxiliaryCLIP.create(("ViT-B-16", "no-such-tag"))


@needs_open_clip
@pytest.mark.parametrize(
    ("vision", "match"),
    [
        (
            {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 32},
            "without a class token",
        ),  # ModifiedResNet
        ({"qk_norm": True}, "Attention attention"),  # open_clip's CustomResidualAttentionBlock
        ({"pool_type": "avg"}, "pool_type='avg'"),  # CLIPA
    ],
    ids=["resnet", "custom-attention", "avg-pool"],
)
def test_create_rejects_towers_without_usable_cls(vision, match):
    with pytest.raises(ValueError, match=f"needs an open_clip ViT.*{match}"):
        AuxiliaryCLIP.create(tiny_clip(**vision))


@needs_open_clip
def test_create_rejects_coca_attentional_pooling():
    coca = open_clip.CoCa(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(
            **{**VISION, "layers": 1, "attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}
        ),
        text_cfg=open_clip.CLIPTextCfg(**TEXT),
        multimodal_cfg={"width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": 64},
    )
    with pytest.raises(ValueError, match="attentional pooling"):
        AuxiliaryCLIP.create(coca)


def test_create_rejects_non_vit_modules():
    with pytest.raises(ValueError, match="needs an open_clip ViT.*Linear"):
        AuxiliaryCLIP.create(nn.Linear(2, 2))


def test_open_clip_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an uninstalled package looks like to import
    with pytest.raises(ValueError, match=r"needs open_clip.*pip install 'vtc\[clip\]'.*open_clip_torch") as info:
        AuxiliaryCLIP.create("ViT-B-16")
    assert isinstance(info.value, ImportError)


def test_open_clip_broken_torchvision(monkeypatch):
    """A torchvision built for another torch makes `import open_clip` raise RuntimeError, not ImportError."""

    class BrokenTorchvision:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "open_clip":
                raise RuntimeError("operator torchvision::nms does not exist")
            return None

    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenTorchvision(), *sys.meta_path])
    with pytest.raises(ValueError, match="torchvision::nms.*torchvision, whose build must match torch"):
        AuxiliaryCLIP.create(("ViT-B-16", None))


# -- resample ----------------------------------------------------------------------------------------------


def test_resample_identity_on_same_grid():
    maps = torch.rand(2, 3, 4, 6)
    assert torch.equal(AuxiliaryCLIP.resample(maps, (4, 6)), maps.flatten(2))


@pytest.mark.parametrize("grid", [(5, 7), (30, 2), (1, 1), (14, 14)])
def test_resample_preserves_mass(grid):
    maps = torch.rand(2, 3, 14, 14) / 200
    out = AuxiliaryCLIP.resample(maps, grid)
    assert out.shape == (2, 3, grid[0] * grid[1]) and (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), maps.sum(dim=(-2, -1)))


def test_resample_hot_patch_lands_in_its_region():
    up = torch.zeros(1, 1, 4, 4)
    up[0, 0, 0, 3] = 0.5  # top-right patch
    out = AuxiliaryCLIP.resample(up, (6, 10)).view(6, 10)
    # bilinear support of source cell (0, 3) on a 6 x 10 grid: rows 0-1, columns 6-9
    assert out[:2, 6:].sum() == pytest.approx(0.5) and out[2:].sum() == 0 and out[:, :6].sum() == 0
    assert divmod(int(out.argmax()), 10) in {(0, 8), (0, 9)}
    down = torch.zeros(1, 1, 8, 8)
    down[0, 0, 7, 0] = 0.25  # bottom-left patch
    out = AuxiliaryCLIP.resample(down, (2, 3)).view(2, 3)
    expected = torch.zeros(2, 3)
    expected[1, 0] = 0.25
    torch.testing.assert_close(out, expected)


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, V, gh, gw\]"):
        AuxiliaryCLIP.resample(torch.rand(3, 4, 6), (2, 2))
    with pytest.raises(ValueError, match="two positive integers"):
        AuxiliaryCLIP.resample(torch.rand(1, 1, 4, 6), (0, 2))


# -- images_from_qwen_patches -------------------------------------------------------------------------------


def qwen_flatten(clips: list[torch.Tensor], mean, std, patch=14, temporal=2, merge=2) -> torch.Tensor:
    """Forward flattening as in transformers' Qwen2VLImageProcessor (4.x _preprocess; 5.x patchify does the
    same with the frame broadcast): each clip is [F, C, H, W] with F = t * temporal frames (an image is its
    frame repeated `temporal` times); normalise, split into (t, T, C, h/m, m, P, w/m, m, P), order patches
    (t, h/m, w/m, m, m) and flatten each patch as (C, T, P, P)."""
    rows = []
    for clip in clips:
        frames, c, height, width = clip.shape
        x = (clip - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        t, gh, gw = frames // temporal, height // patch, width // patch
        x = x.reshape(t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, T, P, P]
        rows.append(x.reshape(t * gh * gw, c * temporal * patch * patch))
    return torch.cat(rows)


@pytest.mark.parametrize("stats", ["identity", "clip"])
def test_qwen_patches_round_trip(stats):
    mean, std = ((0.0,) * 3, (1.0,) * 3) if stats == "identity" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    images = [torch.rand(3, 56, 84), torch.rand(3, 112, 56)]  # grids 4 x 6 and 8 x 4
    pixel_values = qwen_flatten([image.expand(2, -1, -1, -1) for image in images], mean, std)
    grid_thw = torch.tensor([[1, 4, 6], [1, 8, 4]])
    out = images_from_qwen_patches(pixel_values, grid_thw, mean=mean, std=std)
    assert [tuple(x.shape) for x in out] == [(3, 56, 84), (3, 112, 56)]
    for got, image in zip(out, images, strict=True):
        if stats == "identity":
            assert torch.equal(got, image)
        else:
            torch.testing.assert_close(got, image, atol=1e-6, rtol=0)


def test_qwen_patches_video_grid_gives_first_frame():
    frames = torch.rand(4, 3, 28, 56)  # t = 2 temporal groups of 2 frames each
    mean, std = (0.0,) * 3, (1.0,) * 3
    (out,) = images_from_qwen_patches(qwen_flatten([frames], mean, std), torch.tensor([[2, 2, 4]]), mean=mean, std=std)
    assert torch.equal(out, frames[0])


def _qwen_processor(backend: str):
    import transformers

    try:
        if backend == "pil":
            if hasattr(transformers, "Qwen2VLImageProcessorPil"):  # transformers 5.x
                return transformers.Qwen2VLImageProcessorPil
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # 4.x: numpy

            return Qwen2VLImageProcessor
        if hasattr(transformers, "Qwen2VLImageProcessorPil"):
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # 5.x: torchvision

            return Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl_fast import Qwen2VLImageProcessorFast

        return Qwen2VLImageProcessorFast
    except (ImportError, RuntimeError, OSError) as err:
        pytest.skip(f"Qwen2-VL {backend} image processor unavailable: {err}")


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_qwen_patches_invert_transformers_processor(backend):
    import numpy as np

    processor = _qwen_processor(backend)(do_resize=False)
    generator = np.random.default_rng(0)
    images = [
        generator.integers(0, 256, (56, 84, 3), dtype=np.uint8),
        generator.integers(0, 256, (112, 56, 3), dtype=np.uint8),
    ]
    batch = processor(images=images, return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4]]
    out = images_from_qwen_patches(
        batch["pixel_values"], batch["image_grid_thw"], mean=processor.image_mean, std=processor.image_std
    )
    for got, image in zip(out, images, strict=True):
        torch.testing.assert_close(got, torch.from_numpy(image).permute(2, 0, 1).float() / 255, atol=1e-5, rtol=0)


def test_qwen_patches_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"needs \(24, 1176\)"):
        images_from_qwen_patches(torch.zeros(23, 1176), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="multiples of merge_size"):
        images_from_qwen_patches(torch.zeros(15, 1176), torch.tensor([[1, 3, 5]]))
