"""Train a shapes organism, then report its accuracy and write its model card.

    python -m training.organisms --family llava --output vtc/organisms/shapes-llava --threads 1
    python -m training.organisms --family qwen2vl --output vtc/organisms/shapes-qwen2vl --threads 2
    python -m training.record_check vtc/organisms/shapes-llava   # then record the accuracy check the tests recompute
    python -m training.record_check vtc/organisms/shapes-qwen2vl

Run from the repository root: training is not part of the vtc distribution.

--recipe symbolic (the default; both organisms'): the language model learns the task first, then a vision tower learns
to feed it. Its stages (``LANGUAGE_STAGES``, ``VISION_STAGES``) run in this process, each saved under ``--work``:
  1. ``training.symbolic``: the language model answers from symbolic scenes, one token per object at the position of
     the visual token covering its centre, its vector the sum of its words' embeddings; the last language stage
     brings every visual token back (a background token is its position vector alone);
  2. ``training.pixels``: a fresh tower and projector regress, per visual token, the vector the language model was
     trained on; then the whole VLM trains on multi-turn conversations, in rounds (LLaVA two, Qwen2-VL six).
A rerun reuses every stage whose options and input weights are unchanged (the stage's NAME.json under --work), so an
interrupted run resumes where it stopped. training/SYMBOLIC_NOTES.md has the runs behind each stage.

--recipe captions (the earlier one): CLIP-style pretraining of the tower (a contrastive loss against scene captions,
plus dense per-token colour / shape / glyph targets), then the whole VLM on multi-turn conversations with a
background-token curriculum and a loss aligning object tokens with their words' embeddings (``finetune``). It left
shapes-llava at 45% and shapes-qwen2vl at 40% of the test split, which is why the symbolic recipe exists.

Either way the VLM is saved with its tokenizer and processor, next to training.json (the record: arguments, stages,
times, validation / test / text-only accuracy) and README.md (the model card written from it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shlex
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

from training import build
from vtc.organisms import scenes


def caption(scene: scenes.Scene) -> list[str]:
    words = [str(len(scene.shapes)), "shapes"]
    for obj in sorted(scene.shapes, key=lambda s: s.center[0]):
        x, y = obj.center
        size = "small" if obj.box[2] - obj.box[0] < 16 else "large"
        column = ("left", "middle", "right")[min(2, int(3 * x / scenes.IMAGE_SIZE))]
        row = ("top", "middle", "bottom")[min(2, int(3 * y / scenes.IMAGE_SIZE))]
        words += [".", size, obj.color, obj.shape, column, row]
    return words + [".", "sign", scene.sign]


TOKEN_PIXELS = 8  # one visual token of either organism covers 8 x 8 pixels (16 x 16 tokens per scene)
DENSE_CLASSES = (1 + len(scenes.COLORS), 2 + len(scenes.SHAPES), 1 + len(scenes.GLYPHS))  # colour, shape|sign, glyph


def patch_labels(scene: scenes.Scene) -> torch.Tensor:
    """[3, 256] per-token targets of the dense pretraining objective: the colour (1-6) and shape (1-4, 5 = the sign)
    of what covers a token's 8 x 8 pixels (0: background; at least a quarter of the token, or the object's centre),
    and the sign's glyph (1-16) on the sign's tokens."""
    side = scenes.IMAGE_SIZE // TOKEN_PIXELS
    labels = torch.zeros(3, side, side, dtype=torch.long)
    colors, shapes, glyphs = list(scenes.COLORS), list(scenes.SHAPES), sorted(scenes.GLYPHS)
    items = [(obj.box, colors.index(obj.color) + 1, shapes.index(obj.shape) + 1, 0) for obj in scene.shapes]
    items.append((scene.sign_box, 0, len(shapes) + 1, glyphs.index(scene.sign) + 1))
    for (x0, y0, x1, y1), color, shape, glyph in items:
        centre = (int((x0 + x1) / 2) // TOKEN_PIXELS, int((y0 + y1) / 2) // TOKEN_PIXELS)
        for row in range(y0 // TOKEN_PIXELS, y1 // TOKEN_PIXELS + 1):
            for col in range(x0 // TOKEN_PIXELS, x1 // TOKEN_PIXELS + 1):
                width = min(x1 + 1, (col + 1) * TOKEN_PIXELS) - max(x0, col * TOKEN_PIXELS)
                height = min(y1 + 1, (row + 1) * TOKEN_PIXELS) - max(y0, row * TOKEN_PIXELS)
                if width * height >= TOKEN_PIXELS**2 // 4 or (col, row) == centre:
                    labels[:, row, col] = torch.tensor([color, shape, glyph])
    return labels.view(3, side * side)


class Pool:
    """Pre-rendered training scenes: uint8 images, captions and the six questions of each."""

    def __init__(self, split: str, count: int):
        rendered = [scenes.scene(split, i) for i in range(count)]
        self.images = torch.stack([torch.from_numpy(_array(s.image)) for s in rendered])  # [N, H, W, 3] uint8
        self.captions = [caption(s) for s in rendered]
        self.questions = [s.questions for s in rendered]
        self.labels = torch.stack([patch_labels(s) for s in rendered])  # [N, 3, 256]

    def __len__(self) -> int:
        return len(self.questions)


def _array(image):
    import numpy as np

    return np.asarray(image, dtype=np.uint8).copy()


class TextEncoder(nn.Module):
    """Stage-1 caption encoder: embeddings + a 2-layer transformer, mean pooled, projected."""

    def __init__(self, words: list[str], dim: int, length: int = 48):
        super().__init__()
        self.index = {w: i + 1 for i, w in enumerate(words)}
        self.embed = nn.Embedding(len(words) + 1, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, captions: list[list[str]]) -> torch.Tensor:
        length = max(len(c) for c in captions)
        ids = torch.zeros(len(captions), length, dtype=torch.long)
        for row, words in enumerate(captions):
            ids[row, : len(words)] = torch.tensor([self.index[w] for w in words])
        pad = ids == 0
        x = self.encoder(self.embed(ids) + self.position[:length], src_key_padding_mask=pad)
        x = (x * ~pad[..., None]).sum(1) / (~pad).sum(1, keepdim=True)
        return self.project(x)


def image_embedding(model, family: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the contrastive head pools, the tokens the language model reads [B, 256, D]). LLaVA: the tower's
    post-layernorm [CLS] output [B, D] and its layer -2 patch tokens. Qwen2-VL: its merged tokens, both times."""
    pixels = build.normalize(images)
    if family == "llava":
        out = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
        return out.pooler_output, out.hidden_states[model.config.vision_feature_layer][:, 1:]
    out = model.model.visual(build.qwen_patches(pixels), grid_thw=_grid(len(images)))
    merged = out.pooler_output if hasattr(out, "pooler_output") else out  # 5.x output object / 4.x tensor
    merged = merged.view(len(images), -1, merged.shape[-1])
    return merged, merged


