"""``python -m hf_spectralkd ...`` is the ``hf-spectralkd`` command (also under ``accelerate launch -m``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
