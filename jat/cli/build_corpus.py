"""Rebuild the full-band audio corpus from Debian packages, split into train and held-out by package.

    python scripts/build_corpus.py --out data/corpus [--packages NAME ...]
        [--max-minutes-per-package M] [--download-dir DIR]

Needs apt-get and dpkg (Debian or Ubuntu; run `sudo apt-get update` first on a fresh system) unless the
.debs are already in the download folder. Writes OUT/train/<package>/..., OUT/heldout/<package>/...,
the manifests OUT/train.txt, OUT/heldout.txt, OUT/heldout-<category>.txt and OUT/corpus.json, then
prints a summary table. Rerunning with the same arguments changes nothing; an interrupted run is
finished by the next one. See docs/corpus.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jat.data.corpus import PACKAGES, CorpusError, Criteria, build_corpus, select_packages, summary_rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/corpus", help="output folder (default data/corpus)")
    ap.add_argument("--packages", nargs="+", default=None, metavar="NAME",
                    help="only these packages of the table (default all: "
                         f"{' '.join(p.name for p in PACKAGES)})")
    ap.add_argument("--max-minutes-per-package", type=float, default=Criteria.max_minutes_per_package,
                    help="cap on kept minutes per package, shared between its categories (default 30)")
    ap.add_argument("--min-bandwidth", type=float, default=Criteria.min_bandwidth, metavar="HZ",
                    help="reject files whose measured bandwidth is below this (default 16000; a change "
                         "means screening again)")
    ap.add_argument("--download-dir", default=None, help=".deb cache (default OUT/cache/debs)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every file's verdict")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s")
    if args.max_minutes_per_package <= 0:
        ap.error("--max-minutes-per-package must be positive")
    try:
        packages = select_packages(args.packages)
        report = build_corpus(args.out, packages, download_dir=args.download_dir,
                              criteria=Criteria(max_minutes_per_package=args.max_minutes_per_package,
                                                min_bandwidth=args.min_bandwidth))
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_table(summary_rows(report)))
    print()
    for name, lines in report.manifests.items():
        print(f"{report.out / name}: {len(lines)} files")
    print(f"{report.out / 'corpus.json'}")
    if not report.changed:
        print("nothing new: the corpus was already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
