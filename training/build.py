"""The organisms' configs, tokenizer and processors: real transformers classes, saved with ``save_pretrained``.

Both see a 128 x 128 scene as 256 visual tokens: the LLaVA one through a CLIP tower with 8 px patches (16 x 16
patches + [CLS]), the Qwen2-VL one through 4 px patches merged 2 x 2 (32 x 32 patches -> 16 x 16 tokens).
"""

from __future__ import annotations

import inspect
import json
import time

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from vtc.aux_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vtc.organisms import scenes

FAMILIES = ("llava", "qwen2vl")
HIDDEN = 128
QWEN_PATCH = 4
QWEN_MERGE = 2
QWEN_TEMPORAL = 2
LLAVA_PATCH = 8
# Ids 0-3 are shared; the LLaVA organism uses <image>, the Qwen one its three vision tokens.
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
LLAVA_SPECIAL = ["<image>"]
QWEN_SPECIAL = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
PROMPT_WORDS = ["USER", "ASSISTANT", ":"]
# The chat template renders user turns as "USER: <image> question ASSISTANT:" and assistant turns as " answer </s>";
# the Qwen one renders a video part as "<|vision_start|> <|video_pad|> <|vision_end|>" (no organism is trained on
# videos; vtc eval's moving_shapes task asks them about videos all the same).
_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE VIDEO{% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}ASSISTANT:"
    "{% else %}{% for part in message['content'] %} {{ part['text'] }}{% endfor %} </s> {% endif %}"
    "{% endfor %}"
)
IMAGE_TEXT = {"llava": "<image>", "qwen2vl": "<|vision_start|> <|image_pad|> <|vision_end|>"}
VIDEO_BRANCH = {
    "llava": "",
    "qwen2vl": "{% elif part['type'] == 'video' %}<|vision_start|> <|video_pad|> <|vision_end|> ",
}


def chat_template(family: str) -> str:
    return _TEMPLATE.replace("IMAGE", IMAGE_TEXT[family]).replace("VIDEO", VIDEO_BRANCH[family])


def tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the scene vocabulary (whitespace and punctuation split)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    special = SPECIAL + (LLAVA_SPECIAL if family == "llava" else QWEN_SPECIAL)
    words = special + PROMPT_WORDS + [w for w in scenes.vocabulary() if w not in PROMPT_WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(w, special=True) for w in special])  # matched before the split
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    extra = {"image_token": "<image>"} if family == "llava" else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
    )
    tok.chat_template = chat_template(family)
    return tok


def config(family: str, vocab_size: int, rope_theta: float | None = None):
    """The organism's config; ``rope_theta`` replaces its language model's rotary base (the default: Llama's 1e4,
    Qwen2-VL's 1e6)."""
    made = _config(family, vocab_size)
    if rope_theta is not None:
        set_rope_theta(made.text_config, rope_theta)
    return made


def set_rope_theta(text_config, theta: float) -> None:
    """Set a text config's rotary base: transformers 5.x keeps it in ``rope_parameters``, 4.x in ``rope_theta``."""
    if getattr(text_config, "rope_parameters", None):
        text_config.rope_parameters["rope_theta"] = theta
    else:
        text_config.rope_theta = theta


def _config(family: str, vocab_size: int):
    if family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=4 * HIDDEN,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=scenes.IMAGE_SIZE,
            patch_size=LLAVA_PATCH,
            projection_dim=HIDDEN,
        )
        text = LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=3 * HIDDEN,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=SPECIAL.__len__(),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
    if family == "qwen2vl":
        from vtc.tiny import qwen_text_config  # the 4.57 / 5.x rope key

        text = qwen_text_config(HIDDEN, 3, 4, vocab_size, 3 * HIDDEN, [4, 6, 6])
        text.update(num_key_value_heads=4, max_position_embeddings=1024, initializer_range=0.02)
        vision = {  # 1024 patches per scene: a narrower, shallower tower than LLaVA's keeps training near an hour
            "depth": 3,
            "embed_dim": HIDDEN // 2,
            "hidden_size": HIDDEN,
            "mlp_ratio": 4,
            "num_heads": 4,
            "patch_size": QWEN_PATCH,
            "temporal_patch_size": QWEN_TEMPORAL,
            "spatial_merge_size": QWEN_MERGE,
        }
        first = len(SPECIAL)
        return Qwen2VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=first,
            vision_start_token_id=first + 1,
            vision_end_token_id=first + 2,
            video_token_id=first + 3,
        )
    raise ValueError(f"unknown organism family {family!r}; choose from {', '.join(FAMILIES)}")


def model(family: str, vocab_size: int, seed: int = 0, rope_theta: float | None = None):
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    net = cls(config(family, vocab_size, rope_theta))
    net.generation_config.pad_token_id = 0
    net.generation_config.eos_token_id = 2
    net.generation_config.bos_token_id = 1
    return net


