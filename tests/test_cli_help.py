"""``--help`` of every console script answers without importing torch, diffusers or transformers
(they take seconds to import; the CLIs import them only once work starts)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers")

# Runs in a fresh interpreter: import the entry point, ask it (and each subcommand of a group)
# for --help, then report the exit codes and which heavy modules got imported.
PROBE = """
import importlib, json, sys
import click

module, attr, prog = sys.argv[1:4]
command = getattr(importlib.import_module(module), attr)
argvs = [["--help"]]
if isinstance(command, click.Group):
    argvs += [[name, "--help"] for name in command.commands]
codes = []
for argv in argvs:
    try:
        command.main(argv, prog_name=prog)
    except SystemExit as exit:
        codes.append(exit.code or 0)
    else:
        codes.append(0)
heavy = [name for name in ("torch", "diffusers", "transformers") if name in sys.modules]
print("PROBE " + json.dumps({"codes": codes, "heavy": heavy}))
"""


def console_scripts() -> dict[str, str]:
    """name -> "module:attr" from pyproject.toml's [project.scripts], so a new CLI is covered."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^\s*([\w-]+)\s*=\s*"([^"]+)"', section, re.M))


def test_every_script_is_found():
    assert {"iosd-gen", "iosd-train", "iosd-eval", "iosd-predict", "iosd-synth", "iosd-shards"} <= set(console_scripts())


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_help_imports_nothing_heavy(script):
    module, attr = console_scripts()[script].split(":")
    done = subprocess.run([sys.executable, "-c", PROBE, module, attr, script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Usage:" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("PROBE "))
    assert result["codes"] and set(result["codes"]) == {0}, result
    assert result["heavy"] == [], f"{script} --help imported {result['heavy']}"


def test_light_choices_are_the_heavy_modules_keys():
    """The CLI offers iosd.choices; the modules that act on a choice must know the same names."""
    from iosd.choices import CODEC_NAMES, HEAD_KINDS
    from iosd.featstore import CODECS
    from iosd.train.heads import HEADS

    assert tuple(CODECS) == CODEC_NAMES
    assert tuple(HEADS) == HEAD_KINDS
