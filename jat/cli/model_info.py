"""Print a model's parameter breakdown and, with --time, one forward+backward timing.

    python scripts/model_info.py --config configs/v2.yaml --time --seconds 6 --batch 2
"""

from __future__ import annotations

import argparse
import time

import torch

from jat.codecs.base import latent_frames
from jat.config import Config, resolve_config_path
from jat.model.dit import JaT, format_parameter_breakdown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="v2.yaml")
    ap.add_argument("--time", action="store_true", help="time forward+backward in fp32 and bf16 autocast")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = Config.from_yaml(resolve_config_path(args.config), args.overrides)
    model = JaT(cfg.model)
    print(f"model {cfg.model.preset or 'custom'} ({args.config})")
    print(format_parameter_breakdown(model))
    if not args.time:
        return
    frames = latent_frames(args.seconds)
    C = cfg.model.in_channels
    x, c, t = torch.randn(args.batch, C, frames), torch.randn(args.batch, C, frames), torch.rand(args.batch)
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        times = []
        for _ in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(x, t, c)
            out.float().pow(2).mean().backward()
            times.append(time.perf_counter() - start)
        best = min(times[1:])
        print(f"forward+backward {name}: {best:.3f} s"
              f"  (batch {args.batch}, {args.seconds:g} s = {frames} frames)")


if __name__ == "__main__":
    main()
