#!/usr/bin/env python
"""The offline demo: synthesise a 6 s full-band clip, overfit the demo config on it, and upsample an

The `jat-demo` command, run from a checkout; code and usage: jat/cli/demo.py.
"""

import sys

from jat.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
