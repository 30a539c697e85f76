"""The demo as a user meets it: ``vtc demo`` in a subprocess on a free 127.0.0.1 port, called over gradio's HTTP
API, then driven by a headless Chromium through Playwright (type a question, click Compare, read the result from the
page). The server
runs with every outside connection refused and recorded (tests/demo/guarded_demo.py): it must need none, and the
page must ask for nothing beyond 127.0.0.1 (no CDN, no fonts, no analytics)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
httpx = pytest.importorskip("httpx")

# Imported after the importorskip calls, so that without gradio this module is skipped rather than broken.
from tests.demo.test_core import direct_answers  # noqa: E402
from vtc.demo import OFFLINE_ENV  # noqa: E402
from vtc.demo.screenshot import launch_chromium  # noqa: E402
from vtc.organisms import scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCENE = scenes.scene("test", 1)
QUESTION = SCENE.questions[1].question


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(llava_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-server")
    netlog, output = folder / "net.log", folder / "server.log"
    netlog.touch()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in OFFLINE_ENV}  # the demo must set them
    env.update(OMP_NUM_THREADS="1", VTC_DEMO_NETLOG=str(netlog), PYTHONPATH=str(ROOT))
    command = [sys.executable, "tests/demo/guarded_demo.py", "--port", str(port), "--model", llava_dir]
    with open(output, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode}:\n{output.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the demo did not start in 120 s:\n{output.read_text()[-3000:]}")
        time.sleep(0.3)
    yield SimpleNamespace(url=url, port=port, netlog=netlog, log=output, model=llava_dir)
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def call(server, data: list, api: str = "compare") -> tuple[str, object]:
    """POST /gradio_api/call/<api>, then read the event stream: (event name, data) of its last event."""
    reply = httpx.post(f"{server.url}/gradio_api/call/{api}", json={"data": data}, timeout=30)
    reply.raise_for_status()
    event_id = reply.json()["event_id"]
    event, payload = None, None
    with httpx.stream("GET", f"{server.url}/gradio_api/call/{api}/{event_id}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                payload = json.loads(line.split(":", 1)[1])
                if event in ("complete", "error"):
                    break
    return event, payload


def upload(server, image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    files = {"files": ("scene.png", buffer.getvalue(), "image/png")}
    reply = httpx.post(f"{server.url}/gradio_api/upload", files=files, timeout=30)
    reply.raise_for_status()
    return {"path": reply.json()[0], "meta": {"_type": "gradio.FileData"}}


def arguments(server, image, question=QUESTION, **change) -> list:
    values = {
        "image": image,
        "question": question,
        "model": server.model,
        "method": "dart",
        "keep": 24,
        "merge": True,
        "signal": "cls_attention",
        "layer": 2,
        "next_budget": "global",
        "max_new_tokens": 6,
        "repeats": 1,
        **change,
    }
    return list(values.values())


def test_http_api_answers_equal_direct_generate(server):
    event, data = call(server, arguments(server, upload(server, SCENE.image)))
    assert event == "complete", data
    status, baseline, compressed, summary, overlay, chart = data
    plain, with_vtc = direct_answers(server.model, SCENE.image, QUESTION, "dart", 24, merge=True)
    assert (baseline, compressed) == (plain, with_vtc)
    assert status.startswith("Done: 256 -> 24 visual tokens")
    assert "| visual tokens per LLM layer | 256 at every layer | 24/24/24 |" in summary
    assert "dart (merge=True), keep 24" in summary
    for picture in (overlay, chart):  # served as files by the app
        assert httpx.get(picture["url"], timeout=10).content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"question": ""}, "Type a question"),
        ({"image": None}, "Add an image"),
        ({"keep": 300}, "Value 300 is greater than maximum value 256"),  # the slider's own check
        (
            {"model": "QWEN", "image": "wide", "keep": "LIMIT+1"},
            "budget \\(LIMIT\\+1\\) is larger than the LIMIT visual",
        ),
        ({"model": "no/such-model"}, "Could not load 'no/such-model'"),
        ({"method": "vtc_cls", "model": "QWEN"}, "vtc_cls cannot run on .*no \\[CLS\\] token"),
    ],
)
def test_http_api_reports_bad_input_without_a_stack_trace(request, server, change, message):
    import re

    if change.get("model") == "QWEN":
        change["model"] = request.getfixturevalue("qwen_dir")
    image = change.pop("image", "upload")
    wide = SCENE.image.resize((200, 90))
    if change.get("keep") == "LIMIT+1":  # a wide image gives Qwen fewer tokens than the page's slider allows (256)
        from vtc.demo import core

        limit = core.budget_limit(core.load_model(change["model"]), wide)
        change["keep"] = limit + 1
        message = message.replace("LIMIT\\+1", str(limit + 1)).replace("LIMIT", str(limit))
        if limit + 1 > 256:  # this transformers' processor makes more tokens: the slider's own check answers
            message = "greater than maximum value 256"
    if image in ("upload", "wide"):
        image = upload(server, SCENE.image if image == "upload" else wide)
    event, data = call(server, arguments(server, image, **change))
    assert event == "error"
    assert re.search(message, json.dumps(data)), data
    assert "Traceback" not in json.dumps(data)


@pytest.mark.skipif(transformers.__version__.startswith("4."), reason="QwenProcessor prepares videos on transformers 5")
def test_http_api_compares_a_clip_and_refuses_a_model_without_video(request, server):
    """The video section: a synthetic clip on the Qwen organism's architecture (the answer equals the core's), and
    the LLaVA model refused with a message, not a stack trace."""
    from vtc.demo import core, samples

    qwen_dir = request.getfixturevalue("qwen_dir")
    clip = samples.video_samples()[0]
    arguments = [clip.label, clip.question, qwen_dir, "divprune", 64, "per_frame", 1]
    event, data = call(server, arguments, api="compare_video")
    assert event == "complete", data
    summary, strip = data
    direct = core.compare_video(core.load_model(qwen_dir), clip.load(), clip.question, "divprune", 64,
                                video_budget="per_frame", repeats=1)  # fmt: skip
    assert f"| answer | {direct.baseline_answer or '(no text'}" in summary
    assert "| visual tokens | 1024 (4 temporal patches of 16 x 16) | 256 |" in summary
    assert "| kept per temporal patch | 256 each | 64/64/64/64 |" in summary
    assert httpx.get(strip["url"], timeout=10).content.startswith(b"\x89PNG")
    event, data = call(
        server, [clip.label, clip.question, server.model, "divprune", 64, "per_video", 1], "compare_video"
    )
    assert event == "error" and "takes no video here" in json.dumps(data) and "Traceback" not in json.dumps(data)


@pytest.mark.skipif(  # CI installs chromium: there a missing browser is a failure, not a skip
    shutil.which("chromium") is None and not os.environ.get("CI"), reason="no chromium (apt-get install chromium)"
)
def test_browser_runs_a_comparison(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(90_000)
        requests, page_errors = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: page_errors.append(str(error)))

        page.goto(server.url + "/")
        page.fill("#question textarea", QUESTION)
        page.click("#run")
        expect(page.locator("#status")).to_contain_text("Done", timeout=90_000)
        status = page.inner_text("#status")
        assert status.startswith("Done: 256 -> 64 visual tokens")  # the page's default: dart, keep 64
        answers = page.evaluate(
            "['#baseline-answer', '#compressed-answer'].map(s => document.querySelector(s + ' textarea').value)"
        )
        plain, with_vtc = direct_answers(server.model, scenes.scene("test", 0).image, QUESTION, "dart", 64, 24)
        assert answers == [plain, with_vtc]  # the page's default: 24 new tokens
        dom = page.content()
        assert "visual tokens per LLM layer" in dom and "64/64/64" in dom
        assert page.evaluate("document.querySelector('#overlay img').naturalWidth") == 384
        png = page.screenshot(full_page=True)
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
        (tmp_path / "page.png").write_bytes(png)

        # URL parameters set the inputs and run on load (links, headless runs without clicks).
        page.goto(server.url + "/?sample=2&method=fastv&keep=40&run=1")
        expect(page.locator("#status")).to_contain_text("Done", timeout=90_000)
        status = page.inner_text("#status")
        assert status.startswith("Done: 256 -> 40 visual tokens")
        assert "256/256/40" in page.inner_text("#summary")
        question = page.evaluate("document.querySelector('#question textarea').value")
        assert question == scenes.scene("test", 2).questions[2].question
        outside = [url for url in requests if not url.startswith((server.url, "data:", "blob:"))]
        assert outside == [], outside
        assert page_errors == []
        browser.close()


def test_server_made_no_outside_connections(server):
    assert server.netlog.read_text() == ""
    # The only tracebacks in the server log: gradio's own input validation (the slider's range), which it prints.
    import re

    log = server.log.read_text()
    errors = re.findall(r"^Traceback.*?^(\S[^\n]*)$", log, flags=re.MULTILINE | re.DOTALL)
    assert log.count("Traceback") == len(errors)
    assert all(re.match(r"gradio.exceptions.Error: 'Value \d+ is greater than maximum", e) for e in errors), log[-4000:]
