"""The README's Python example runs as written, and its two commands are the ones CI and users run."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert type(scope["merged"]).__name__ == "Transformer"
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


def test_the_two_commands_are_there():
    assert 'pip install -e ".[dev]" && minipeft finetune' in README
    assert 'pip install -e ".[dev]" && pytest' in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "pytest" in ci