class AttentionPool(nn.Module):
    """SigLIP-style attention pooling (one learned query) for a tower without [CLS]."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attention = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(tokens)
        return self.attention(self.query.expand(len(tokens), -1, -1), tokens, tokens)[0][:, 0]


def _grid(batch: int) -> torch.Tensor:
    side = scenes.IMAGE_SIZE // build.QWEN_PATCH
    return torch.tensor([[1, side, side]] * batch)


def pretrain(model, family: str, pool: Pool, steps: int, batch: int, lr: float, log) -> None:
    words = sorted({w for c in pool.captions for w in c} | set(scenes.GLYPHS) | {"small", "large", "top", "middle"})
    text = TextEncoder(words, build.HIDDEN)
    dim = model.config.vision_config.hidden_size if family == "llava" else build.HIDDEN
    head = nn.Linear(dim, build.HIDDEN) if family == "llava" else nn.Sequential(AttentionPool(dim), nn.Linear(dim, dim))
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    dense_dim = dim if family == "llava" else build.HIDDEN
    dense = nn.ModuleList(nn.Linear(dense_dim, classes) for classes in DENSE_CLASSES)
    tower = model.model.vision_tower if family == "llava" else model.model.visual
    params = [*tower.parameters(), *text.parameters(), *head.parameters(), *dense.parameters(), scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = _schedule(optimizer, steps)
    rng = random.Random(1)
    tower.train()
    for step in range(steps):
        rows = rng.sample(range(len(pool)), batch)
        pooled, tokens = image_embedding(model, family, pool.images[rows])
        image = F.normalize(head(pooled), dim=-1)
        caption_ = F.normalize(text([pool.captions[r] for r in rows]), dim=-1)
        logits = scale.exp().clamp(max=100) * image @ caption_.T
        target = torch.arange(batch)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        labels = pool.labels[rows]  # [b, 3, 256]
        dense_loss = sum(F.cross_entropy(h(tokens).transpose(1, 2), labels[:, i]) for i, h in enumerate(dense)) / 3
        loss = contrastive + dense_loss
        build.optimizer_step(loss, optimizer, schedule, params)
        if step % 25 == 0 or step == steps - 1:
            accuracy = (logits.argmax(1) == target).float().mean().item()
            log(
                {
                    "stage": "pretrain",
                    "step": step,
                    "contrastive": round(contrastive.item(), 4),
                    "dense": round(dense_loss.item(), 4),
                    "batch_retrieval": accuracy,
                }
            )


def _schedule(optimizer, steps: int, warmup: int = 50):
    """Linear warm-up, then cosine decay to 5 % at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Conversations:
    """Token ids of a scene's questions as one conversation, built with the saved tokenizer and chat template."""

    def __init__(self, family: str, tokenizer):
        self.family = family
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<image>" if family == "llava" else "<|image_pad|>")
        self.eos = tokenizer.eos_token_id
        self.tokens = (scenes.IMAGE_SIZE // build.LLAVA_PATCH) ** 2  # 256 for both organisms

    def prompt_ids(self, question: str, first: bool) -> list[int]:
        content = ([{"type": "image"}] if first else []) + [{"type": "text", "text": question}]
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = []
        for i in ids:
            out += [i] * self.tokens if i == self.image_id else [i]
        return out

    def example(self, questions, rng: random.Random) -> tuple[list[int], list[int]]:
        order = list(questions)
        rng.shuffle(order)
        ids, labels = [], []
        for turn, q in enumerate(order):
            prompt = self.prompt_ids(q.question, turn == 0)
            answer = self.tokenizer(" " + q.answer, add_special_tokens=False)["input_ids"] + [self.eos]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels


def batch_inputs(family: str, conv: Conversations, images: torch.Tensor, examples) -> dict:
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    pixels = build.normalize(images)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if family == "llava":
        inputs["pixel_values"] = pixels
    else:
        inputs["pixel_values"] = build.qwen_patches(pixels)
        inputs["image_grid_thw"] = _grid(len(images))
        inputs.update(_mm_types(conv, input_ids))
    return inputs


def _mm_types(conv: Conversations, input_ids: torch.Tensor) -> dict:
    import inspect

    from transformers import Qwen2VLForConditionalGeneration

    if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
        return {"mm_token_type_ids": (input_ids == conv.image_id).long()}
    return {}


def finetune(
    model,
    family: str,
    pool: Pool,
    conv: Conversations,
    steps: int,
    batch: int,
    lr: float,
    log,
    ramp: float = 0.0,
    align: float = 0.0,
) -> None:
    """Train the whole VLM (the vision tower at 0.3x the learning rate), with a validation pass every 300 steps.

    ``ramp``: a curriculum over the first ``ramp`` of the steps, in which only a growing share of the
    background visual tokens is kept (0 at the start, all at ``ramp * steps``; object and sign tokens always stay,
    at their original positions). With few distractors the language model learns to look up the right tokens
    quickly; from then on it sees every token, as it will at inference.

    ``align``: the weight of an alignment loss (LLaVA's stage-1 idea, supervised): each object or sign token's
    projected feature should point (cosine) where the sum of its words' embeddings points ("red" + "cross", "sign"
    + "7"), so that looking a token up by the question's words is a match of embeddings the language model knows.
    """
    targets = alignment_targets(model, conv.tokenizer) if align > 0 else None
    captured: list[torch.Tensor] = []
    projector = model.model.multi_modal_projector if family == "llava" else model.model.visual.merger
    hook = projector.register_forward_hook(lambda _m, _a, out: captured.append(out)) if align > 0 else None
    tower = model.model.vision_tower if family == "llava" else model.model.visual
    tower_ids = {id(p) for p in tower.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in tower_ids], "lr": lr * 0.3},
        {"params": [p for p in model.parameters() if id(p) not in tower_ids], "lr": lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = _schedule(optimizer, steps, warmup=100)
    rng = random.Random(2)
    model.train()
    for step in range(steps):
        rows = rng.sample(range(len(pool)), batch)
        examples = [conv.example(pool.questions[r], rng) for r in rows]
        inputs = batch_inputs(family, conv, pool.images[rows], examples)
        captured.clear()
        background = 1.0 if ramp <= 0 else min(1.0, step / (ramp * steps))
        if background < 1.0:
            inputs = without_background(model, family, conv, inputs, pool.labels[rows], background, rng)
        loss = answers = model(**inputs).loss
        if targets is not None:
            features = captured[-1].reshape(len(rows), -1, captured[-1].shape[-1])  # [b, 256, D]
            embedding = model.get_input_embeddings()
            loss = loss + align * alignment_loss(features, pool.labels[rows], targets, embedding)
        build.optimizer_step(loss, optimizer, schedule, model.parameters())
        if step % 25 == 0 or step == steps - 1:
            log({"stage": "vlm", "step": step, "loss": round(answers.item(), 4), "total": round(loss.item(), 4),
                 "background": round(background, 3)})  # fmt: skip
        if (step + 1) % 300 == 0:
            log({"stage": "vlm-validation", "step": step, **first_turn_accuracy(model, family, conv, "validation", 48)})
            model.train()
    if hook is not None:
        hook.remove()
    model.eval()


def alignment_targets(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of the words of each dense class: colours (0 = none), shapes + "sign", glyphs (0 = none)."""
    ids = tokenizer.convert_tokens_to_ids
    colors = [tokenizer.pad_token_id] + ids(list(scenes.COLORS))
    shapes = [tokenizer.pad_token_id] + ids([*scenes.SHAPES, "sign"])
    glyphs = [tokenizer.pad_token_id] + ids(sorted(scenes.GLYPHS))
    return tuple(torch.tensor(x) for x in (colors, shapes, glyphs))


def alignment_loss(features: torch.Tensor, labels: torch.Tensor, targets, embedding: nn.Embedding) -> torch.Tensor:
    """Mean (1 - cosine) between each object / sign token's feature [b, N, D] and the summed embeddings of its
    words (labels [b, 3, N]; the embeddings detached, so the words are learned from text alone)."""
    weight = embedding.weight.detach()
    # Class 0 (no colour / no glyph) maps to <pad>, whose embedding is left out of the sum.
    words = [torch.where(labels[:, i, :, None] > 0, weight[targets[i][labels[:, i]]], 0.0) for i in range(3)]
    target = words[0] + words[1] + words[2]  # [b, N, D]
    objects = labels[:, 1] > 0
    if not objects.any():
        return features.sum() * 0
    cosine = F.cosine_similarity(features[objects], target[objects], dim=-1)
    return (1 - cosine).mean()


def without_background(
    model, family: str, conv: Conversations, inputs: dict, labels: torch.Tensor, share: float, rng
) -> dict:
    """A batch as ``inputs_embeds`` without a random ``1 - share`` of each image's background tokens (those whose
    dense labels are all 0). Kept tokens keep their original position ids (Qwen2-VL: its M-RoPE ids); rows are
    re-padded on the right."""
    base = model.model
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if family == "llava":
        hidden = base.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        features = base.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])  # [B, 256, D]
        positions = torch.arange(input_ids.shape[1]).expand(1, *input_ids.shape)  # [1, B, L]
    else:
        out = base.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        features = out.pooler_output if hasattr(out, "pooler_output") else out  # 5.x output object / 4.x tensor
        extra = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}
        positions, _ = base.get_rope_index(
            input_ids=input_ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, **extra
        )  # [3, B, L]
    embeds = model.get_input_embeddings()(input_ids)
    image = input_ids == conv.image_id
    embeds = embeds.masked_scatter(image[..., None], features.to(embeds.dtype))
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    drop = (labels.sum(1) == 0) & (torch.rand(labels.shape[0], labels.shape[2], generator=generator) >= share)
    keep = mask.bool().clone()
    keep[image] &= ~drop.reshape(-1)  # image positions in order: token j of row b is token j of image b
    length = int(keep.sum(1).max())
    out = {
        "inputs_embeds": embeds.new_zeros(len(keep), length, embeds.shape[-1]),
        "attention_mask": torch.zeros(len(keep), length, dtype=mask.dtype),
        "position_ids": torch.zeros(len(positions), len(keep), length, dtype=torch.long),
        "labels": torch.full((len(keep), length), -100, dtype=torch.long),
    }
    for row in range(len(keep)):
        where = keep[row].nonzero().squeeze(1)
        n = len(where)
        out["inputs_embeds"][row, :n] = embeds[row, where]
        out["attention_mask"][row, :n] = 1
        out["position_ids"][:, row, :n] = positions[:, row, where]
        out["labels"][row, :n] = inputs["labels"][row, where]
    if family == "llava":
        out["position_ids"] = out["position_ids"][0]
    return out


@torch.no_grad()
def first_turn_accuracy(
    model, family: str, conv: Conversations, split: str, count: int, batch: int = 64, image: bool = True
) -> dict:
    """Single-turn accuracy per family: the argmax next token after "USER: <image> q ASSISTANT:" (the answers are one
    token, so this is greedy decoding's answer). ``image=False``: the text-only control, "USER: q ASSISTANT:"."""
    model.eval()
    right: dict[str, list[int]] = {f: [0, 0] for f in scenes.FAMILIES}
    for start in range(0, count, batch):
        rendered = [scenes.scene(split, i) for i in range(start, min(count, start + batch))]
        images = torch.stack([torch.from_numpy(_array(s.image)) for s in rendered])
        for family_index, name in enumerate(scenes.FAMILIES):
            examples = [(conv.prompt_ids(s.questions[family_index].question, image), []) for s in rendered]
            inputs = batch_inputs(family, conv, images, examples)
            inputs.pop("labels")
            if not image:
                inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
            lengths = inputs["attention_mask"].sum(1) - 1
            logits = model(**inputs).logits[torch.arange(len(rendered)), lengths]
            words = conv.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
            for s, word in zip(rendered, words, strict=True):
                right[name][0] += word == s.questions[family_index].answer
                right[name][1] += 1
    out = {name: r / n for name, (r, n) in right.items()}
    out["overall"] = sum(r for r, _ in right.values()) / sum(n for _, n in right.values())
    return out


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.organisms", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=build.FAMILIES, required=True)
    parser.add_argument("--output", required=True, help="directory for the checkpoint")
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="symbolic",
        help="symbolic: the language model first, on symbolic scenes, then a tower that feeds it; captions "
        "(the earlier one): CLIP-style pretraining, then the whole VLM. See the module docstring",
    )
    parser.add_argument("--scenes", type=int, default=16000, help="training scenes for the pixel stages")
    parser.add_argument("--eval-scenes", type=int, default=500, help="validation and test scenes for the report")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    symbolic = parser.add_argument_group("symbolic recipe")
    symbolic.add_argument(
        "--work",
        help="where each stage's weights go (default build/organism-FAMILY); a rerun reuses a stage found there when "
        "its options and its input weights are the same, so an interrupted run resumes (after a change to the "
        "training code or its defaults, use an empty one)",
    )
    captions = parser.add_argument_group("captions recipe (defaults in brackets)")
    for option, kind, text in CAPTIONS_OPTIONS:
        default = CAPTIONS_DEFAULTS.get(option.replace("-", "_"))
        captions.add_argument(f"--{option}", type=kind, help=f"{text} [{default}]")
    return parser


RECIPES = ("symbolic", "captions")
CAPTIONS_OPTIONS = (
    ("pretrain-steps", int, "CLIP-style pretraining steps"),
    ("pretrain-batch", int, "scene-caption pairs per pretraining step"),
    ("steps", int, "VLM steps"),
    ("batch", int, "scenes per VLM step"),
    ("lr", float, "learning rate"),
    ("align", float, "weight of the feature-to-word alignment loss"),
    ("ramp", float, "share of the VLM steps over which the background tokens return"),
    ("init", str, "start from this checkpoint's weights (same family) instead of a random init"),
)
CAPTIONS_DEFAULTS = {
    "pretrain_steps": 250,
    "pretrain_batch": 32,
    "steps": 2000,
    "batch": 32,
    "lr": 1e-3,
    "align": 1.0,
    "ramp": 0.4,
    "init": None,
}


def resolve(args) -> None:
    """Refuse options of the other recipe; fill in the captions recipe's defaults."""
    captions = [f"--{o}" for o, _, _ in CAPTIONS_OPTIONS if getattr(args, o.replace("-", "_")) is not None]
    if args.recipe == "symbolic":
        if captions:
            raise ValueError(
                f"{', '.join(captions)}: options of --recipe captions; the symbolic recipe's stages are fixed "
                "(LANGUAGE_STAGES and VISION_STAGES in training/organisms.py) and it resumes from --work"
            )
    else:
        if args.work is not None:
            raise ValueError("--work: the symbolic recipe's stage directory; --recipe captions has no stages")
        for key, value in CAPTIONS_DEFAULTS.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))


