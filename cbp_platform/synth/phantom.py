"""Dixon MRI phantoms of the lower thoracic and lumbar trunk, with exact ground truth.

Geometry is analytic (per-slice ellipses, egg shapes and boxes whose sizes follow the vertebral level), so a
volume renders in tens of milliseconds at the ``fast`` preset and in about a second at NAKO resolution.
Partial volume comes from soft coverage at every border (a one-voxel ramp of the signed distance; in z,
the exact overlap of slice and vertebra). Tissues are painted in anatomical order with their proton density
and fat fraction, giving noise-free water ``W`` and fat ``F`` proton-density maps; a smooth multiplicative
coil bias field, small pose changes and Rician noise (magnitude of complex Gaussian noise per channel) then
make the delivered images.

Coordinates: ``u`` points to the participant's left, ``v`` anterior, ``z`` superior (mm). Arrays are indexed
``[i, j, k]`` along (left, anterior, superior), so the affine has orientation codes ``L A S`` (as dcm2niix
often writes axial Dixon series).

Labels (truth): 0 background / other tissue, 1 left autochthonous back muscle, 2 right autochthonous back
muscle, 3 left psoas, 4 right psoas. A compartment is the region inside its fascia, intermuscular fat
included. A labelled voxel counts as fat when its noise-free signal fat fraction F/(W+F) is >= 0.5, so the
true InterMAT % and lean volumes are exactly what a perfect segmentation of a noise-free scan would measure
with the study's rule. The intermuscular fat threshold is solved per participant so that the realised
InterMAT equals the cohort model's value (up to one voxel), and compartment sizes are iterated until their
lean volumes match the drawn lean volumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from cbp_platform import classes

LABELS = classes.LABELS
COMPARTMENTS = classes.IDS
FAT_THRESHOLD = 0.5

# tissue (proton density, fat fraction)
SKIN = (0.75, 0.15)
ADIPOSE = (1.0, 0.92)
BLOOD = (0.9, 0.0)
CSF = (1.0, 0.0)
DISC = (0.85, 0.03)
KIDNEY = (0.85, 0.02)
CORTEX = (0.12, 0.30)
BOWEL = (0.7, 0.05)
MUSCLE_PD = 0.8
# Fascia (thoracolumbar fascia, epimysium, psoas fascia): dense collagen, short T2*, so it is dark on both
# Dixon channels. A sheet of FASCIA_MM around each compartment is what marks the compartment border where
# intermuscular fat meets the fat outside the fascia.
FASCIA = (0.12, 0.30)
FASCIA_MM = 1.2


@dataclass(frozen=True)
class Preset:
    name: str
    spacing: tuple[float, float, float]  # mm: left-right, posterior-anterior, inferior-superior
    shape: tuple[int, int, int]

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0


PRESETS = {
    # 384 x 288 x 288 mm at 4 x 4 x 6 mm: small volumes for tests and demos
    "fast": Preset("fast", (4.0, 4.0, 6.0), (96, 72, 48)),
    # NAKO's 3D VIBE Dixon: ~1.41 x 1.41 mm in-plane, 3 mm slices; 405 x 315 x 288 mm
    "nako": Preset("nako", (1.40625, 1.40625, 3.0), (288, 224, 96)),
}


@dataclass
class Subject:
    """What the renderer needs to know about a participant (from the cohort table)."""
    female: bool
    age: float
    height_cm: float
    weight_kg: float
    imat_pct: float                     # target InterMAT % of the compartments
    mfi: float                          # fat fraction of lean muscle
    lean_ml: tuple[float, float, float, float]  # target lean volume per compartment (labels 1..4), cm3
    swap: str = "none"                  # none | full | slab

    @property
    def bmi(self) -> float:
        return self.weight_kg / (self.height_cm / 100.0) ** 2


@dataclass
class Phantom:
    water: np.ndarray     # int16
    fat: np.ndarray       # int16
    labels: np.ndarray    # uint8
    affine: np.ndarray
    truth: dict
    in_phase: np.ndarray | None = None
    opp_phase: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------------
# geometry helpers


def _coverage(sdf: np.ndarray, h: float) -> np.ndarray:
    """Soft coverage in [0, 1] from a signed distance (mm): a linear ramp one voxel (h mm) wide."""
    return np.clip(0.5 - sdf / h, 0.0, 1.0)


def _egg_sdf(u, v, cu, cv, au, bpos, bneg):
    """First-order signed distance to an ellipse whose AP semi-axis differs anterior/posterior of centre."""
    du = u - cu
    dv = v - cv
    b = np.where(dv > 0, bpos, bneg)
    fu = du / au
    fv = dv / b
    grad = np.sqrt((fu / au) ** 2 + (fv / b) ** 2) + 1e-9
    return (fu * fu + fv * fv - 1.0) / (2.0 * grad)


def _box_sdf(u, v, cu, cv, hu, hv):
    return np.maximum(np.abs(u - cu) - hu, np.abs(v - cv) - hv)


def _z_overlap(zc_slices: np.ndarray, dz: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fraction of each slice [z - dz/2, z + dz/2] inside the interval [lo, hi]."""
    a = np.maximum(zc_slices - dz / 2, lo)
    b = np.minimum(zc_slices + dz / 2, hi)
    return np.clip((b - a) / dz, 0.0, 1.0)


