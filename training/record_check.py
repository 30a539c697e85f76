"""``python -m training.record_check DIR [--questions N]``: record a trained organism's accuracy through the eval path.

Runs the first N questions of the shapes test split through ``vtc eval``'s own code (processor, chat template,
greedy ``generate()``), uncompressed and with random pruning to 16 tokens, and writes the counts into
``DIR/training.json`` under ``"check"``. ``tests/organisms/test_shipped.py`` recomputes them on every test run, so a
change anywhere on that path that moves the shipped models' answers fails the tests.

    python -m training.organisms --family llava --output vtc/organisms/shapes-llava
    python -m training.record_check vtc/organisms/shapes-llava
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vtc import loading
from vtc.eval import runner
from vtc.eval.tasks import get_task

# 40 scenes x 6 families: small enough for the test suite (a few seconds per organism), large enough that the count
# checks the whole path (a wrong prompt or a broken image path costs far more than the 2 questions of slack).
DEFAULT_QUESTIONS = 240


def record(directory: Path, questions: int = DEFAULT_QUESTIONS, batch_size: int = 24) -> dict:
    """Compute the check, write it into ``directory / "training.json"``, and return it."""
    training = directory / "training.json"
    if not training.is_file():
        raise FileNotFoundError(f"{training} does not exist: train the organism first (python -m training.organisms)")
    model, processor = loading.load(str(directory))
    task = get_task("shapes")
    samples = list(enumerate(task.samples("test", questions)))
    check: dict = {"questions": len(samples), "split": "test"}
    for setting in (runner.Setting("none", None), runner.Setting("random", 16)):
        records = runner.run_setting(model, processor, task, samples, setting, batch_size=batch_size)
        key = "correct" if setting.method == "none" else "correct_random_16"
        check[key] = int(sum(r["score"] for r in records))
    data = json.loads(training.read_text())
    data["check"] = check
    training.write_text(json.dumps(data, indent=1) + "\n")
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.record_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a trained organism's directory (holds training.json)")
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS)
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error(f"--questions must be >= 1, got {args.questions}")
    try:
        check = record(args.directory, args.questions)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
