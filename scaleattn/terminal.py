"""What a run prints: the project's own lines (progress, metrics, where files went) and every warning, without the
libraries' per-checkpoint INFO chatter (Orbax's manager, handlers and event tracking, absl's and JAX's start-up
notes). `--verbosity=1` shows everything."""
from __future__ import annotations

import logging
import os

# Modules whose INFO lines a person running the project wants: this package, and clu's metric writer and progress
# report (the metric lines and steps/s).
SHOWN = (os.sep + "scaleattn" + os.sep, os.sep + os.path.join("clu", "metric_writers") + os.sep,
         os.sep + os.path.join("clu", "periodic_actions") + os.sep)


class ProjectLines(logging.Filter):
  """Passes warnings and errors from anywhere, and lower levels only from the modules in SHOWN."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or any(part in record.pathname for part in SHOWN)


def show_project_lines(verbosity: int) -> None:
  """Installs `ProjectLines` on absl's handler (where absl, Orbax, clu and this package log) unless verbosity >= 1."""
  from absl import logging as absl_logging  # noqa: PLC0415 - its handler exists once absl has parsed the flags

  if verbosity >= 1:
    return
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, ProjectLines) for f in handler.filters):
    handler.addFilter(ProjectLines())
