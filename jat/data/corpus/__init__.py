"""A real full-band audio corpus rebuilt from Debian packages, split into train and held-out by package.

`build_corpus` (build.py) fetches each package of `PACKAGES` (packages.py; `apt-get download` +
`dpkg -x`, cached: debian.py), screens its audio files (`screen_file`, screen.py: unreadable, too
short, silent, sample rate below 32 kHz, measured bandwidth below 16 kHz; `measure_bandwidth`), copies
the kept files unchanged into OUT/<split>/<package>/... under a per-package cap on minutes shared
fairly between the package's categories (`apply_cap`: a package with an hour of music and ten minutes
of speech keeps all the speech), and writes the manifests
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
plain measure of screen.py: the highest frequency still within 70 dB of the level of the 200 Hz - 4 kHz
band.
"""

from jat.data.corpus.build import (
    CorpusReport,
    PackageReport,
    apply_cap,
    build_corpus,
    category_quotas,
    summary_rows,
)
from jat.data.corpus.debian import Extracted, fetch_package, licence_summary
from jat.data.corpus.packages import (
    CATEGORIES,
    PACKAGES,
    SPLITS,
    CorpusError,
    Criteria,
    Package,
    select_packages,
)
from jat.data.corpus.screen import FileResult, measure_bandwidth, screen_file

__all__ = ["CATEGORIES", "PACKAGES", "SPLITS", "CorpusError", "CorpusReport", "Criteria", "Extracted",
           "FileResult", "Package", "PackageReport", "apply_cap", "build_corpus", "category_quotas",
           "fetch_package", "licence_summary", "measure_bandwidth", "screen_file", "select_packages",
           "summary_rows"]
