"""Building the corpus: per-package scans (cached), the fair per-category cap, copies, manifests and
corpus.json."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jat.data.corpus.debian import Extracted, Fetch, copyright_file, fetch_package, licence_summary
from jat.data.corpus.files import copy_changed, load_json, sha256_file, write_changed, write_json
from jat.data.corpus.packages import (
    AUDIO_SUFFIXES,
    CATEGORIES,
    DEFAULT_CRITERIA,
    FORMAT,
    PACKAGES,
    REASONS,
    SPLITS,
    CorpusError,
    Criteria,
    Package,
)
from jat.data.corpus.screen import FileResult, screen_file

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# one package


def audio_files(root: Path) -> list[str]:
    """Paths (POSIX, relative to root, sorted) of the audio files under root, symlinks included."""
    found = []
    for dirpath, _dirs, files in os.walk(root):  # does not descend into symlinked folders
        for name in files:
            if name.lower().endswith(AUDIO_SUFFIXES):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def scan_package(package: Package, root: Path, criteria: Criteria) -> list[FileResult]:
    """Screen every audio file of an extracted package (sorted path order); the cap is `apply_cap`'s."""
    results, seen = [], set()
    for rel in audio_files(root):
        path = root / rel
        category = package.category(rel)
        if category is None:
            continue  # outside the package's table: not part of the corpus
        if path.is_symlink():
            results.append(FileResult(rel, category, "symlink", detail=os.readlink(path)))
            continue
        digest = sha256_file(path)
        if digest in seen:
            results.append(FileResult(rel, category, "duplicate", size=path.stat().st_size))
            continue
        seen.add(digest)
        result = screen_file(path, criteria)
        result.path, result.category, result.size = rel, category, path.stat().st_size
        log.debug("%s: %s %s %s", package.name, rel, result.status, result.detail)
        results.append(result)
    return results


def category_quotas(available: dict[str, float], cap: float) -> dict[str, float]:
    """Split `cap` seconds between categories with `available` seconds each: equal shares, a category
    needing less than its share leaving the rest to the others (water filling)."""
    quotas, left = {}, cap
    order = sorted(available, key=lambda c: (available[c], c))
    for i, c in enumerate(order):
        quotas[c] = min(available[c], left / (len(order) - i))
        left -= quotas[c]
    return quotas


def apply_cap(results: list[FileResult], max_minutes: float) -> list[FileResult]:
    """The package's cap: kept files beyond their category's quota (`category_quotas` of
    max_minutes) become "over_cap". Within a category files are taken in sorted path order, each one
    that still fits (so the result is deterministic). Returns new results; the input is unchanged."""
    available = Counter()
    for f in results:
        if f.status == "kept":
            available[f.category] += f.seconds
    quotas = category_quotas(dict(available), max_minutes * 60.0)
    used = Counter()
    capped = []
    for f in sorted(results, key=lambda f: f.path):
        f = FileResult(**asdict(f))
        if f.status == "kept":
            if used[f.category] + f.seconds <= quotas[f.category] + 1e-6:
                used[f.category] += f.seconds
            else:
                f.status = "over_cap"
                f.detail = f"{f.category} share of the cap: {quotas[f.category] / 60:.2f} min"
        capped.append(f)
    return capped


@dataclass
class PackageReport:
    """One package's part of the corpus (corpus.json "packages" entry, plus the per-file results)."""

    name: str
    split: str
    version: str
    licence: str
    copyright: str | None  # path relative to OUT of the copied copyright file
    files: list[FileResult] = field(repr=False)
    scanned: bool = True  # False: the cached screening was reused
    copied: int = 0  # files copied in this run

    @property
    def kept(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "kept"]

    def summary(self) -> dict:
        kept = self.kept
        minutes = {c: round(sum(f.seconds for f in kept if f.category == c) / 60, 3) for c in CATEGORIES}
        rates = Counter(f.sample_rate for f in kept)
        rejected = Counter(f.status for f in self.files if f.status != "kept")
        full_band = [f for f in self.files if f.status in ("kept", "over_cap")]
        return {
            "version": self.version,
            "split": self.split,
            "licence": self.licence,
            "copyright": self.copyright,
            "files_kept": len(kept),
            "files_rejected": sum(rejected.values()),
            "rejected": {r: rejected[r] for r in REASONS if rejected[r]},
            "minutes": minutes,
            "minutes_total": round(sum(f.seconds for f in kept) / 60, 3),
            "minutes_full_band": round(sum(f.seconds for f in full_band) / 60, 3),  # before the cap
            "sample_rates": {str(sr): rates[sr] for sr in sorted(rates)},
            "bandwidth_hz": _spread([f.bandwidth for f in kept]),  # of the kept files
        }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    lo, med, hi = np.percentile(values, [0, 50, 100])
    return {"min": round(float(lo)), "median": round(float(med)), "max": round(float(hi))}


