"""Research: can the organisms' language model answer the scene questions when vision is perfect? (issue 18)

    python -m training.symbolic --steps 3000 --log /tmp/runs.jsonl           # the symbolic task
    python -m training.symbolic --steps 3000 --save /tmp/lm.pt               # ... and keep the LM for Stage 0
    python -m training.symbolic --pixels 4000 --init /tmp/lm.pt --steps 1500 # Stage 0: real visual tokens

Run from the repository root: training is not part of the vtc distribution.

The symbolic task replaces the image by what a perfect vision tower would hand the language model: one token per
object and one for the sign, each at the sequence position of the visual token covering its centre inside the
256-token image span of the LLaVA prompt ``USER: <image> question ASSISTANT: answer``; every other visual token is
dropped, and the kept ones keep their original position ids (what vtc does after pruning). An object token's
vector is the sum of its words' input embeddings ("red" + "triangle", "sign" + "7"), plus optionally a learned row
and column embedding of its 8 x 8 px grid cell (what a vision tower's position embeddings give its features).
``--objects split`` gives each word its own token instead (two tokens at the same position id): a departure from
one token per visual token, to test whether the summed vector is what blocks binding. ``--objects pair`` adds a
learned vector per (colour, shape) conjunction; ``--coords`` a learned linear map of the cell's (x, y).

Position aids (training only; the language model stays a plain ``LlamaForCausalLM``): ``--aux-order`` adds a linear
head on the last layer's input where a position question's answer is predicted, trained to tell whether the first
named object's centre is left of / above the second's (the answer is that order XOR the relation's direction, so
the answer loss alone gives the order no gradient while the four relations are balanced); ``--aux`` a head reading
each named object's row and column at the question word completing its name; ``--relations`` (with
``--relations-steps`` / ``--relations-ramp``) asks only some relations at first.

Training scenes are fresh every step (scenes are a pure function of ``(split, index)``: step s uses train scenes
``s * batch ...``); evaluation is single-turn on the ``test`` split, the argmax answer token after ``ASSISTANT:``,
per question family. The language model is ``LlamaForCausalLM`` with the organism's text config
(``build.config("llava", ...)``: 3 layers, width 128, 4 heads) unless options change it.

Stage 0 (``--pixels N``): the shipped ``shapes-llava`` organism's vision tower (frozen) encodes N train scenes once;
its layer -2 patch features are cached (fp16) and the language model, initialised from a symbolic run
(``--init``), continues on them through a projector (the shipped one, trained along; ``--freeze-projector`` keeps
it). ``--keep objects`` keeps only the object and sign tokens (a well-pruned sequence), ``all`` every token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from training import build
from vtc.organisms import scenes

SIDE = scenes.IMAGE_SIZE // 8  # 16 x 16 visual tokens of 8 x 8 px
IMAGE_TOKENS = SIDE * SIDE
IGNORE = -100


def layout(split: str, index: int) -> tuple[list[scenes.Shape], str, tuple, tuple[scenes.Question, ...]]:
    """``scenes.scene(split, index)`` without drawing the image (20x faster): the same seed and random calls."""
    seed = int.from_bytes(hashlib.sha256(f"vtc-shapes:{split}:{index}".encode()).digest()[:8], "little")
    rng = random.Random(seed)
    shapes, sign, sign_box = scenes._layout(rng)
    questions = tuple(scenes._ask(family, shapes, sign, rng) for family in scenes.FAMILIES)
    return shapes, sign, sign_box, questions


def cell(box) -> int:
    """Index (row-major, 0-255) of the visual token covering a box's centre."""
    x0, y0, x1, y1 = box
    return (int((y0 + y1) / 2) // 8) * SIDE + int((x0 + x1) / 2) // 8


class Vocabulary:
    """An organism family's tokenizer and image span: LLaVA's 256 ``<image>`` tokens at 1-D positions, or Qwen2-VL's
    ``<|vision_start|>`` 256 x ``<|image_pad|>`` ``<|vision_end|>`` whose M-RoPE positions are (t, t + row, t + col)
    and take 16 positions."""

    def __init__(self, family: str = "llava"):
        self.family = family
        self.tokenizer = build.tokenizer(family)
        self.words = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self.id = {w: i for i, w in enumerate(self.words)}
        self.eos = self.tokenizer.eos_token_id
        self.mrope = family == "qwen2vl"
        self.image_open = [self.id["<|vision_start|>"]] if self.mrope else []
        self.image_close = [self.id["<|vision_end|>"]] if self.mrope else []
        self.image_span = SIDE if self.mrope else IMAGE_TOKENS

    def cell_position(self, base: int, cell: int) -> int:
        """The (1-D, or M-RoPE temporal) position of visual token ``cell`` of an image starting at ``base``."""
        return base if self.mrope else base + cell

    def ids(self, text: str) -> list[int]:
        return [self.id[w] for w in text.split()]


class Example:
    """One sequence: per position two word ids (the second 0 = none), a grid cell (-1 = none), a position id, the
    target of the NEXT-token prediction made at that position (IGNORE = no loss) and, on a question word that
    completes an object's name, that object's grid cell (``where``, -1 = none; the ``--aux`` loss) and, where a
    position question's answer is predicted, whether its first object's centre is left of / above the second's
    (``order``: 1 * left + 2 * above, -1 = none; the ``--aux-order`` loss)."""

    def __init__(self):
        self.first, self.second, self.grid, self.position, self.target, self.where = [], [], [], [], [], []
        self.order: list[int] = []
        self.kinds: list[str] = []  # the family of each answer, in order

    def add(self, word: int, position: int, second: int = 0, grid: int = -1) -> None:
        self.first.append(word)
        self.second.append(second)
        self.grid.append(grid)
        self.position.append(position)
        self.target.append(IGNORE)
        self.where.append(-1)
        self.order.append(-1)

    def __len__(self) -> int:
        return len(self.first)


def objects(shapes, sign: str, sign_box, vocab: Vocabulary) -> list[tuple[int, int, int]]:
    """(cell, first word id, second word id) of the objects and the sign, in visual-token order."""
    items = [(cell(s.box), vocab.id[s.color], vocab.id[s.shape]) for s in shapes]
    items.append((cell(sign_box), vocab.id["sign"], vocab.id[sign]))
    return sorted(items)


def example(scene, questions, vocab: Vocabulary, split_objects: bool, answer_eos: bool = True) -> Example:
    """The LLaVA conversation ``USER: <image> q ASSISTANT: a </s> USER: q ASSISTANT: a </s> ...`` with the image span
    reduced to its object / sign tokens at their original position ids."""
    shapes, sign, sign_box, _ = scene
    ex = Example()
    position = 0
    for turn, q in enumerate(questions):
        ex.add(vocab.id["USER"], position)
        ex.add(vocab.id[":"], position + 1)
        position += 2
        if turn == 0:
            for word in vocab.image_open:
                ex.add(word, position)
                position += 1
            for index, first, second in objects(shapes, sign, sign_box, vocab):
                if split_objects:
                    ex.add(first, vocab.cell_position(position, index), grid=index)
                    ex.add(second, vocab.cell_position(position, index), grid=index)
                else:
                    ex.add(first, vocab.cell_position(position, index), second=second, grid=index)
            position += vocab.image_span
            for word in vocab.image_close:
                ex.add(word, position)
                position += 1
        named = mentions(q, shapes, sign_box)
        for i, word in enumerate(vocab.ids(q.question) + [vocab.id["ASSISTANT"], vocab.id[":"]]):
            ex.add(word, position)
            ex.where[-1] = named.get(i, -1)
            position += 1
        ex.target[-1] = vocab.id[q.answer]
        if q.family == "position":
            ex.order[-1] = order(q, shapes)
        ex.kinds.append(q.family)
        ex.add(vocab.id[q.answer], position)
        position += 1
        if answer_eos:
            ex.target[-1] = vocab.eos
        ex.add(vocab.eos, position)
        position += 1
    return ex


def mentions(q: scenes.Question, shapes, sign_box) -> dict[int, int]:
    """{index of the question word that completes an object's name: that object's grid cell}: the shape word of
    "red circle" (exists when present, both objects of position), the shape of colour questions, the colour of shape
    questions, "sign" of read questions. Count names no object; an absent object of exists has no cell."""
    words = q.question.split()
    by_name = {s.name: s for s in shapes}
    out = {}
    if q.family == "color":
        out[4] = cell(next(s.box for s in shapes if s.shape == words[4]))
    elif q.family == "shape":
        out[4] = cell(next(s.box for s in shapes if s.color == words[4]))
    elif q.family == "exists" and " ".join(words[3:5]) in by_name:
        out[4] = cell(by_name[" ".join(words[3:5])].box)
    elif q.family == "position":
        out[3] = cell(by_name[" ".join(words[2:4])].box)
        out[len(words) - 2] = cell(by_name[" ".join(words[-3:-1])].box)
    elif q.family == "read":
        out[words.index("sign")] = cell(sign_box)
    return out


def order(q: scenes.Question, shapes) -> int:
    """1 * (first object's centre left of the second's) + 2 * (above it), for a position question."""
    words = q.question.split()
    by_name = {s.name: s for s in shapes}
    (xa, ya), (xb, yb) = by_name[" ".join(words[2:4])].center, by_name[" ".join(words[-3:-1])].center
    return int(xa < xb) + 2 * int(ya < yb)


def prompt(scene, question, vocab: Vocabulary, split_objects: bool) -> Example:
    """The single-turn evaluation prompt, ending at ``ASSISTANT:`` (the answer is predicted at the last position)."""
    ex = example(scene, [question], vocab, split_objects)
    for field in (ex.first, ex.second, ex.grid, ex.position, ex.target, ex.where, ex.order):
        del field[-2:]
    return ex


def collate(examples: list[Example], mrope: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding has id 0 (<pad>), mask 0. ``mrope``: positions [3, b, L] (t, h, w), a visual
    token's h and w its cell's row and column past its temporal position."""
    length = max(len(e) for e in examples)
    out = {
        "first": torch.zeros(len(examples), length, dtype=torch.long),
        "second": torch.zeros(len(examples), length, dtype=torch.long),
        "grid": torch.full((len(examples), length), -1, dtype=torch.long),
        "position": torch.zeros(len(examples), length, dtype=torch.long),
        "target": torch.full((len(examples), length), IGNORE, dtype=torch.long),
        "where": torch.full((len(examples), length), -1, dtype=torch.long),
        "order": torch.full((len(examples), length), -1, dtype=torch.long),
        "mask": torch.zeros(len(examples), length, dtype=torch.long),
        "last": torch.tensor([len(e) - 1 for e in examples]),
    }
    for row, e in enumerate(examples):
        n = len(e)
        for key, values in (("first", e.first), ("second", e.second), ("grid", e.grid), ("position", e.position)):
            out[key][row, :n] = torch.tensor(values)
        out["target"][row, :n] = torch.tensor(e.target)
        out["where"][row, :n] = torch.tensor(e.where)
        out["order"][row, :n] = torch.tensor(e.order)
        out["mask"][row, :n] = 1
    if mrope:
        grid, position = out["grid"], out["position"]
        on = grid >= 0
        cell = grid.clamp(min=0)
        out["position"] = torch.stack([position, position + on * (cell // SIDE), position + on * (cell % SIDE)])
    return out


class Symbolic(nn.Module):
    """The language model plus what stands in for vision: learned row / column embeddings of the grid cells."""

    def __init__(
        self,
        lm: LlamaForCausalLM,
        grid: bool,
        pairs: bool = False,
        vocab: Vocabulary | None = None,
        coords=False,
        aux_layer: int | None = None,
        heads: tuple[str, ...] = (),
    ):
        super().__init__()
        self.lm = lm
        width = lm.config.hidden_size
        self.row = nn.Embedding(SIDE, width) if grid else None
        self.column = nn.Embedding(SIDE, width) if grid else None
        # --coords: an ordinal 2-D signal, a learned linear map of the cell's (x, y) in [-1, 1]
        self.coords = nn.Linear(2, width, bias=False) if coords else None
        # --objects pair: a learned vector per (colour, shape) conjunction added to the sum of the words'
        self.pair = nn.Embedding(len(scenes.COLORS) * len(scenes.SHAPES), width) if pairs else None
        index = torch.full((lm.config.vocab_size, lm.config.vocab_size), -1, dtype=torch.long)
        if pairs:
            for c, color in enumerate(scenes.COLORS):
                for s, shape in enumerate(scenes.SHAPES):
                    index[vocab.id[color], vocab.id[shape]] = c * len(scenes.SHAPES) + s
        self.register_buffer("pair_index", index, persistent=False)
        for table in (self.row, self.column, self.pair, self.coords):
            if table is not None:  # the scale of the word embeddings (Llama's initializer_range)
                nn.init.normal_(table.weight, std=0.02)
        # --aux: linear heads reading a named object's row and column off a question word's hidden state;
        # --aux-order: a linear head reading the two objects' left / above order where the answer is predicted.
        # Made last, so that the rest starts as without them (same random draws)
        self.aux_layer = aux_layer
        self.where = nn.Linear(width, 2 * SIDE) if "where" in heads else None
        self.order = nn.Linear(width, 2) if "order" in heads else None

    def embed(self, batch: dict) -> torch.Tensor:
        table = self.lm.get_input_embeddings()
        x = table(batch["first"]) + table(batch["second"]) * (batch["second"] > 0)[..., None]
        if self.row is not None:
            grid = batch["grid"].clamp(min=0)
            on = (batch["grid"] >= 0)[..., None]
            x = x + on * (self.row(grid // SIDE) + self.column(grid % SIDE))
        if self.coords is not None:
            grid = batch["grid"].clamp(min=0)
            xy = torch.stack([grid % SIDE, grid // SIDE], -1).float() / (SIDE - 1) * 2 - 1
            x = x + (batch["grid"] >= 0)[..., None] * self.coords(xy)
        if self.pair is not None:
            pair = self.pair_index[batch["first"], batch["second"]]
            x = x + (pair >= 0)[..., None] * self.pair(pair.clamp(min=0))
        return x

    def forward(self, batch: dict, embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.outputs(batch, embeds)[0]

    def outputs(self, batch: dict, embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(next-token logits, {"aux": the --aux loss, "order": the --aux-order loss} when training with them)."""
        embeds = self.embed(batch) if embeds is None else embeds
        hidden = self.aux_layer is not None and self.training
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=batch["mask"],
            position_ids=batch["position"],
            output_hidden_states=hidden,
        )
        if not hidden:
            return out.logits, {}
        states = out.hidden_states[self.aux_layer]
        losses = {}
        if self.where is not None:
            on = batch["where"] >= 0
            guess = self.where(states[on]).view(-1, 2, SIDE)
            cells = batch["where"][on]
            losses["aux"] = (
                F.cross_entropy(guess[:, 0], cells // SIDE) + F.cross_entropy(guess[:, 1], cells % SIDE)
            ) / 2
        if self.order is not None:
            on = batch["order"] >= 0
            bits = torch.stack([batch["order"][on] % 2, batch["order"][on] // 2], -1).float()
            losses["order"] = (
                F.binary_cross_entropy_with_logits(self.order(states[on]), bits) if on.any() else 0 * states.sum()
            )
        return out.logits, losses


class QwenLanguageModel(nn.Module):
    """The Qwen2-VL organism's language model (``Qwen2VLTextModel`` + its head) behind ``LlamaForCausalLM``'s call."""

    def __init__(self, vocab_size: int, rope_theta: float | None = None):
        super().__init__()
        from transformers import Qwen2VLForConditionalGeneration

        full = Qwen2VLForConditionalGeneration(build.config("qwen2vl", vocab_size, rope_theta))
        self.model, self.lm_head = full.model.language_model, full.lm_head
        self.config = self.model.config

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, inputs_embeds, attention_mask, position_ids, output_hidden_states=False):
        from types import SimpleNamespace

        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )
        return SimpleNamespace(logits=self.lm_head(out.last_hidden_state), hidden_states=out.hidden_states)


def language_model(args, vocab_size: int) -> LlamaForCausalLM:
    """The organism's language model (``build.config(family, ...).text_config``), with the overrides in ``args``."""
    if args.family == "qwen2vl":
        if any((args.width, args.heads, args.layers, args.tie)):
            raise ValueError("--family qwen2vl takes the organism's language model as it is: no size overrides")
        torch.manual_seed(args.seed)
        return QwenLanguageModel(vocab_size, args.rope_theta)
    text = build.config("llava", vocab_size, args.rope_theta).text_config
    width = args.width or text.hidden_size
    heads = args.heads or text.num_attention_heads
    text.hidden_size = width
    text.num_attention_heads = text.num_key_value_heads = heads
    text.head_dim = width // heads
    text.intermediate_size = 3 * width
    text.num_hidden_layers = args.layers or text.num_hidden_layers
    text.tie_word_embeddings = args.tie
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(text)


def symbolic_model(args, vocab: Vocabulary) -> Symbolic:
    lm = language_model(args, len(vocab.words))
    aux_layer = None
    if args.aux or args.aux_order:  # hidden_states[k] is the output of layer k; default: the last layer's input
        aux_layer = args.aux_layer if args.aux_layer is not None else lm.config.num_hidden_layers - 1
    heads = ("where",) * bool(args.aux) + ("order",) * bool(args.aux_order)
    return Symbolic(lm, args.grid, args.objects == "pair", vocab, args.coords, aux_layer, heads)


def initialise(model: Symbolic, path: str, log) -> None:
    """Load the weights of a ``--save`` file (``check`` has matched its model options); modules it lacks (e.g.
    ``--coords`` added now) keep their fresh init, and its ``--aux`` / ``--aux-order`` heads are dropped when this run
    has none."""
    state, _ = load(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("where.", "order."))}  # training heads
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path} has parameters this model lacks: {unexpected}")
    log({"stage": "init", "path": path, "fresh": missing})