class _Canvas:
    """Noise-free water/fat proton-density maps, painted structure by structure inside bounding boxes."""

    def __init__(self, preset: Preset, pose: dict):
        self.p = preset
        nx, ny, nz = preset.shape
        sx, sy, sz = preset.spacing
        self.h = min(sx, sy)
        X = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)
        Y = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)
        Z = ((np.arange(nz) - (nz - 1) / 2) * sz).astype(np.float32)
        self.X, self.Y, self.Z = X, Y, Z
        th = pose["theta"]
        c, s = math.cos(th), math.sin(th)
        ox = pose["tx"] + pose["tilt_x"] * Z + pose["scoliosis"] * np.sin(Z / 90.0 + pose["scol_phase"])
        oy = pose["ty"] + pose["tilt_y"] * Z
        dX = X[:, None, None] - ox[None, None, :]
        dY = Y[None, :, None] - oy[None, None, :]
        self.u = (c * dX + s * dY).astype(np.float32)
        self.v = (-s * dX + c * dY).astype(np.float32)
        self.za = (Z - pose["tz"]).astype(np.float32)   # anatomical z of each slice
        self.W = np.zeros(preset.shape, np.float32)
        self.F = np.zeros(preset.shape, np.float32)
        self._rot = (c, s)
        self._off = (ox, oy)

    def bbox(self, cu, cv, radius, kmask=None):
        """Index bounding box (slices) of a structure with per-slice centre (cu, cv) and radius (mm)."""
        nx, ny, nz = self.p.shape
        cu = np.broadcast_to(np.asarray(cu, np.float64), (nz,))
        cv = np.broadcast_to(np.asarray(cv, np.float64), (nz,))
        r = np.broadcast_to(np.asarray(radius, np.float64), (nz,))
        ks = np.arange(nz) if kmask is None else np.flatnonzero(kmask)
        if ks.size == 0:
            return None
        c, s = self._rot
        ox, oy = self._off
        # anatomical -> scanner: X = c*u - s*v + ox, Y = s*u + c*v + oy
        Xc = c * cu[ks] - s * cv[ks] + ox[ks]
        Yc = s * cu[ks] + c * cv[ks] + oy[ks]
        rr = r[ks] + 2 * self.h
        sx, sy, _ = self.p.spacing
        i0 = int(np.floor(((Xc - rr).min() - self.X[0]) / sx))
        i1 = int(np.ceil(((Xc + rr).max() - self.X[0]) / sx)) + 1
        j0 = int(np.floor(((Yc - rr).min() - self.Y[0]) / sy))
        j1 = int(np.ceil(((Yc + rr).max() - self.Y[0]) / sy)) + 1
        i0, j0 = max(i0, 0), max(j0, 0)
        i1, j1 = min(i1, nx), min(j1, ny)
        if i0 >= i1 or j0 >= j1:
            return None
        return (slice(i0, i1), slice(j0, j1), slice(int(ks.min()), int(ks.max()) + 1))

    def uv(self, sl):
        return self.u[sl], self.v[sl]

    def paint(self, sl, cov, pd_ff=None, W=None, F=None):
        """Composite a structure: new = (1 - c) old + c tissue. Tissue as (pd, ff) or explicit W/F maps."""
        if sl is None:
            return
        if pd_ff is not None:
            pd, ff = pd_ff
            W, F = pd * (1.0 - ff), pd * ff
        w_old, f_old = self.W[sl], self.F[sl]
        self.W[sl] = w_old + cov * (W - w_old)
        self.F[sl] = f_old + cov * (F - f_old)


