"""Benchmark tasks by name; a task's module is imported only when the task is asked for."""

from __future__ import annotations

import difflib
import importlib

from vtc.eval.tasks.base import Sample, Task

__all__ = ["TASKS", "Sample", "Task", "get_task", "list_tasks"]

# name -> "module:Class"
TASKS: dict[str, str] = {
    "gqa": "vtc.eval.tasks.gqa:GQATask",
    "vqav2": "vtc.eval.tasks.vqav2:VQAv2Task",
    "textvqa": "vtc.eval.tasks.textvqa:TextVQATask",
    "pope": "vtc.eval.tasks.pope:POPETask",
    "mme": "vtc.eval.tasks.mme:MMETask",
    "scienceqa": "vtc.eval.tasks.scienceqa:ScienceQATask",
    "mmbench": "vtc.eval.tasks.mmbench:MMBenchTask",
    "shapes": "vtc.eval.tasks.shapes:ShapesTask",
    "moving_shapes": "vtc.eval.tasks.moving_shapes:MovingShapesTask",
}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """A fresh task by name, e.g. ``get_task("gqa")``."""
    if not isinstance(name, str) or name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}; known tasks: {list_tasks()}.{hint}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
