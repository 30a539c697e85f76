"""python -m vtc.eval.tables: the README's accuracy / retention tables from a summary.json."""

from __future__ import annotations

import json

import pytest

from vtc.eval import tables


def run(method, keep, accuracy, families):
    return {
        "task": "shapes",
        "method": method,
        "keep": keep,
        "n": 20,
        "accuracy": accuracy,
        "visual_tokens": 256.0 if keep is None else float(keep),
        "families": {f: {"accuracy": a, "n": 10} for f, a in families.items()},
    }


@pytest.fixture
def summary():
    return {
        "runs": [
            run("none", None, 0.6, {"count": 0.8, "read": 0.4}),
            run("random", 64, 0.3, {"count": 0.4, "read": 0.2}),
            run("random", 16, 0.15, {"count": 0.2, "read": 0.1}),
            run("divprune", 64, 0.6, {"count": 0.8, "read": 0.4}),
        ],
        "skipped": [{"method": "divprune", "keep": 16, "reason": "budget above the image's tokens"}],
    }


def test_accuracy_with_retention_per_method_and_budget(summary):
    text = tables.markdown(summary)
    assert "Uncompressed (256 tokens): **0.600** on 20 questions (count 0.80, read 0.40)." in text
    assert "| method | keep 64 | keep 16 |" in text
    assert "| random | 0.300 (50%) | 0.150 (25%) |" in text
    assert "| divprune | 0.600 (100%) | - |" in text  # a skipped cell stays empty
    assert "Skipped: divprune keep 16: budget above the image's tokens" in text


def test_family_retention_for_the_budgets_asked(summary):
    text = tables.markdown(summary, family_keeps=[16])
    assert "at keep 64" not in text
    assert "at keep 16" in text
    assert "| none (accuracy) | 0.80 | 0.40 |" in text
    assert "| random | 25% | 25% |" in text
    assert "| divprune |" not in text.split("at keep 16")[1]
    assert tables.markdown(summary).count("Retention per question family") == 2


def test_errors(tmp_path, summary, capsys):
    with pytest.raises(ValueError, match=r"--family-keep 32: task 'shapes' has runs at keep 64, 16 only"):
        tables.markdown(summary, family_keeps=[16, 32])
    summary["runs"] = summary["runs"][1:]
    with pytest.raises(ValueError, match="no uncompressed run"):
        tables.markdown(summary)
    assert tables.main([str(tmp_path)]) == 2
    assert "summary.json does not exist" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text(json.dumps({"runs": [run("none", None, 0.5, {})]}))
    assert tables.main([str(tmp_path)]) == 0
    assert "**0.500** on 20 questions." in capsys.readouterr().out