def schedule(optimizer, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 5 % at the last step (as ``training.organisms``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def position_question(shapes, rng: random.Random, relations) -> scenes.Question | None:
    """``scenes._position`` with the relation drawn from ``relations`` only (``--relations``): a pair whose centres
    differ by at least 12 px along the relation's axis, yes or no half each; None if the scene has no such pair."""
    pairs = [(a, b) for a in shapes for b in shapes if a is not b]
    rng.shuffle(pairs)
    want = rng.random() < 0.5
    relation = rng.choice(relations)
    axis = 0 if relation in ("left of", "right of") else 1
    for a, b in pairs:
        delta = a.center[axis] - b.center[axis]
        holds = delta < 0 if relation in ("left of", "above") else delta > 0
        if abs(delta) >= 12 and holds == want:
            return scenes.Question("position", f"is the {a.name} {relation} the {b.name} ?", "yes" if want else "no")
    return None


class Batches:
    """Training sequences from fresh train scenes: multi-turn (each scene's six questions in random order, as
    ``training.organisms``) or single-turn (one random question per scene). ``families`` limits the questions;
    ``relations`` (a subset of ``scenes.RELATIONS``) replaces each scene's position question by one asking only
    those relations (scenes without a suitable pair keep theirs)."""

    def __init__(self, vocab: Vocabulary, args):
        self.vocab, self.args = vocab, args
        self.next_index = args.scene_offset
        self.rng = random.Random(args.seed + 1)

    def __call__(self, families, relations=scenes.RELATIONS, share: float = 1.0) -> list[Example]:
        """``share``: the fraction of scenes whose position question is restricted to ``relations``."""
        out = []
        while len(out) < self.args.batch:
            scene = layout("train", self.next_index)
            self.next_index += 1
            if tuple(relations) != scenes.RELATIONS and self.rng.random() < share:
                asked = position_question(scene[0], self.rng, relations)
                if asked is not None:
                    scene = (*scene[:3], tuple(asked if q.family == "position" else q for q in scene[3]))
            questions = [q for q in scene[3] if q.family in families]
            self.rng.shuffle(questions)
            if self.args.turns == "single":
                questions = questions[:1]
            out.append(example(scene, questions, self.vocab, self.args.objects == "split", self.args.eos))
        return [_all_tokens(e, self.vocab) for e in out] if self.args.span == "all" else out


@torch.no_grad()
def evaluate(model: Symbolic, vocab: Vocabulary, args, count: int, features=None) -> dict:
    """Single-turn test accuracy per family (argmax over the whole vocabulary at ``ASSISTANT:``)."""
    model.eval()
    right = {f: 0 for f in scenes.FAMILIES}
    by_relation = {r: [0, 0] for r in scenes.RELATIONS}  # position questions: [right, asked] per relation
    for start in range(0, count, 100):
        chunk = [layout("test", i) for i in range(start, min(count, start + 100))]
        for family_index, family in enumerate(scenes.FAMILIES):
            examples = [prompt(s, s[3][family_index], vocab, args.objects == "split") for s in chunk]
            if features is None:
                spans = [_all_tokens(e, vocab) for e in examples] if args.span == "all" else examples
                batch = collate(spans, vocab.mrope)
                logits = model(batch)
            else:
                batch, embeds, _, _ = features.inputs(model, examples, range(start, start + len(chunk)), "test")
                logits = model(batch, embeds)
            guess = logits[torch.arange(len(chunk)), batch["last"]].argmax(-1)
            truth = torch.tensor([vocab.id[s[3][family_index].answer] for s in chunk])
            right[family] += int((guess == truth).sum())
            if family == "position":
                for s, hit in zip(chunk, (guess == truth).tolist(), strict=True):
                    relation = next(r for r in scenes.RELATIONS if f" {r} the " in s[3][family_index].question)
                    by_relation[relation][0] += hit
                    by_relation[relation][1] += 1
    model.train()
    out = {f: round(r / count, 3) for f, r in right.items()}
    out["overall"] = round(sum(right.values()) / (count * len(scenes.FAMILIES)), 3)
    out["min"] = min(out[f] for f in scenes.FAMILIES)
    out["relations"] = {r: round(hit / max(1, n), 3) for r, (hit, n) in by_relation.items()}
    return out


def answer_prior(vocab: Vocabulary, count: int) -> dict:
    """Test accuracy of always giving each family's most frequent train answer (the prior a stuck model learns)."""
    from collections import Counter

    counts = {f: Counter() for f in scenes.FAMILIES}
    for i in range(5000):
        for q in layout("train", i)[3]:
            counts[q.family][q.answer] += 1
    best = {f: c.most_common(1)[0][0] for f, c in counts.items()}
    right = {f: 0 for f in scenes.FAMILIES}
    for i in range(count):
        for q in layout("test", i)[3]:
            right[q.family] += q.answer == best[q.family]
    return {f: round(r / count, 3) for f, r in right.items()}


# --- Stage 0: real visual tokens from the shipped organism's frozen vision tower -------------------------------------


class Features:
    """Cached layer -2 patch features (fp16) of the shipped shapes-llava tower for train and test scenes, and the
    batches built from them: the conversation of ``example`` with each object / sign slot filled by the projected
    feature of the visual token covering its centre (``keep="objects"``), or with all 256 visual tokens in place
    (``keep="all"``)."""

    def __init__(self, organism, counts: dict[str, int], keep: str):
        self.keep = keep
        self.projector = organism.model.multi_modal_projector
        tower = organism.model.vision_tower
        layer = organism.config.vision_feature_layer
        self.cache = {}
        for split, count in counts.items():
            chunks = []
            for start in range(0, count, 64):
                images = [scenes.scene(split, i).image for i in range(start, min(count, start + 64))]
                pixels = build.normalize(torch.stack([torch.from_numpy(_array(im)) for im in images]))
                with torch.no_grad():
                    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
                chunks.append(hidden.half())
            self.cache[split] = torch.cat(chunks)  # [N, 256, D]

    def inputs(self, model: Symbolic, examples: list[Example], indices, split: str):
        """(batch tensors, input embeddings, the symbolic vectors the visual slots replace, the object-slot mask)."""
        if self.keep == "all":
            examples = [_all_tokens(e, Vocabulary()) for e in examples]
        batch = collate(examples)
        symbolic = model.embed(batch)
        features = self.projector(self.cache[split][list(indices)].float())  # [b, 256, D]
        visual = batch["grid"] >= 0
        rows = torch.arange(len(examples))[:, None].expand_as(visual)[visual]
        embeds = symbolic.masked_scatter(visual[..., None], features[rows, batch["grid"][visual]])
        return batch, embeds, symbolic, visual & (batch["first"] > 0)


def _all_tokens(e: Example, vocab: Vocabulary) -> Example:
    """The first turn's object slots replaced by all 256 visual tokens, at their original positions."""
    out = Example()
    out.kinds = e.kinds
    slots = [i for i, g in enumerate(e.grid) if g >= 0]
    for i in range(slots[0]):
        out.add(e.first[i], e.position[i])
    base = e.position[slots[0]] - (0 if vocab.mrope else e.grid[slots[0]])
    words = {e.grid[i]: (e.first[i], e.second[i]) for i in slots}  # the object cells keep their words (alignment)
    for index in range(IMAGE_TOKENS):
        first, second = words.get(index, (0, 0))
        out.add(first, vocab.cell_position(base, index), second=second, grid=index)
    for i in range(slots[-1] + 1, len(e)):
        out.add(e.first[i], e.position[i])
        out.target[-1] = e.target[i]
        out.where[-1] = e.where[i]
        out.order[-1] = e.order[i]
    return out


def _array(image):
    import numpy as np

    return np.asarray(image, dtype=np.uint8).copy()


def stage0(args, vocab: Vocabulary, log) -> None:
    """Continue a symbolic run's language model on real visual tokens (see the module docstring)."""
    from transformers import AutoModelForImageTextToText

    from vtc import organisms

    if args.objects == "split":
        raise ValueError("Stage 0 puts one visual token per object: use --objects sum or pair")
    organism = AutoModelForImageTextToText.from_pretrained(organisms.path("shapes-llava")).float()
    organism.requires_grad_(False)
    model = symbolic_model(args, vocab)
    if args.init:
        initialise(model, args.init, log)
    started = time.time()
    features = Features(organism, {"train": args.pixels, "test": args.eval_scenes}, args.keep)
    log({"stage": "cache", "train": args.pixels, "test": args.eval_scenes, "cache_s": round(time.time() - started, 1)})
    projector = features.projector
    if args.reset_projector:
        for module in projector.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    projector.requires_grad_(not args.freeze_projector)
    lm_params = list(model.parameters())
    params = lm_params + ([] if args.freeze_projector else list(projector.parameters()))
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd)
    sched = schedule(optimizer, args.steps, args.warmup)
    rng = random.Random(args.seed + 1)
    log({"stage": "pixels-test", "step": 0, **evaluate(model, vocab, args, args.eval_scenes, features)})
    for step in range(args.steps):
        frozen = step < args.projector_steps  # the language model waits while the projector learns its inputs
        for p in lm_params:
            p.requires_grad_(not frozen)
        indices = rng.sample(range(args.pixels), args.batch)
        examples = []
        for i in indices:
            s = layout("train", i)
            questions = list(s[3])
            rng.shuffle(questions)
            examples.append(example(s, questions[:1] if args.turns == "single" else questions, vocab, False, args.eos))
        batch, embeds, symbolic, objects = features.inputs(model, examples, indices, "train")
        answers = loss_of(model(batch, embeds), batch["target"])
        target = symbolic[objects].detach()
        align = F.mse_loss(embeds[objects], target) / target.pow(2).mean()  # relative squared error
        loss = answers + args.align * align
        build.optimizer_step(loss, optimizer, sched, params)
        if step % 100 == 0:
            log({"stage": "pixels", "step": step, "loss": round(answers.item(), 4), "align": round(align.item(), 4)})
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            log({"stage": "pixels-test", "step": step + 1, **evaluate(model, vocab, args, args.eval_scenes, features)})


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.symbolic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="run", help="label of the run in the log")
    parser.add_argument("--family", choices=build.FAMILIES, default="llava", help="whose prompt and language model")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64, help="sequences (= fresh scenes) per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--wd", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--turns", choices=("single", "multi"), default="multi")
    parser.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True, help="loss on </s> too")
    parser.add_argument("--objects", choices=("sum", "split", "pair"), default="sum")
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="row/col embeddings")
    parser.add_argument("--coords", action="store_true", help="add a linear map of the cell's (x, y) to objects")
    parser.add_argument("--aux", type=float, default=0.0, help="weight of the named-object row/column loss")
    parser.add_argument(
        "--aux-order", type=float, default=0.0, help="weight of the position pair's left/above loss at the answer"
    )
    parser.add_argument("--aux-order-start", type=int, default=0, help="step from which --aux-order counts")
    parser.add_argument("--aux-layer", type=int, default=None, help="hidden state it reads (default: layers - 1)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--tie", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--rope-theta",
        type=float,
        default=None,
        help="rotary base (default: the family's; training.pixels takes Qwen2-VL's along, and refuses one on LLaVA)",
    )
    parser.add_argument("--families", default=",".join(scenes.FAMILIES), help="families trained on")
    parser.add_argument("--first", default="", help="families trained on alone for the first --first-steps")
    parser.add_argument("--first-steps", type=int, default=0)
    parser.add_argument(
        "--relations", default=",".join(scenes.RELATIONS), help="relations of the training position questions"
    )
    parser.add_argument("--relations-steps", type=int, default=0, help="--relations for these first steps (0: all)")
    parser.add_argument("--relations-ramp", type=int, default=0, help="then mixed in with all four over these steps")
    parser.add_argument(
        "--span", choices=("objects", "all"), default="objects", help="image span: object tokens only, or all 256"
    )
    parser.add_argument("--scene-offset", type=int, default=0, help="index of the first train scene")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--log", help="append the run's record (JSON line) to this file")
    parser.add_argument("--save", help="save the trained model's weights and this run's options here")
    parser.add_argument("--prior", action="store_true", help="print the answer-prior accuracy and exit")
    parser.add_argument("--pixels", type=int, default=0, help="Stage 0: continue on N cached train scenes' features")
    parser.add_argument("--init", help="start from a model saved by --save (the same MODEL_OPTIONS)")
    parser.add_argument("--keep", choices=("objects", "all"), default="objects")
    parser.add_argument("--freeze-projector", action="store_true")
    parser.add_argument("--reset-projector", action="store_true", help="re-initialise the projector")
    parser.add_argument("--projector-steps", type=int, default=0, help="Stage 0: first steps train the projector only")
    parser.add_argument("--align", type=float, default=0.0, help="Stage 0: weight of the feature-to-symbol MSE")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