def _col(a, sl):
    """Per-slice parameter vector -> broadcastable (1, 1, nz_box) for the box's slices."""
    a = np.asarray(a, np.float32)
    if a.ndim == 0:
        return a
    return a[sl[2]][None, None, :]


# ----------------------------------------------------------------------------------------------------------
# the anatomy


def _layout(subj: Subject, za: np.ndarray, scales: np.ndarray) -> dict:
    """Per-slice anatomical parameters (mm) given the compartment scale factors (L/R auto, L/R psoas)."""
    hs = subj.height_cm / 172.0
    bmi = subj.bmi
    male = 0.0 if subj.female else 1.0
    pitch = 33.0 * hs
    # vertebrae T10..L5 then S1; T10 centre near the top of the slab
    names = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
    z_top = 122.0
    centres = z_top - pitch * np.arange(len(names))
    z_t10, z_l5 = centres[0], centres[7]
    s = np.clip((za - z_l5) / (z_t10 - z_l5), -0.3, 1.3)      # 0 at L5, 1 at T10
    body_h = 0.76 * pitch                                      # vertebral body height; the rest is disc

    t_post = float(np.clip(6 + 1.4 * (bmi - 22) + 4 * (1 - male), 3, 60))
    t_lat = float(np.clip(8 + 2.2 * (bmi - 22) + 8 * (1 - male), 4, 80))
    t_ant = float(np.clip(8 + 2.0 * (bmi - 22) + 3 * (1 - male), 4, 80))

    auto_prof = np.sqrt(np.clip(0.55 + 0.45 * np.exp(-((s - 0.3) / 0.38) ** 2) - 0.25 * np.clip(-s, 0, 1), 0.05, None))
    k_auto = np.maximum(scales[0], scales[1])
    h_auto = 40.0 * hs * k_auto * auto_prof                    # depth of the deeper (medial) part
    R_ap = (15.0 + 4.0 * np.clip(1 - s, 0, 1.2)) * hs
    R_lat = (20.0 + 6.0 * np.clip(1 - s, 0, 1.2)) * hs
    v_back = -(t_post + 4 + h_auto + 20 + 2 * R_ap + 15)      # posterior skin
    v_mpost = v_back + 2 + t_post + 2                          # posterior border of the back muscles
    v_lamina = v_mpost + h_auto + 2
    v_canal = v_lamina + 9.0
    v_vb = v_canal + 9.0 + R_ap
    ap_total = 205.0 + 6.0 * (bmi - 25) + 10.0 * male
    Bp = -v_back
    Ba = np.maximum(ap_total - Bp, t_ant + 12 + 45)
    A = (118.0 + 10.0 * male + 3.2 * (bmi - 25)) * (1 + 0.03 * np.cos(np.pi * s))
    A = A * (1 + 0.10 * (1 - male) * np.clip((0.25 - s) / 0.55, 0, 1))   # hips, women
    A = np.maximum(A, 85.0)
    psoas_prof = np.clip((0.62 - s) / 0.62, 0, 1.2) ** 0.8
    return dict(names=names, centres=centres, body_h=body_h, pitch=pitch, s=s, t_post=t_post, t_lat=t_lat,
                t_ant=t_ant, auto_prof=auto_prof, h_auto=h_auto, R_ap=R_ap, R_lat=R_lat, v_mpost=v_mpost,
                v_lamina=v_lamina, v_canal=v_canal, v_vb=v_vb, Bp=Bp, Ba=Ba, A=A, psoas_prof=psoas_prof, hs=hs)


def _compartment_sdf(label: int, u, v, L: dict, sl, scales) -> np.ndarray:
    """Signed distance to a labelled compartment inside box ``sl``."""
    side = 1.0 if label in (1, 3) else -1.0    # left = +u
    hs = L["hs"]
    if label in (1, 2):
        k = scales[label - 1] * _col(L["auto_prof"], sl)
        vm = _col(L["v_mpost"], sl)
        gap = 4.5
        # deep medial part (multifidus) and flatter lateral part (longissimus / iliocostalis)
        med = _egg_sdf(u, v, side * (gap + 12.5 * hs * k), vm + 20.0 * hs * k, 12.5 * hs * k, 20.0 * hs * k,
                       20.0 * hs * k)
        lat = _egg_sdf(u, v, side * (gap + 30.0 * hs * k), vm + 15.0 * hs * k, 22.0 * hs * k, 15.0 * hs * k,
                       14.0 * hs * k)
        d = np.minimum(med, lat)
        return np.maximum(d, gap - side * u)               # never across the midline / spinous process
    k = scales[label - 1] * _col(L["psoas_prof"], sl)
    au, bv = 20.0 * hs * k, 16.0 * hs * k
    cu = side * (_col(L["R_lat"], sl) + 0.85 * au + 2.0)
    cv = _col(L["v_vb"], sl) + 0.15 * _col(L["R_ap"], sl) + 8.0 * np.clip(0.5 - _col(L["s"], sl), 0, 1)
    d = _egg_sdf(u, v, cu, cv, np.maximum(au, 0.01), np.maximum(bv, 0.01), np.maximum(bv, 0.01))
    return np.where(k > 1e-3, d, 1e3)


