"""The corpus table: which Debian packages, which split, which category each file is, and what a file
must pass to be kept."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

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
    # spoken letters and syllables, 20 languages (KDE's KLettres): recorded speech beside game voices
    Package("klettres-data", "train", (("usr/share/klettres/*.ogg", "speech"),)),  # 46 min, capped at 30
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


DEFAULT_CRITERIA = Criteria()




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
