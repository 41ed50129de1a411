"""A regression corpus of hostile deliveries, built from a simulated delivery.

:func:`build` copies a ``cbp synth`` delivery into ``<root>/landing/hostile-d01`` and gives one participant each
fault of :data:`SCAN_FAULTS` and :data:`COVARIATE_FAULTS`; the manifest is rewritten to match what a data centre
would have listed (consistent with the broken file, except where the fault is the disagreement itself). Around it
lie deliveries that are waiting, refused or re-sent (:data:`DELIVERY_CASES`). Every expectation is returned, so the
test asserts each participant's reason and that every other participant is processed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from cbp_platform.imaging.nifti import nifti_bytes
from cbp_platform.reasons import R
from cbp_platform.synth.faults import corrupt_gzip, truncate_gzip

# participant fault -> the quarantine reason expected (stage: raw_mri_scans for SCAN_FAULTS, participant_covariates
# for COVARIATE_FAULTS); the codes come from the registry, cbp_platform/reasons.py
SCAN_FAULTS = {
    "corrupt_gzip": R.corrupt_gzip.code,
    "truncated_gzip": R.truncated_gzip.code,
    "empty_file": R.empty_file.code,
    "not_nifti": R.not_nifti.code,
    "not_nifti_gz": R.not_nifti.code,
    "gzip_bomb": R.trailing_data.code,
    "trailing_garbage": R.trailing_data.code,
    "offset_inside_header": R.invalid_data_offset.code,
    "four_d": R.invalid_dimensions.code,
    "absurd_header_size": R.absurd_size.code,
    "zero_spacing": R.invalid_spacing.code,
    "nan_values": R.nan_values.code,
    "negative_signal": R.negative_signal.code,
    "constant_image": R.constant_image.code,
    "unsupported_dtype": R.unsupported_dtype.code,
    "shape_mismatch": R.shape_mismatch.code,
    "affine_mismatch": R.affine_mismatch.code,
    "checksum_mismatch": R.checksum_mismatch.code,
    "size_mismatch": R.size_mismatch.code,
    "missing_file": R.missing_file.code,
    "missing_fat": R.missing_fat.code,
    "symlink_to_valid_copy": R.outside_delivery.code,
    "symlink_to_fifo": R.outside_delivery.code,
    "symlinked_participant_folder": R.outside_delivery.code,
    "fifo_in_delivery": R.not_a_file.code,
    "not_in_manifest": R.not_in_manifest.code,
    # round 2 (issue 26)
    "unlisted_participant": R.not_in_participant_list.code,    # files and row present, not in `participants`
    "duplicate_content_a": R.duplicate_content.code,           # a and b: one scan under two pseudonyms
    "duplicate_content_b": R.duplicate_content.code,
    "incomplete_copy": R.size_mismatch.code,                   # still being copied at _SUCCESS; completed later
}
# the other stages a fault quarantines its participant at, with the same reason
ALSO_AT = {"unlisted_participant": ("participant_covariates",)}
# harmless variations of good participants: they must be stored
HARMLESS = ("two_member_gzip", "upper_case_checksum", "dot_slash_path")
COVARIATE_FAULTS = {
    "undecodable_byte": R.undecodable_row.code,
    "extra_field": R.malformed_row.code,
    "age_out_of_range": R.out_of_range.code,
    "mistyped_age": R.invalid_value.code,
    "unknown_site": R.invalid_value.code,
    "empty_required": R.missing_required.code,
    "repeated_row": R.duplicate_pseudonym.code,
    "no_row": R.no_covariate_row.code,
}
HOSTILE = "hostile-d01"
# a re-send of three participants under an id that sorts before the original, arriving with it (same tick), and
# another arriving after the original was registered: both lose (first registered wins)
RESEND_SAME_TICK = "aa-resend"
RESEND_LATER = "a0-resend"
DELIVERY_CASES = {
    "bad-json": ("refused", "not valid JSON"),
    "escape-d01": ("refused", "escapes the delivery folder"),
    "linked-d01": ("refused", "symbolic link"),
    "waiting-d01": ("waiting", "no _SUCCESS marker"),
    "bad id!": ("refused", "invalid delivery id"),
    # round 2: an id whose registry files would collide with another delivery's, a manifest nested 100,000 deep
    f"{HOSTILE}.manifest": ("refused", "invalid delivery id"),
    "deep-json": ("refused", "nested 100001 levels deep"),
}


@dataclass
class Corpus:
    root: Path
    outside: Path
    participants: list[str]
    expected: dict[str, tuple[str, str]] = field(default_factory=dict)   # pseudonym -> (stage, reason)
    also: dict[str, set] = field(default_factory=dict)    # pseudonym -> other (stage, reason) expected
    good: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    harmless: dict[str, str] = field(default_factory=dict)   # variation -> the good participant given it
    incomplete: tuple[str, bytes] | None = None            # (listed path, full bytes) of the incomplete copy


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _raw(payload: bytes) -> tuple[nib.Nifti1Header, bytes]:
    raw = gzip.decompress(payload)
    return nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348])), raw


def _with_header(payload: bytes, edit) -> bytes:
    hdr, raw = _raw(payload)
    edit(hdr)
    return gzip.compress(hdr.binaryblock + raw[348:], mtime=0)


def _image(payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    img = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
    return np.asarray(img.dataobj), img.affine


def _bomb(payload: bytes, zeros: int) -> bytes:
    """One gzip member: the valid image, then ``zeros`` bytes of zeros (compressed a thousandfold)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [c.compress(gzip.decompress(payload))]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(c.compress(block))
    out.append(c.flush())
    return b"".join(out)