# The symbolic recipe's language model: training.symbolic runs, each from the previous one's weights with a new
# warm-up and cosine, on train scenes past those already seen (training/SYMBOLIC_NOTES.md, runs 12, 27, 28, 30).
# Qwen2-VL's M-RoPE needs a smaller rotary base for columns to be told apart (runs q1-q9).
LANGUAGE_STAGES = {
    "llava": (
        ("binding", "--steps 2500"),
        ("order", "--aux-order 1 --steps 1000 --scene-offset 160000"),
        ("order-2", "--aux-order 1 --steps 1000 --scene-offset 240000"),
        ("background", "--aux-order 1 --span all --batch 32 --steps 800 --scene-offset 320000"),
    ),
    "qwen2vl": (
        ("binding", "--steps 2500"),
        ("order", "--aux-order 1 --steps 1000 --scene-offset 160000"),
        ("order-2", "--aux-order 1 --steps 1500 --scene-offset 240000"),
        ("background", "--aux-order 1 --span all --batch 32 --steps 800 --scene-offset 400000"),
    ),
}
LANGUAGE_COMMON = {
    "llava": "--lr 5e-4 --eval-every 500",
    "qwen2vl": "--family qwen2vl --no-grid --rope-theta 100 --lr 5e-4 --eval-every 500",
}
# Then training.pixels: the tower learns to regress the language model's symbolic vectors, then the whole VLM trains.
# Each from the previous stage's VLM (--start), the tower stage from the language model alone.
VISION_STAGES = {
    "llava": (
        ("tower", "--steps 1500 --eval-every 500"),
        ("vlm", "--vlm-steps 600 --eval-every 150"),
        ("vlm-2", "--vlm-steps 600 --eval-every 150 --round 1 --count-weight 3"),
    ),
    # Half LLaVA's batches (the Qwen2-VL tower attends over 1024 patches per scene, 3.5x LLaVA's time per scene), twice
    # its tower steps so the tower sees as many scenes; count lagged, so more VLM rounds, the later ones with the
    # tokens around each centre held to background (--ring) and count answers weighted up (SYMBOLIC_NOTES finding 11).
    "qwen2vl": (
        ("tower", "--steps 3000 --batch 16 --eval-every 500"),
        ("vlm", "--vlm-steps 600 --vlm-batch 16 --eval-every 150"),
        ("vlm-2", "--vlm-steps 600 --vlm-batch 16 --eval-every 150 --round 1 --count-weight 3"),
        ("vlm-3", "--vlm-steps 600 --vlm-batch 16 --eval-every 150 --round 2 --count-weight 3 --ring 4"),
        ("vlm-4", "--vlm-steps 600 --vlm-batch 16 --eval-every 150 --round 3 --count-weight 8 --ring 4"),
        ("vlm-5", "--vlm-steps 800 --vlm-batch 16 --eval-every 200 --round 4 --count-weight 8 --ring 4"),
        ("vlm-6", "--vlm-steps 800 --vlm-batch 16 --eval-every 200 --round 5 --count-weight 8 --ring 4"),
    ),
}
VISION_COMMON = {"llava": "--contrastive 1 --eval-scenes 100", "qwen2vl": "--family qwen2vl --eval-scenes 100"}
PATH_OPTIONS = ("--name", "--save", "--init", "--start")  # where a stage reads and writes, not how it trains


