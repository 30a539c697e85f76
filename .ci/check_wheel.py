"""``python .ci/check_wheel.py WHEEL``, with the python of a venv that WHEEL is installed in, from outside the checkout.

Checks that the wheel holds the vtc package and its organisms, no tests, training code or other top-level package,
and that the venv imports vtc from its site-packages and finds no top-level ``eval``, ``demo`` or ``training``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import zipfile
from pathlib import Path


def wheel_problems(wheel: str) -> list[str]:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    problems = [f"top-level {name!r} in the wheel" for name in sorted(top - {"vtc"})]
    not_shipped = re.compile(r"(^|/)(train\w*|tests?)(/|\.py$)")  # training code, test code
    problems += [f"{name}: training or test code" for name in names if not_shipped.search(name)]
    for needed in ("vtc/cli.py", "vtc/eval/__main__.py", "vtc/demo/__main__.py", "vtc/organisms/scenes.py"):
        if needed not in names:
            problems.append(f"{needed} is missing")
    weights = [name for name in names if name.endswith("/model.safetensors")]
    if len(weights) != 2:
        problems.append(f"expected the two organisms' weights, found {weights}")
    return problems


def venv_problems() -> list[str]:
    import vtc

    problems = []
    if not Path(vtc.__file__).is_relative_to(sys.prefix):
        problems.append(f"vtc was imported from {vtc.__file__}, not from this venv ({sys.prefix})")
    for name in ("eval", "demo", "training"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            problems.append(f"import {name} finds {spec.origin}")
    return problems


if __name__ == "__main__":
    found = wheel_problems(sys.argv[1]) + venv_problems()
    for problem in found:
        print(f"wheel check: {problem}", file=sys.stderr)
    print(f"wheel check: {'FAILED' if found else 'ok'} ({Path(sys.argv[1]).name})")
    sys.exit(1 if found else 0)
