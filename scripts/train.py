#!/usr/bin/env python
"""Train JaT-AudioSR.

The `jat-train` command, run from a checkout; code and usage: jat/cli/train.py.
"""

import sys

from jat.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
