"""``python -m demo [--port P] [--model NAME] [--host 127.0.0.1] [--device cpu|cuda]``: serve the demo page."""

from __future__ import annotations

import argparse

from demo import offline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Serve the vtc demo page: answers, speed and kept patches, with and without vtc.",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--model", default="shapes-llava", help="model shown first: an organism name, a local directory or a hub id"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)

    offline()
    import torch

    from demo.app import CSS, build_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    app = build_app(args.model, device)
    print(f"vtc demo: http://{args.host}:{args.port}/ (model {args.model}, {device})", flush=True)
    app.launch(server_name=args.host, server_port=args.port, css=CSS, show_error=True, footer_links=[], quiet=True)


if __name__ == "__main__":
    main()
