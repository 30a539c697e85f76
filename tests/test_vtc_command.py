"""The ``vtc`` console command: each subcommand hands its arguments to its own module's parser (``--help`` documents
every option), a missing extra is a one-line error naming what to install, and ``vtc run`` and ``vtc eval`` take the
same method specs."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from tests.helpers import refused
from vtc import cli

SPECS = ["none", "fastervlm:signal=attention_received", "pdrop:layers=(1,3)"]


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_vtc_help_lists_every_subcommand(capsys):
    text = help_text(["--help"], capsys)
    assert text.startswith("usage: vtc ")
    for name in cli.COMMANDS:
        assert re.search(rf"^ +{name} ", text, flags=re.MULTILINE), name
    assert help_text(["--version"], capsys).startswith("vtc ")


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_subcommand_help_is_its_modules_parser_with_every_option_documented(name, capsys):
    text = help_text([name, "--help"], capsys)
    assert text.startswith(f"usage: vtc {name} ")
    parser = importlib.import_module(cli.COMMANDS[name].module).build_parser()
    options = [action for action in parser._actions if action.option_strings]
    assert len(options) > 3
    for action in options:
        assert action.help, f"vtc {name}: {action.option_strings} has no help"
        for option in action.option_strings:
            assert re.search(rf"(^|\s|\[){re.escape(option)}\b", text), f"vtc {name} --help does not show {option}"


def test_importing_vtc_and_its_command_loads_no_eval_or_demo_code():
    code = (
        "import sys, vtc, vtc.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in OPTIONAL or m.startswith(('vtc.eval', 'vtc.demo'))))"
    ).replace("OPTIONAL", repr(("gradio", "pyarrow", "matplotlib", "accelerate", "playwright", "training")))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--methods", "dart"]])
def test_no_or_an_unknown_subcommand_is_refused(argv, capsys):
    line = refused(cli.main, argv, capsys)
    assert line.startswith("vtc: error: ")


def test_run_is_python_m_vtc(capsys, monkeypatch):
    import vtc.__main__ as run

    def no_model(*_):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(run, "_load", no_model)
    line = refused(cli.main, ["run", "--keep", "0"], capsys)
    assert line == "vtc run: error: --keep must be >= 1, got 0"


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [
        (["demo", "--port", "1"], "gradio", "demo"),
        (["eval", "--model", "shapes-llava", "--output", "OUT"], "matplotlib", "eval"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_extra(argv, missing, extra, tmp_path, capsys, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded although the command cannot run")

    monkeypatch.setattr("vtc.loading.load", no_model)
    monkeypatch.setitem(sys.modules, missing, None)  # import and find_spec treat it as not installed
    argv = [str(tmp_path / arg) if arg == "OUT" else arg for arg in argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    install = f'pip install "vtc[{extra}]"'
    assert captured.err == f"error: vtc {argv[0]} needs {missing}, part of the {extra} extra: {install}\n"
    assert captured.out == ""


def test_run_and_eval_take_the_same_method_specs(capsys):
    """``vtc run`` runs each spec (a row named by it); ``vtc eval`` plans one setting per spec with the same options."""
    from vtc.eval import runner
    from vtc.eval.__main__ import parse_args

    argv = ["run", "--model", "tiny-qwen2-vl", "--methods", ",".join(SPECS), "--repeats", "1", "--max-new-tokens", "1"]
    assert cli.main(argv) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if " -> " in line}
    assert set(table) == set(SPECS)
    assert all("384 -> 64 " in table[spec] for spec in SPECS[1:]), table
    args = parse_args(["--model", "m", "--output", "/tmp/unused", "--methods", ",".join(SPECS)])
    plan = runner.settings(args.method_specs, [64])
    assert [s.name for s in plan] == SPECS
    assert plan[1].options == {"signal": "attention_received"} and plan[2].options == {"layers": (1, 3)}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("foo", "unknown method 'foo'"),
        ("fastervlm:signal=bogus", "signal must be one of"),
        ("dart:merge", "must be key=value"),
        ("pdrop:layers=3", "bad option value in method 'pdrop:layers=3'"),
    ],
)
def test_run_and_eval_refuse_the_same_bad_specs(spec, message, tmp_path, capsys, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the method specs were checked")

    monkeypatch.setattr("vtc.loading.load", no_model)
    monkeypatch.setattr("vtc.__main__._load", no_model)
    assert message in refused(cli.main, ["run", "--methods", spec], capsys)
    assert message in refused(cli.main, ["eval", "--model", "m", "--output", str(tmp_path), "--methods", spec], capsys)
