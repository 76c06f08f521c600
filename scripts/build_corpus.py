#!/usr/bin/env python
"""Rebuild the full-band audio corpus from Debian packages, split into train and held-out by package.

The `jat-corpus` command, run from a checkout; code and usage: jat/cli/build_corpus.py.
"""

import sys

from jat.cli.build_corpus import main

if __name__ == "__main__":
    sys.exit(main())
