"""Predictions on image files from a serving artefact, no model built: `python -m scaleattn.predict --exported=F`.

  python -m scaleattn.predict --exported=model.npz --inputs=img.jpg,folder/ --out_dir=D

Each image goes through the artefact as `scaleattn.inference.serving` prepares it (mean subtracted, placed top-left in the
artefact's image size); one larger than that size is refused with a message, never shrunk. Writes per image what
`--mode=predict` writes: the segmentation (palette and colour PNGs), a heat map per scale and the panel. An
unreadable or too large image is reported and skipped; the exit status is 1 when no image gave an output.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from scaleattn.inference import files, serving


def predict_files(exported: str, inputs: Sequence[str], out_dir: str) -> dict[str, Any]:
  """Runs the artefact on every image in `inputs` (files or folders); returns the paths written and, per failed
  image, why (an image larger than the artefact's size is refused, never shrunk)."""
  model = serving.load(exported)

  def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = model.predict(image)
    return out["labels"], out["weights"]
  return files.predict_files(predict, inputs, out_dir, scales=model.scales, class_names=model.class_names,
                             skip=(ValueError,))


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0 when at least one image gave an output)."""
  parser = argparse.ArgumentParser(prog="python -m scaleattn.predict", description=__doc__.split("\n\n")[0])
  parser.add_argument("--exported", required=True,
                      help="a serving artefact written by python -m scaleattn.export --platforms=...")
  parser.add_argument("--inputs", required=True, help="image files or folders, comma-separated")
  parser.add_argument("--out_dir", required=True, help="where the outputs go")
  args = parser.parse_args(argv)
  try:
    result = predict_files(args.exported, args.inputs.split(","), args.out_dir)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {len(result['written'])} files to {args.out_dir}; {len(result['failed'])} images failed.")
  if not result["written"]:
    print(f"error: no image gave an output ({'; '.join(f'{p}: {r}' for p, r in result['failed'].items())})",
          file=sys.stderr)
    return 1
  return 0