def check(args) -> None:
    """Refuse option combinations this module cannot train, before any work."""
    if args.family == "qwen2vl" and (args.grid or args.coords or args.pixels):
        raise ValueError(
            "--family qwen2vl: its vision tower has no absolute positions (use --no-grid, no --coords) and Stage 0 "
            "(--pixels) is LLaVA's"
        )
    if args.span == "all" and args.objects == "split":
        raise ValueError("--span all puts one vector per visual token: use --objects sum or pair with it")
    if args.init:
        _, saved = load(args.init)
        wrong = {k: saved.get(k) for k in MODEL_OPTIONS if saved.get(k) != getattr(args, k)}
        if wrong:
            raise ValueError(
                f"--init {args.init}: its model was trained with {wrong}, this run asks for "
                f"{ {k: getattr(args, k) for k in wrong} }; a continued run keeps the model's "
                f"{', '.join(MODEL_OPTIONS)}"
            )


MODEL_OPTIONS = ("family", "grid", "layers", "width", "heads", "tie", "rope_theta")  # the model, not its training


def run(args) -> None:
    """One run of ``args`` on the calling process's threads: train (or Stage 0), then append its record to --log."""
    check(args)
    vocab = Vocabulary(args.family)
    for i in range(20):  # layout() must reproduce scenes.scene()
        s = scenes.scene("test", i)
        if layout("test", i) != (list(s.shapes), s.sign, s.sign_box, s.questions):
            raise RuntimeError("training.symbolic.layout no longer matches vtc.organisms.scenes.scene")
    if args.prior:
        print(json.dumps({"prior": answer_prior(vocab, args.eval_scenes)}))
        return
    start = time.time()
    history = []
    log = build.run_log(start, history)
    log({"stage": "config", **vars(args)})
    if args.pixels:
        stage0(args, vocab, log)
    else:
        train(args, vocab, log)
    if args.log:
        record = {"name": args.name, "arguments": vars(args), "seconds": round(time.time() - start, 1)}
        record["final"] = history[-1]
        record["history"] = [h for h in history if "overall" in h]
        with open(args.log, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(args, vocab: Vocabulary, log) -> None:
    model = symbolic_model(args, vocab)
    if args.init:  # continue a symbolic run (with --scene-offset past the scenes it saw)
        initialise(model, args.init, log)
    log({"stage": "model", "parameters": sum(p.numel() for p in model.parameters())})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    sched = schedule(optimizer, args.steps, args.warmup)
    batches = Batches(vocab, args)
    families = tuple(args.families.split(","))
    first = tuple(args.first.split(",")) if args.first else families
    relations = tuple(args.relations.split(","))
    if not set(relations) <= set(scenes.RELATIONS):
        raise ValueError(f"--relations: choose from {scenes.RELATIONS}")
    model.train()
    if args.steps == 0:  # evaluate the --init weights only
        log({"stage": "test", "step": 0, **evaluate(model, vocab, args, args.eval_scenes)})
    for step in range(args.steps):
        # --relations for --relations-steps, then their share falls linearly to 0 over --relations-ramp steps
        share = 1.0
        if args.relations_steps and step >= args.relations_steps:
            share = max(0.0, 1 - (step - args.relations_steps + 1) / (args.relations_ramp + 1))
        examples = batches(first if step < args.first_steps else families, relations, share)
        batch = collate(examples, vocab.mrope)
        logits, aux = model.outputs(batch)
        answers = loss_of(logits, batch["target"])
        order = args.aux_order if step >= args.aux_order_start else 0.0
        loss = answers + args.aux * aux.get("aux", 0) + order * aux.get("order", 0)
        build.optimizer_step(loss, optimizer, sched, model.parameters())
        if step % 100 == 0:
            entry = {"stage": "train", "step": step, "loss": round(answers.item(), 4)}
            entry.update({k: round(v.item(), 4) for k, v in aux.items()})
            log(entry)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            log({"stage": "test", "step": step + 1, **evaluate(model, vocab, args, args.eval_scenes)})
    if args.save:
        save(model, args, args.save)


def save(model: nn.Module, args, path) -> None:
    """A run's weights together with the options that made them (``training.pixels`` checks them)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arguments": vars(args), "state_dict": model.state_dict()}, path)


def load(path) -> tuple[dict, dict]:
    """(state dict, arguments) of a file written by ``--save``."""
    saved = torch.load(path)
    if not (isinstance(saved, dict) and set(saved) == {"arguments", "state_dict"}):
        raise ValueError(f"{path}: not a training.symbolic --save file (a dict of 'arguments' and 'state_dict')")
    return saved["state_dict"], saved["arguments"]


if __name__ == "__main__":
    main()
