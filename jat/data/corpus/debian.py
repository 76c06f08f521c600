"""Fetching a package (`apt-get download`, `dpkg -x`, cached) and summarising its licence."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jat.data.corpus.files import load_json, write_json
from jat.data.corpus.packages import CorpusError

log = logging.getLogger(__name__)

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
    if root.is_dir() and marker.is_file() and load_json(marker) == stamp:
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
    write_json(marker, stamp)
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


def copyright_file(root: Path, name: str) -> Path | None:
    path = root / "usr/share/doc" / name / "copyright"
    return path if path.is_file() else None
