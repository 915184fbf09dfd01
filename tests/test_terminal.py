"""The terminal shows the project's lines and every warning, not the libraries' INFO chatter."""
import logging
import os

from scaleattn import terminal


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "message", (), None)


def test_library_info_is_hidden_and_warnings_and_project_lines_are_shown():
  keep = terminal.ProjectLines()
  site = os.path.join(os.sep, "env", "lib", "python3.11", "site-packages")
  orbax = os.path.join(site, "orbax", "checkpoint", "checkpoint_manager.py")
  ours = os.path.join(os.sep, "src", "scaleattn", "training", "loop.py")
  writer = os.path.join(site, "clu", "metric_writers", "logging_writer.py")
  assert not keep.filter(_record(orbax, logging.INFO))
  assert keep.filter(_record(orbax, logging.WARNING)) and keep.filter(_record(orbax, logging.ERROR))
  assert keep.filter(_record(ours, logging.INFO)) and keep.filter(_record(writer, logging.INFO))
  assert not keep.filter(_record(os.path.join(site, "scaleattn_other", "x.py"), logging.INFO))
