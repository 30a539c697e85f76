"""``python -m demo.screenshot``: start the demo, run one comparison in headless Chromium, save a small PNG of the page.

    python -m demo.screenshot --model shapes-llava --out demo/screenshot.png

The page is opened with URL parameters (``--query``) that pick a sample, a method and a budget and run it on load;
the capture is reduced to a 256-colour PNG under ``--max-kb``.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

from demo import offline
from demo.browser import Browser

ROOT = Path(__file__).resolve().parents[1]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.screenshot", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--out", default=str(ROOT / "demo" / "screenshot.png"))
    parser.add_argument("--query", default="sample=1&method=dart&keep=48&merge=1&run=1", help="URL parameters")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--max-kb", type=int, default=290)
    args = parser.parse_args(argv)

    offline()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, "-m", "demo", "--port", str(port), "--model", args.model], env=env)
    try:
        _wait_ready(url, server)
        with Browser(width=args.width, height=900, timeout=180) as browser:
            browser.open(f"{url}?{args.query}")
            status = browser.wait_for_text("#status", "Done")
            browser.wait_for("[...document.querySelectorAll('#overlay img, #chart img')].every(i => i.complete)")
            time.sleep(0.5)  # let the last layout settle
            png = browser.screenshot()
    finally:
        server.terminate()
        server.wait(timeout=30)
    data = small_png(png, args.max_kb)
    Path(args.out).write_bytes(data)
    print(f"{args.out}: {len(data) // 1024} KB ({status.strip()})")


if __name__ == "__main__":
    main()