class _Delivery:
    def __init__(self, src: Path, dst: Path, delivery_id: str, participants: list[str] | None = None):
        self.src, self.dst, self.id = src, dst, delivery_id
        self.dup_of: tuple[bytes, bytes] | None = None
        self.incomplete: tuple[str, bytes] | None = None
        man = json.loads((src / "manifest.json").read_text())
        keep = set(participants) if participants is not None else set(man["participants"])
        self.man = {**man, "delivery_id": delivery_id, "participants": [p for p in man["participants"] if p in keep],
                    "files": [f for f in man["files"] if f["path"] == "covariates.csv" or f["path"].split("/")[1] in keep]}
        dst.mkdir(parents=True)
        for f in self.man["files"]:
            (dst / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f["path"], dst / f["path"])
        self.cov_lines = (src / "covariates.csv").read_bytes().decode().splitlines()
        self.cov_lines = [self.cov_lines[0]] + [r for r in self.cov_lines[1:] if r.split(",")[0] in keep]

    def entry(self, rel: str) -> dict | None:
        return next((f for f in self.man["files"] if f["path"] == rel), None)

    def read(self, rel: str) -> bytes:
        return (self.src / rel).read_bytes()

    def put(self, rel: str, payload: bytes, *, listed: bool = True) -> None:
        """Write ``rel`` and list it as it is (a data centre's consistent manifest)."""
        (self.dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.dst / rel).write_bytes(payload)
        e = self.entry(rel)
        if not listed:
            if e is not None:
                self.man["files"].remove(e)
            return
        if e is None:
            e = {"path": rel}
            self.man["files"].append(e)
        e.update(size=len(payload), sha256=_sha(payload))

    def replace_with(self, rel: str, make) -> None:
        (self.dst / rel).unlink(missing_ok=True)
        make(self.dst / rel)

    def finish(self, covariates: bytes | None = None, marker: bool = True, created_at: str | None = None) -> None:
        cov = covariates if covariates is not None else ("\n".join(self.cov_lines) + "\n").encode()
        self.put("covariates.csv", cov)
        if created_at:
            self.man["created_at"] = created_at
        (self.dst / "manifest.json").write_text(json.dumps(self.man, indent=1))
        if marker:
            (self.dst / "_SUCCESS").write_text("")


