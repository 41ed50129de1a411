"""Validating one participant's Dixon scans against the manifest and reading their facts, with bounded memory.

Every problem is a :class:`ScanProblem` with its own reason code and a message that names the file by its role
and its position in the manifest (``water image (files[3])``), never by a path: paths hold the pseudonym, and
these messages reach operators. The order is cheap-first, and nothing is opened that is not a regular file
inside the delivery:

1. the path: every component is ``lstat``-ed; a symbolic link anywhere (``outside_delivery``) or anything but a
   regular file (``not_a_file``) is refused *without opening the target*; absent (``missing_file``), or
   another size than the manifest's (``size_mismatch``, ``empty_file``);
2. the sha256 against the manifest (streamed, ``checksum_mismatch``);
3. the NIfTI-1 header, from the first bytes only: ``not_nifti``, ``invalid_dimensions``, ``absurd_size`` (more
   than :attr:`ScanRules.max_image_bytes` declared), ``implausible_shape``, ``unsupported_dtype``,
   ``invalid_data_offset`` (the data would start inside the header), ``invalid_spacing`` (zero, negative or
   non-finite voxel size), ``invalid_affine``;
4. the data, streamed through the decompressor into a buffer of exactly the declared size: a stream that ends
   early is ``truncated_gzip`` (``truncated_file`` uncompressed), a broken one ``corrupt_gzip``; anything after
   the image (data in another gzip member, gigabytes of zeros) is ``trailing_data``, found after decompressing at
   most :data:`TRAILING_PROBE` bytes past the image, so a decompression bomb never fills memory. A gzip file of
   several members is read as one stream, as RFC 1952 allows (what ``cat a.gz b.gz`` and ``pigz`` write);
5. the values: ``nan_values``, ``negative_signal``, ``empty_image``, ``constant_image``; then agreement with
   the water image (``shape_mismatch``, ``affine_mismatch``) and the fat-water swap QC (a flag, not a refusal).

:data:`RULES` is shared with the ``scan_facts_expectations`` Great Expectations suite: a scan that passes here
passes there, so the batch-level check can only fail on batch-level breakage, never on one participant's scan.
A :class:`ByteBudget` bounds the image bytes held at once by an ingest worker's threads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform.imaging.qc import fat_water_swap, subsample
from cbp_platform.landing import OPTIONAL_CHANNELS, REQUIRED_CHANNELS, scan_relpath
from cbp_platform.reasons import R, Reason, code_of

NIFTI1_HEADER_BYTES = 348
NIFTI1_MIN_VOX_OFFSET = 352          # header + the 4-byte extension flag
MAX_EXTENSION_BYTES = 1 << 20        # header extensions beyond this are refused (invalid_data_offset)
TRAILING_PROBE = 64 << 10            # decompressed past the image to detect trailing data, at most
CHUNK = 1 << 20


@dataclass(frozen=True)
class ScanRules:
    """What a scan must satisfy; the ingestion check and the GX suite both read it."""

    shape: tuple[int, int] = (16, 1024)                  # voxels per axis
    spacing_mm: tuple[float, float] = (0.2, 20.0)
    dtypes: tuple[str, ...] = ("uint8", "int16", "uint16", "int32", "float32", "float64")
    min_signal: float = 0.0                              # magnitude images: no negative voxel
    # one image, uncompressed: a NAKO whole-body float32 volume (~25 M voxels) is ~100 MB
    max_image_bytes: int = 128 << 20


RULES = ScanRules()

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
    # nifti: the delivery's own files; dicom: volumes stitched from the delivery's series (paths under the data root)
    "source_format": pl.String,
    "stations": pl.Int32, "dicom_series": pl.Int32, "dicom_files": pl.Int32, "superseded_series": pl.Int32,
    "ignored_files": pl.Int32,
}


# a required channel that is not delivered (NIfTI: no image; DICOM: no series)
MISSING_CHANNEL: dict[str, Reason] = {"water": R.missing_water, "fat": R.missing_fat}


@dataclass
class ScanProblem(Exception):
    reason: str       # a registered reason code (cbp_platform/reasons.py; given as ``R.<code>`` or checked)
    message: str      # names the file by role and manifest position, and the problem

    def __post_init__(self):
        self.reason = code_of(self.reason)         # an unregistered code fails here, where it is raised

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ByteBudget:
    """At most ``limit`` bytes of decoded images held at once by the threads of one worker. A participant takes
    its whole need in one step (so two threads can never each hold half and wait for the other); a need larger
    than the limit runs alone."""

    def __init__(self, limit: int = 384 << 20):
        self.limit = int(limit)
        self.used = 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(int(n), self.limit)
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


@dataclass
class _Listed:
    """One listed scan file: where it is, how operators are told about it, what the manifest says."""

    channel: str
    rel: str
    path: Path
    role: str
    entry: dict | None


@dataclass
class _Header:
    hdr: nib.Nifti1Header
    shape: tuple[int, int, int]
    dtype: np.dtype
    vox_offset: int
    nbytes: int
    zooms: tuple[float, float, float]
    affine: np.ndarray
    gz: bool


def role_of(channel: str, rel: str, files_index: dict[str, int]) -> str:
    i = files_index.get(rel)
    return f"{channel} image ({'not in the manifest' if i is None else f'files[{i}]'})"


def check_regular_file(delivery_dir: Path, rel: str, role: str) -> os.stat_result:
    """``lstat`` every component of ``rel`` under ``delivery_dir``: links are never followed, only a regular file
    is ever opened. Raises :class:`ScanProblem` (``missing_file``, ``outside_delivery``, ``not_a_file``)."""
    cur = Path(delivery_dir)
    parts = [p for p in rel.split("/") if p]
    st = None
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise ScanProblem(R.missing_file, f"{role}: listed in the manifest but missing") from None
        except OSError as exc:
            raise ScanProblem(R.unreadable, f"{role}: cannot be examined ({exc.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            what = "the file" if i == len(parts) - 1 else "a folder on its path"
            raise ScanProblem(R.outside_delivery, f"{role}: {what} is a symbolic link; links are never followed "
                                                  "out of the delivery")
    if st is None or not stat.S_ISREG(st.st_mode):
        raise ScanProblem(R.not_a_file, f"{role}: not a regular file")
    return st


def _open(path: Path, role: str):
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ScanProblem(R.unreadable, f"{role}: cannot be opened ({exc.strerror})") from None
    return os.fdopen(fd, "rb")


def _verify(f: _Listed, delivery_dir: Path) -> os.stat_result:
    if f.entry is None:
        raise ScanProblem(R.not_in_manifest, f"{f.role}: file present but not listed in the manifest")
    st = check_regular_file(delivery_dir, f.rel, f.role)
    if st.st_size != f.entry["size"]:
        if st.st_size == 0:
            raise ScanProblem(R.empty_file, f"{f.role}: 0 bytes (the manifest says {f.entry['size']})")
        raise ScanProblem(R.size_mismatch, f"{f.role}: {st.st_size} bytes, the manifest says {f.entry['size']}")
    if st.st_size == 0:
        raise ScanProblem(R.empty_file, f"{f.role}: 0 bytes")
    h = hashlib.sha256()
    with _open(f.path, f.role) as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    if h.hexdigest() != f.entry["sha256"]:
        raise ScanProblem(R.checksum_mismatch, f"{f.role}: sha256 {h.hexdigest()[:12]}... differs from the "
                                               f"manifest's {f.entry['sha256'][:12]}...")
    return st


class _Stream:
    """The decompressed bytes of a (gzip or plain) file, pulled with a bound on every read.

    A gzip file may hold several members, one after the other (RFC 1952, 2.2; ``gzip``, ``pigz`` and concatenated
    files write them): they are read as one stream, as the standard says. Bytes after the last member that do not
    start another member are kept (``garbage``) for :meth:`trailing`."""

    def __init__(self, fh, gz: bool, role: str):
        self.fh, self.gz, self.role = fh, gz, role
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS) if gz else None
        self.tail = b""
        self.garbage = b""
        self.done = False                # the last member ended, and nothing (or garbage) follows

    def _problem(self, exc: Exception) -> ScanProblem:
        return ScanProblem(R.corrupt_gzip, f"{self.role}: corrupt gzip stream ({exc})")

    def _next_member(self) -> bool:
        """At the end of a member: start the next one if one follows; False at the end of the file (or garbage)."""
        rest = self.d.unused_data
        while len(rest) < 2:
            more = self.fh.read(CHUNK)
            if not more:
                break
            rest += more
        if rest[:2] == b"\x1f\x8b":
            self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.tail = rest
            return True
        self.garbage, self.done = rest, True
        return False

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the stream goes; return the bytes written."""
        got, n = 0, len(buf)
        while got < n:
            if self.d is None:
                k = self.fh.readinto(buf[got:])
                if not k:
                    break
                got += k
                continue
            if self.done or (self.d.eof and not self._next_member()):
                break
            src = self.tail
            if not src:
                src = self.fh.read(CHUNK)
                if not src:
                    break
            try:
                out = self.d.decompress(src, n - got)
            except zlib.error as exc:
                raise self._problem(exc) from None
            self.tail = b"" if self.d.eof else self.d.unconsumed_tail   # zlib may keep a stale tail at the end
            buf[got:got + len(out)] = out
            got += len(out)
        return got

    def read(self, n: int) -> bytes:
        b = bytearray(n)
        k = self.readinto(memoryview(b))
        return bytes(b[:k])

    def trailing(self) -> int:
        """Bytes found after the image (decompressing at most :data:`TRAILING_PROBE` more, through any further
        members; then any bytes that are not a gzip member)."""
        extra = len(self.read(TRAILING_PROBE))
        if self.d is not None and self.garbage:
            extra += len(self.garbage) + len(self.fh.read(1))
        return extra

    @property
    def ended_early(self) -> bool:
        return self.d is not None and not self.d.eof


