#!/usr/bin/env python
"""Merge a LoRA / QLoRA adapter into its base model: a full-precision checkpoint for export.

The `jat-merge` command, run from a checkout; code and usage: jat/cli/merge_lora.py.
"""

import sys

from jat.cli.merge_lora import main

if __name__ == "__main__":
    sys.exit(main())
