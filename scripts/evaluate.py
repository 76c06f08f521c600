#!/usr/bin/env python
"""Evaluate a checkpoint: degrade each HR file at each cutoff (recorded protocol), upsample, score.

The `jat-eval` command, run from a checkout; code and usage: jat/cli/evaluate.py.
"""

import sys

from jat.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
