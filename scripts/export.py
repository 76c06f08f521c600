#!/usr/bin/env python
"""Export an inference folder: EMA weights only (optionally bf16), the latent statistics, a model card.

The `jat-export` command, run from a checkout; code and usage: jat/cli/export.py.
"""

import sys

from jat.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
