"""The Gradio page: a thin layer over :mod:`vtc.demo.core` (computation) and :mod:`vtc.demo.render` (pictures).

Import this module only after :func:`vtc.demo.offline` has set gradio's offline environment (``vtc demo`` does).

URL parameters (for links and headless browsers), applied on page load: ``sample=N`` (or a sample's label),
``method=NAME``, ``keep=K``, ``merge=1`` set the inputs; ``run=1`` also runs the comparison, e.g.
``http://127.0.0.1:7860/?sample=1&method=dart&keep=48&merge=1&run=1``.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

import vtc
from vtc import organisms
from vtc.adapters import llava_next
from vtc.adapters.base import VIDEO_BUDGETS
from vtc.demo import core, render, samples

log = logging.getLogger(__name__)

TITLE = "vtc: visual token compression"
CSS = """
#summary table { width: 100%; }
#status p { margin: 0; }
"""
HEADER = (
    f"## {TITLE}\n"
    "Ask a question about an image. The model answers twice: with all of its visual tokens and with a vtc method "
    "keeping only a budget of them. Below: both answers, how much faster the prefill was, how many visual tokens "
    "each language-model layer saw, and the image as the model still sees it: **kept patches bright**, dropped ones "
    "dimmed, merged groups (dart with merge) in colour, parts no token covers (cut off by the processor) hatched."
)
OPTION_METHODS = {"merge": ("dart",), "signal": ("fastervlm",), "layer": ("fastv", "dart_llm")}
DEFAULT_METHOD = "dart"
DEFAULT_KEEP = 64
VIDEO_MODEL = "shapes-qwen2vl"
VIDEO_HEADER = (
    "### Video\n"
    "A short synthetic clip (shapes moving, one appearing late) and a question about it, answered with all of the "
    "video's visual tokens and with a vtc method keeping a budget of them per video (or per frame). Below: the frames "
    "as the model still sees them. The video families compress videos (Qwen2-VL / 2.5-VL / 3-VL here); the shipped "
    "organism was trained on images only, so its answers about a video are guesses: watch which tokens survive."
)


def _model_choices(default: str) -> list[str]:
    choices = [default] + [name for name in organisms.ORGANISMS if name != default]
    return choices


def _visible(method: str) -> dict[str, bool]:
    return {option: method in methods for option, methods in OPTION_METHODS.items()}


def _error(error: Exception) -> gr.Error:
    if isinstance(error, core.DemoError):
        return gr.Error(str(error), title="Cannot compare", print_exception=False)
    log.exception("unexpected error")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return gr.Error(f"Something went wrong ({type(error).__name__}: {first}). The server log has the details.")


def shown(answer: str) -> str:
    """An answer as the page shows it (an untrained model may produce only special tokens)."""
    return answer if answer else "(no text: only special tokens)"


def summary(result: core.Comparison) -> str:
    """The comparison as a Markdown table."""
    defaults = vtc.get_method(result.method)
    options = ", ".join(f"{k}={v}" for k, v in result.options.items() if getattr(defaults, k, None) != v)
    setting = f"{result.method}{f' ({options})' if options else ''}, keep {result.keep}"
    per_layer = "/".join(str(n) for n in result.tokens_per_layer)
    signals = "; ".join(f"{name}: {source}" for name, source in result.signals.items()) or "none (token features only)"
    faster = f"**{result.speedup:.2f}x** faster" if result.speedup >= 1 else f"{1 / result.speedup:.2f}x slower"
    same = "the same answer" if result.same_answer else "a different answer"
    lines = [
        f"**{result.model}** · {setting} · {same}",
        "",
        "| | without vtc | with vtc |",
        "|---|---|---|",
        f"| prefill latency (median of {result.repeats}) | {result.baseline_ms:.1f} ms | {result.compressed_ms:.1f} ms "
        f"({faster}) |",
        f"| visual tokens (at the last LLM layer) | {result.tokens_before} | {result.tokens_after} |",
        f"| visual tokens per LLM layer | {result.tokens_before} at every layer | {per_layer} |",
    ]
    if result.flops_ratio is not None:
        lines.append(f"| LLM prefill FLOPs (estimate) | 100% | {result.flops_ratio:.0%} |")
    lines += [
        f"| image area the tokens cover | {result.area_visible:.0%} | {result.area_seen:.0%} |",
        "",
        f"Signals: {signals}.",
    ]
    lines += [f"Note: {note}" for note in result.notes]
    return "\n".join(lines)


def video_summary(result: core.VideoComparison) -> str:
    """A video comparison as a Markdown table."""
    faster = f"**{result.speedup:.2f}x** faster" if result.speedup >= 1 else f"{1 / result.speedup:.2f}x slower"
    t, h, w = result.grid
    per_frame = "/".join(str(n) for n in result.kept_per_frame)
    return "\n".join(
        [
            f"**{result.model}** · {result.method}, keep {result.keep} ({result.video_budget.replace('_', ' ')})",
            "",
            "| | without vtc | with vtc |",
            "|---|---|---|",
            f"| answer | {shown(result.baseline_answer)} | {shown(result.compressed_answer)} |",
            f"| prefill latency (median of {result.repeats}) | {result.baseline_ms:.1f} ms | "
            f"{result.compressed_ms:.1f} ms ({faster}) |",
            f"| visual tokens | {result.tokens_before} ({t} temporal patches of {h} x {w}) | {result.tokens_after} |",
            f"| kept per temporal patch | {h * w} each | {per_frame} |",
        ]
    )


def build_app(default_model: str = "shapes-llava", device: str = "cpu") -> gr.Blocks:
    """The demo page. ``default_model`` is loaded now (a failure is shown on the page, not raised)."""
    sample_list = samples.samples()
    first = sample_list[0]
    first_image = first.load()
    status = ""
    limit = 576
    try:
        bundle = core.load_model(default_model, device)
        limit = core.budget_limit(bundle, first_image)
        status = f"Model {bundle.describe()}."
    except core.DemoError as error:
        status = f"**{error}** Choose another model."

    def load_sample(label: str | None):
        if not label:
            return gr.update(), gr.update()
        sample = samples.by_label(label)
        return sample.load(), sample.question

    def budget_update(model_name: str, image: Any, keep: float):
        if image is None:
            return gr.update()
        try:
            bundle = core.load_model(model_name, device)
            top = core.budget_limit(bundle, core.as_rgb(image))
        except Exception:  # the slider keeps its range; compare() reports the problem
            return gr.update()
        return gr.update(maximum=top, value=min(int(keep or DEFAULT_KEEP), top))

    def change_model(model_name: str, image: Any, keep: float):
        try:
            bundle = core.load_model(model_name, device)
        except core.DemoError as error:
            gr.Warning(str(error), title="Model not loaded")
            return f"**{error}**", gr.update(), gr.update(visible=False), gr.update()
        next_visible = bundle.crop_budgets
        signal = "cls_attention" if bundle.has_cls else "attention_received"
        return (
            f"Model {bundle.describe()}.",
            budget_update(model_name, image, keep),
            gr.update(visible=next_visible),
            gr.update(value=signal),
        )

    def change_method(method: str):
        visible = _visible(method)
        return tuple(gr.update(visible=visible[name]) for name in ("merge", "signal", "layer"))

    def run(image, question, model_name, method, keep, merge, signal, layer, next_budget, max_new_tokens, repeats):
        try:
            bundle = core.load_model(model_name, device)
            options = core.method_options(method, merge=merge, signal=signal, layer=layer)
            if bundle.crop_budgets and next_budget:
                options["budget"] = next_budget
            result = core.compare(
                bundle,
                image,
                question,
                method,
                keep,
                options=options,
                max_new_tokens=int(max_new_tokens),
                repeats=int(repeats),
            )
        except Exception as error:  # every failure reaches the page as one message, never a stack trace
            raise _error(error) from None
        scale = render.display_scale(result.image)
        overlay = render.draw_overlay(
            result.image, result.boxes, result.kept, result.merge_into, scale=scale, outline=True
        )
        chart = render.layer_chart(result.tokens_before, result.tokens_per_layer)
        return (
            f"Done: {result.tokens_before} -> {result.tokens_after} visual tokens, {result.speedup:.2f}x prefill.",
            shown(result.baseline_answer),
            shown(result.compressed_answer),
            summary(result),
            overlay,
            chart,
        )

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(HEADER)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                sample = gr.Dropdown(
                    [s.label for s in sample_list], value=first.label, label="Sample", elem_id="sample"
                )
                image = gr.Image(
                    first_image,
                    type="pil",
                    format="png",  # lossless: the model must see the sample as it is
                    label="Image",
                    sources=["upload", "clipboard"],
                    height=300,
                    elem_id="image",
                )
                question = gr.Textbox(first.question, label="Question", elem_id="question", max_lines=3)
                model = gr.Dropdown(
                    _model_choices(default_model),
                    value=default_model,
                    label="Model",
                    info="a shipped organism, a local directory or a hub id (offline: local or cached)",
                    allow_custom_value=True,
                    elem_id="model",
                )
                method = gr.Dropdown(
                    vtc.list_methods(images=True), value=DEFAULT_METHOD, label="Method", elem_id="method"
                )
                keep = gr.Slider(
                    1, limit, value=min(DEFAULT_KEEP, limit), step=1, label="Budget: visual tokens kept", elem_id="keep"
                )
                visible = _visible(DEFAULT_METHOD)
                with gr.Row():
                    merge = gr.Checkbox(False, label="merge dropped tokens (dart)", visible=visible["merge"])
                    signal = gr.Dropdown(
                        ["cls_attention", "attention_received"],
                        value="cls_attention",
                        label="signal (fastervlm)",
                        visible=visible["signal"],
                    )
                    layer = gr.Number(2, precision=0, label="drop at layer (fastv, dart_llm)", visible=visible["layer"])
                    next_budget = gr.Dropdown(
                        list(llava_next.BUDGETS),
                        value="global",
                        label="AnyRes budget (LLaVA-NeXT, OneVision)",
                        visible=False,
                    )
                with gr.Accordion("Run settings", open=False):
                    max_new_tokens = gr.Slider(1, 256, value=24, step=1, label="max new tokens")
                    repeats = gr.Slider(1, 20, value=3, step=1, label="timed prefills (median)")
                button = gr.Button("Compare", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                status_box = gr.Markdown(status, elem_id="status")
                with gr.Row():
                    baseline = gr.Textbox(label="Answer without compression", elem_id="baseline-answer")
                    compressed = gr.Textbox(label="Answer with vtc", elem_id="compressed-answer")
                table = gr.Markdown(elem_id="summary")
                with gr.Row():
                    overlay = gr.Image(
                        label="What the model still sees",
                        type="pil",
                        format="png",
                        interactive=False,
                        elem_id="overlay",
                    )
                    chart = gr.Image(
                        label="Visual tokens per LLM layer",
                        type="pil",
                        format="png",
                        interactive=False,
                        elem_id="chart",
                    )

        clips = samples.video_samples()
        gr.Markdown(VIDEO_HEADER)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                clip = gr.Dropdown([c.label for c in clips], value=clips[0].label, label="Clip", elem_id="clip")
                video_question = gr.Textbox(clips[0].question, label="Question", elem_id="video-question", max_lines=3)
                video_model = gr.Dropdown(
                    _model_choices(VIDEO_MODEL), value=VIDEO_MODEL, label="Model", allow_custom_value=True
                )
                video_method = gr.Dropdown(vtc.list_methods("pre"), value="evs", label="Method", elem_id="video-method")
                video_keep = gr.Slider(1, 1024, value=384, step=1, label="Budget: visual tokens kept per video")
                video_budget = gr.Dropdown(list(VIDEO_BUDGETS), value="per_video", label="video_budget")
                video_button = gr.Button("Compare on the clip", variant="primary", elem_id="run-video")
            with gr.Column(scale=3):
                video_table = gr.Markdown(elem_id="video-summary")
                strip = gr.Image(
                    label="The clip as the model still sees it (one frame per temporal patch)",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="strip",
                )

        def load_clip(label: str | None):
            return gr.update() if not label else samples.video_by_label(label).question

        def run_video(label, question, model_name, method, keep, budget, repeats):
            try:
                bundle = core.load_model(model_name, device)
                frames = samples.video_by_label(label).load()
                result = core.compare_video(
                    bundle, frames, question, method, int(keep), video_budget=budget, repeats=int(repeats)
                )
            except Exception as error:  # every failure reaches the page as one message, never a stack trace
                raise _error(error) from None
            return video_summary(result), render.frame_strip(result.frames, result.grid, result.kept)

        clip.input(load_clip, clip, video_question, api_name=False)
        video_inputs = [clip, video_question, video_model, video_method, video_keep, video_budget, repeats]
        video_button.click(run_video, video_inputs, [video_table, strip], api_name="compare_video")

        inputs = [image, question, model, method, keep, merge, signal, layer, next_budget, max_new_tokens, repeats]
        outputs = [status_box, baseline, compressed, table, overlay, chart]
        sample.input(load_sample, sample, [image, question], api_name=False)  # user choices only, not autorun
        image.change(budget_update, [model, image, keep], keep, api_name=False)
        model.change(change_model, [model, image, keep], [status_box, keep, next_budget, signal], api_name=False)
        method.change(change_method, method, [merge, signal, layer], api_name=False)
        button.click(run, inputs, outputs, api_name="compare")

        url_settable = [sample, image, question, method, keep, merge]

        def on_load(
            image, question, model, method, keep, merge, signal, layer, next_budget, max_new_tokens, repeats,
            request: gr.Request,
        ):  # fmt: skip
            values = {
                "image": image, "question": question, "model_name": model, "method": method, "keep": keep,
                "merge": merge, "signal": signal, "layer": layer, "next_budget": next_budget,
                "max_new_tokens": max_new_tokens, "repeats": repeats,
            }  # fmt: skip
            updates = from_url(dict(request.query_params) if request is not None else {}, values)
            if updates is None:
                return tuple(gr.update() for _ in url_settable + outputs)
            if values.pop("run"):
                return updates + run(**values)
            return updates + tuple(gr.update() for _ in outputs)

        def from_url(params: dict[str, str], values: dict) -> tuple | None:
            """Apply ?sample=&method=&keep=&merge=&run= to ``values``; the updates of ``url_settable``, or None."""
            if not params.keys() & {"sample", "method", "keep", "merge", "run"}:
                return None
            updates = {name: gr.update() for name in ("sample", "image", "question", "method", "keep", "merge")}
            chosen = params.get("sample")
            if chosen is not None:
                try:
                    picked = sample_list[int(chosen)] if chosen.isdigit() else samples.by_label(chosen)
                except (IndexError, KeyError):
                    raise gr.Error(f"No sample {chosen!r} (samples 0..{len(sample_list) - 1})") from None
                values["image"], values["question"] = picked.load(), picked.question
                updates.update(sample=picked.label, image=values["image"], question=picked.question)
            if "method" in params:
                if params["method"] not in vtc.list_methods():
                    raise gr.Error(f"Unknown method {params['method']!r}; choose one of {vtc.list_methods()}")
                values["method"] = updates["method"] = params["method"]
            if "keep" in params:
                if not params["keep"].isdigit():
                    raise gr.Error(f"keep must be a whole number, got {params['keep']!r}")
                values["keep"] = updates["keep"] = int(params["keep"])
            truthy = ("1", "true", "yes")
            if "merge" in params:
                values["merge"] = updates["merge"] = params["merge"].lower() in truthy
            values["run"] = params.get("run", "").lower() in truthy
            return tuple(updates.values())

        app.load(on_load, inputs, url_settable + outputs, api_name=False)
    return app