def _compartment_box(canvas: _Canvas, label: int, L: dict, scales, margin=6.0):
    hs = L["hs"]
    if label in (1, 2):
        side = 1.0 if label == 1 else -1.0
        k = scales[label - 1] * L["auto_prof"]
        cu = side * (4.5 + 30.0 * hs * k)
        cv = L["v_mpost"] + 20.0 * hs * k
        r = 55.0 * hs * k + margin
        return canvas.bbox(cu, cv, r)
    side = 1.0 if label == 3 else -1.0
    k = scales[label - 1] * L["psoas_prof"]
    cu = side * (L["R_lat"] + 20.0 * hs * k)
    cv = L["v_vb"]
    r = 30.0 * hs * k + 12.0 + margin
    return canvas.bbox(cu, cv, r, kmask=k > 1e-3)


def _fit_scales(subj: Subject, preset: Preset, canvas: _Canvas) -> tuple[np.ndarray, dict]:
    """Scale factors so that each compartment's labelled volume hits lean / (1 - InterMAT)."""
    f = subj.imat_pct / 100.0
    target_vox = np.array(subj.lean_ml) / (1.0 - f) / preset.voxel_ml
    scales = np.array([1.0, 1.0, 1.25, 1.25])
    for _ in range(4):
        L = _layout(subj, canvas.za, scales)
        counts = np.zeros(4)
        for j, lab in enumerate(COMPARTMENTS):
            sl = _compartment_box(canvas, lab, L, scales)
            if sl is None:
                continue
            u, v = canvas.uv(sl)
            counts[j] = np.count_nonzero(_compartment_sdf(lab, u, v, L, sl, scales) <= 0.0)
        ratio = np.sqrt(target_vox / np.maximum(counts, 1.0))
        scales = scales * np.clip(ratio, 0.5, 2.0)
        if np.all(np.abs(ratio - 1) < 0.002):
            break
    return scales, _layout(subj, canvas.za, scales)


