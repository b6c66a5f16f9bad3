"""`dsedge completion`: the script lists every command and flag, and bash accepts and runs it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from dsedge.cli import build_parser
from dsedge.cli_completion import command_options, completion_script


def test_script_names_every_command_and_its_flags():
    parser = build_parser()
    script = completion_script(parser, "bash")
    options = command_options(parser)
    assert {"run", "chat", "export", "compress", "index", "completion"} <= set(options)
    assert "--max-new-tokens" in options["run"] and "--threads" in options["run"]
    for flag in options["run"]:
        assert flag in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_a_command_and_a_flag():
    script = completion_script(build_parser(), "bash")
    probe = script + """
COMP_WORDS=(dsedge ru); COMP_CWORD=1; _dsedge; echo "${COMPREPLY[*]}"
COMP_WORDS=(dsedge run --max-n); COMP_CWORD=2; _dsedge; echo "${COMPREPLY[*]}"
"""
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["run", "--max-new-tokens"]
