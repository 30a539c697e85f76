"""Video in vtc eval: the moving_shapes task, QwenProcessor's video inputs, and end-to-end runs on a tiny Qwen2-VL.

QwenProcessor's ``pixel_values_videos`` are compared with a straightforward reference written here (rescale,
normalise, pad with the last frame, then the patchify of transformers' Qwen2VLVideoProcessor, copied), because that
processor imports torchvision, which this environment lacks; where torchvision is installed, the same inputs are
also compared with transformers' own video processor.

The end-to-end model is an untrained checkpoint of the shapes-qwen2vl architecture (real
Qwen2VLForConditionalGeneration, random weights, saved to a temporary directory): its answers, and so its accuracy,
mean nothing; the visual token counts are what is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tests.eval.test_runner import _run, untrained_organism
from training import build
from vtc import loading
from vtc.eval.__main__ import main
from vtc.eval.tasks import Sample, get_task
from vtc.eval.tasks.moving_shapes import normalize
from vtc.organisms import clips

PATCH, MERGE, TEMPORAL = 4, 2, 2
TOKENS_PER_CLIP = (8 // TEMPORAL) * (128 // PATCH // MERGE) ** 2  # 4 temporal patches x 16 x 16 merged tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return untrained_organism(tmp_path_factory, "qwen2vl")


# The task


def test_moving_shapes_samples_and_scoring():
    task = get_task("moving_shapes")
    samples = task.samples(None, 7)
    assert [s.id for s in samples[:4]] == ["test-0-moving", "test-1-direction", "test-2-appears", "test-3-moving"]
    assert [s.family for s in samples] == [clips.FAMILIES[i % 3] for i in range(7)]
    assert all(s.image is None and s.meta == {"clip": i} for i, s in enumerate(samples))
    clip = clips.clip("test", 1)
    assert (samples[1].question, samples[1].answer) == (clip.question.question, clip.question.answer)
    frames = samples[1].video()
    assert [f.tobytes() for f in frames] == [f.tobytes() for f in clip.frames] and len(frames) == 8
    assert task.samples("validation", 1)[0].id == "validation-0-moving"
    assert len(task.samples(None, 10_000)) == task.clips_per_split == 600
    with pytest.raises(ValueError, match="split"):
        task.samples("train", 3)
    assert [normalize(t) for t in ("Two.", " none", "Zero", "UP!", "left of it", "")] == [
        "2",
        "0",
        "0",
        "up",
        "left",
        "",
    ]
    assert task.score(samples[1], f" {samples[1].answer.title()}.")["score"] == 1.0
    assert task.score(samples[1], "sideways")["score"] == 0.0


def test_a_sample_holds_an_image_or_a_video():
    frames = lambda: []  # noqa: E731
    with pytest.raises(ValueError, match="exactly one of image and video"):
        Sample(id="x", question="q", answer="a", family="f")
    with pytest.raises(ValueError, match="exactly one of image and video"):
        Sample(id="x", question="q", answer="a", family="f", image=lambda: None, video=frames)


# QwenProcessor's videos

FIVE = pytest.mark.skipif(
    transformers.__version__.startswith("4."), reason="QwenProcessor prepares videos on transformers >= 5 only"
)


def _image_processor(**size):
    """The PIL image processor QwenProcessor builds on (transformers 5's PIL class; 4.57's default one)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as images
    except ImportError:  # transformers 4.x
        from transformers import Qwen2VLImageProcessor as images

    return images(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, size=size or None)