def _paint_anatomy(canvas: _Canvas, subj: Subject, L: dict, rng: np.random.Generator) -> None:
    za = canvas.za
    h = canvas.h
    male = not subj.female
    A, Ba, Bp = L["A"], L["Ba"], L["Bp"]
    everything = (slice(None), slice(None), slice(None))
    u, v = canvas.u, canvas.v
    col = lambda a: _col(a, everything)  # noqa: E731

    # body: skin, subcutaneous fat, abdominal / back wall muscle
    d_body = _egg_sdf(u, v, 0.0, 0.0, col(A), col(Ba), col(Bp))
    canvas.paint(everything, _coverage(d_body, h), SKIN)
    canvas.paint(everything, _coverage(_egg_sdf(u, v, 0.0, 0.0, col(A - 2), col(Ba - 2), col(Bp - 2)), h), ADIPOSE)
    Ai, Bai, Bpi = A - 2 - L["t_lat"], Ba - 2 - L["t_ant"], Bp - 2 - L["t_post"]
    generic_mfi = float(np.clip(subj.mfi + 0.01, 0.01, 0.2))
    canvas.paint(everything, _coverage(_egg_sdf(u, v, 0.0, 0.0, col(Ai), col(Bai), col(Bpi)), h),
                 (MUSCLE_PD, generic_mfi))

    # abdominal cavity: bowel and visceral fat as a smooth texture (sum of random plane waves)
    Av, Bav = Ai - 12.0, Bai - 12.0
    cav_back = L["v_vb"] - L["R_ap"]                       # cavity reaches back to the spine
    sl = canvas.bbox(0.0, 0.0, np.maximum(Av, Bav))
    uu, vv = canvas.uv(sl)
    d_cav = _egg_sdf(uu, vv, 0.0, _col((Bav + cav_back) / 2, sl), _col(Av, sl), _col((Bav - cav_back) / 2, sl),
                     _col((Bav - cav_back) / 2, sl))
    zz = za[sl[2]][None, None, :]
    tex = np.zeros(uu.shape, np.float32)
    for _ in range(7):
        kdir = rng.normal(size=3)
        kdir /= np.linalg.norm(kdir)
        kmag = 2 * np.pi / rng.uniform(25.0, 60.0)
        tex += np.cos(kmag * (kdir[0] * uu + kdir[1] * vv + kdir[2] * zz) + rng.uniform(0, 2 * np.pi))
    tex /= math.sqrt(7 / 2)
    vat_share = float(np.clip(0.15 + 0.025 * (subj.bmi - 25) + 0.08 * male, 0.05, 0.65))
    a = special.expit((tex - special.ndtri(1 - vat_share)) / 0.25)
    Wv = (1 - a) * BOWEL[0] * (1 - BOWEL[1]) + a * ADIPOSE[0] * (1 - ADIPOSE[1])
    Fv = (1 - a) * BOWEL[0] * BOWEL[1] + a * ADIPOSE[0] * ADIPOSE[1]
    canvas.paint(sl, _coverage(d_cav, h), W=Wv, F=Fv)

    # liver (participant's right = -u), upper slices
    liver_prof = np.clip((L["s"] - 0.5) / 0.3, 0, 1)
    if liver_prof.max() > 0:
        ff_liver = float(np.clip(0.03 + 0.008 * (subj.bmi - 25) + rng.normal(0, 0.02), 0.01, 0.35))
        lu, lv = -0.45 * Ai, L["v_vb"] + 0.45 * Bai
        la, lb = 0.55 * Ai * liver_prof + 0.01, 0.5 * Bai * liver_prof + 0.01
        sl = canvas.bbox(lu, lv, np.maximum(la, lb), kmask=liver_prof > 0)
        if sl is not None:
            uu, vv = canvas.uv(sl)
            canvas.paint(sl, _coverage(_egg_sdf(uu, vv, _col(lu, sl), _col(lv, sl), _col(la, sl), _col(lb, sl),
                                                _col(lb, sl)), h), (0.8, ff_liver))

    # kidneys with perirenal fat (3D ellipsoids around L1-L3)
    zk = L["centres"][4]
    for side, dz in ((1.0, 0.0), (-1.0, -12.0)):
        cu = side * np.minimum(L["R_lat"] + 58.0 * L["hs"], 0.62 * Ai)
        cv = L["v_vb"] + 8.0
        zr = (za - (zk + dz)) / (55.0 * L["hs"])
        prof = np.sqrt(np.clip(1 - zr ** 2, 0, 1))
        if prof.max() <= 0:
            continue
        sl = canvas.bbox(cu, cv, 40.0, kmask=prof > 0)
        uu, vv = canvas.uv(sl)
        p = _col(prof, sl)
        canvas.paint(sl, _coverage(_egg_sdf(uu, vv, _col(cu, sl), _col(cv, sl), 34 * p + 0.01, 28 * p + 0.01,
                                            28 * p + 0.01), h), ADIPOSE)
        canvas.paint(sl, _coverage(_egg_sdf(uu, vv, _col(cu, sl), _col(cv, sl), 27 * p + 0.01, 21 * p + 0.01,
                                            21 * p + 0.01), h), KIDNEY)

    # aorta and inferior vena cava
    for cu_off, r in ((12.0, 11.0), (-20.0, 12.0)):
        cv = L["v_vb"] + L["R_ap"] + r + 3
        sl = canvas.bbox(cu_off, cv, r)
        uu, vv = canvas.uv(sl)
        canvas.paint(sl, _coverage(_egg_sdf(uu, vv, cu_off, _col(cv, sl), r, r, r), h), BLOOD)


