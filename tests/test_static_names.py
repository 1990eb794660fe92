"""Every name the package, configs and tests use is defined (pyflakes):
a misspelt or dropped variable on a rarely run path (a report branch, an
error message) fails here, not at the end of a long run."""
import os

import pytest
from pyflakes import api, messages, reporter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Collect(reporter.Reporter):

  def __init__(self):
    super().__init__(None, None)
    self.found = []

  def flake(self, message):
    if isinstance(message, messages.UndefinedName):
      self.found.append(f"{message.filename}:{message.lineno}: "
                        f"{message.message % message.message_args}")

  def syntaxError(self, filename, msg, lineno, offset, text):
    self.found.append(f"{filename}:{lineno}: {msg}")

  def unexpectedError(self, filename, msg):
    self.found.append(f"{filename}: {msg}")


@pytest.mark.parametrize("folder", ["kd_jax", "configs", "tests",
                                    "benchmarks"])
def test_no_undefined_names(folder):
  collect = _Collect()
  api.checkRecursive([os.path.join(ROOT, folder)], collect)
  assert not collect.found, "\n".join(collect.found)


def test_the_check_finds_an_undefined_name(tmp_path):
  (tmp_path / "bad.py").write_text("def f():\n  return missing + 1\n")
  collect = _Collect()
  api.checkRecursive([str(tmp_path)], collect)
  assert collect.found == [f"{tmp_path / 'bad.py'}:2: undefined name "
                           "'missing'"]
