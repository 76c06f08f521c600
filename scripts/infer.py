#!/usr/bin/env python
"""Upsample audio files to 44.1 kHz with a trained JaT-AudioSR checkpoint.

The `jat-infer` command, run from a checkout; code and usage: jat/cli/infer.py.
"""

import sys

from jat.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
