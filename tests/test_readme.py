"""The README's Python snippets run as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from verl_sb3.checkpoints import save_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_command_quick_start():
    text = README.read_text()
    quick_start = text[text.index("## Quick start") : text.index("## The environment")]
    commands = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)
    assert commands[:2] == [
        "pip install torch==2.13.0 && pip install -e . && python examples/train.py\n",
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest\n',
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1].strip() in ci  # CI runs the README's test command


def test_readme_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks[:3]:  # environment, batched environments, verified PPO
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "start sequence to 1.0 {'length': 3, 'diversity': 1.0" in printed
    model = namespace["model"]
    assert len(model.verification_log) > 0 and "no_token_dominates" in model.verification_log[-1]["checks"]
    save_checkpoint(model, tmp_path / "results" / "model_checkpoints" / "final_model.zip")
    exec(compile(blocks[3], "README.md", "exec"), {})  # evaluation and generation, on that checkpoint
    printed = capsys.readouterr().out
    assert "| Test case | Metric | Target | Actual | Result |" in printed
    assert printed.strip().splitlines()[-1].startswith("[")  # the generated texts


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
