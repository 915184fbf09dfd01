"""Jobs for the pool tests, imported by spawned workers (so nothing heavy here): a worker that dies the way a
watchdog ends it (os._exit(75)), once or every time."""
import os


def dies_once(marker: str, out: str = "") -> str:
  """Exits 75 the first time (leaving `marker`), then writes `out` (when given) and returns 'done'."""
  if not os.path.exists(marker):
    open(marker, "w").close()
    os._exit(75)
  if out:
    open(out, "w").close()
  return "done"


def always_dies() -> None:
  os._exit(75)


def square(x: int) -> int:
  return x * x
