#!/usr/bin/env python
"""Pre-encode an audio folder into latent shards (HR + K degraded LR versions per segment).

The `jat-precompute` command, run from a checkout; code and usage: jat/cli/precompute_latents.py.
"""

import sys

from jat.cli.precompute_latents import main

if __name__ == "__main__":
    sys.exit(main())
