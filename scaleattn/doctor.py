"""`python -m scaleattn.doctor DIR`: the label doctor, which checks a folder of your own data
(scaleattn/data/doctor.py)."""
import sys

from scaleattn.data.doctor import main

if __name__ == "__main__":
  sys.exit(main())
