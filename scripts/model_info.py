#!/usr/bin/env python
"""Print a model's parameter breakdown and, with --time, one forward+backward timing.

The `jat-model-info` command, run from a checkout; code and usage: jat/cli/model_info.py.
"""

import sys

from jat.cli.model_info import main

if __name__ == "__main__":
    sys.exit(main())
