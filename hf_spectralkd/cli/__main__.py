"""``python -m hf_spectralkd.cli ...`` (and ``accelerate launch -m hf_spectralkd.cli distill ...``, ``torchrun -m ...``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
