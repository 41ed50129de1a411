"""Data releases: a frozen, named choice of which version of which participant's data the analysis uses.

A release freezes, at the moment it is cut, the version in force of every participant in every versioned stage
table (:data:`cbp_platform.warehouse.UNIQUE_KEYS`), with a digest of each version's rows, and the decisions the
analysis reads beside them: the quarantine rows, the reviewers' rejections in force, and the retired deliveries.
Releases are numbered 1, 2, ... and never change once cut (append-only tables). The analysis cohort is always
built from a release (the latest by default, any earlier one to reproduce its report), so every published number
names the release it came from. ``docs/lifecycle.md`` explains releases to their users.

This module is the framework-free core: it turns frames into a release's frames and summaries. Reading and writing
the warehouse is the caller's (``assets/releases.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import polars as pl

from cbp_platform.warehouse import UNIQUE_KEYS, VERSION_COLUMNS

RELEASE_FORMAT = "cbp-release/1"
# the stage tables a release freezes, and the analysis reads through it
STAGES = tuple(UNIQUE_KEYS)
ANALYSIS_STAGES = ("participant_covariates", "raw_mri_scans", "muscle_metrics")
MIN_PUBLIC_COUNT = 5            # counts under it are shown as "<5" in a release's public summary

VERSIONS_SCHEMA = {"release_id": pl.Int64, "stage": pl.String, "pseudonym": pl.String, "model_name": pl.String,
                   "delivery_id": pl.String, "registration_seq": pl.Int64, "version_sha256": pl.String}
PARTICIPANTS_SCHEMA = {"release_id": pl.Int64, "pseudonym": pl.String, "retired_by": pl.String,
                       "qc_rejected": pl.Boolean, "withdrawn": pl.String}
QUARANTINE_SCHEMA = {"release_id": pl.Int64, "pseudonym": pl.String, "stage": pl.String, "reason": pl.String,
                     "delivery_id": pl.String}


def _canon(df: pl.DataFrame) -> pl.Expr:
    cols = sorted(c for c in df.columns if c not in VERSION_COLUMNS)
    return pl.concat_str([pl.lit(c) + pl.lit("=") + pl.col(c).cast(pl.String).fill_null("\u2205") for c in cols],
                         separator="\x1f")


def version_digests(stage: str, rows: pl.DataFrame) -> pl.DataFrame:
    """One row per version in ``rows`` (a versioned stage table's rows, with their version columns): the
    participant, the model (comparison tables; ``''`` otherwise), the delivery that wrote it, its registration
    number and the sha256 of its rows (every column but the version columns, rows sorted). A version whose rows
    change after a release (its batch re-run by other code) changes its digest."""
    schema = {k: v for k, v in VERSIONS_SCHEMA.items() if k not in ("release_id", "stage")}
    if rows is None or rows.height == 0:
        return pl.DataFrame(schema={"stage": pl.String, **schema})
    model = pl.col("model_name") if "model_name" in rows.columns else pl.lit("")
    seq = pl.col("registration_seq") if "registration_seq" in rows.columns else pl.lit(None, pl.Int64)
    out = (rows.with_columns(_canon(rows).alias("_canon"), model.cast(pl.String).alias("model_name"),
                             seq.cast(pl.Int64).alias("registration_seq"))
           .group_by("pseudonym", "model_name", "delivery_id", "registration_seq")
           .agg(pl.col("_canon").sort().str.join("\x1e").alias("_rows"))
           .with_columns(pl.col("_rows").map_elements(lambda s: hashlib.sha256(s.encode()).hexdigest(),
                                                       return_dtype=pl.String).alias("version_sha256"))
           .drop("_rows").with_columns(pl.lit(stage).alias("stage")))
    return out.select("stage", *schema).sort("pseudonym", "model_name")


@dataclass
class Release:
    """A release's frames and summaries, as :func:`cut` makes them (nothing written yet)."""

    release_id: int
    versions: pl.DataFrame
    participants: pl.DataFrame
    quarantine: pl.DataFrame
    content_hash: str
    summary: dict = field(default_factory=dict)     # public: counts and changes since the previous release

    def row(self, *, cut_at: str, code_version: str, reviews: tuple[int, str], qc_outdated: int) -> pl.DataFrame:
        """The release's row of the ``releases`` table."""
        return pl.DataFrame([{"release_id": self.release_id, "content_hash": self.content_hash, "cut_at": cut_at,
                              "previous": self.summary.get("previous"), "format": RELEASE_FORMAT,
                              "participants": self.summary["participants"],
                              "summary": json.dumps(self.summary, sort_keys=True), "code_version": code_version,
                              "reviews_count": reviews[0], "reviews_sha256": reviews[1], "qc_outdated": qc_outdated}],
                            schema_overrides={"previous": pl.Int64})


def content_hash(versions: pl.DataFrame, participants: pl.DataFrame, quarantine: pl.DataFrame) -> str:
    """sha256 of what a release freezes, independent of row order and of the release's number."""
    h = hashlib.sha256(f"{RELEASE_FORMAT}\n".encode())
    for name, df, keys in (("versions", versions, ["stage", "pseudonym", "model_name", "delivery_id"]),
                           ("participants", participants, ["pseudonym"]),
                           ("quarantine", quarantine, ["pseudonym", "stage", "reason", "delivery_id"])):
        body = df.drop("release_id", strict=False).sort(keys)
        h.update(f"{name}\t{','.join(body.columns)}\n".encode())
        h.update(body.write_csv(include_header=False).encode())
    return h.hexdigest()


def _public(n: int) -> int | str:
    return n if n == 0 or n >= MIN_PUBLIC_COUNT else f"<{MIN_PUBLIC_COUNT}"


def cut(release_id: int, stages: dict[str, pl.DataFrame], *, quarantine: pl.DataFrame, rejected: list[str],
        retired: dict[str, str], kinds: dict[str, str], reasons: dict[tuple[str, str], str],
        withdrawn: dict[str, str] | None = None, previous: pl.DataFrame | None = None,
        previous_id: int | None = None, previous_retired: set[str] = frozenset(),
        previous_withdrawn: int = 0) -> Release:
    """The release ``release_id`` of the versions in force now.

    ``stages``: stage -> its rows in force (with version columns); ``quarantine``: the quarantine table's rows;
    ``rejected``: pseudonyms whose current label map a reviewer rejected; ``retired``: retired delivery -> reason;
    ``kinds``: delivery id -> ``delivery``/``correction``; ``reasons``: (correction id, pseudonym) -> its reason
    code; ``withdrawn``: pseudonym -> scope of the participants who withdrew consent (the withdrawal register);
    ``previous``: the previous release's versions (None for release 1), ``previous_retired`` its retired
    deliveries, ``previous_withdrawn`` its count of withdrawn participants. A participant with any version in force
    from a retired delivery is marked ``retired_by`` it: the analysis excludes them at the step ``delivery_retired``;
    a withdrawn one is marked with the scope and excluded first, at ``consent_withdrawn``."""
    versions = pl.concat([version_digests(s, stages.get(s)) for s in STAGES], how="vertical_relaxed")
    versions = versions.with_columns(pl.lit(release_id, pl.Int64).alias("release_id")).select(list(VERSIONS_SCHEMA))
    q = quarantine if quarantine is not None and quarantine.height else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    q = (q.select([pl.col(c).cast(pl.String) if c in q.columns else pl.lit(None, pl.String).alias(c)
                   for c in ("pseudonym", "stage", "reason", "delivery_id")])
         .filter(pl.col("pseudonym").is_not_null()).unique()
         .with_columns(pl.lit(release_id, pl.Int64).alias("release_id")).select(list(QUARANTINE_SCHEMA)))
    people = pl.concat([versions.select("pseudonym"), q.select("pseudonym")]).unique()
    retired_by = (versions.filter(pl.col("delivery_id").is_in(list(retired)))
                  .group_by("pseudonym").agg(pl.col("delivery_id").min().alias("retired_by")))
    participants = (people.join(retired_by, on="pseudonym", how="left")
                    .with_columns(pl.col("retired_by").fill_null(""),
                                  pl.col("pseudonym").is_in(list(rejected)).alias("qc_rejected"),
                                  pl.col("pseudonym").replace_strict(withdrawn or {}, default="",
                                                                     return_dtype=pl.String).alias("withdrawn"),
                                  pl.lit(release_id, pl.Int64).alias("release_id"))
                    .select(list(PARTICIPANTS_SCHEMA)).sort("pseudonym"))
    summary = _summary(release_id, versions, participants, retired, kinds, reasons, previous, previous_id,
                       previous_retired, previous_withdrawn)
    digest = content_hash(versions, participants, q)
    summary["content_hash"] = digest
    return Release(release_id, versions.sort("stage", "pseudonym", "model_name"), participants,
                   q.sort("pseudonym", "stage", "reason"), digest, summary)


def _summary(release_id: int, versions: pl.DataFrame, participants: pl.DataFrame, retired: dict[str, str],
             kinds: dict[str, str], reasons: dict[tuple[str, str], str], previous: pl.DataFrame | None,
             previous_id: int | None, previous_retired: set[str], previous_withdrawn: int = 0) -> dict:
    """The public summary: counts, and what changed since the previous release. No pseudonym; counts under
    :data:`MIN_PUBLIC_COUNT` shown as ``<5``."""
    key = ["stage", "pseudonym", "model_name"]
    now = versions.select(*key, "delivery_id")
    if previous is not None and previous.height:
        before = previous.select(*key, pl.col("delivery_id").alias("before"))
        changed = now.join(before, on=key, how="left").filter(pl.col("before").is_null()
                                                               | (pl.col("before") != pl.col("delivery_id")))
    else:
        changed = now.with_columns(pl.lit(None, pl.String).alias("before"))
    corrected = changed.filter(pl.col("delivery_id").is_in([d for d, k in kinds.items() if k == "correction"]))
    by_reason: dict[str, set] = {}
    for p, d in corrected.select("pseudonym", "delivery_id").unique().iter_rows():
        by_reason.setdefault(reasons.get((d, p), "unknown"), set()).add(p)
    new_people = (changed.filter(pl.col("before").is_null()).select("pseudonym").unique()
                  .join(previous.select("pseudonym").unique() if previous is not None and previous.height
                        else pl.DataFrame(schema={"pseudonym": pl.String}), on="pseudonym", how="anti"))
    return {
        "release": release_id, "format": RELEASE_FORMAT, "previous": previous_id,
        "participants": participants.height,
        "versions_per_stage": {s: int(n) for s, n in versions.group_by("stage").len().sort("stage").iter_rows()},
        "deliveries": sorted(set(versions["delivery_id"].to_list())),
        "since_previous": {
            "new_participants": _public(new_people.height),
            "corrected_participants": _public(corrected.select("pseudonym").unique().height),
            "corrections_by_reason": {r: _public(len(ps)) for r, ps in sorted(by_reason.items())},
            "correction_deliveries": sorted(set(corrected["delivery_id"].to_list())),
            "retirements": [{"delivery_id": d, "reason": retired[d]} for d in sorted(set(retired) - previous_retired)],
        },
        "retired_deliveries": sorted(retired),
        "excluded_as_retired": _public(int((participants["retired_by"] != "").sum())),
        "excluded_as_withdrawn": _public(int((participants["withdrawn"] != "").sum())),
        "withdrawn_since_previous": _public(max(int((participants["withdrawn"] != "").sum()) - previous_withdrawn,
                                                0)),
        "qc_rejected": _public(int(participants["qc_rejected"].sum())),
    }


# --- the release's commitment to its participants: a salted Merkle tree (issue 28) --------------------------------
# Each participant of a release gets a random salt; their leaf is the sha256 of the salt and of every row the release
# froze of them (versions with their digests, their participant row, their quarantine rows), canonically. The root
# over the sorted leaves is in the ``releases`` row, the public summary and every report's lineage.json. An erasure
# destroys the salt and the rows; the leaf stays, opaque (``release_leaves`` names no participant), so the old root
# still verifies from the surviving participants' recomputed leaves plus the opaque ones, and nobody can tell from a
# leaf whose it was, nor test a guess without the salt.
SALTS_SCHEMA = {"release_id": pl.Int64, "pseudonym": pl.String, "salt": pl.String}
LEAVES_SCHEMA = {"release_id": pl.Int64, "leaf": pl.String}


def _participant_payload(versions: pl.DataFrame, participants: pl.DataFrame, quarantine: pl.DataFrame
                         ) -> dict[str, bytes]:
    """pseudonym -> the canonical bytes of every row the release froze of them (release id left out)."""
    out: dict[str, list[str]] = {}
    for name, df in (("v", versions), ("p", participants), ("q", quarantine)):
        if df is None or df.height == 0:
            continue
        body = df.drop("release_id", strict=False)
        cols = sorted(body.columns)
        for row in body.select(cols).iter_rows(named=True):
            out.setdefault(row["pseudonym"], []).append(
                name + "\x1f" + "\x1f".join(f"{c}={'' if row[c] is None else row[c]}" for c in cols))
    return {p: "\x1e".join(sorted(rows)).encode() for p, rows in out.items()}


def leaf_hash(salt_hex: str, payload: bytes) -> str:
    return hashlib.sha256(b"cbp-release-leaf\x00" + bytes.fromhex(salt_hex) + b"\x00" + payload).hexdigest()


def merkle_root(leaves: list[str]) -> str:
    """The root over ``leaves`` (sorted first: the order tells nothing); an odd node is carried up unchanged."""
    level = sorted(leaves)
    if not level:
        return hashlib.sha256(b"cbp-release-empty").hexdigest()
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + bytes.fromhex(a) + bytes.fromhex(b)).hexdigest()
               for a, b in zip(level[0::2], level[1::2])]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def commit(release: Release) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    """(salts, leaves, root) of ``release``: a fresh random salt per participant."""
    import secrets

    payload = _participant_payload(release.versions, release.participants, release.quarantine)
    salts = {p: secrets.token_hex(16) for p in sorted(payload)}
    leaves = [leaf_hash(salts[p], payload[p]) for p in sorted(payload)]
    rid = release.release_id
    return (pl.DataFrame({"release_id": [rid] * len(salts), "pseudonym": list(salts), "salt": list(salts.values())},
                         schema=SALTS_SCHEMA),
            pl.DataFrame({"release_id": [rid] * len(leaves), "leaf": sorted(leaves)}, schema=LEAVES_SCHEMA),
            merkle_root(leaves))


def verify_commitment(root: str, leaves: list[str], salts: pl.DataFrame, versions: pl.DataFrame,
                      participants: pl.DataFrame, quarantine: pl.DataFrame) -> dict:
    """Check a release's root against its stored leaves and the rows that survive: every participant that still has
    a salt must recompute to a stored leaf; the leaves nobody recomputes are the opaque ones (participants erased
    since). ``{"root_ok", "participants", "recomputed", "erased", "mismatched"}``."""
    payload = _participant_payload(versions, participants, quarantine)
    stored = set(leaves)
    mine = {p: leaf_hash(s, payload.get(p, b"")) for p, s in salts.select("pseudonym", "salt").iter_rows()}
    mismatched = sorted(p for p, h in mine.items() if h not in stored)
    return {"root_ok": merkle_root(leaves) == root, "participants": len(leaves),
            "recomputed": len(mine) - len(mismatched), "erased": len(stored - set(mine.values())),
            "mismatched": len(mismatched)}
