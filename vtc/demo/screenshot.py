"""``python -m vtc.demo.screenshot``: start the demo, run one comparison in headless Chromium, save a small PNG of the
page.

    python -m vtc.demo.screenshot --model shapes-llava --out vtc/demo/screenshot.png

The page is opened with URL parameters (``--query``) that pick a sample, a method and a budget and run it on load;
the capture is reduced to a 256-colour PNG under ``--max-kb``. Playwright (the dev extra) drives the chromium on PATH
(Debian: ``apt-get install chromium``); it downloads no browser.
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

from vtc import extras
from vtc.demo import offline

# No outside host resolves (only 127.0.0.1 does); /dev/shm is small in containers.
CHROMIUM_ARGS = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--disable-dev-shm-usage")


def launch_chromium(playwright, executable: str | None = None):
    """A headless Playwright browser on the chromium on PATH (or ``executable``)."""
    executable = executable or shutil.which("chromium")
    if executable is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install -y chromium)")
    return playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the demo exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the demo did not answer at {url} within {timeout:.0f} s")


def small_png(png: bytes, max_kb: int) -> bytes:
    """A 256-colour PNG, scaled down until it is under ``max_kb`` kilobytes."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        sized = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)))
        buffer = io.BytesIO()
        sized.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, format="PNG", optimize=True
        )
        if buffer.tell() <= max_kb * 1024 or scale < 0.4:
            return buffer.getvalue()
        scale *= 0.85


def main(argv: list[str] | None = None) -> int:
    prog = "python -m vtc.demo.screenshot"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-llava", help="the model the page starts with")
    parser.add_argument("--out", default=str(Path(__file__).with_name("screenshot.png")), help="the PNG to write")
    parser.add_argument("--query", default="sample=1&method=dart&keep=48&merge=1&run=1", help="URL parameters")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    parser.add_argument("--max-kb", type=int, default=290, help="largest PNG size in kilobytes")
    args = parser.parse_args(argv)
    try:
        extras.require("demo", "gradio", needed_by=prog)
        extras.require("dev", "playwright", needed_by=prog)
    except extras.MissingExtra as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from playwright.sync_api import expect, sync_playwright

    offline()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "-m", "vtc.demo", "--port", str(port), "--model", args.model])
    try:
        _wait_ready(url, server)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"{url}?{args.query}")
            expect(page.locator("#status")).to_contain_text("Done", timeout=180_000)
            page.wait_for_function("[...document.querySelectorAll('#overlay img, #chart img')].every(i => i.complete)")
            time.sleep(0.5)  # let the last layout settle
            status = page.inner_text("#status")
            png = page.screenshot(full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    data = small_png(png, args.max_kb)
    Path(args.out).write_bytes(data)
    print(f"{args.out}: {len(data) // 1024} KB ({status.strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
