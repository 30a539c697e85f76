"""Tiny random-weight models built from configs: offline, seconds on a CPU, real transformers classes.

Used by the tests, the benchmarks and ``python -m vtc``. They have the real token geometry
(a 336 px CLIP-style tower with 14 px patches gives LLaVA-1.5's 576 visual tokens per image) but
random weights, so they exercise every code path without downloading anything.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1


def tiny_llava_config(
    *,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    image_size: int = 336,
    patch_size: int = 14,
    vocab_size: int = 256,
    vision_feature_layer: int = -2,
    attn_implementation: str = "sdpa",
    intermediate_size: int | None = None,
    heads: int = 4,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config ((image_size / patch_size)^2 visual tokens, CLS dropped)."""
    intermediate = intermediate_size or 2 * hidden_size
    vision = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_options
) -> LlavaForConditionalGeneration:
    """A random-weight LlavaForConditionalGeneration in eval mode (weights depend only on ``seed``)."""
    config = tiny_llava_config(attn_implementation=attn_implementation, **config_options)
    torch.manual_seed(seed)
    # Larger-than-default init so that random tokens are distinguishable and greedy decoding has no ties.
    config.text_config.initializer_range = 0.2
    config.vision_config.initializer_factor = 4.0
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():
        # Special tokens (pad, bos, eos, <image>) get logit 0, below the max of the random ones, so greedy
        # decoding never emits an <image> placeholder or stops early.
        model.lm_head.weight[: IMAGE_TOKEN_ID + 1] = 0
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_llava_inputs(
    model: LlavaForConditionalGeneration,
    *,
    images_per_sample: tuple[int, ...] = (1,),
    text_lengths: tuple[tuple[int, int], ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / pixel_values for a batch, left-padded like a real processor.

    Sample b is ``<bos> text <image>xN ... text`` with ``images_per_sample[b]`` images, text before
    and after of the lengths in ``text_lengths[b]`` (default: lengths that differ per sample).
    """
    config = model.config
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    rows = []
    for b, count in enumerate(images_per_sample):
        before, after = text_lengths[b] if text_lengths else (3 + 2 * b, 5 + b)
        ids = [BOS_TOKEN_ID] + torch.randint(4, vocab, (before,), generator=generator).tolist()
        for _ in range(count):
            ids += [IMAGE_TOKEN_ID] * n + torch.randint(4, vocab, (2,), generator=generator).tolist()
        ids += torch.randint(4, vocab, (after,), generator=generator).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids) :] = torch.tensor(ids)
        attention_mask[b, length - len(ids) :] = 1
    total_images = sum(images_per_sample)
    pixel_values = torch.randn(total_images, 3, vision.image_size, vision.image_size, generator=generator)
    dtype = next(model.parameters()).dtype
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values.to(dtype)}


_WORDS = (  # noqa: SIM905 - a sentence reads better than 37 quoted words
    "<pad> <s> </s> <image> <unk> USER: ASSISTANT: what is in the image ? describe it briefly . "
    "a an of on and red green blue yellow circle square triangle cat dog how many left right yes no"
).split()
_CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "ASSISTANT:"
)


def save_tiny_llava(directory: str, seed: int = 0, **config_options) -> str:
    """Save a tiny LLaVA and a real LlavaProcessor (word-level tokenizer, CLIP image processor, chat
    template) to ``directory``, loadable offline with ``from_pretrained`` / ``AutoProcessor``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_WORDS)}
    assert vocab["<image>"] == IMAGE_TOKEN_ID and vocab["<pad>"] == PAD_TOKEN_ID and vocab["<s>"] == BOS_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_input_names=["input_ids", "attention_mask"],
    )
    config_options.setdefault("vocab_size", 64)
    model = tiny_llava(seed=seed, **config_options)
    vision = model.config.vision_config
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATE,
        image_token="<image>",
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
