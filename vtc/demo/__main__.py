"""``vtc demo`` (or ``python -m vtc.demo``) ``[--port P] [--model NAME] [--host 127.0.0.1] [--device cpu|cuda]``:
serve the demo page."""

from __future__ import annotations

import argparse
import sys

from vtc import extras
from vtc.demo import offline


def build_parser(prog: str = "python -m vtc.demo") -> argparse.ArgumentParser:
    """The options of ``python -m vtc.demo`` / ``vtc demo``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve the vtc demo page: answers, speed and kept patches, with and without vtc."
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--model", default="shapes-llava", help="model shown first: an organism name, a local directory or a hub id"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m vtc.demo") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        extras.require("demo", "gradio", needed_by=prog)
    except extras.MissingExtra as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    offline()
    import torch

    from vtc.demo.app import CSS, build_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    app = build_app(args.model, device)
    print(f"vtc demo: http://{args.host}:{args.port}/ (model {args.model}, {device})", flush=True)
    app.launch(server_name=args.host, server_port=args.port, css=CSS, show_error=True, footer_links=[], quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
