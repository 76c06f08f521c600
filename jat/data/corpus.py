"""A real full-band audio corpus rebuilt from Debian packages, split into train and held-out by package.

`build_corpus` fetches each package of `PACKAGES` (`apt-get download` + `dpkg -x`, cached), screens its
audio files (`screen_file`: unreadable, too short, silent, sample rate below 32 kHz, measured bandwidth
below 16 kHz; `measure_bandwidth`), copies the kept files unchanged into OUT/<split>/<package>/... under a
per-package cap on minutes shared fairly between the package's categories (`apply_cap`: a package with
an hour of music and ten minutes of speech keeps all the speech), and writes the manifests
(OUT/train.txt, OUT/heldout.txt, OUT/heldout-<category>.txt, one path per line relative to OUT, as
`jat.data.audio.list_audio_files` reads them) and OUT/corpus.json (version, licence, split, counts,
minutes, sample rates per package).

Every step is cached under OUT/cache and every file is written atomically (`jat.atomic.write_atomic`:
a temporary file, then a rename), the manifests last: a second run with the same arguments changes
nothing, and an interrupted run is finished by the next one. Nothing here prints; progress goes to
`logging`.

Bandwidth: `jat.infer.band.detect_cutoff` looks for the *cliff* a resampler or codec leaves and calls a
gradual roll-off full band, which is what degradation needs; here a recording whose spectrum
merely fades out (a dull microphone, a soft synth) must be rejected too, so the corpus uses the
plain measure below: the highest frequency still within 70 dB of the level of the 200 Hz - 4 kHz
band.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from jat.atomic import write_atomic

log = logging.getLogger(__name__)

CATEGORIES = ("speech", "music", "effects")
SPLITS = ("train", "heldout")
AUDIO_SUFFIXES = (".ogg", ".oga", ".wav", ".flac")  # matched case-insensitively
FORMAT = 1  # bump when the screening or the layout changes: cached scans are redone

# Why a file is left out, in the order the checks run (`screen_file`, `build_corpus`).
REASONS = {
    "symlink": "a symbolic link (its target is screened as itself)",
    "duplicate": "the same bytes as an earlier file of the package",
    "unreadable": "soundfile cannot decode it (or it holds NaN/Inf)",
    "low_sample_rate": "sample rate below the minimum",
    "too_short": "shorter than the minimum duration",
    "silent": "peak below the silence threshold",
    "band_limited": "measured bandwidth below the minimum",
    "over_cap": "passed every check but is beyond its category's share of the package's cap",
}


class CorpusError(RuntimeError):
    """A corpus build problem (apt-get or dpkg missing or failing, an unknown package); says what to do."""


@dataclass(frozen=True)
class Package:
    """A Debian binary package of the corpus.

    categories: (glob, category) pairs tried in order on each audio file's path inside the package
    (POSIX, no leading slash, `fnmatch` syntax where '*' also crosses '/'); the first match wins and a
    file matching none is left out. The split is by package, so no recording, speaker or piece is on
    both sides.
    """

    name: str
    split: str  # "train" or "heldout"
    categories: tuple[tuple[str, str], ...]

    def category(self, path: str) -> str | None:
        for pattern, category in self.categories:
            if fnmatch.fnmatchcase(path, pattern):
                return category
        return None


_HW = "usr/share/games/hedgewars/Data"
_TUX = "usr/share/tuxtype"

# Full-band minutes (files of 16 kHz bandwidth or more) as measured when the table was drawn up.
PACKAGES: tuple[Package, ...] = (
    # train
    Package("singularity-music", "train", (("*", "music"),)),  # 12.7 min
    Package("hedgewars-data", "train", (  # ~40 min
        (f"{_HW}/Sounds/voices/*", "speech"),
        (f"{_HW}/Music/*", "music"),
        (f"{_HW}/Sounds/*", "effects"),
    )),
    Package("colobot-common-sounds", "train", (  # ~19 min
        ("usr/share/games/colobot/music/*", "music"),
        ("usr/share/games/colobot/sounds/*", "effects"),
    )),
    Package("frozen-bubble-data", "train", (  # ~1 min
        ("usr/share/games/frozen-bubble/snd/*zik*", "music"),
        ("*", "effects"),
    )),
    Package("sound-theme-freedesktop", "train", (("*", "effects"),)),  # .oga files
    # held out
    Package("ktuberling-data", "heldout", (("usr/share/ktuberling/sounds/*", "speech"),)),  # ~22 min
    Package("drascula-music", "heldout", (("*", "music"),)),  # 164 min: the cap matters
    Package("tuxtype-data", "heldout", (  # small
        (f"{_TUX}/*excuseme.wav", "speech"),
        (f"{_TUX}/*.ogg", "music"),
        ("*", "effects"),
    )),
)


@dataclass(frozen=True)
class Criteria:
    """What a file must pass to be kept, and the per-package cap."""

    min_sample_rate: int = 32000
    min_seconds: float = 0.5
    min_bandwidth: float = 16000.0  # Hz, `measure_bandwidth`
    silence_peak: float = 1e-4  # a file whose peak |sample| is below this (-80 dBFS) is silent
    max_minutes_per_package: float = 30.0  # `apply_cap`; changing it needs no new screening
    bandwidth_seconds: float = 60.0  # the bandwidth is measured on the first this many seconds


# ---------------------------------------------------------------------------------------------------
# bandwidth


def measure_bandwidth(
    audio: np.ndarray, sr: int, max_seconds: float = 60.0, ref_band: tuple[float, float] = (200.0, 4000.0),
    ref_percentile: float = 90.0, range_db: float = 70.0,
) -> float:
    """Bandwidth (Hz) of audio [C, L] (or [L]) at `sr`: the highest frequency whose power is within
    `range_db` of the reference level.

    Welch PSD (Hann, nperseg = min(4096, L)) of the mono mix of the first `max_seconds`; the reference
    is the `ref_percentile` percentile of the PSD in dB over `ref_band`. White noise reads sr / 2; a
    steep low-pass reads just above its corner (where its stop band has fallen `range_db`).
    Meaningless for digital silence (reads sr / 2): screen that out first.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)  # [L] mono mix
    x = x[: max(1, int(max_seconds * sr))]
    if x.size < 2:
        raise ValueError(f"need at least 2 samples to measure a bandwidth, got {x.size}")
    freqs, psd = scipy.signal.welch(x, fs=sr, nperseg=min(4096, x.size))  # [F], [F]
    level = 10.0 * np.log10(psd + 1e-30)  # [F] dB
    band = (freqs >= ref_band[0]) & (freqs <= ref_band[1])
    reference = np.percentile(level[band] if band.any() else level, ref_percentile)
    within = np.flatnonzero(level >= reference - range_db)
    return float(freqs[within[-1]])