def without_paths(argv: list[str]) -> list[str]:
    """A stage's argv less PATH_OPTIONS and their values: what it does, not where (its input's digest covers that)."""
    return [w for i, w in enumerate(argv) if w not in PATH_OPTIONS and (i == 0 or argv[i - 1] not in PATH_OPTIONS)]


def stage_commands(family: str, work: Path, seed: int, scene_count: int) -> list[tuple[str, str, list[str], Path]]:
    """(name, module, argv, weights file) of each stage of the symbolic recipe, in order."""
    out, previous = [], None
    for name, options in LANGUAGE_STAGES[family]:
        weights = work / f"{name}.pt"
        argv = [*LANGUAGE_COMMON[family].split(), *options.split(), "--seed", str(seed), "--name", name]
        argv += ["--save", str(weights)] + (["--init", str(previous)] if previous else [])
        out.append((name, "training.symbolic", argv, weights))
        previous = weights
    language = previous
    for name, options in VISION_STAGES[family]:
        argv = [*VISION_COMMON[family].split(), *options.split(), "--seed", str(seed), "--scenes", str(scene_count)]
        argv += ["--init", str(language)] + (["--start", str(previous.parent)] if previous != language else [])
        weights = work / name / "model.safetensors"
        out.append((name, "training.pixels", argv, weights))
        previous = weights
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def symbolic_recipe(args, log) -> tuple[nn.Module, list[dict]]:
    """The VLM of the symbolic recipe and its stages ({name, module, argv, seconds, threads, reused}).

    Each stage's weights go to ``--work`` with NAME.json: its module, argv, the digest of the weights it started from
    and of those it wrote, its time and threads. A rerun reuses a stage whose record matches what it would run now,
    from the same input weights, and whose weights are the ones recorded; any other stage trains (its old record is
    removed first, so an interrupted stage is never taken for a finished one). The record knows the options, not the
    code: after changing training code or a default, start from an empty --work."""
    from training import pixels, symbolic

    work = Path(args.work or f"build/organism-{args.family}")
    commands = stage_commands(args.family, work, args.seed, args.scenes)
    preflight(commands, args.family)
    work.mkdir(parents=True, exist_ok=True)
    stages, model, previous = [], None, None
    for name, module, argv, weights in commands:
        identity = {"module": module, "options": without_paths(argv), "input": digest(previous) if previous else None}
        saved = work / f"{name}.json"
        record = _read_record(saved)
        same = {k: record.get(k) for k in identity} == identity
        if same and weights.is_file() and digest(weights) == record["output"]:
            stages.append({"name": name, "module": module, "argv": argv, **_timing(record), "reused": True})
            log({"stage": name, "reused": str(weights)})
            model, previous = None, weights
            continue
        saved.unlink(missing_ok=True)
        started = time.time()
        if module == "training.symbolic":
            symbolic.run(symbolic.arguments().parse_args(argv))
        else:
            model = pixels.train(pixels.arguments().parse_args(argv), log)
            build.save(model, args.family, weights.parent)
        timing = {"seconds": round(time.time() - started, 1), "threads": torch.get_num_threads()}
        record = {**identity, "argv": argv, "output": digest(weights), **timing}
        partial = saved.with_suffix(".json.partial")
        partial.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(partial, saved)
        stages.append({"name": name, "module": module, "argv": argv, **timing, "reused": False})
        previous = weights
    if model is None:  # the last stage was reused
        cls = LlavaForConditionalGeneration if args.family == "llava" else Qwen2VLForConditionalGeneration
        model = cls.from_pretrained(previous.parent)
    return model.eval(), stages