def _header(f: _Listed) -> _Header:
    with _open(f.path, f.role) as fh:
        magic = fh.read(2)
        fh.seek(0)
        gz = magic == b"\x1f\x8b"
        s = _Stream(fh, gz, f.role)
        head = s.read(NIFTI1_HEADER_BYTES)
    if len(head) < NIFTI1_HEADER_BYTES:
        if gz and s.ended_early:
            raise ScanProblem(R.truncated_gzip, f"{f.role}: the gzip stream ends inside the NIfTI header")
        raise ScanProblem(R.not_nifti, f"{f.role}: {len(head)} bytes, shorter than a NIfTI-1 header")
    sizeof = int.from_bytes(head[:4], "little")
    if sizeof not in (NIFTI1_HEADER_BYTES, 0x5C010000) or head[344:348] not in (b"n+1\0", b"ni1\0"):
        if sizeof in (540, 0x1C020000):
            raise ScanProblem(R.not_nifti, f"{f.role}: a NIfTI-2 file; the landing-zone contract is NIfTI-1")
        raise ScanProblem(R.not_nifti, f"{f.role}: not a NIfTI-1 file (no NIfTI-1 header"
                                       f"{' inside the gzip stream' if gz else ''})")
    if head[344:348] == b"ni1\0":
        raise ScanProblem(R.not_nifti, f"{f.role}: a NIfTI header/image pair; the contract is one .nii.gz file")
    try:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(head), check=False)
        dtype = hdr.get_data_dtype()
        hdr.get_slope_inter()
    except Exception as exc:  # nibabel raises a variety of header errors
        raise ScanProblem(R.invalid_header, f"{f.role}: NIfTI-1 header unreadable ({exc})") from None
    dims = [int(x) for x in hdr["dim"]]
    ndim = dims[0]
    if not 3 <= ndim <= 7 or any(d != 1 for d in dims[4:ndim + 1]):
        raise ScanProblem(R.invalid_dimensions, f"{f.role}: {ndim}D image with dim {dims[1:ndim + 1]} "
                                                "(want one 3D volume)")
    shape = (dims[1], dims[2], dims[3])
    if any(d < 1 for d in shape):
        raise ScanProblem(R.invalid_dimensions, f"{f.role}: header dimensions {shape}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > RULES.max_image_bytes:
        raise ScanProblem(R.absurd_size, f"{f.role}: header declares shape {shape} of {dtype.name} "
                                         f"({nbytes / 2**20:.0f} MiB, limit {RULES.max_image_bytes >> 20} MiB); "
                                         "refused before decompressing")
    lo, hi = RULES.shape
    if not all(lo <= d <= hi for d in shape):
        raise ScanProblem(R.implausible_shape, f"{f.role}: shape {shape} outside {lo}-{hi} voxels per axis")
    if dtype.name not in RULES.dtypes:
        raise ScanProblem(R.unsupported_dtype, f"{f.role}: data type {dtype.name} (accepted: "
                                               f"{', '.join(RULES.dtypes)})")
    off = float(hdr["vox_offset"])
    if not (np.isfinite(off) and off == int(off)
            and NIFTI1_MIN_VOX_OFFSET <= off <= NIFTI1_MIN_VOX_OFFSET + MAX_EXTENSION_BYTES):
        raise ScanProblem(R.invalid_data_offset, f"{f.role}: data offset {off:g} (the image data must start at "
                                                 f"or after byte {NIFTI1_MIN_VOX_OFFSET}, after the header)")
    pix = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if not (np.isfinite(pix).all() and (pix > 0).all()):
        raise ScanProblem(R.invalid_spacing, f"{f.role}: voxel spacing {tuple(float(x) for x in pix)} mm "
                                             "(must be positive and finite)")
    zooms = tuple(float(z) for z in pix)
    lo_mm, hi_mm = RULES.spacing_mm
    if not all(lo_mm <= z <= hi_mm for z in zooms):
        raise ScanProblem(R.invalid_spacing, f"{f.role}: voxel spacing {zooms} mm outside {lo_mm}-{hi_mm} mm")
    try:
        affine = hdr.get_best_affine()
    except Exception as exc:
        raise ScanProblem(R.invalid_affine, f"{f.role}: no usable affine ({exc})") from None
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ScanProblem(R.invalid_affine, f"{f.role}: affine is singular or not finite")
    if None in nib.aff2axcodes(affine):
        raise ScanProblem(R.invalid_affine, f"{f.role}: affine has no clear orientation (an axis sheared between "
                                            "two directions)")
    return _Header(hdr, shape, dtype, int(off), nbytes, zooms, affine, gz)


def _data(f: _Listed, h: _Header) -> np.ndarray:
    """The image, streamed into a buffer of exactly its declared size; bounded whatever the file holds."""
    what = "gzip stream" if h.gz else "file"
    buf = bytearray(h.nbytes)
    with _open(f.path, f.role) as fh:
        s = _Stream(fh, h.gz, f.role)
        skip = len(s.read(h.vox_offset))
        got = s.readinto(memoryview(buf)) if skip == h.vox_offset else 0
        if got < h.nbytes:
            reason = R.truncated_gzip if h.gz else R.truncated_file
            raise ScanProblem(reason, f"{f.role}: the {what} ends after {skip + got} bytes; the header declares "
                                      f"{h.vox_offset + h.nbytes}")
        extra = s.trailing()
        if extra:
            more = "+" if extra >= TRAILING_PROBE else ""
            raise ScanProblem(R.trailing_data, f"{f.role}: {extra}{more} bytes after the image the header declares "
                                               f"(decompression stopped there)")
        if h.gz and not s.d.eof:
            raise ScanProblem(R.truncated_gzip, f"{f.role}: the gzip stream does not end properly")
    arr = np.frombuffer(buf, dtype=h.dtype).reshape(h.shape, order="F")
    slope, inter = h.hdr.get_slope_inter()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        arr = arr.astype(np.float32) * np.float32(slope) + np.float32(inter or 0)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _values(f: _Listed, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ScanProblem(R.nan_values, f"{f.role}: {int(bad.sum())} voxels are NaN or infinite")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < RULES.min_signal:
        raise ScanProblem(R.negative_signal, f"{f.role}: minimum {lo:.4g} below {RULES.min_signal:g} "
                                             "(magnitude images have no negative signal)")
    if hi <= 0:
        raise ScanProblem(R.empty_image, f"{f.role}: image has no signal")
    if lo == hi:
        raise ScanProblem(R.constant_image, f"{f.role}: every voxel is {lo:g}")


def verified_headers(delivery_dir: Path, pseudonym: str, files_by_path: dict[str, dict],
                   files_index: dict[str, int] | None = None) -> list[tuple[_Listed, _Header]]:
    """Steps 1-3 for every channel of a participant: the listed files, verified, with their headers."""
    idx = files_index if files_index is not None else {p: i for i, p in enumerate(files_by_path)}
    out = []
    for ch in REQUIRED_CHANNELS + OPTIONAL_CHANNELS:
        rel = scan_relpath(pseudonym, ch)
        f = _Listed(ch, rel, Path(delivery_dir) / rel, role_of(ch, rel, idx), files_by_path.get(rel))
        if f.entry is None:
            try:
                os.lstat(f.path)
                present = True
            except OSError:
                present = False
            if not present:
                if ch in REQUIRED_CHANNELS:
                    raise ScanProblem(MISSING_CHANNEL[ch], f"{ch} image: required, not delivered")
                continue
        _verify(f, Path(delivery_dir))
        out.append((f, _header(f)))
    return out


def inspect_participant(delivery_dir: Path, pseudonym: str, files_by_path: dict[str, dict], *,
                        swap_qc: bool = True, budget: ByteBudget | None = None,
                        files_index: dict[str, int] | None = None) -> dict:
    """Validated facts of one participant's scans, or raise :class:`ScanProblem`."""
    listed = verified_headers(delivery_dir, pseudonym, files_by_path, files_index)
    need = sum(h.nbytes for f, h in listed if f.channel in REQUIRED_CHANNELS) + max(
        [h.nbytes for f, h in listed if f.channel not in REQUIRED_CHANNELS] or [0])
    held = budget.acquire(need) if budget is not None else 0
    try:
        return _inspect(listed, pseudonym, swap_qc)
    finally:
        if budget is not None:
            budget.release(held)


def _inspect(listed: list[tuple[_Listed, _Header]], pseudonym: str, swap_qc: bool) -> dict:
    facts: dict = {"pseudonym": pseudonym, "source_format": "nifti"}
    heads = {f.channel: (f, h) for f, h in listed}
    wf, wh = heads["water"]
    for f, h in listed:                    # geometry before any decompression
        if f.channel == "water":
            continue
        if h.shape != wh.shape:
            raise ScanProblem(R.shape_mismatch, f"{f.role}: shape {h.shape} differs from the water image's "
                                                f"{wh.shape}")
        if not np.allclose(h.affine, wh.affine, atol=1e-3):
            d = float(np.abs(h.affine - wh.affine).max())
            raise ScanProblem(R.affine_mismatch, f"{f.role}: affine differs from the water image's "
                                                 f"(max difference {d:.3g} mm)")
    arrays = {}
    for f, h in listed:
        arr = _data(f, h)
        _values(f, arr)
        if f.channel in REQUIRED_CHANNELS:
            arrays[f.channel] = arr
        facts[f"{f.channel}_path"] = f.rel
        facts[f"{f.channel}_sha256"] = f.entry["sha256"]
        facts[f"{f.channel}_bytes"] = f.entry["size"]
        del arr
    w, fat = arrays["water"], arrays["fat"]
    zooms = wh.zooms
    facts.update(
        channels=",".join(f.channel for f, _ in listed),
        shape_x=int(w.shape[0]), shape_y=int(w.shape[1]), shape_z=int(w.shape[2]),
        spacing_x=zooms[0], spacing_y=zooms[1], spacing_z=zooms[2],
        orientation="".join(nib.aff2axcodes(wh.affine)),
        affine=json.dumps([round(float(x), 6) for x in wh.affine.ravel()]),
        dtype=str(w.dtype),
        water_min=float(w.min()), water_max=float(w.max()), water_p99=float(np.percentile(subsample(w), 99)),
        fat_min=float(fat.min()), fat_max=float(fat.max()), fat_p99=float(np.percentile(subsample(fat), 99)),
    )
    if swap_qc:
        q = fat_water_swap(w, fat, zooms)
        facts.update(swap_score=q.score, swap_reversed_fraction=q.reversed_fraction, swap_suspected=q.suspected)
    return facts