def _scan_fault(d: _Delivery, p: str, kind: str, outside: Path) -> None:
    w, f = f"mri/{p}/{p}_water.nii.gz", f"mri/{p}/{p}_fat.nii.gz"
    water, fat = d.read(w), d.read(f)
    arr, aff = _image(water)
    if kind == "corrupt_gzip":
        d.put(w, corrupt_gzip(water))
    elif kind == "truncated_gzip":
        d.put(f, truncate_gzip(fat))
    elif kind == "empty_file":
        d.put(w, b"")
    elif kind == "not_nifti":
        d.put(w, b"%PDF-1.4\n" + bytes(range(256)) * 64)
    elif kind == "not_nifti_gz":
        d.put(w, gzip.compress(b"participant,site\n" * 200, mtime=0))
    elif kind == "gzip_bomb":
        d.put(w, _bomb(water, 256 << 20))                # 256 MiB of zeros after a valid image, ~250 kB on disk
    elif kind == "trailing_garbage":
        d.put(w, water + gzip.compress(b"\x00junk" * 10, mtime=0))
    elif kind == "offset_inside_header":
        d.put(w, _with_header(water, lambda h: h.__setitem__("vox_offset", 100)))
    elif kind == "four_d":
        d.put(w, nifti_bytes(np.stack([arr] * 3, axis=-1), aff))
    elif kind == "absurd_header_size":
        d.put(w, _with_header(water, lambda h: h.set_data_shape((2000, 2000, 2000))))
    elif kind == "zero_spacing":
        def zero(h):
            pix = h["pixdim"].copy()
            pix[3] = 0
            h["pixdim"] = pix
            h.set_qform(None, code=0)
            h.set_sform(None, code=0)
        d.put(w, _with_header(water, zero))
    elif kind == "nan_values":
        a = arr.astype(np.float32)
        a[:, :, : max(1, a.shape[2] // 5)] = np.nan
        d.put(w, nifti_bytes(a, aff))
    elif kind == "negative_signal":
        d.put(w, nifti_bytes(arr.astype(np.float32) - 50.0, aff))
    elif kind == "constant_image":
        d.put(w, nifti_bytes(np.full_like(arr, 100), aff))
    elif kind == "unsupported_dtype":
        d.put(w, nifti_bytes(np.clip(arr, 0, 127).astype(np.int8), aff))
    elif kind == "shape_mismatch":
        fa, faff = _image(fat)
        d.put(f, nifti_bytes(fa[:, :, :-1], faff))
    elif kind == "affine_mismatch":
        fa, faff = _image(fat)
        faff = faff.copy()
        faff[2, 3] += 15.0
        d.put(f, nifti_bytes(fa, faff))
    elif kind == "checksum_mismatch":
        d.entry(w)["sha256"] = _sha(b"something else")
    elif kind == "size_mismatch":
        with open(d.dst / w, "ab") as fh:                # grew after the manifest was written
            fh.write(b"\0" * 100)
    elif kind == "missing_file":
        (d.dst / w).unlink()
    elif kind == "missing_fat":
        (d.dst / f).unlink()
        d.man["files"].remove(d.entry(f))
    elif kind == "symlink_to_valid_copy":
        copy = outside / f"{p}_water.nii.gz"
        copy.write_bytes(water)
        d.replace_with(w, lambda path: path.symlink_to(copy))
    elif kind == "symlink_to_fifo":
        fifo = outside / "never-open-me.fifo"              # opening it for reading would block forever
        if not fifo.exists():
            os.mkfifo(fifo)
        d.replace_with(w, lambda path: path.symlink_to(fifo))
    elif kind == "symlinked_participant_folder":
        away = outside / "participant-folder"
        shutil.copytree(d.dst / "mri" / p, away)
        shutil.rmtree(d.dst / "mri" / p)
        (d.dst / "mri" / p).symlink_to(away, target_is_directory=True)
    elif kind == "fifo_in_delivery":
        d.replace_with(w, lambda path: os.mkfifo(path))
    elif kind == "not_in_manifest":
        d.put(f"mri/{p}/{p}_in.nii.gz", water, listed=False)
    elif kind == "unlisted_participant":
        d.man["participants"].remove(p)
    elif kind == "duplicate_content_a":
        d.dup_of = (water, fat)
    elif kind == "duplicate_content_b":
        d.put(w, d.dup_of[0])
        d.put(f, d.dup_of[1])
    elif kind == "incomplete_copy":
        d.incomplete = (w, water)
        (d.dst / w).write_bytes(water[: len(water) // 2])      # the manifest lists the whole file
    else:
        raise KeyError(kind)


def _harmless(d: _Delivery, p: str, kind: str) -> None:
    w, f = f"mri/{p}/{p}_water.nii.gz", f"mri/{p}/{p}_fat.nii.gz"
    if kind == "two_member_gzip":                 # as `cat a.gz b.gz` or pigz write it
        raw = gzip.decompress(d.read(w))
        d.put(w, gzip.compress(raw[:5000], mtime=0) + gzip.compress(raw[5000:], mtime=0))
    elif kind == "upper_case_checksum":           # as Windows' Get-FileHash writes it
        d.entry(w)["sha256"] = d.entry(w)["sha256"].upper()
    elif kind == "dot_slash_path":
        d.entry(w)["path"] = f"./{w}"
        d.entry(f)["path"] = f"mri//{p}/{p}_fat.nii.gz"
    else:
        raise KeyError(kind)


def _covariate_fault(lines: list[str], p: str, kind: str) -> list[str]:
    i = next(k for k, r in enumerate(lines) if r.startswith(p + ","))
    cells = lines[i].split(",")
    if kind == "undecodable_byte":
        cells[1] = cells[1][:2] + "\udce9" + cells[1][3:]   # one byte outside UTF-8 (written with surrogateescape)
    elif kind == "extra_field":
        cells.append("surplus")
    elif kind == "age_out_of_range":
        cells[3] = "120"
    elif kind == "mistyped_age":
        cells[3] = "4o"
    elif kind == "unknown_site":
        cells[1] = "Hamburg"
    elif kind == "empty_required":
        cells[4] = ""
    elif kind == "repeated_row":
        lines.insert(i + 1, lines[i])
    elif kind == "no_row":
        del lines[i]
        return lines
    lines[i] = ",".join(cells)
    return lines


def build(src_root: Path, root: Path) -> Corpus:
    """The hostile landing zone under ``root`` from the synthesized delivery under ``src_root``."""
    (src,) = [p for p in (src_root / "landing").iterdir()]
    outside = root / "outside"
    outside.mkdir(parents=True)
    landing = root / "landing"
    man = json.loads((src / "manifest.json").read_text())
    ps = sorted(man["participants"])
    faults = list(SCAN_FAULTS) + list(COVARIATE_FAULTS)
    assert len(ps) >= len(faults) + 8, "synthesize more participants"
    corpus = Corpus(root, outside, ps)
    d = _Delivery(src, landing / HOSTILE, HOSTILE)
    for p, kind in zip(ps, SCAN_FAULTS):
        _scan_fault(d, p, kind, outside)
        corpus.expected[p] = ("raw_mri_scans", SCAN_FAULTS[kind])
        corpus.also[p] = {(stage, SCAN_FAULTS[kind]) for stage in ALSO_AT.get(kind, ())}
    corpus.incomplete = d.incomplete
    lines = list(d.cov_lines)
    for p, kind in zip(ps[len(SCAN_FAULTS):], COVARIATE_FAULTS):
        lines = _covariate_fault(lines, p, kind)
        corpus.expected[p] = ("participant_covariates", COVARIATE_FAULTS[kind])
    corpus.good = ps[len(faults):]
    for p, kind in zip(corpus.good[3:], HARMLESS):          # not the first three: they are re-sent
        _harmless(d, p, kind)
        corpus.harmless[kind] = p
    # a UTF-8 byte-order mark at the start of the file is accepted
    d.finish(covariates=b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    corpus.resent = corpus.good[:3]
    _Delivery(src, landing / RESEND_SAME_TICK, RESEND_SAME_TICK, corpus.resent).finish(
        created_at="2030-01-01T00:00:00Z")          # sent after the original (same tick: oldest manifest first)
    # delivery-level cases
    _Delivery(src, landing / "bad-json", "bad-json", ps[:2]).finish()
    (landing / "bad-json" / "manifest.json").write_text('{"schema_version": "1.0", "files": [')
    esc = _Delivery(src, landing / "escape-d01", "escape-d01", ps[:2])
    esc.man["files"].append({"path": f"../{HOSTILE}/mri/{ps[0]}/{ps[0]}_water.nii.gz", "size": 1, "sha256": "0" * 64})
    esc.finish()
    _Delivery(src, outside / "linked-d01", "linked-d01", ps[:2]).finish()
    (landing / "linked-d01").symlink_to(outside / "linked-d01", target_is_directory=True)
    _Delivery(src, landing / "waiting-d01", "waiting-d01", ps[:2]).finish(marker=False)
    _Delivery(src, landing / "bad id!", "bad id!", ps[:2]).finish()
    _Delivery(src, landing / f"{HOSTILE}.manifest", f"{HOSTILE}.manifest", ps[:2]).finish()
    deep = _Delivery(src, landing / "deep-json", "deep-json", ps[:2])
    deep.finish()
    (landing / "deep-json" / "manifest.json").write_text('{"schema_version": "1.0", "x": ' + "[" * 100_000
                                                         + "]" * 100_000 + "}")
    return corpus


def complete_the_copy(corpus: Corpus) -> None:
    """The incomplete copy completes, after its delivery was registered and ingested."""
    rel, payload = corpus.incomplete
    (corpus.root / "landing" / HOSTILE / rel).write_bytes(payload)


def add_late_resend(src_root: Path, corpus: Corpus) -> None:
    """A re-send of the same three participants, arriving after the original was registered."""
    (src,) = [p for p in (src_root / "landing").iterdir()]
    _Delivery(src, corpus.root / "landing" / RESEND_LATER, RESEND_LATER, corpus.resent).finish(
        created_at="2000-01-01T00:00:00Z")           # even claiming an older manifest: registered later, it loses


def snapshot(tree: Path) -> dict:
    """Every entry under ``tree`` (links not followed): type, size, mtime, sha256 of files, link targets."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(tree))
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            elif p.is_fifo():
                out[rel] = ("fifo", st.st_mode)
            else:
                out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, _sha(p.read_bytes()))
    return out
