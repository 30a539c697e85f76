"""``python -m vtc.eval.tables DIR [--family-keep K ...]``: an evaluation's summary as Markdown tables.

Reads ``DIR/summary.json`` (or the file itself) written by ``vtc eval`` and prints, per task: the uncompressed
accuracy, a method x budget table of accuracy with retention (compressed / uncompressed accuracy) in brackets, and
per question family (or category) the retention of every method at each budget asked for (default: every budget).
The README's accuracy tables are this output.

    python -m vtc.eval.tables vtc/eval/results/shapes-llava --family-keep 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass vtc eval's output directory or its summary.json")
    return json.loads(path.read_text())


def retention(value: float, reference: float) -> str:
    return f"{value / reference:.0%}" if reference > 0 else "-"


def markdown(summary: dict, family_keeps: list[int] | None = None) -> str:
    """The tables for every task in ``summary`` (the parsed summary.json)."""
    blocks = []
    for task in dict.fromkeys(run["task"] for run in summary["runs"]):
        runs = [run for run in summary["runs"] if run["task"] == task]
        full = next((run for run in runs if run["method"] == "none"), None)
        if full is None:
            raise ValueError(f"task {task!r} has no uncompressed run (method 'none'): retention needs it")
        compressed = [run for run in runs if run["method"] != "none"]
        keeps = sorted({run["keep"] for run in compressed}, reverse=True)
        methods = list(dict.fromkeys(run["method"] for run in compressed))
        cell = {(run["method"], run["keep"]): run for run in compressed}
        families = sorted(full.get("families", {}))
        per_family = ", ".join(f"{f} {full['families'][f]['accuracy']:.2f}" for f in families)
        lines = [
            f"Uncompressed ({full['visual_tokens']:.0f} tokens): **{full['accuracy']:.3f}** on {full['n']} questions"
            + (f" ({per_family})." if families else "."),
            "",
            "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
            "|---|" + "---|" * len(keeps),
        ]
        for method in methods:
            row = []
            for keep in keeps:
                run = cell.get((method, keep))
                if run is None:
                    row.append("-")
                else:
                    row.append(f"{run['accuracy']:.3f} ({retention(run['accuracy'], full['accuracy'])})")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        unknown = sorted(set(family_keeps or ()) - set(keeps))
        if unknown:
            raise ValueError(
                f"--family-keep {', '.join(map(str, unknown))}: task {task!r} has runs at keep "
                f"{', '.join(map(str, keeps))} only"
            )
        family_tables = keeps if family_keeps is None else [k for k in keeps if k in family_keeps]
        for keep in family_tables if families else []:
            lines += [
                "",
                f"Retention per question family at keep {keep} (accuracy / uncompressed accuracy):",
                "",
                "| method | " + " | ".join(families) + " |",
                "|---|" + "---|" * len(families),
                "| none (accuracy) | " + " | ".join(f"{full['families'][f]['accuracy']:.2f}" for f in families) + " |",
            ]
            for method in methods:
                run = cell.get((method, keep))
                if run is None:
                    continue
                values = [retention(run["families"][f]["accuracy"], full["families"][f]["accuracy"]) for f in families]
                lines.append(f"| {method} | " + " | ".join(values) + " |")
        skipped = [s for s in summary.get("skipped", []) if s.get("task", task) == task]
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{s['method']} keep {s['keep']}: {s['reason']}" for s in skipped)]
        blocks.append((f"### {task}\n\n" if len(summary["runs"]) != len(runs) else "") + "\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", type=Path, help="an output directory of vtc eval, or its summary.json")
    parser.add_argument("--family-keep", type=int, nargs="*", help="budgets for the per-family tables (default: all)")
    args = parser.parse_args(argv)
    try:
        print(markdown(load(args.summary), args.family_keep), end="")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
