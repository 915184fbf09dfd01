"""`python -m scaleattn.predict --exported=F --inputs=A,B --out_dir=D`: predictions from a serving artefact, no model
built (scaleattn/inference/exported.py)."""
from scaleattn.inference.exported import main

if __name__ == "__main__":
  raise SystemExit(main())
