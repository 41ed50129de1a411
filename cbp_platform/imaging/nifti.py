"""Deterministic, atomic NIfTI writing.

``nibabel`` writes gzip members with the current time in their header, so two writes of the same array differ
byte for byte. Deliveries carry sha256 checksums, so the simulator serialises the image itself and gzips it
with ``mtime=0``: the same array always gives the same bytes (and the same checksum).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_bytes(data: np.ndarray, affine: np.ndarray, *, compresslevel: int = 1,
                xyzt_units: tuple[str, str] = ("mm", "sec")) -> bytes:
    """Serialise ``data`` as a gzipped NIfTI-1 file (bytes), reproducibly."""
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_xyzt_units(*xyzt_units)
    hdr.set_qform(affine, code=1)  # scanner coordinates
    hdr.set_sform(affine, code=1)
    if data.dtype.kind in "iu":
        hdr.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0)


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
