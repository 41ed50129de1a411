"""A small QC-review warehouse: what the pipeline would have written for a few participants in 2 batches,
``segmentation_qc`` (triage score and rank, flags, QC image), ``muscle_segmentations`` (the current label maps) and
``participant_covariates``. Used by the review-store tests (tests/qc) and the browser test of the review app
(tests/ui)."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl

from cbp_platform.landing import PSEUDONYM_ALPHABET, PSEUDONYM_LENGTH, PSEUDONYM_RE
from cbp_platform.paths import DataLayout

BATCHES = ("b001", "b002")
MODEL_SHA = "ab" * 32


def pseudonyms(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    out = ["".join(rng.choice(PSEUDONYM_ALPHABET) for _ in range(PSEUDONYM_LENGTH)) for _ in range(n)]
    assert all(PSEUDONYM_RE.match(p) for p in out) and len(set(out)) == n
    return out


def _png(path: Path, seed: int) -> None:
    """The platform's QC image (cbp_platform.qc.render) of a small simulated phantom and its true labels."""
    import numpy as np

    from cbp_platform.qc.render import qc_image
    from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

    ph = render_phantom(Subject(seed % 2 == 0, 40 + seed, 170 + seed, 70 + seed, 6.0 + seed, 0.04,
                                (400.0, 395.0, 130.0, 128.0)), PRESETS["fast"], np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(qc_image(ph.water, ph.fat, ph.labels, ph.affine, {"lean muscle": f"{1000 + seed} cm3"}))


def build_warehouse(root: Path, n: int = 6) -> dict:
    """Write segmentation_qc, muscle_segmentations and participant_covariates for ``n`` participants, alternating
    between the 2 batches, each with a QC image under ``root/derived/qc``. Returns db path, rows (by pseudonym)."""
    from resources.warehouse import DuckDBWarehouse

    db = DataLayout(root).warehouse_file
    wh = DuckDBWarehouse(database=str(db))
    ps = pseudonyms(n)
    scores = [round(1.0 + 1.7 * ((i * 7) % n), 2) for i in range(n)]        # distinct, not in insertion order
    qc, segs, cov = [], [], []
    for i, p in enumerate(ps):
        batch = BATCHES[i % 2]
        delivery = f"sim1-d{i % 2 + 1}"
        label_sha = f"{i:02d}" + "c" * 62
        image = root / "derived" / "qc" / delivery / f"{p}.png"
        _png(image, i)
        site = None if i == n - 1 else f"S{i % 3 + 1}"
        qc.append({"pseudonym": p, "batch_key": batch, "delivery_id": delivery, "site": site,
                   "label_sha256": label_sha, "model_sha256": MODEL_SHA, "model_name": "cbp-default",
                   "qc_image": str(image), "triage_score": scores[i], "triage_flags": f"uncertainty z {scores[i]:.1f}",
                   "lean_ml": 900.0 + 10 * i, "imat_pct": 5.0 + 0.5 * i})
        segs.append({"pseudonym": p, "batch_key": batch, "delivery_id": delivery,
                     "label_path": str(root / "derived" / "segmentations" / delivery / f"{p}.nii.gz"),
                     "label_sha256": label_sha, "model_sha256": MODEL_SHA})
        cov.append({"pseudonym": p, "batch_key": batch, "delivery_id": delivery, "site": site})
    qc_df = pl.DataFrame(qc, schema_overrides={"site": pl.String, "triage_score": pl.Float64})
    qc_df = qc_df.with_columns(pl.col("triage_score").rank("ordinal", descending=True).over("batch_key")
                               .cast(pl.Int64).alias("triage_rank"))
    wh.replace_rows("segmentation_qc", qc_df, {})
    wh.replace_rows("muscle_segmentations", pl.DataFrame(segs), {})
    wh.replace_rows("participant_covariates", pl.DataFrame(cov, schema_overrides={"site": pl.String}), {})
    return {"db": db, "root": root, "pseudonyms": ps, "rows": {r["pseudonym"]: r for r in qc_df.to_dicts()}}
