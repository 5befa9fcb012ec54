"""The README's two commands are what CI and a new user run: keep them honest."""

import re
import shlex
from pathlib import Path

from onnxopt.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_ci_runs_exactly_the_readme_test_command():
    install_and_run, install_and_test = _readme_commands()
    assert "pytest" in install_and_test
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert ci_lines == [install_and_test]


def test_quick_start_command_runs_on_the_bundled_model(tmp_path, monkeypatch):
    install_and_run, _ = _readme_commands()
    onnxopt_part = install_and_run.split("&&", 1)[1].strip()
    argv = shlex.split(onnxopt_part)
    assert argv[0] == "onnxopt"
    monkeypatch.chdir(ROOT)
    out = tmp_path / "quick.onnx"
    argv = [str(out) if a.endswith(".opt.onnx") else a for a in argv[1:]]
    assert main(argv + ["--quiet"]) == 0
    assert out.exists()