def _paint_spine(canvas: _Canvas, subj: Subject, L: dict) -> None:
    h = canvas.h
    za = canvas.za
    dz = canvas.p.spacing[2]
    ff_marrow = float(np.clip(0.30 + 0.005 * (subj.age - 20) + (0.05 if subj.female and subj.age > 50 else 0),
                              0.2, 0.7))
    R_ap, R_lat, v_vb = L["R_ap"], L["R_lat"], L["v_vb"]
    sl = canvas.bbox(0.0, v_vb, np.maximum(R_ap, R_lat))
    uu, vv = canvas.uv(sl)
    d_vb = _egg_sdf(uu, vv, 0.0, _col(v_vb, sl), _col(R_lat, sl), _col(R_ap, sl), _col(R_ap, sl))
    cov_xy = _coverage(d_vb, h)
    canvas.paint(sl, cov_xy, DISC)                         # the column: discs between vertebral bodies
    zc = L["centres"]
    bh = L["body_h"]
    cov_z = np.zeros_like(za)
    for c in zc:
        cov_z = np.maximum(cov_z, _z_overlap(za, dz, np.float32(c - bh / 2), np.float32(c + bh / 2)))
    cz = cov_z[sl[2]][None, None, :]
    canvas.paint(sl, cov_xy * cz, CORTEX)
    d_marrow = _egg_sdf(uu, vv, 0.0, _col(v_vb, sl), _col(R_lat - 1.5, sl), _col(R_ap - 1.5, sl),
                        _col(R_ap - 1.5, sl))
    canvas.paint(sl, _coverage(d_marrow, h) * cz, (0.75, ff_marrow))

    # posterior elements: lamina arch, spinous process, transverse processes (bone) and the canal (CSF)
    v_can, v_lam, v_mp = L["v_canal"], L["v_lamina"], L["v_mpost"]
    sl = canvas.bbox(0.0, (v_can + v_mp) / 2, (v_can - v_mp) / 2 + 60.0)
    uu, vv = canvas.uv(sl)
    d_arch = _box_sdf(uu, vv, 0.0, _col(v_lam + 1.0, sl), _col(R_lat * 0.75, sl), 4.0)
    d_spin = _box_sdf(uu, vv, 0.0, _col((v_lam + v_mp) / 2 + 2, sl), 3.0, _col((v_lam - v_mp) / 2, sl))
    tp_z = np.zeros_like(za)
    for c in zc[3:8]:   # lumbar transverse processes
        tp_z = np.maximum(tp_z, _z_overlap(za, dz, np.float32(c - 5), np.float32(c + 5)))
    d_tp = _box_sdf(np.abs(uu), vv, _col(R_lat * 0.6 + 22.0, sl), _col(v_can, sl), _col(R_lat * 0.6 + 20.0, sl), 4.0)
    canvas.paint(sl, _coverage(np.minimum(d_arch, d_spin), h), CORTEX)
    canvas.paint(sl, _coverage(d_tp, h) * tp_z[sl[2]][None, None, :], CORTEX)
    d_can = _egg_sdf(uu, vv, 0.0, _col(v_can, sl), 10.0, 8.0, 8.0)
    canvas.paint(sl, _coverage(d_can, h), CSF)


