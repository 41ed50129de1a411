"""Editing simulated DICOM zips the way real exports differ (no tests and no fixtures here).

The simulator (:func:`cbp_platform.synth.dicom.participant_zips`) writes one zip per contrast, each series in a
folder ``<series number>_<description>/``; these helpers read such a zip's members, rewrite chosen members' headers
with pydicom, and write the zip again. Used by the DICOM regression corpus (``tests/ingest/test_dicom_corpus.py``).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

from cbp_platform.synth.dicom import CONTRASTS


def members(payload: bytes) -> list[tuple[str, bytes]]:
    """A zip's members as (name, bytes), in order."""
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        return [(n, z.read(n)) for n in z.namelist()]


def zip_of(items: list[tuple[str, bytes]]) -> bytes:
    """A deflated zip of ``items`` (name, bytes), in order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, payload in items:
            z.writestr(name, payload)
    return buf.getvalue()


def with_members(payload: bytes, extra: list[tuple[str, bytes]]) -> bytes:
    """The zip with ``extra`` members appended."""
    return zip_of(members(payload) + extra)


def series_of(station: int, *contrasts: str) -> Callable[[str], bool]:
    """Selects the members of ``station``'s series of ``contrasts`` (the simulator's folders ``<number>_...``)."""
    prefixes = tuple(f"{10 * station + list(CONTRASTS).index(c) + 1:04d}_" for c in contrasts)
    return lambda name: name.startswith(prefixes)


def everything(name: str) -> bool:
    return True


def saved(ds) -> bytes:
    """A data set as a standard DICOM file (preamble, ``DICM``, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def edited(payload: bytes, select: Callable[[str], bool], change: Callable) -> bytes:
    """The zip with each selected member's data set changed by ``change(ds)`` and saved as a standard file, unless
    ``change`` returns the bytes to store instead."""
    import pydicom

    out = []
    for name, b in members(payload):
        if select(name):
            ds = pydicom.dcmread(io.BytesIO(b))
            b2 = change(ds)
            b = saved(ds) if b2 is None else b2
        out.append((name, b))
    return zip_of(out)


def no_preamble(ds) -> bytes:
    """The file meta kept, the 128-byte preamble and the ``DICM`` prefix dropped (some exports write this)."""
    return saved(ds)[132:]


def cut(n: int) -> Callable:
    """A ``change`` that stores the file without its last ``n`` bytes (cut inside its pixel data)."""
    return lambda ds: saved(ds)[:-n]


def dicomdir(folder: Path, slices: list[bytes]) -> bytes:
    """A real DICOMDIR (pydicom's FileSet) indexing ``slices``, written under ``folder``."""
    import pydicom
    from pydicom.fileset import FileSet

    fs = FileSet()
    for b in slices:
        ds = pydicom.dcmread(io.BytesIO(b))
        ds.StudyID = "1"                                # what a DICOMDIR's study record needs
        fs.add(ds)
    fs.write(folder)
    return (Path(folder) / "DICOMDIR").read_bytes()