def _scan_key(package: Package, extracted: Extracted, criteria: Criteria) -> dict:
    screening = {k: v for k, v in asdict(criteria).items() if k != "max_minutes_per_package"}
    return {"format": FORMAT, "version": extracted.version, "split": package.split,
            "categories": [list(c) for c in package.categories], "criteria": screening}


def _package_out(out: Path, package: Package) -> Path:
    return out / package.split / package.name


def _prune(folder: Path, keep: set[Path]) -> None:
    """Remove every file under folder not in keep (stale from another run), then empty folders."""
    if not folder.is_dir():
        return
    for dirpath, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(dirpath) / name
            if path not in keep:
                log.info("removing stale %s", path)
                path.unlink()
        if Path(dirpath) != folder and not any(Path(dirpath).iterdir()):
            Path(dirpath).rmdir()


def build_package(package: Package, extracted: Extracted, out: Path, criteria: Criteria) -> PackageReport:
    """Screen (or reuse the cached screening of) one extracted package and copy its kept files into
    OUT/<split>/<name>/, its copyright file into OUT/licences/<name>.copyright."""
    record_path = out / "cache" / "scan" / f"{package.name}.json"
    key = _scan_key(package, extracted, criteria)
    record = load_json(record_path)
    if isinstance(record, dict) and record.get("key") == key:
        screened = [FileResult(**f) for f in record["files"]]
        scanned = False
    else:
        log.info("%s %s: screening", package.name, extracted.version)
        screened = scan_package(package, extracted.root, criteria)
        scanned = True
    files = apply_cap(screened, criteria.max_minutes_per_package)
    src_copyright = copyright_file(extracted.root, package.name)
    copyright_rel = None
    if src_copyright is not None:
        copyright_rel = f"licences/{package.name}.copyright"
        write_changed(out / copyright_rel, src_copyright.read_bytes())
        licence = licence_summary(src_copyright.read_text(errors="replace"))
    else:
        licence = "unknown (no usr/share/doc/<package>/copyright in the .deb)"
    dest = _package_out(out, package)
    copied, keep = 0, set()
    for f in files:
        if f.status == "kept":
            target = dest / f.path
            copied += copy_changed(extracted.root / f.path, target)
            keep.add(target)
    _prune(dest, keep)
    if scanned:  # only once the files are in place: a rerun after an interruption copies the rest
        write_json(record_path, {"key": key, "files": [asdict(f) for f in screened]})
    return PackageReport(package.name, package.split, extracted.version, licence, copyright_rel, files,
                         scanned=scanned, copied=copied)


# ---------------------------------------------------------------------------------------------------
# the corpus


@dataclass
class CorpusReport:
    """What `build_corpus` did: per-package reports, the manifests (paths relative to OUT) and which of
    the outputs this run actually changed."""

    out: Path
    packages: list[PackageReport]
    manifests: dict[str, list[str]]  # manifest file name -> its lines (paths relative to OUT)
    written: list[str]  # output files (relative to OUT) written in this run: empty when nothing changed

    @property
    def changed(self) -> bool:
        return bool(self.written) or any(p.copied or p.scanned for p in self.packages)