# ---------------------------------------------------------------------------------------------------
# screening one file


@dataclass
class FileResult:
    """What happened to one audio file of a package. path: inside the package (POSIX)."""

    path: str
    category: str | None
    status: str  # "kept" or a key of REASONS
    detail: str = ""
    seconds: float = 0.0
    sample_rate: int = 0
    channels: int = 0
    bandwidth: float | None = None  # Hz, when measured
    size: int = 0  # bytes


def _read_info(path: Path) -> tuple[int, int, int] | str:
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile raises several types for malformed files
        return f"{type(exc).__name__}: {exc}"
    if info.samplerate <= 0 or info.frames <= 0 or info.channels <= 0:
        return f"no samples (rate {info.samplerate}, {info.frames} frames, {info.channels} channels)"
    return int(info.samplerate), int(info.channels), int(info.frames)


def _decode(path: Path, keep_frames: int, block: int = 1 << 18) -> tuple[float, np.ndarray] | str:
    """(peak |sample| over the whole file, the first `keep_frames` frames [C, l]) or why decoding failed."""
    peak, head, have = 0.0, [], 0
    try:
        with sf.SoundFile(str(path)) as f:
            for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):  # [b, C]
                if not np.isfinite(data).all():
                    return f"{int((~np.isfinite(data)).sum())} NaN/Inf samples"
                if data.size:
                    peak = max(peak, float(np.abs(data).max()))
                if have < keep_frames:
                    head.append(data[: keep_frames - have])
                    have += len(head[-1])
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if not head:
        return "no samples"
    return peak, np.concatenate(head).T  # [C, l]


