"""Validating one participant's Dixon scans against the manifest and reading their facts.

Every check names the file and the problem. The order is cheap-first: presence and size, sha256 against the
manifest (one read of the compressed bytes), the NIfTI header (refusing absurd sizes *before* decompressing),
then decompression, NaN and intensity checks, water/fat agreement, and the fat-water swap QC.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform.imaging.qc import fat_water_swap
from cbp_platform.landing import OPTIONAL_CHANNELS, REQUIRED_CHANNELS, scan_relpath

MAX_DIM = 2048
MAX_VOXELS = 256 * 1024 * 1024          # refuse headers claiming more than this per image
SPACING_RANGE = (0.2, 20.0)             # mm

SCAN_FACTS_SCHEMA = {
    "batch_key": pl.String, "delivery_id": pl.String, "pseudonym": pl.String, "channels": pl.String,
    **{f"{ch}_{k}": t for ch in REQUIRED_CHANNELS + OPTIONAL_CHANNELS
       for k, t in (("path", pl.String), ("sha256", pl.String), ("bytes", pl.Int64))},
    "shape_x": pl.Int32, "shape_y": pl.Int32, "shape_z": pl.Int32,
    "spacing_x": pl.Float64, "spacing_y": pl.Float64, "spacing_z": pl.Float64,
    "orientation": pl.String, "affine": pl.String, "dtype": pl.String,
    "water_min": pl.Float64, "water_max": pl.Float64, "water_p99": pl.Float64,
    "fat_min": pl.Float64, "fat_max": pl.Float64, "fat_p99": pl.Float64,
    "swap_score": pl.Float64, "swap_reversed_fraction": pl.Float64, "swap_suspected": pl.Boolean,
}


@dataclass
class ScanProblem(Exception):
    reason: str       # machine-readable reason code
    message: str      # names the file and the problem

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def _read_verified(path: Path, entry: dict | None) -> bytes:
    if entry is None:
        raise ScanProblem("not_in_manifest", f"{path}: file present but not listed in the manifest")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ScanProblem("missing_file", f"{path}: listed in the manifest but missing") from None
    if len(raw) != entry["size"]:
        raise ScanProblem("size_mismatch", f"{path}: {len(raw)} bytes, manifest says {entry['size']}")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry["sha256"]:
        raise ScanProblem("checksum_mismatch", f"{path}: sha256 {digest[:12]}... differs from the manifest's "
                                               f"{entry['sha256'][:12]}...")
    return raw


def _decode(path: Path, raw: bytes) -> tuple[nib.Nifti1Image, np.ndarray]:
    # header first: NIfTI-1 headers are 348 bytes; a gzip member gives them after a small decompress
    try:
        if raw[:2] == b"\x1f\x8b":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            head = d.decompress(raw, 352)
        else:
            head = raw[:352]
        if len(head) < 348:
            raise ScanProblem("truncated_gzip", f"{path}: stream ends inside the NIfTI header")
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(head), check=False)
    except ScanProblem:
        raise
    except (zlib.error, OSError, EOFError) as exc:
        raise ScanProblem("corrupt_gzip", f"{path}: cannot read the header ({exc})") from None
    except Exception as exc:  # nibabel raises a variety of header errors
        raise ScanProblem("invalid_header", f"{path}: not a NIfTI-1 image ({exc})") from None
    dims = hdr["dim"]
    ndim = int(dims[0])
    if not 3 <= ndim <= 4 or (ndim == 4 and int(dims[4]) != 1):
        raise ScanProblem("invalid_dimensions", f"{path}: {ndim}D image (want one 3D volume)")
    shape = tuple(int(x) for x in dims[1:4])
    if any(s < 1 or s > MAX_DIM for s in shape) or int(np.prod(shape)) > MAX_VOXELS:
        raise ScanProblem("absurd_size", f"{path}: header claims shape {shape}; refused before decompressing")
    try:
        data_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except EOFError as exc:
        raise ScanProblem("truncated_gzip", f"{path}: gzip stream ends early ({exc})") from None
    except (zlib.error, OSError) as exc:
        raise ScanProblem("corrupt_gzip", f"{path}: corrupt gzip stream ({exc})") from None
    try:
        img = nib.Nifti1Image.from_bytes(data_bytes)
        arr = np.asarray(img.dataobj)
    except Exception as exc:
        raise ScanProblem("invalid_image", f"{path}: image data unreadable ({exc})") from None
    if arr.ndim == 4:
        arr = arr[..., 0]
    return img, arr


def inspect_participant(delivery_dir: Path, pseudonym: str, files_by_path: dict[str, dict], *,
                        swap_qc: bool = True) -> dict:
    """Validated facts of one participant's scans, or raise :class:`ScanProblem`."""
    facts: dict = {"pseudonym": pseudonym}
    arrays = {}
    imgs = {}
    channels = []
    for ch in REQUIRED_CHANNELS + OPTIONAL_CHANNELS:
        rel = scan_relpath(pseudonym, ch)
        path = delivery_dir / rel
        entry = files_by_path.get(rel)
        if entry is None and not path.exists():
            if ch in REQUIRED_CHANNELS:
                raise ScanProblem(f"missing_{ch}", f"{path}: required {ch} image not delivered")
            continue
        raw = _read_verified(path, entry)
        img, arr = _decode(path, raw)
        if ch in REQUIRED_CHANNELS:
            arrays[ch] = arr
            imgs[ch] = img
        channels.append(ch)
        facts[f"{ch}_path"] = rel
        facts[f"{ch}_sha256"] = entry["sha256"]
        facts[f"{ch}_bytes"] = entry["size"]
    w_img, f_img = imgs["water"], imgs["fat"]
    w, f = arrays["water"], arrays["fat"]
    wp, fp = delivery_dir / scan_relpath(pseudonym, "water"), delivery_dir / scan_relpath(pseudonym, "fat")
    if w.shape != f.shape:
        raise ScanProblem("shape_mismatch", f"{fp}: shape {f.shape} differs from water {w.shape}")
    if not np.allclose(w_img.affine, f_img.affine, atol=1e-3):
        d = np.abs(w_img.affine - f_img.affine).max()
        raise ScanProblem("affine_mismatch", f"{fp}: affine differs from water's (max difference {d:.3g} mm)")
    for ch, arr, p in (("water", w, wp), ("fat", f, fp)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            n_bad = int((~np.isfinite(arr)).sum())
            raise ScanProblem("nan_values", f"{p}: {n_bad} voxels are NaN or infinite")
    zooms = tuple(float(z) for z in w_img.header.get_zooms()[:3])
    if not all(SPACING_RANGE[0] <= z <= SPACING_RANGE[1] for z in zooms):
        raise ScanProblem("invalid_spacing", f"{wp}: voxel spacing {zooms} mm outside {SPACING_RANGE}")
    if float(w.max()) <= 0 or float(f.max()) <= 0:
        raise ScanProblem("empty_image", f"{wp if float(w.max()) <= 0 else fp}: image has no signal")
    facts.update(
        channels=",".join(channels),
        shape_x=int(w.shape[0]), shape_y=int(w.shape[1]), shape_z=int(w.shape[2]),
        spacing_x=zooms[0], spacing_y=zooms[1], spacing_z=zooms[2],
        orientation="".join(nib.aff2axcodes(w_img.affine)),
        affine=json.dumps([round(float(x), 6) for x in w_img.affine.ravel()]),
        dtype=str(w.dtype),
        water_min=float(w.min()), water_max=float(w.max()), water_p99=float(np.percentile(w, 99)),
        fat_min=float(f.min()), fat_max=float(f.max()), fat_p99=float(np.percentile(f, 99)),
    )
    if swap_qc:
        q = fat_water_swap(w, f, zooms)
        facts.update(swap_score=q.score, swap_reversed_fraction=q.reversed_fraction, swap_suspected=q.suspected)
    return facts
