#!/usr/bin/env python
"""Re-fit a checkpoint's envelope head alone with another envelope target.

The `jat-fit-envelope` command, run from a checkout; code and usage: jat/cli/fit_envelope.py.
"""

import sys

from jat.cli.fit_envelope import main

if __name__ == "__main__":
    sys.exit(main())
