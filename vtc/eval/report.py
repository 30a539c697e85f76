"""Write an evaluation's files: samples.jsonl, summary.json, summary.csv and accuracy_vs_tokens.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write(output: Path, header: dict, summaries: list[dict], records: list[dict]) -> list[Path]:
    """All files for one evaluation; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    samples = output / "samples.jsonl"
    with samples.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    summary = output / "summary.json"
    summary.write_text(json.dumps({**header, "runs": summaries}, indent=1) + "\n")
    table = output / "summary.csv"
    write_csv(table, summaries)
    paths = [samples, summary, table]
    plot = output / "accuracy_vs_tokens.png"
    if plot_accuracy(plot, summaries, title=f"{header['model']} on {header['task']}"):
        paths.append(plot)
    return paths


def write_csv(path: Path, summaries: list[dict]) -> None:
    """One row per (task, method, keep): tokens, accuracy, per-family accuracy, latency, memory."""
    families = sorted({family for s in summaries for family in s.get("families", {})})
    columns = ["task", "method", "keep", "visual_tokens", "visual_tokens_last_layer", "accuracy", "n"]
    columns += [f"accuracy_{family}" for family in families]
    columns += ["prefill_ms_per_sample", "peak_memory_mb"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for s in summaries:
            row = dict(s)
            for family, value in s.get("families", {}).items():
                row[f"accuracy_{family}"] = round(value["accuracy"], 4)
            for key in ("accuracy", "visual_tokens", "visual_tokens_last_layer", "prefill_ms_per_sample"):
                row[key] = round(row[key], 4)
            row["peak_memory_mb"] = round(row["peak_memory_mb"], 1)
            writer.writerow(row)


def plot_accuracy(path: Path, summaries: list[dict], title: str) -> bool:
    """Accuracy against visual tokens reaching the language model, one line per method (log2 x axis); the
    uncompressed model is a dashed line. False (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for task in sorted({s["task"] for s in summaries}):
        prefix = "" if len({s["task"] for s in summaries}) == 1 else f"{task}: "
        runs = [s for s in summaries if s["task"] == task]
        for s in runs:
            if s["method"] == "none":
                axes.axhline(s["accuracy"], color="black", linestyle="--", linewidth=1, label=f"{prefix}uncompressed")
        for method in dict.fromkeys(s["method"] for s in runs if s["method"] != "none"):
            points = sorted((s["visual_tokens_last_layer"], s["accuracy"]) for s in runs if s["method"] == method)
            axes.plot(*zip(*points, strict=True), marker="o", label=f"{prefix}{method}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("visual tokens per image reaching the last LLM layer")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