def reference_video(frames, processor) -> tuple[torch.Tensor, list[int]]:
    """Frames that need no resizing, as Qwen2VLVideoProcessor lays them out: [t * h * w, C * T * P * P], (t, h, w)."""
    x = torch.tensor(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).double() / 255  # F, C, H, W
    mean = torch.tensor(processor.image_mean, dtype=torch.double)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.double)[:, None, None]
    x = ((x - mean) / std)[None]  # B, F, C, H, W
    if pad := -x.shape[1] % TEMPORAL:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    b, f, c, height, width = x.shape
    t, h, w = f // TEMPORAL, height // PATCH, width // PATCH
    patches = x.reshape(b, t, TEMPORAL, c, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # transformers' Qwen2VLVideoProcessor.patchify
    return patches.reshape(t * h * w, c * TEMPORAL * PATCH * PATCH), [t, h, w]


def _noise_frames(count: int, height: int, width: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def _processor(image_processor=None):
    tokenizer = build.tokenizer("qwen2vl")
    images = image_processor or _image_processor(shortest_edge=64, longest_edge=128 * 128)
    return loading.QwenProcessor(tokenizer, images, build.chat_template("qwen2vl"))


def _text(processor, kinds: list[str]) -> str:
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": "how many shapes move ?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.mark.skipif(not transformers.__version__.startswith("4."), reason="transformers 4.x only")
def test_videos_are_refused_by_qwen_processor_on_transformers_4(checkpoint):
    processor = loading.QwenProcessor.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="prepares videos with transformers 5's PIL image processor"):
        processor(videos=[_noise_frames(2, 32, 32, seed=0)], text=[_text(processor, ["video"])])


@FIVE
def test_video_patches_match_the_video_processors_layout():
    """Two videos (3 frames of 32 x 48, padded to 4 with the last; 4 frames of 16 x 16) and an image in one batch:
    patches as the reference lays them out, one <|video_pad|> per merged token, mm_token_type_ids 1 / 2."""
    processor = _processor()
    videos = [_noise_frames(3, 32, 48, seed=0), _noise_frames(4, 16, 16, seed=1)]
    image = _noise_frames(1, 24, 24, seed=2)[0]
    texts = [_text(processor, ["image", "video"]), _text(processor, ["video"])]
    out = processor(images=[image], videos=videos, text=texts)
    expected = [reference_video(v, processor.image_processor) for v in videos]
    assert out["video_grid_thw"].tolist() == [[2, 8, 12], [2, 4, 4]] == [grid for _, grid in expected]
    # float32 here, float64 in the reference: a misplaced patch would differ by O(1)
    torch.testing.assert_close(
        out["pixel_values_videos"].double(), torch.cat([p for p, _ in expected]), atol=1e-6, rtol=1e-6
    )
    alone = processor(images=[image], text=[_text(processor, ["image"])])
    assert torch.equal(out["pixel_values"], alone["pixel_values"])
    ids, types = out["input_ids"], out["mm_token_type_ids"]
    video_id, image_id = processor.video_token_id, processor.image_token_id
    assert (ids == video_id).sum(1).tolist() == [2 * 8 * 12 // 4, 2 * 4 * 4 // 4]
    assert (ids == image_id).sum(1).tolist() == [6 * 6 // 4, 0]
    assert torch.equal(types, (ids == image_id).long() + 2 * (ids == video_id).long())


@FIVE
def test_video_frames_are_resized_like_images_and_must_agree():
    processor = _processor()
    out = processor(videos=[_noise_frames(2, 100, 60, seed=3)], text=[_text(processor, ["video"])])
    image = processor.image_processor(images=_noise_frames(1, 100, 60, seed=3), return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[1, *image["image_grid_thw"][0, 1:].tolist()]]
    with pytest.raises(ValueError, match="must all have one size"):
        processor(
            videos=[_noise_frames(1, 32, 32, 4) + _noise_frames(1, 16, 16, 5)], text=[_text(processor, ["video"])]
        )


@FIVE
def test_video_settings_come_from_the_video_processor_config(tmp_path, checkpoint):
    """The organism has no video config: its image processor's settings. A video_preprocessor_config.json wins."""
    organism = loading.QwenProcessor.from_pretrained(checkpoint)
    assert organism.video_processor.size == organism.image_processor.size
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((Path(checkpoint) / name).read_bytes())
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"max_pixels": 64 * 64, "patch_size": 4}))
    own = loading.QwenProcessor.from_pretrained(tmp_path)
    size = dict(own.video_processor.size)  # a SizeDict on transformers 5, a dict on 4.57
    assert (size["longest_edge"], size["shortest_edge"]) == (64 * 64, 128 * 28 * 28)
    out = own(videos=[_noise_frames(2, 128, 128, seed=6)], text=[_text(own, ["video"])])
    assert out["video_grid_thw"].tolist() == [[1, 16, 16]]


def test_transformers_video_processor_agrees_where_it_runs():
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    processor = _processor()
    frames = _noise_frames(3, 32, 48, seed=0)
    theirs = Qwen2VLVideoProcessor(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, size=dict(processor.image_processor.size)
    )(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
    ours = processor(videos=[frames], text=[_text(processor, ["video"])])
    assert torch.equal(ours["video_grid_thw"], theirs["video_grid_thw"])
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"])


# vtc eval end to end


@FIVE
def test_moving_shapes_end_to_end_on_a_tiny_qwen2_vl(checkpoint, tmp_path):
    """Every clip is 1024 video tokens entering the model; divprune keep=16 keeps 16 of them (one selection over the
    whole video). Accuracy is computed and consistent with the predictions, and meaningless on random weights."""
    summary, records = _run(
        tmp_path, "--model", checkpoint, "--task", "moving_shapes", "--methods", "none,divprune", "--keep", "16",
        "--limit", "4", "--batch-size", "3",
    )  # fmt: skip
    assert [(r["method"], r["keep"]) for r in summary["runs"]] == [("none", None), ("divprune", 16)]
    assert summary["skipped"] == [] and len(records) == 8
    for record in records:
        assert record["visual_tokens_in"] == TOKENS_PER_CLIP
        kept = TOKENS_PER_CLIP if record["method"] == "none" else 16
        assert (record["visual_tokens"], record["visual_tokens_last_layer"]) == (kept, kept), record["id"]
        assert record["score"] == float(normalize(record["prediction"]) == record["answer"])
    for run in summary["runs"]:
        assert run["families"]["moving"]["n"] == 2 and run["families"]["direction"]["n"] == 1
        assert run["visual_tokens_in"] == TOKENS_PER_CLIP


def test_video_tasks_refuse_models_vtc_compresses_no_video_of(capsys, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("vtc.loading.load", no_model)
    args = ["--model", "shapes-llava", "--task", "moving_shapes", "--output", "/tmp/unused", "--limit", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "moving_shapes asks about videos, but 'shapes-llava' is a LLaVA-1.5 model (llava)" in err
    families = err.split("run on")[1]
    assert "Qwen2-VL (qwen2_vl)" in families and "LLaVA-OneVision (llava_onevision)" in families
    assert "(llava)" not in families


@FIVE
def test_a_chat_template_without_video_parts_is_reported(checkpoint, tmp_path):
    """A template that renders no {'type': 'video'} part (the organism's before it had one) leaves the prompt without
    placeholders: every setting is skipped with that reason, rather than run on the text alone."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(checkpoint, copy)
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").write_text(template.replace(build.VIDEO_BRANCH["qwen2vl"], ""))
    summary, records = _run(
        tmp_path, "--model", str(copy), "--task", "moving_shapes", "--methods", "none", "--limit", "1"
    )
    assert records == [] and summary["runs"] == []
    [skipped] = summary["skipped"]
    assert "holds no video placeholder" in skipped["reason"]
