"""The README's two commands are the ones CI and newcomers run."""

import os
import re

from tests import runs


def readme_commands() -> list[str]:
  with open(os.path.join(runs.ROOT, 'README.md')) as f:
    text = f.read()
  first_block = re.search(r'```(?:bash|sh)?\n(.*?)```', text, re.S).group(1)
  return [line for line in first_block.splitlines() if line.strip() and not line.startswith('#')]


def test_readme_starts_with_exactly_two_commands():
  commands = readme_commands()
  assert len(commands) == 2
  install_and_demo, tests = commands
  assert 'pip install -r requirements.txt' in install_and_demo
  assert 'main.py --config=configs/demo.py' in install_and_demo
  assert 'pytest' in tests


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(runs.ROOT, '.ci', 'run')) as f:
    ci_lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert readme_commands()[1] in ci_lines