def screen_file(path: Path, criteria: Criteria) -> FileResult:
    """Screen one audio file (path and category left blank): unreadable, low sample rate, too short,
    silent, band-limited, else kept. The whole file is decoded (a corrupt tail is unreadable)."""
    result = FileResult(path="", category=None, status="kept")
    info = _read_info(path)
    if isinstance(info, str):
        result.status, result.detail = "unreadable", info
        return result
    sr, channels, frames = info
    result.sample_rate, result.channels, result.seconds = sr, channels, frames / sr
    if sr < criteria.min_sample_rate:
        result.status, result.detail = "low_sample_rate", f"{sr} Hz < {criteria.min_sample_rate} Hz"
        return result
    if result.seconds < criteria.min_seconds:
        result.status, result.detail = "too_short", f"{result.seconds:.3f} s < {criteria.min_seconds} s"
        return result
    decoded = _decode(path, max(2, int(criteria.bandwidth_seconds * sr)))
    if isinstance(decoded, str):
        result.status, result.detail = "unreadable", decoded
        return result
    peak, head = decoded
    if peak < criteria.silence_peak:
        result.status, result.detail = "silent", f"peak {peak:.2e} < {criteria.silence_peak:.0e}"
        return result
    result.bandwidth = round(measure_bandwidth(head, sr, max_seconds=criteria.bandwidth_seconds), 1)
    if result.bandwidth < criteria.min_bandwidth:
        result.status = "band_limited"
        result.detail = f"{result.bandwidth:.0f} Hz < {criteria.min_bandwidth:.0f} Hz"
    return result


# ---------------------------------------------------------------------------------------------------
# fetching a package


@dataclass(frozen=True)
class Extracted:
    """A package unpacked by `dpkg -x`: root is the folder that holds its usr/..."""

    name: str
    version: str
    root: Path


Runner = Callable[..., subprocess.CompletedProcess]
Fetch = Callable[[str, Path, Path], Extracted]


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CorpusError(
            f"{package}: `{name}` not found: the corpus is built from Debian packages and needs apt-get and "
            "dpkg (a Debian or Ubuntu system); or put the package's .deb in the download folder yourself"
        )
    return path


def _call(cmd: list[str], package: str, run: Runner, hint: str = "", **kw) -> str:
    try:
        proc = run(cmd, capture_output=True, text=True, **kw)
    except OSError as exc:
        raise CorpusError(f"{package}: `{' '.join(cmd)}` could not run ({exc})") from None
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        raise CorpusError(f"{package}: `{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}{hint}")
    return proc.stdout


def _compare_versions(a: str, b: str, run: Runner) -> int:
    if run(["dpkg", "--compare-versions", a, "gt", b], capture_output=True).returncode == 0:
        return 1
    return 0 if a == b else -1


