#!/usr/bin/env python
"""A web demo (Gradio) of the upsampler: upload, listen, compare spectrograms, download.

The `jat-web` command, run from a checkout; code and usage: jat/cli/web.py.
"""

import sys

from jat.cli.web import main

if __name__ == "__main__":
    sys.exit(main())