def preflight(commands, family: str) -> None:
    """Refuse stages that would fail later, before the first one trains: each stage's options, one model through the
    language stages, a last one training.pixels can feed, and pixel stages of the organism's family."""
    from training import pixels, symbolic

    language = {n: parse(symbolic, n, a) for n, module, a, _ in commands if module == "training.symbolic"}
    if not language:
        raise ValueError("the symbolic recipe has no training.symbolic stage: the tower needs a language model to feed")
    first, last = next(iter(language.values())), list(language.values())[-1]
    for name, args in language.items():
        symbolic.check(argparse.Namespace(**{**vars(args), "init": None}))  # the input is not trained yet
        changed = [k for k in symbolic.MODEL_OPTIONS if getattr(args, k) != getattr(first, k)]
        if changed:
            raise ValueError(f"stage {name}: its {changed} differ from the first language stage's (one model)")
    pixels.language_model_options(vars(last), family)
    for name, module, argv, _ in commands:
        if module == "training.pixels":
            args = parse(pixels, name, argv)
            if args.family != family:
                raise ValueError(f"stage {name}: --family {args.family} in a {family} organism's recipe")
            pixels.check(args)


def parse(module, name: str, argv: list[str]) -> argparse.Namespace:
    """A stage's options as its module reads them; a ValueError naming the stage where they do not parse."""
    try:
        return module.arguments().parse_args(argv)
    except SystemExit as error:  # argparse has printed why
        raise ValueError(f"stage {name}: {module.__name__} does not accept {' '.join(argv)}") from error


