#!/usr/bin/env python
"""Overfit check: memorise one clip, then upsample its LR version and score it.

The `jat-overfit` command, run from a checkout; code and usage: jat/cli/overfit.py.
"""

import sys

from jat.cli.overfit import main

if __name__ == "__main__":
    sys.exit(main())