def fetch_package(
    name: str, download_dir: Path, extract_dir: Path, run: Runner = subprocess.run,
) -> Extracted:
    """`apt-get download NAME` into download_dir (skipped when a NAME_*.deb is there: the newest is used)
    and `dpkg -x` it into extract_dir/NAME (skipped when already done for that .deb). Raises CorpusError
    naming the package when apt-get or dpkg is missing or fails."""
    download_dir, extract_dir = Path(download_dir), Path(extract_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(download_dir.glob(f"{name}_*.deb"))
    if not debs:
        apt = _tool("apt-get", name)
        log.info("%s: apt-get download into %s", name, download_dir)
        with tempfile.TemporaryDirectory(dir=download_dir, prefix=".apt-") as tmp:
            _call([apt, "download", name], name, run, cwd=tmp, hint=(
                " (if apt cannot locate the package, run `sudo apt-get update` first; it is in Debian's "
                "main archive)"))
            got = sorted(Path(tmp).glob(f"{name}_*.deb"))
            if not got:
                raise CorpusError(f"{name}: `apt-get download {name}` left no {name}_*.deb")
            for deb in got:
                os.replace(deb, download_dir / deb.name)
        debs = sorted(download_dir.glob(f"{name}_*.deb"))
    dpkg_deb = _tool("dpkg-deb", name)
    versions = {deb: _call([dpkg_deb, "-f", str(deb), "Version"], name, run).strip() for deb in debs}
    deb = max(debs, key=functools.cmp_to_key(lambda a, b: _compare_versions(versions[a], versions[b], run)))
    version = versions[deb]
    root = extract_dir / name
    marker = extract_dir / f"{name}.json"
    stamp = {"deb": deb.name, "size": deb.stat().st_size, "version": version}
    if root.is_dir() and marker.is_file() and _load_json(marker) == stamp:
        return Extracted(name, version, root)
    dpkg = _tool("dpkg", name)
    extract_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s: dpkg -x %s", name, deb.name)
    tmp = Path(tempfile.mkdtemp(dir=extract_dir, prefix=f".{name}-"))
    try:
        _call([dpkg, "-x", str(deb), str(tmp)], name, run)
        marker.unlink(missing_ok=True)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _write_json(marker, stamp)
    return Extracted(name, version, root)


# ---------------------------------------------------------------------------------------------------
# licences


def licence_summary(text: str) -> str:
    """A short licence summary of a Debian copyright file: the distinct `License:` names of a
    machine-readable (DEP-5) file in order, else the licences its prose names."""
    names = []
    for line in text.splitlines():
        m = re.match(r"License:[ \t]*(\S.*)$", line)
        if m and m.group(1).strip() not in names:
            names.append(m.group(1).strip())
    if names:
        return ", ".join(names)
    prose = [
        (r"Attribution-ShareAlike|Attribution, ShareAlike|CC[- ]BY[- ]SA", "CC-BY-SA"),
        (r"Creative Commons", "Creative Commons"),
        (r"Lesser General Public License|\bLGPL", "LGPL"),
        (r"GNU General Public License|GNU Public License|\bGPL\b", "GPL"),
        (r"public domain", "public domain"),
        (r"\bBSD\b", "BSD"),
        (r"\bMIT\b", "MIT"),
    ]
    found = []
    for pattern, name in prose:
        if re.search(pattern, text, flags=re.IGNORECASE) and not any(name in f for f in found):
            found.append(name)
    if any(f.startswith("CC-") for f in found) and "Creative Commons" in found:
        found.remove("Creative Commons")
    return ", ".join(found) + " (prose, not machine-readable)" if found else "unknown"


def _copyright_file(root: Path, name: str) -> Path | None:
    path = root / "usr/share/doc" / name / "copyright"
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------
# files on disk, atomically


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_changed(path: Path, data: bytes) -> bool:
    """Write data to path atomically (`write_atomic`); False (nothing written) if it already holds it."""
    if path.is_file() and path.read_bytes() == data:
        return False
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return True


def _write_json(path: Path, obj) -> bool:
    return _write_changed(path, (json.dumps(obj, indent=2) + "\n").encode())


def _copy_changed(src: Path, dst: Path) -> bool:
    """Copy src to dst atomically (`write_atomic`); False (nothing copied) if dst already has src's size."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return False
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        digest = _sha256(path)
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
    record = _load_json(record_path)
    if isinstance(record, dict) and record.get("key") == key:
        screened = [FileResult(**f) for f in record["files"]]
        scanned = False
    else:
        log.info("%s %s: screening", package.name, extracted.version)
        screened = scan_package(package, extracted.root, criteria)
        scanned = True
    files = apply_cap(screened, criteria.max_minutes_per_package)
    src_copyright = _copyright_file(extracted.root, package.name)
    copyright_rel = None
    if src_copyright is not None:
        copyright_rel = f"licences/{package.name}.copyright"
        _write_changed(out / copyright_rel, src_copyright.read_bytes())
        licence = licence_summary(src_copyright.read_text(errors="replace"))
    else:
        licence = "unknown (no usr/share/doc/<package>/copyright in the .deb)"
    dest = _package_out(out, package)
    copied, keep = 0, set()
    for f in files:
        if f.status == "kept":
            target = dest / f.path
            copied += _copy_changed(extracted.root / f.path, target)
            keep.add(target)
    _prune(dest, keep)
    if scanned:  # only once the files are in place: a rerun after an interruption copies the rest
        _write_json(record_path, {"key": key, "files": [asdict(f) for f in screened]})
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


def select_packages(names: Sequence[str] | None, table: Sequence[Package] = PACKAGES) -> list[Package]:
    """The table's packages named in `names` (table order), all of them for None; CorpusError for
    a name not in the table."""
    if names is None:
        return list(table)
    known = {p.name for p in table}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CorpusError(
            f"not in the corpus table: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return [p for p in table if p.name in set(names)]


def build_corpus(
    out: str | Path, packages: Iterable[Package] = PACKAGES, download_dir: str | Path | None = None,
    criteria: Criteria = Criteria(), fetch: Fetch = fetch_package,
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
    if _write_json(out / "corpus.json", corpus):
        written.append("corpus.json")
    for name, lines in manifests.items():  # last: a manifest never lists a file not yet in place
        text = "# paths relative to this file; rebuilt by scripts/build_corpus.py\n" + "".join(
            f"{line}\n" for line in lines)
        if _write_changed(out / name, text.encode()):
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
