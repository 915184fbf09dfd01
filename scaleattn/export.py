"""`python -m scaleattn.export`: a trained model as one file for inference (scaleattn/inference/export.py)."""
from scaleattn.inference.export import main

if __name__ == "__main__":
  main()
