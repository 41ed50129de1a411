"""The byte scan behind an erasure's proof: every file under the given folders, read as bytes.

:func:`scan` looks in every regular file (links are never followed) for

* **needles**: byte strings such as the participant's pseudonym (upper and lower case) and the hexadecimal sha256 of
  each file the participant had (the provenance and manifests name files by these);
* **file digests**: a file whose own sha256 is one of the participant's files' (a copy left behind, under any name).

It reads inside compressed files too: a gzip stream (``.gz``: NIfTI volumes) is searched decompressed, and every
member of a zip archive (DICOM deliveries) is searched decompressed, with the member's sha256 compared like a file's.
Database files are read as they lie on disk (free pages and dead tuples included): a row deleted but still in the
file's bytes is found. A hit names the file, the archive member and *which* needle (its label), never the needle
itself, so a scan's report can be published beside the certificate.

Framework-free; reads only.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

CHUNK = 8 << 20
MAX_MEMBER_BYTES = 4 << 30          # a zip member or gzip stream larger than this (decompressed) is searched up to it


@dataclass(frozen=True)
class Hit:
    path: str                       # relative to the scanned folder it was found under
    member: str                     # the archive member ('' for the file itself; 'gzip' for a .gz stream)
    what: str                       # the needle's label, or '<label> (a copy: same sha256)' for a copy of a file


@dataclass
class ScanResult:
    files: int = 0
    bytes: int = 0
    members: int = 0                # archive members and gzip streams searched decompressed
    unreadable: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)   # archives whose raw bytes were searched, not their content
    hits: list[Hit] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.hits and not self.unreadable

    def merge(self, other: "ScanResult") -> "ScanResult":
        self.files += other.files
        self.bytes += other.bytes
        self.members += other.members
        self.unreadable += other.unreadable
        self.damaged += other.damaged
        self.hits += other.hits
        return self

    def as_dict(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "archive_members": self.members,
                "unreadable": len(self.unreadable), "damaged_archives": len(self.damaged), "hits": len(self.hits)}


_HEX64 = re.compile(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
HEX_REGEX_FROM = 40         # digests: from this many on, one regex pass instead of one plain search each


class _Searcher:
    """Finds needles in a stream of chunks (a needle split across two chunks included). Many sha256 needles (64
    lower-case hex digits) are found in one pass whatever their number: each such run is looked up in a set."""

    def __init__(self, needles: dict[str, bytes]):
        live = {k: v for k, v in needles.items() if v}
        hexes = {v: k for k, v in live.items() if len(v) == 64 and _HEX64.fullmatch(v)}
        # a plain search runs at memory speed, the regex at a few tens of MB/s: one regex pass pays off only for
        # many digests (an erasure of many participants at once)
        self.hex = hexes if len(hexes) > HEX_REGEX_FROM else {}
        self.needles = {k: v for k, v in live.items() if v not in self.hex}
        self.keep = max((len(v) for v in live.values()), default=1)
        self.found: set[str] = set()
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        buf = self._tail + chunk
        for label, needle in self.needles.items():
            if label not in self.found and needle in buf:
                self.found.add(label)
        if self.hex:
            for m in _HEX64.finditer(buf):
                label = self.hex.get(m.group())
                if label is not None:
                    self.found.add(label)
        self._tail = buf[-self.keep:]


def _walk(root: Path, exclude: tuple[Path, ...]) -> Iterator[tuple[Path, bool]]:
    """(path, is a regular file) of every folder and entry under ``root``; links are listed, never followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if here / d not in exclude)
        for d in dirnames:
            yield here / d, False
        for name in sorted(filenames):
            p = here / name
            if p not in exclude:
                yield p, p.is_file() and not p.is_symlink()


def _search_stream(read, needles: dict[str, bytes], limit: int = MAX_MEMBER_BYTES) -> tuple[set[str], str, int]:
    s, h, n = _Searcher(needles), hashlib.sha256(), 0
    while n < limit:
        chunk = read(CHUNK)
        if not chunk:
            break
        s.feed(chunk)
        h.update(chunk)
        n += len(chunk)
    return s.found, h.hexdigest(), n


def scan_file(path: Path, rel: str, needles: dict[str, bytes], digests: dict[str, str]) -> ScanResult:
    """One file: its bytes, and decompressed, its gzip stream or each zip member."""
    res = ScanResult(files=1)
    try:
        with open(path, "rb") as fh:
            found, digest, n = _search_stream(fh.read, needles, limit=1 << 62)
        res.bytes = n
        res.hits += [Hit(rel, "", w) for w in sorted(found)]
        if digest in digests:
            res.hits.append(Hit(rel, "", f"{digests[digest]} (a copy: same sha256)"))
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic[:2] == b"\x1f\x8b":
            try:
                with gzip.open(path, "rb") as gz:
                    found, digest, _ = _search_stream(gz.read, needles)
                res.members += 1
                res.hits += [Hit(rel, "gzip", w) for w in sorted(found)]
                if digest in digests:
                    res.hits.append(Hit(rel, "gzip", f"{digests[digest]} (a copy: same sha256)"))
            except (OSError, EOFError, zlib.error):     # a truncated or corrupt stream (a faulty delivery's file)
                res.damaged.append(rel)                # its raw bytes were searched; the certificate counts it
        elif magic == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(path) as zf:
                    for info in zf.infolist():
                        if info.is_dir():
                            continue
                        with zf.open(info) as member:
                            found, digest, _ = _search_stream(member.read, needles)
                        res.members += 1
                        res.hits += [Hit(rel, info.filename, w) for w in sorted(found)]
                        if digest in digests:
                            res.hits.append(Hit(rel, info.filename, f"{digests[digest]} (a copy: same sha256)"))
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError):
                res.damaged.append(rel)                # a damaged or encrypted archive: its raw bytes were searched
    except OSError as exc:
        res.unreadable.append(f"{rel} ({exc.strerror or type(exc).__name__})")
    return res


def scan(roots: Iterable[Path], needles: dict[str, bytes], digests: dict[str, str] | None = None, *,
         exclude: Iterable[Path] = (), progress=None) -> ScanResult:
    """Scan every file under ``roots`` (folders or files) for ``needles`` (label -> bytes) and for copies of the
    files in ``digests`` (sha256 hex -> label). ``exclude``: paths not scanned (with what lies under them)."""
    digests = digests or {}
    ex = tuple(Path(p) for p in exclude)
    out = ScanResult()
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        entries = [(root, True)] if root.is_file() else _walk(root, ex)
        for p, regular in entries:
            rel = p.name if p == root else f"{root.name}/{p.relative_to(root)}"
            name = str(p.relative_to(root)).encode() if p != root else p.name.encode()
            out.hits += [Hit(rel, "", f"{label} in the path") for label, n in needles.items() if n and n in name]
            if regular:
                out.merge(scan_file(p, rel, needles, digests))
                if progress is not None:
                    progress(out)
    return out


def needles_for(pseudonym: str, file_digests: Iterable[str] = ()) -> dict[str, bytes]:
    """The byte strings a participant's erasure must leave nowhere: the pseudonym (as delivered, upper case, and in
    lower case) and the sha256 (hex) of each file they had."""
    out = {"pseudonym": pseudonym.encode(), "pseudonym (lower case)": pseudonym.lower().encode()}
    for i, d in enumerate(sorted(set(file_digests)), start=1):
        out[f"sha256 of file {i}"] = d.encode()
    return out
