#!/usr/bin/env python
"""Benchmark training and inference against this machine's yardsticks and a plain reference.

The `jat-bench` command, run from a checkout; code and usage: jat/cli/benchmark.py.
"""

import sys

from jat.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
