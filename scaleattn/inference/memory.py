"""What a compiled XLA program needs on one device, from the compiler's own buffer assignment: the measure the
memory budget of tiled inference and the benchmark's memory records share, known before anything runs."""
from __future__ import annotations

from typing import Any

_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
           "generated_code_size_in_bytes")


def memory_analysis(compiled: Any) -> dict[str, int]:
  """XLA's buffer assignment of a compiled program, in bytes; `total_bytes` = arguments + outputs + temporaries -
  donated aliases, the most the program holds at once."""
  m = compiled.memory_analysis()
  out = {f: int(getattr(m, f)) for f in _FIELDS}
  if getattr(m, "peak_memory_in_bytes", 0):  # the compiler's own peak, where it reports one (TPU)
    out["peak_memory_in_bytes"] = int(m.peak_memory_in_bytes)
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
                        - out["alias_size_in_bytes"])
  return out