def image_processor(family: str):
    size = scenes.IMAGE_SIZE
    if family == "llava":
        return CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
        )
    try:  # 5.x: the PIL backend, which needs no torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # 4.x: the slow processor is the PIL one
        from transformers import Qwen2VLImageProcessor as cls
    pixels = size * size
    kwargs = {
        "patch_size": QWEN_PATCH,
        "merge_size": QWEN_MERGE,
        "temporal_patch_size": QWEN_TEMPORAL,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    if "size" in inspect.signature(cls.__init__).parameters:
        kwargs["size"] = {"shortest_edge": pixels, "longest_edge": pixels}
    else:
        kwargs.update(min_pixels=pixels, max_pixels=pixels)
    return cls(**kwargs)


def processor(family: str):
    """The real processor: LlavaProcessor, or Qwen2VLProcessor (needs torchvision: see ``vtc.organisms``)."""
    tok = tokenizer(family)
    if family == "llava":
        return LlavaProcessor(
            image_processor=image_processor(family),
            tokenizer=tok,
            patch_size=LLAVA_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=chat_template(family),
            image_token="<image>",
        )
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor(image_processor=image_processor(family), tokenizer=tok, chat_template=chat_template(family))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] CLIP-normalised: what both image processors compute for a 128 px scene."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def qwen_patches(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] normalised -> Qwen2-VL's flattened patches [B * h * w, 3 * T * P * P] in merge-window order."""
    b, c, height, width = pixels.shape
    p, m, t = QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL
    h, w = height // p, width // p
    x = pixels.unsqueeze(1).expand(b, t, c, height, width)
    x = x.reshape(b, t, c, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # b, h/m, w/m, m, m, c, t, p, p
    return x.reshape(b * h * w, c * t * p * p)


def save_processor(family: str, directory) -> None:
    """Save the processor files. Qwen2VLProcessor cannot be built without torchvision (transformers 5.x) nor with a
    tokenizer of another class than Qwen2's (4.57); its files (tokenizer, image processor, chat template, processor
    class) are then written from their parts, which :func:`vtc.loading.load_processor` reads back."""
    try:
        processor(family).save_pretrained(directory)
        return
    except (ImportError, AttributeError, ValueError, TypeError):
        if family == "llava":
            raise
    import json
    from pathlib import Path

    tokenizer(family).save_pretrained(directory)
    image_processor(family).save_pretrained(directory)
    path = Path(directory)
    (path / "chat_template.jinja").write_text(chat_template(family))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2) + "\n")


def save(model, family: str, directory) -> None:
    """Save a trained organism so that transformers 4.57 and 5.x both load it: weights, processor files.

    transformers 5.x writes the LLaVA CLIP tower as ``vision_tower.encoder...``, a tokenizer config whose
    ``extra_special_tokens`` is a list, and the Qwen2-VL language model's M-RoPE as ``rope_parameters``; 4.57 reads
    none of them (its tower is ``vision_tower.vision_model...``, it wants a dict, and ``rope_scaling`` +
    ``rope_theta``). All three are rewritten in the layout of the hub's checkpoints, which both versions read.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(directory)
    model.save_pretrained(path)
    save_processor(family, path)
    weights = path / "model.safetensors"
    state = load_file(weights)
    legacy = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        legacy[key] = value.contiguous()
    save_file(legacy, weights, metadata={"format": "pt"})
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":  # 5.x's name; 4.57 knows the class by its old name
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["extra_special_tokens"] = {"image_token": config.pop("image_token")} if "image_token" in config else {}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if family == "qwen2vl":
        legacy_rope(path / "config.json")


def legacy_rope(config_path) -> None:
    """Rewrite a Qwen2-VL config.json's text ``rope_parameters`` (5.x) as ``rope_theta`` + ``rope_scaling``."""
    import json
    from pathlib import Path

    config = json.loads(Path(config_path).read_text())
    text = config["text_config"]
    rope = text.pop("rope_parameters", None)
    if rope is not None:
        text["rope_theta"] = rope["rope_theta"]
        text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        Path(config_path).write_text(json.dumps(config, indent=2) + "\n")


def optimizer_step(loss: torch.Tensor, optimizer, schedule, parameters, clip: float = 1.0) -> None:
    """One training step of every training loop here: the gradients of ``loss``, clipped to total norm ``clip``, then
    an optimizer and a learning-rate schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    schedule.step()


def run_log(start: float, history: list[dict]):
    """A training run's logger: each entry gets its ``seconds`` since ``start``, goes into ``history`` and is printed
    as a JSON line."""

    def log(entry: dict) -> None:
        entry["seconds"] = round(time.time() - start, 1)
        history.append(entry)
        print(json.dumps(entry), flush=True)

    return log
