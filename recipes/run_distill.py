#!/usr/bin/env python
"""Distil a Vision Transformer with SpectralKD: ``accelerate launch recipes/run_distill.py CONFIG.yaml [options]``.

A thin wrapper so the recipe can be launched as a script; the recipe itself is
:mod:`hf_spectralkd.cli.distill` (also ``hf-spectralkd distill``). ``--help`` lists every option.
"""

import sys

from hf_spectralkd.cli.distill import main, parse_arguments  # noqa: F401 - parse_arguments is re-exported

if __name__ == "__main__":
    sys.exit(main())