def _smooth_field(rng: np.random.Generator, shape, spacing) -> np.ndarray:
    """Unit-variance Gaussian random field, correlated ~3 mm in-plane and ~10 mm along z (fibre streaks)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    sig = (3.0 / spacing[0], 3.0 / spacing[1], 10.0 / spacing[2])
    f = ndimage.gaussian_filter(noise, sig, mode="reflect", truncate=3.0)
    sd = float(f.std())
    return f / (sd if sd > 0 else 1.0)


def _paint_compartments(canvas: _Canvas, subj: Subject, L: dict, scales, rng) -> tuple[np.ndarray, dict]:
    """Fascial fat and the fascia, then the four labelled compartments with lean muscle and intermuscular fat."""
    h = canvas.h
    labels = np.zeros(canvas.p.shape, np.uint8)
    boxes = {lab: _compartment_box(canvas, lab, L, scales) for lab in COMPARTMENTS}
    # fascial / paraspinal fat around each compartment (4 mm), and quadratus lumborum (unlabelled muscle)
    sdfs = {}
    for lab, sl in boxes.items():
        if sl is None:
            continue
        u, v = canvas.uv(sl)
        sdfs[lab] = _compartment_sdf(lab, u, v, L, sl, scales)
        canvas.paint(sl, _coverage(sdfs[lab] - 4.0, h), ADIPOSE)
    for lab, sdf in sdfs.items():   # the fascial sheet just outside each compartment, over all the fat
        canvas.paint(boxes[lab], _coverage(sdf - FASCIA_MM, h) - _coverage(sdf, h), FASCIA)
    for side in (1.0, -1.0):
        k = np.clip((0.62 - L["s"]) / 0.5, 0, 1) * np.clip((L["s"] + 0.05) / 0.2, 0, 1)
        cu = side * (L["R_lat"] + 2 * 20.0 * L["hs"] * scales[2] * L["psoas_prof"] + 18.0)
        cv = L["v_canal"] + 2.0
        sl = canvas.bbox(cu, cv, 30.0, kmask=k > 0.05)
        if sl is None:
            continue
        u, v = canvas.uv(sl)
        kk = _col(k, sl)
        d = _egg_sdf(u, v, _col(cu, sl), _col(cv, sl), 15 * kk + 0.01, 10 * kk + 0.01, 10 * kk + 0.01)
        canvas.paint(sl, _coverage(d - 2.5, h), ADIPOSE)
        canvas.paint(sl, _coverage(d, h), (MUSCLE_PD, subj.mfi + 0.01))

    f_target = subj.imat_pct / 100.0
    lean_W, lean_F = MUSCLE_PD * (1 - subj.mfi), MUSCLE_PD * subj.mfi
    fat_W, fat_F = ADIPOSE[0] * (1 - ADIPOSE[1]), ADIPOSE[0] * ADIPOSE[1]
    D0, D1 = lean_F - lean_W, fat_F - fat_W
    width = 0.15
    per = {}
    for lab in COMPARTMENTS:
        sl = boxes[lab]
        if sl is None:
            per[lab] = dict(n=0)
            continue
        u, v = canvas.uv(sl)
        sdf = _compartment_sdf(lab, u, v, L, sl, scales)
        cov = _coverage(sdf, h)
        inside = cov >= 0.5
        n_lab = int(np.count_nonzero(inside))
        G = _smooth_field(rng, cov.shape, canvas.p.spacing)
        G += 0.25 * np.exp(np.minimum(sdf, 0.0) / 4.0)      # a mild preference for the fascial border
        # Solve the intermuscular-fat threshold t so that exactly round(f * n) labelled voxels end up with
        # noise-free F >= W after compositing over what lies beneath (partial volume at the border).
        Du = canvas.F[sl] - canvas.W[sl]
        c = np.maximum(cov, 1e-6)
        a_star = (-(1 - c) * Du / c - D0) / (D1 - D0)
        key = G - width * special.logit(np.clip(a_star, 1e-9, 1 - 1e-9))
        key = np.where(a_star <= 0, np.inf, np.where(a_star >= 1, -np.inf, key))
        m = int(round(f_target * n_lab))
        kin = np.sort(key[inside])[::-1]
        if m <= 0 or n_lab == 0:
            t = float(np.max(G)) + 1e3
        else:
            hi = kin[m - 1]
            lo = kin[m] if m < n_lab else hi - 1.0
            t = float(hi if not np.isfinite(lo) else (hi + lo) / 2) if np.isfinite(hi) else float(np.max(G)) + 1e3
        a = special.expit((G - t) / width).astype(np.float32)
        Wc = (1 - a) * lean_W + a * fat_W
        Fc = (1 - a) * lean_F + a * fat_F
        canvas.paint(sl, cov, W=Wc, F=Fc)
        lab_view = labels[sl]
        lab_view[inside] = lab
        per[lab] = dict(n=n_lab)
    return labels, per


def _bias_field(canvas: _Canvas, rng: np.random.Generator, L: dict) -> np.ndarray:
    """Smooth receive-coil bias: a random low-order polynomial in log space plus the posterior spine coil."""
    X = canvas.X / 200.0
    Y = canvas.Y / 200.0
    Z = canvas.Z / 200.0
    c = rng.normal(0, 1, 7) * np.array([0.10, 0.08, 0.08, 0.06, 0.06, 0.05, 0.05])
    logb = (c[0] * X[:, None, None] + c[1] * Y[None, :, None] + c[2] * Z[None, None, :]
            + c[3] * X[:, None, None] ** 2 + c[4] * Y[None, :, None] ** 2 + c[5] * Z[None, None, :] ** 2
            + c[6] * X[:, None, None] * Y[None, :, None])
    back = -np.mean(L["Bp"])
    spine_coil = 0.25 * np.exp(-np.clip(canvas.Y - back, 0, None) / 90.0)
    return (np.exp(logb) * (1.0 + spine_coil[None, :, None])).astype(np.float32), c


def render_phantom(subj: Subject, preset: Preset, rng: np.random.Generator, *, in_opp: bool = False,
                   gain: float = 1000.0) -> Phantom:
    """Render one participant's Dixon water/fat images, label map and realised ground truth."""
    sx, sy, sz = preset.spacing
    pose = dict(theta=math.radians(rng.uniform(-4, 4)), tx=rng.normal(0, 4), ty=rng.normal(0, 4),
                tilt_x=rng.normal(0, 0.02), tilt_y=rng.normal(0, 0.03), tz=rng.normal(0, 6),
                scoliosis=abs(rng.normal(0, 2.5)), scol_phase=rng.uniform(0, 2 * np.pi))
    canvas = _Canvas(preset, pose)
    scales, L = _fit_scales(subj, preset, canvas)
    _paint_anatomy(canvas, subj, L, rng)
    _paint_spine(canvas, subj, L)
    labels, _ = _paint_compartments(canvas, subj, L, scales, rng)

    W0, F0 = canvas.W, canvas.F
    # truth from the noise-free signal, with the study's rule
    fatvox = F0 >= W0 * (FAT_THRESHOLD / (1.0 - FAT_THRESHOLD))   # F / (W + F) >= threshold
    vml = preset.voxel_ml
    truth: dict = {}
    lean_total = comp_total = fat_total = 0.0
    ff_sum = 0.0
    for lab in COMPARTMENTS:
        m = labels == lab
        n = int(np.count_nonzero(m))
        nf = int(np.count_nonzero(m & fatvox))
        name = LABELS[lab]
        truth[f"{name}_compartment_ml"] = n * vml
        truth[f"{name}_fat_ml"] = nf * vml
        truth[f"{name}_lean_ml"] = (n - nf) * vml
        comp_total += n * vml
        fat_total += nf * vml
        lean_total += (n - nf) * vml
        lean_mask = m & ~fatvox
        ff_sum += float((F0[lean_mask] / np.maximum(W0[lean_mask] + F0[lean_mask], 1e-6)).sum())
    truth["compartment_ml"] = comp_total
    truth["fat_ml"] = fat_total
    truth["lean_ml"] = lean_total
    truth["imat_pct"] = 100.0 * fat_total / comp_total if comp_total else float("nan")
    truth["lmm_index"] = lean_total / (subj.weight_kg / (subj.height_cm / 100.0))
    truth["mfi"] = ff_sum / max(lean_total / vml, 1)

    bias, bias_coef = _bias_field(canvas, rng, L)
    snr = rng.uniform(22.0, 40.0)
    sigma = gain * MUSCLE_PD / snr
    shape = preset.shape

    def rician(sig):
        re = sig * bias * gain + sigma * rng.standard_normal(shape, dtype=np.float32)
        im = sigma * rng.standard_normal(shape, dtype=np.float32)
        return np.sqrt(re * re + im * im)

    water = rician(W0)
    fat = rician(F0)
    in_img = opp_img = None
    if in_opp:
        in_img = rician(W0 + F0)
        opp_img = rician(np.abs(W0 - F0))
    nz = shape[2]
    swap_slices = None
    if subj.swap == "full":
        water, fat = fat, water
        swap_slices = (0, nz)
    elif subj.swap == "slab":
        # one station of a multi-station acquisition is swapped: 40-60 % of the slab, at one end
        n_sw = int(round(nz * rng.uniform(0.4, 0.6)))
        k0, k1 = (0, n_sw) if rng.random() < 0.5 else (nz - n_sw, nz)
        w_part = water[:, :, k0:k1].copy()
        water[:, :, k0:k1] = fat[:, :, k0:k1]
        fat[:, :, k0:k1] = w_part
        swap_slices = (k0, k1)
    truth["swap_slices"] = swap_slices
    truth["snr"] = snr
    truth["pose"] = {k: float(v) for k, v in pose.items()}
    truth["bias_coefficients"] = [float(x) for x in bias_coef]
    truth["compartment_scales"] = [float(x) for x in scales]

    origin_jitter = rng.normal(0, 10, 3)
    affine = np.array([
        [-sx, 0, 0, sx * (shape[0] - 1) / 2 + origin_jitter[0]],
        [0, sy, 0, -sy * (shape[1] - 1) / 2 + origin_jitter[1]],
        [0, 0, sz, -sz * (shape[2] - 1) / 2 + origin_jitter[2] - 80.0],
        [0, 0, 0, 1.0]])

    def to_i16(a):
        return np.clip(np.rint(a), 0, 32767).astype(np.int16) if a is not None else None

    return Phantom(water=to_i16(water), fat=to_i16(fat), labels=labels, affine=affine, truth=truth,
                   in_phase=to_i16(in_img), opp_phase=to_i16(opp_img))
