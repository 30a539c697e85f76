"""Teach a vision tower to hand the language model what the symbolic task gave it (issue 18; stages 2-3 of
``python -m training.organisms --recipe symbolic``).

    python -m training.pixels --init build/organism-llava/background.pt --steps 1500 --save /tmp/llava-pixels

The language model of a symbolic run (``training.symbolic --span all``: all 256 visual tokens, a background token
being its position vector alone - LLaVA: its cell's row + column embedding; Qwen2-VL: nothing, its M-RoPE position
says where it is - and an object's or the sign's centre token its words' embeddings on top) is copied into a fresh
organism (``LlavaForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``, ``--family``). The vision tower
and the projector (Qwen2-VL: its merger) then learn, per visual token, to regress that token's symbolic vector
(relative squared error, the object / sign centre tokens weighted up, and with ``--ring`` the tokens around them,
whose target is background), for LLaVA optionally with the CLIP-style caption loss of ``training.organisms`` next to
it (``--contrastive``). ``--vlm-steps`` then trains the whole VLM on conversations. Evaluation is the real VLM on
all 256 tokens (``organisms.first_turn_accuracy``).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from training import build, organisms, symbolic
from vtc.organisms import scenes


class Targets:
    """Each visual token's symbolic vector: its cell's row + column embedding, plus its words' embeddings at an object's
    or the sign's centre cell."""

    def __init__(self, state: dict, vocab: symbolic.Vocabulary):
        self.vocab = vocab
        self.words = state["lm.model.embed_tokens.weight"].float()
        cells = torch.arange(symbolic.IMAGE_TOKENS)
        self.grid = torch.zeros(symbolic.IMAGE_TOKENS, self.words.shape[1])
        if "row.weight" in state:  # LLaVA: row and column embeddings; Qwen2-VL: M-RoPE positions only
            rows, columns = state["row.weight"].float(), state["column.weight"].float()
            self.grid = rows[cells // symbolic.SIDE] + columns[cells % symbolic.SIDE]

    def __call__(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """([b, 256, D] targets, [b, 256] bool: centre cells)."""
        targets = self.grid.expand(len(indices), -1, -1).clone()
        centres = torch.zeros(len(indices), symbolic.IMAGE_TOKENS, dtype=torch.bool)
        for row, index in enumerate(indices):
            shapes, sign, sign_box, _ = symbolic.layout(split, index)
            for cell, first, second in symbolic.objects(shapes, sign, sign_box, self.vocab):
                targets[row, cell] += self.words[first] + self.words[second]
                centres[row, cell] = True
        return targets, centres


def language_model_state(state: dict) -> dict:
    """The symbolic run's ``LlamaForCausalLM`` weights under ``LlavaForConditionalGeneration``'s names."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm.model."):
            out["model.language_model." + key[len("lm.model.") :]] = value
        elif key.startswith("lm.lm_head."):
            out["lm_head." + key[len("lm.lm_head.") :]] = value
    return out


def features(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([b, 256, D] what the language model reads, LLaVA's [CLS] output or None) for uint8 images [b, H, W, 3]."""
    pixels = build.normalize(images)
    if isinstance(model, LlavaForConditionalGeneration):
        tower = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
        hidden = tower.hidden_states[model.config.vision_feature_layer][:, 1:]
        return model.model.multi_modal_projector(hidden), tower.pooler_output
    out = model.model.visual(build.qwen_patches(pixels), grid_thw=organisms._grid(len(images)))
    merged = out.pooler_output if hasattr(out, "pooler_output") else out  # 5.x output object / 4.x tensor
    return merged.view(len(images), symbolic.IMAGE_TOKENS, -1), None


def ring(centres: torch.Tensor) -> torch.Tensor:
    """[b, 256] bool: the tokens next to a centre token (its 3 x 3 neighbourhood), centres themselves excluded."""
    grid = centres.view(-1, 1, symbolic.SIDE, symbolic.SIDE).float()
    near = F.max_pool2d(grid, 3, stride=1, padding=1).view(centres.shape) > 0
    return near & ~centres


def regression(
    output: torch.Tensor, target: torch.Tensor, centres: torch.Tensor, weight: float, ring_weight: float = 0.0
) -> dict:
    """Relative squared error per token; the loss adds ``weight`` x the centre tokens' mean error and ``ring_weight``
    x the mean error of the tokens around them (whose target is background: a tower that smears an object over its
    neighbours hands the language model one object several times)."""
    scale = target.pow(2).mean()
    error = (output - target).pow(2).mean(-1) / scale  # [b, 256]
    out = {"all": error.mean(), "centre": error[centres].mean(), "ring": error[ring(centres)].mean()}
    out["loss"] = out["all"] + weight * out["centre"] + (ring_weight * out["ring"] if ring_weight else 0)
    return out


@torch.no_grad()
def test_error(model, targets: Targets, count: int) -> dict:
    model.eval()
    images = torch.stack([torch.from_numpy(organisms._array(scenes.scene("test", i).image)) for i in range(count)])
    target, centres = targets("test", range(count))
    out = regression(features(model, images)[0], target, centres, 1.0)
    model.train()
    return {
        key: round(out[name].item(), 4)
        for key, name in (("test_all", "all"), ("test_centre", "centre"), ("test_ring", "ring"))
    }


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.pixels", description=__doc__)
    parser.add_argument("--family", choices=build.FAMILIES, default="llava")
    parser.add_argument("--init", required=True, help="a training.symbolic --save file (--span all)")
    parser.add_argument("--scenes", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--centre", type=float, default=4.0, help="extra weight of the centre cells' error")
    parser.add_argument("--ring", type=float, default=0.0, help="extra weight of the error of the cells around them")
    parser.add_argument("--contrastive", type=float, default=0.0, help="weight of the CLIP-style caption loss")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-scenes", type=int, default=300)
    parser.add_argument("--save", help="directory for the VLM (build.save)")
    parser.add_argument("--start", help="a saved VLM directory to continue (the tower stage is then skipped)")
    parser.add_argument("--vlm-steps", type=int, default=0, help="then train the whole VLM on conversations")
    parser.add_argument("--vlm-batch", type=int, default=32)
    parser.add_argument("--vlm-lr", type=float, default=5e-4)
    parser.add_argument("--vlm-regression", type=float, default=1.0)
    parser.add_argument("--count-weight", type=float, default=1.0, help="weight of count answers in --vlm-steps")
    parser.add_argument("--round", type=int, default=0, help="a later --vlm-steps round: other batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser


def main(argv=None) -> None:
    args = arguments().parse_args(argv)
    torch.set_num_threads(args.threads)
    log = build.run_log(time.time(), [])
    log({"stage": "config", **vars(args)})
    model = train(args, log)
    if args.save:
        build.save(model, args.family, args.save)


# What the symbolic language model must have been trained with for this module to reproduce its inputs.
LANGUAGE_OPTIONS = {"span": "all", "objects": "sum", "coords": False, "layers": None, "width": None, "heads": None}


def language_model_options(symbolic_args: dict, family: str) -> None:
    """Refuse a symbolic run whose inputs the tower cannot learn to give (``Targets`` builds only these)."""
    wanted = {**LANGUAGE_OPTIONS, "family": family, "grid": family == "llava", "tie": False}
    if family == "llava":  # build.save writes a rotary base 4.57 reads for Qwen2-VL only; LLaVA keeps Llama's
        wanted["rope_theta"] = None
    wrong = {k: symbolic_args.get(k) for k, v in wanted.items() if symbolic_args.get(k) != v}
    if wrong:
        raise ValueError(
            f"--init: its language model was trained with {wrong}; training.pixels --family {family} needs "
            f"{ {k: wanted[k] for k in wrong} }"
        )


def check(args) -> None:
    """Refuse options that cannot go together, before anything is loaded or trained."""
    if args.contrastive > 0 and args.family != "llava":
        raise ValueError(
            f"--contrastive {args.contrastive}: a loss on LLaVA's [CLS] token; --family {args.family} has none"
        )
    if not (math.isfinite(args.ring) and args.ring >= 0):
        raise ValueError(f"--ring {args.ring}: a weight of an error, 0 (off) or more, finite")


def train(args, log):
    """The VLM of ``args`` (see the module docstring), in eval mode."""
    check(args)
    state, options = symbolic.load(args.init)
    language_model_options(options, args.family)
    vocab = symbolic.Vocabulary(args.family)
    targets = Targets(state, vocab)
    model = build.model(args.family, len(vocab.words), seed=args.seed, rope_theta=options["rope_theta"])
    missing, unexpected = model.load_state_dict(language_model_state(state), strict=False)
    wrong = unexpected or [k for k in missing if k.startswith(("model.language_model.", "lm_head."))]
    if wrong:
        raise ValueError(f"--init {args.init}: its language model weights do not fit the organism ({wrong})")
    if args.start:
        model.load_state_dict(type(model).from_pretrained(args.start).state_dict())
        args.steps = 0
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    pool = organisms.Pool("train", args.scenes)
    log({"stage": "data", "scenes": len(pool)})
    conv = organisms.Conversations(args.family, vocab.tokenizer)
    if args.family == "llava":
        params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    else:
        params = list(model.model.visual.parameters())
    extra = []
    if args.contrastive > 0:
        words = sorted({w for c in pool.captions for w in c} | set(scenes.GLYPHS) | {"small", "large", "top", "middle"})
        text = organisms.TextEncoder(words, build.HIDDEN)
        head = nn.Linear(model.config.vision_config.hidden_size, build.HIDDEN)
        scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        extra = [*text.parameters(), *head.parameters(), scale]
    optimizer = torch.optim.AdamW(params + extra, lr=args.lr, weight_decay=0.01)
    schedule = organisms._schedule(optimizer, args.steps, warmup=100)
    rng = random.Random(args.seed + 3)
    model.train()
    for step in range(args.steps):
        rows = rng.sample(range(len(pool)), args.batch)
        output, cls = features(model, pool.images[rows])
        target, centres = targets("train", rows)
        losses = regression(output, target, centres, args.centre, args.ring)
        loss = losses["loss"]
        if extra:
            image = F.normalize(head(cls), dim=-1)
            caption = F.normalize(text([pool.captions[r] for r in rows]), dim=-1)
            logits = scale.exp().clamp(max=100) * image @ caption.T
            labels = torch.arange(len(rows))
            losses["contrastive"] = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            loss = loss + args.contrastive * losses["contrastive"]
        build.optimizer_step(loss, optimizer, schedule, params + extra)
        if step % 50 == 0:
            log({"stage": "tower", "step": step, **{k: round(v.item(), 4) for k, v in losses.items()}})
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            entry = test_error(model, targets, 64)
            entry.update(organisms.first_turn_accuracy(model, args.family, conv, "test", args.eval_scenes))
            log({"stage": "test", "step": step + 1, **entry})
            model.train()
    if args.vlm_steps:
        tune(model, args, pool, conv, targets, log)
    return model.eval()


def weighted_answer_loss(logits: torch.Tensor, inputs: dict, conv, count_weight: float) -> torch.Tensor:
    """The answer loss (next-token cross-entropy on the labelled tokens), the answers of count questions (and their
    end-of-turn token) weighted ``count_weight``: a turn asks for a count when its question has the word "many"."""
    labels = inputs["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    many, user = conv.tokenizer.convert_tokens_to_ids(["many", "USER"])
    ids = inputs["input_ids"]
    turn = torch.cumsum(ids == user, dim=1)  # the turn of each token
    weights = torch.ones_like(losses)
    for row in range(len(ids)):
        counting = set(turn[row][ids[row] == many].tolist())
        for t in counting:
            weights[row][(turn[row, 1:] == t) & (labels[row] != -100)] = count_weight
    mask = (labels != -100).float()
    return (losses * weights * mask).sum() / (weights * mask).sum()


def tune(model, args, pool, conv, targets: Targets, log) -> None:
    """The whole VLM on multi-turn scene conversations (answer loss), the tower at 0.3x the learning rate, with the
    per-token regression kept as an auxiliary loss (weight ``--vlm-regression``). Its targets stay those of the
    symbolic language model (``--init``) while the embeddings train: an anchor to the inputs the language model
    learned the task on, not a target that moves with it."""
    model.requires_grad_(True)
    vision = model.model.vision_tower if args.family == "llava" else model.model.visual
    output = model.model.multi_modal_projector if args.family == "llava" else model.model.visual.merger
    captured = []
    hook = output.register_forward_hook(lambda module, _a, out: captured.append(out) if module.training else None)
    vision_ids = {id(p) for p in vision.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in vision_ids], "lr": args.vlm_lr * 0.3},
        {"params": [p for p in model.parameters() if id(p) not in vision_ids], "lr": args.vlm_lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = organisms._schedule(optimizer, args.vlm_steps, warmup=50)
    rng = random.Random(args.seed + 4 + 1000 * args.round)
    model.train()
    for step in range(args.vlm_steps):
        rows = rng.sample(range(len(pool)), args.vlm_batch)
        examples = [conv.example(pool.questions[r], rng) for r in rows]
        inputs = organisms.batch_inputs(args.family, conv, pool.images[rows], examples)
        captured.clear()
        answers = weighted_answer_loss(model(**inputs).logits, inputs, conv, args.count_weight)
        target, centres = targets("train", rows)
        losses = regression(captured[-1].reshape(target.shape), target, centres, args.centre, args.ring)
        loss = answers + args.vlm_regression * losses["loss"]
        build.optimizer_step(loss, optimizer, schedule, model.parameters())
        if step % 25 == 0:
            entry = {"answers": answers, "centre": losses["centre"], "ring": losses["ring"]}
            entry = {key: round(value.item(), 4) for key, value in entry.items()}
            log({"stage": "vlm", "step": step, **entry})
        if (step + 1) % args.eval_every == 0 or step == args.vlm_steps - 1:
            entry = test_error(model, targets, 64)
            entry.update(organisms.first_turn_accuracy(model, args.family, conv, "test", args.eval_scenes))
            log({"stage": "vlm-test", "step": step + 1, **entry})
            model.train()
    hook.remove()


if __name__ == "__main__":
    main()