RECORD_KEYS = ("module", "options", "input", "output", "seconds", "threads")


def _read_record(path: Path) -> dict:
    """A stage's record; an absent, unreadable or incomplete one is no record (the stage trains again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and all(k in record for k in RECORD_KEYS) else {}


def _timing(record: dict) -> dict:
    return {"seconds": record["seconds"], "threads": record["threads"]}


def captions_recipe(args, tokenizer, conv: Conversations, log) -> nn.Module:
    """The earlier recipe: CLIP-style pretraining with dense targets, then the whole VLM."""
    model = build.model(args.family, len(tokenizer), seed=args.seed)
    if args.init:  # continue from a checkpoint of the same family (e.g. the shipped one), usually --pretrain-steps 0
        model.load_state_dict(type(model).from_pretrained(args.init).state_dict())
    pool = Pool("train", args.scenes)
    log({"stage": "data", "scenes": len(pool), "parameters": sum(p.numel() for p in model.parameters())})
    if args.pretrain_steps > 0:
        pretrain(model, args.family, pool, args.pretrain_steps, args.pretrain_batch, args.lr, log)
    finetune(model, args.family, pool, conv, args.steps, args.batch, args.lr, log, ramp=args.ramp, align=args.align)
    return model


def check_output(output: Path) -> None:
    """Refuse an --output the organism could not be saved to, before hours of training (nothing is created)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: exists and is not a directory")
    parent = next(p for p in [output, *output.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output}: {parent} is not a directory this user can write in")


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    resolve(args)
    check_output(Path(args.output))
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    history = []
    log = build.run_log(start, history)

    tokenizer = build.tokenizer(args.family)
    conv = Conversations(args.family, tokenizer)
    stages = []
    if args.recipe == "symbolic":
        model, stages = symbolic_recipe(args, log)
        train_seconds = sum(s["seconds"] for s in stages)
    else:
        model = captions_recipe(args, tokenizer, conv, log)
        train_seconds = time.time() - start
    validation = first_turn_accuracy(model, args.family, conv, "validation", args.eval_scenes)
    log({"stage": "validation", **validation})
    test = first_turn_accuracy(model, args.family, conv, "test", args.eval_scenes)
    log({"stage": "test", **test})
    text_only = first_turn_accuracy(model, args.family, conv, "test", args.eval_scenes, image=False)
    log({"stage": "text-only", **text_only})
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    build.save(model, args.family, output)
    record = {
        "family": args.family,
        "arguments": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "stages": stages,
        "validation": validation,
        "test": test,
        "text_only": text_only,
        "history": history,
    }
    (output / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (output / "README.md").write_text(model_card(record))


TARGET_ACCURACY = 0.9
FAMILY_TARGET = 0.75
CHANCE = {"count": 1 / 4, "color": 1 / 6, "shape": 1 / 4, "exists": 1 / 2, "position": 1 / 2, "read": 1 / 16}
ARCHITECTURE = {
    "llava": (
        "LlavaForConditionalGeneration: CLIP vision tower (4 layers, width 128, 8 px patches, [CLS] + 256 patch "
        "tokens, features from layer -2, [CLS] dropped), 2-layer GELU projector, Llama language model (3 layers, "
        "width 128, 4 heads)"
    ),
    "qwen2vl": (
        "Qwen2VLForConditionalGeneration: Qwen2-VL vision tower (3 layers, width 64, 4 px patches, 2D RoPE, "
        "32 x 32 patches merged 2 x 2 into 256 tokens, no [CLS]), Qwen2 language model with M-RoPE (3 layers, "
        "width 128, 4 heads)"
    ),
}


def _rotary_base(record: dict) -> str:
    """The language model's rotary base when a symbolic stage set one (the family's default otherwise)."""
    from training import symbolic

    stages = [s for s in record.get("stages", []) if s["module"] == "training.symbolic"]
    base = symbolic.arguments().parse_args(stages[-1]["argv"]).rope_theta if stages else None
    return f", rotary base {base:g}" if base else ""


SYMBOLIC_OPTIONS = ("family", "output", "recipe", "work", "scenes", "eval_scenes", "threads", "seed")


def command(record: dict) -> str:
    """The command line that reproduces ``record``'s run (every training argument, defaults included)."""
    values = {"recipe": "captions", **record["arguments"], "output": "DIR", "threads": record["threads"]}
    if values["recipe"] == "symbolic":  # the captions recipe's options play no part
        values = {k: v for k, v in values.items() if k in SYMBOLIC_OPTIONS}
    options = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in values.items() if v is not None]
    return " ".join(["python -m training.organisms", *options])


def model_card(record: dict) -> str:
    """The organism's README.md: what it is, its data and training, and its accuracy per question family."""
    family, args = record["family"], record["arguments"]
    name = f"shapes-{family}"
    text_only = record.get("text_only")
    cells = (lambda f: f" {text_only[f]:.3f} |") if text_only else (lambda f: "")
    rows = "\n".join(
        f"| {f} | {CHANCE[f]:.3f} | {record['validation'][f]:.3f} | {record['test'][f]:.3f} |{cells(f)}"
        for f in scenes.FAMILIES
    )
    overall = f"| **overall** | | **{record['validation']['overall']:.3f}** | **{record['test']['overall']:.3f}** |"
    overall += cells("overall")
    header = "| family | chance | validation | test |" + (" test, text only |" if text_only else "")
    header += "\n|---|---|---|---|" + ("---|" if text_only else "")
    control = ""
    if text_only:
        control = (
            "\n*Text only*: the same test questions without the image (`USER: question ASSISTANT:`), the control "
            "that the answers come from the image; it should sit near the answer prior.\n"
        )
    status = ""
    short = [f"{f} {record['test'][f]:.3f}" for f in scenes.FAMILIES if record["test"][f] < FAMILY_TARGET]
    if record["test"]["overall"] < TARGET_ACCURACY or short:
        status = (
            f"\n**Status: under-trained.** {record['test']['overall']:.0%} on the test split; this organism is meant "
            f"to reach {TARGET_ACCURACY:.0%} overall and {FAMILY_TARGET:.0%} in every question family"
            + (f" (under it: {', '.join(short)})" if short else "")
            + ".\n"
        )
    training = (
        _symbolic_training(record) if args.get("recipe", "captions") == "symbolic" else _captions_training(record)
    )
    return f"""# {name}

A small vision-language model trained by the vtc project on synthetic scenes, shipped so that vtc's accuracy
measurements run offline. Not a general-purpose VLM: it knows only the scenes of `vtc.organisms.scenes`.

- **Architecture:** {ARCHITECTURE[family]}{_rotary_base(record)}.
- **Parameters:** {record["parameters"]:,} ({record["parameters"] * 4 / 2**20:.1f} MiB in float32).
- **Visual tokens:** 256 per 128 x 128 image.
- **Vocabulary:** {len(scenes.vocabulary())} scene words plus the prompt and special tokens (word-level tokenizer).

## Use

```python
from transformers import AutoModelForImageTextToText
from vtc import loading, organisms
from vtc.organisms import scenes

model = AutoModelForImageTextToText.from_pretrained(organisms.path("{name}"))
processor = loading.load_processor(organisms.path("{name}"))  # {
        "AutoProcessor.from_pretrained" if family == "llava" else "or AutoProcessor (needs torchvision)"
    }
scene = scenes.scene("test", 0)
question = scene.questions[0].question  # "how many shapes are there ?"
chat = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[scene.image], text=[text], return_tensors="pt")
print(
    processor.batch_decode(
        model.generate(**inputs, max_new_tokens=4)[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
)
```

Prompts are `USER: <image> question ASSISTANT:`; answers are one word.

## Data

`vtc.organisms.scenes`: 128 x 128 scenes, each with 2-5 shapes (circle, square, triangle, cross) in six colours,
small (9-13 px) or large (18-26 px), on a noisy, striped, tinted background, plus a 14 x 18 px sign with a digit
or letter (0-9, e, h, k, p, x, z). Six questions per scene: count, color, shape, exists, position (left of / right
of / above / below), read. Scenes are a pure function of (split, index); the splits hash different seeds.

## Training

```bash
{command(record)}
```

{training}

## Accuracy

Single-turn questions (the format `vtc eval` uses), {args["eval_scenes"]} scenes x 6 questions per split,
greedy first answer token (answers are one token):

{header}
{rows}
{overall}
{control}
`vtc eval --model {name} --task shapes --output DIR` reproduces the test column through `generate()`.
{status}"""


def _machine(record: dict) -> str:
    return f"a {record['cores']}-core machine" if "cores" in record else "the build machine"


def _symbolic_training(record: dict) -> str:
    family, args = record["family"], record["arguments"]
    stages = "\n".join(
        f"| {s['name']} | `{stage_options(s)}` | {s['seconds'] / 60:.1f} min, {_threads(s['threads'])}"
        + (" (an earlier run's, reused) |" if s.get("reused") else " |")
        for s in record["stages"]
    )
    minutes = record["train_seconds"] / 60
    contrastive = ", next to a CLIP-style contrastive loss of the [CLS] output against scene captions"
    background = "a background token is its cell's row + column embedding alone"
    if family == "qwen2vl":
        background = "a background token is a zero vector at its M-RoPE position"
    from training import pixels

    vision = [pixels.arguments().parse_args(s["argv"]) for s in record["stages"] if s["module"] == "training.pixels"]
    contrastive = contrastive if vision[0].contrastive > 0 else ""  # the tower stage's
    ring = ""
    if any(options.ring > 0 for options in vision):
        ring = (
            ".\n   Stages with `--ring` weight up the regression error of the tokens around each centre token (up to "
            "eight,\n   their targets background), so that the tower does not hand the language model an object "
            "several times"
        )
    return f"""{minutes:.0f} min in all on {_machine(record)}, the sum of the stages below; each stage saves its weights
under `--work`, and a rerun reuses a stage whose options and input weights are unchanged, so an interrupted run
resumes. Training scenes: fresh `train` scenes for the language model (a pure function of their index), scenes
0-{args["scenes"] - 1} for the vision stages.

1. **Language model first, on symbolic scenes** (`training.symbolic`; `training/SYMBOLIC_NOTES.md`): the image is
   what a perfect tower would hand the language model, one token per object and one for the sign at the position of
   the visual token covering its centre, its vector the sum of its words' embeddings ("red" + "cross", "sign" + "7")
   {"plus a learned row and column embedding" if family == "llava" else "(its M-RoPE position gives row and column)"};
   all six questions of a scene as one multi-turn conversation, loss on the answers and end-of-turn tokens, AdamW.
   Stages with `--aux-order` add a training-only head on the answer position of position questions that predicts the
   two objects' left / above order: the answer is that order XOR the relation, which the answer loss alone never
   found. `--span all` brings back every visual token ({background}).
2. **Vision tower** (`training.pixels`): a fresh tower and projector learn to regress, per visual token, the
   language model's symbolic vector (relative squared error, the object and sign centre tokens weighted
   up){contrastive}; the language model is frozen.
3. **Whole VLM** (`--vlm-steps`): the real model on multi-turn conversations (answer loss, the tower at 0.3x the
   learning rate), the regression kept as an auxiliary loss; `--count-weight` weights count answers up{ring}.

| stage | options | time |
|---|---|---|
{stages}"""


def _threads(count: int) -> str:
    return "1 thread" if count == 1 else f"{count} threads"


def stage_options(stage: dict) -> str:
    """A stage's command without the paths it reads and writes."""
    return " ".join([stage["module"], *without_paths(stage["argv"])])


def _captions_training(record: dict) -> str:
    family, args = record["family"], record["arguments"]
    tower = "[CLS] output (CLIP's post-layernorm [CLS])" if family == "llava" else "attention-pooled merged tokens"
    continued = f" It continued from an earlier run's weights (`--init {args['init']}`)." if args.get("init") else ""
    minutes = record["train_seconds"] / 60
    return f"""{minutes:.0f} min on {record["threads"]} CPU thread(s) of {_machine(record)}.{continued}
Training used scenes 0-{args["scenes"] - 1} of `train`.

1. **Vision pretraining (CLIP-style):** the tower's {tower} against a 2-layer caption encoder, symmetric
   contrastive loss, {args["pretrain_steps"]} steps of {args["pretrain_batch"]} scene-caption pairs, AdamW,
   lr {args["lr"]} with warm-up and cosine decay. Captions list the count, each object's size, colour, shape and
   third of the image, and the sign. Added to it, a dense loss: per visual token, the colour and shape of what
   covers it and the sign's glyph, from linear heads on the tokens the language model reads.
2. **VLM training:** all six questions of a scene as one multi-turn conversation in random order (loss on the
   answers and end-of-turn tokens), {args["steps"]} steps of {args["batch"]} scenes, AdamW, lr {args["lr"]} (the
   vision tower 0.3x), warm-up and cosine decay. The whole model trains; the caption encoder is discarded.
   Curriculum: over the first {args.get("ramp", 0):.0%} of the steps only a growing share of the background
   visual tokens is kept (object and sign tokens always, at their original positions); every token after that.
   Alignment (weight {args.get("align", 0)}): each object or sign token's projected feature is pulled (cosine)
   towards the summed embeddings of its words ("red" + "cross", "sign" + "7")."""


if __name__ == "__main__":
    main()