def build_corpus(
    out: str | Path, packages: Iterable[Package] = PACKAGES, download_dir: str | Path | None = None,
    criteria: Criteria = DEFAULT_CRITERIA, fetch: Fetch = fetch_package,
) -> CorpusReport:
    """Build (or finish, or confirm) the corpus in `out` from `packages`; see the module docstring.

    download_dir: where the .debs are cached (default OUT/cache/debs); packages are unpacked in
    OUT/cache/extracted. `fetch(name, download_dir, extract_dir) -> Extracted` is the apt/dpkg step
    (`fetch_package`), injectable for tests. Package folders under OUT/train and OUT/heldout that are
    not in `packages` are removed, so the output describes exactly this selection.
    """
    out = Path(out)
    packages = list(packages)
    for p in packages:
        if p.split not in SPLITS:
            raise CorpusError(f"{p.name}: split must be one of {SPLITS}, got {p.split!r}")
        bad = [c for _g, c in p.categories if c not in CATEGORIES]
        if bad:
            raise CorpusError(f"{p.name}: categories must be in {CATEGORIES}, got {bad}")
    download_dir = Path(download_dir) if download_dir is not None else out / "cache" / "debs"
    extract_dir = out / "cache" / "extracted"
    reports = []
    for package in packages:
        extracted = fetch(package.name, download_dir, extract_dir)
        report = build_package(package, extracted, out, criteria)
        log.info("%s: %d kept, %d copied", package.name, len(report.kept), report.copied)
        reports.append(report)
    wanted = {_package_out(out, p) for p in packages}
    for split in SPLITS:
        if (out / split).is_dir():
            for folder in sorted((out / split).iterdir()):
                if folder.is_dir() and folder not in wanted:
                    log.info("removing %s: not in this selection of packages", folder)
                    shutil.rmtree(folder)

    manifests: dict[str, list[str]] = {f"{s}.txt": [] for s in SPLITS}
    for c in CATEGORIES:
        manifests[f"heldout-{c}.txt"] = []
    for report in reports:
        for f in report.kept:
            line = f"{report.split}/{report.name}/{f.path}"
            manifests[f"{report.split}.txt"].append(line)
            if report.split == "heldout":
                manifests[f"heldout-{f.category}.txt"].append(line)
    manifests = {k: v for k, v in manifests.items() if v or k in ("train.txt", "heldout.txt")}

    totals = {s: {c: round(sum(f.seconds for r in reports if r.split == s for f in r.kept if f.category == c)
                          / 60, 3) for c in CATEGORIES} for s in SPLITS}
    corpus = {
        "format": FORMAT,
        "criteria": asdict(criteria),
        "reasons": REASONS,
        "manifests": sorted(manifests),
        "totals_minutes": totals,
        "packages": {r.name: r.summary() for r in reports},
    }
    written = []
    if write_json(out / "corpus.json", corpus):
        written.append("corpus.json")
    for name, lines in manifests.items():  # last: a manifest never lists a file not yet in place
        text = "# paths relative to this file; rebuilt by scripts/build_corpus.py\n" + "".join(
            f"{line}\n" for line in lines)
        if write_changed(out / name, text.encode()):
            written.append(name)
    for c in CATEGORIES:  # a category manifest left from an earlier selection
        stale = out / f"heldout-{c}.txt"
        if stale.name not in manifests and stale.exists():
            stale.unlink()
            written.append(stale.name)
    return CorpusReport(out, reports, manifests, written)


def summary_rows(report: CorpusReport) -> list[list[str]]:
    """The summary table (header first) of a build: one row per package, then one per split."""
    rows = [["package", "split", "version", "kept", "rejected", "speech min", "music min", "effects min",
             "total min", "licence"]]
    for r in report.packages:
        s = r.summary()
        reasons = ", ".join(f"{k} {v}" for k, v in s["rejected"].items())
        rows.append([r.name, r.split, r.version, str(s["files_kept"]),
                     f"{s['files_rejected']}" + (f" ({reasons})" if reasons else ""),
                     *(f"{s['minutes'][c]:.1f}" for c in CATEGORIES), f"{s['minutes_total']:.1f}",
                     s["licence"] if len(s["licence"]) <= 40 else s["licence"][:37] + "..."])
    for split in SPLITS:
        part = [r for r in report.packages if r.split == split]
        if not part:
            continue
        mins = [sum(r.summary()["minutes"][c] for r in part) for c in CATEGORIES]
        rows.append([f"TOTAL {split}", split, "", str(sum(len(r.kept) for r in part)),
                     str(sum(r.summary()["files_rejected"] for r in part)),
                     *(f"{m:.1f}" for m in mins), f"{sum(mins):.1f}", ""])
    return rows
