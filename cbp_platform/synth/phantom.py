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

``render_phantom(..., extent="whole-body")`` covers neck to thighs as NAKO's whole-body Dixon does: the same slab,
drawn with the same random numbers, embedded voxel for voxel in a 1080 mm volume whose other slices hold
unlabelled thorax, shoulder girdle, neck, pelvis and thighs (labels and truth stay the slab's).
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
# outside the lumbar slab (whole-body volumes only)
LUNG = (0.25, 0.0)          # lung parenchyma: a quarter of soft tissue's proton density, water only: dark
AIR = (0.02, 0.0)           # trachea
FLUID = (1.0, 0.0)          # urine
MYOCARDIUM = (0.8, 0.02)
MEDIASTINUM = (0.8, 0.2)    # vessels, oesophagus, lymph nodes in mediastinal fat
YELLOW_MARROW = (0.9, 0.85)  # the adult femoral shaft
CORD = (0.75, 0.02)

EXTENTS = ("lumbar", "whole-body")
# a whole-body volume (NAKO's neck-to-thigh Dixon): the slab with this much more above and below it, in mm
WB_ABOVE_MM = 300.0         # thorax, shoulder girdle, neck
WB_BELOW_MM = 492.0         # pelvis and thighs


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
    extent: str = "lumbar"       # lumbar | whole-body (render_phantom's extent)


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

    def __init__(self, preset: Preset, pose: dict, ks: np.ndarray | None = None,
                 pose_z: tuple[float, float] | None = None):
        """``ks``: the slices to paint, as indices on the preset's (lumbar) z grid, which may run past it (a
        whole-body volume paints a few of its slices at a time); default all of the preset's slices. ``pose_z``:
        the (lowest, highest) slice position (mm) of the lumbar slab; beyond it the pose's tilt and scoliosis
        terms follow a softly clamped z, so that a metre-long volume does not drift out of the field of view."""
        self.p = preset
        nx, ny, nz = preset.shape
        sx, sy, sz = preset.spacing
        self.h = min(sx, sy)
        X = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)
        Y = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)
        Z = ((np.arange(nz) if ks is None else np.asarray(ks)) - (nz - 1) / 2) * sz
        Z = Z.astype(np.float32)
        self.shape = (nx, ny, int(Z.size))
        self.X, self.Y, self.Z = X, Y, Z
        th = pose["theta"]
        c, s = math.cos(th), math.sin(th)
        Zp = Z if pose_z is None else _soft_clamp(Z, *pose_z)
        ox = pose["tx"] + pose["tilt_x"] * Zp + pose["scoliosis"] * np.sin(Zp / 90.0 + pose["scol_phase"])
        oy = pose["ty"] + pose["tilt_y"] * Zp
        dX = X[:, None, None] - ox[None, None, :]
        dY = Y[None, :, None] - oy[None, None, :]
        self.u = (c * dX + s * dY).astype(np.float32)
        self.v = (-s * dX + c * dY).astype(np.float32)
        self.za = (Z - pose["tz"]).astype(np.float32)   # anatomical z of each slice
        self.W = np.zeros(self.shape, np.float32)
        self.F = np.zeros(self.shape, np.float32)
        self._rot = (c, s)
        self._off = (ox, oy)

    def bbox(self, cu, cv, radius, kmask=None):
        """Index bounding box (slices) of a structure with per-slice centre (cu, cv) and radius (mm)."""
        nx, ny, nz = self.shape
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


def _paint_anatomy(canvas: _Canvas, subj: Subject, L: dict, rng: np.random.Generator) -> dict:
    """Paint the trunk outside the spine and the compartments. Returns what was drawn (the bowel texture's plane
    waves, the liver's fat fraction), so that a whole-body volume continues the same texture past the slab."""
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
    drawn: dict = {"waves": [], "ff_liver": None}
    for _ in range(7):
        kdir = rng.normal(size=3)
        kdir /= np.linalg.norm(kdir)
        kmag = 2 * np.pi / rng.uniform(25.0, 60.0)
        phase = rng.uniform(0, 2 * np.pi)
        tex += np.cos(kmag * (kdir[0] * uu + kdir[1] * vv + kdir[2] * zz) + phase)
        drawn["waves"].append((kdir, kmag, phase))
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
        drawn["ff_liver"] = ff_liver
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
    return drawn


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
    labels = np.zeros(canvas.shape, np.uint8)
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


def _to_i16(a):
    return np.clip(np.rint(a), 0, 32767).astype(np.int16) if a is not None else None


def render_phantom(subj: Subject, preset: Preset, rng: np.random.Generator, *, in_opp: bool = False,
                   gain: float = 1000.0, extent: str = "lumbar") -> Phantom:
    """Render one participant's Dixon water/fat images, label map and realised ground truth.

    ``extent="lumbar"`` renders the preset's slab (T10 to S1). ``extent="whole-body"`` renders that same slab,
    with the same random numbers in the same order (so the same labels, voxels and truth numbers), and embeds it
    in a neck-to-thigh volume of :func:`whole_body_slices` slices: the slices above and below hold unlabelled
    anatomy (:func:`_render_outside`) drawn from a generator seeded after every number the slab draws."""
    if extent not in EXTENTS:
        raise ValueError(f"unknown extent {extent!r} (choose from {', '.join(EXTENTS)})")
    lumbar = extent == "lumbar"
    sx, sy, sz = preset.spacing
    pose = dict(theta=math.radians(rng.uniform(-4, 4)), tx=rng.normal(0, 4), ty=rng.normal(0, 4),
                tilt_x=rng.normal(0, 0.02), tilt_y=rng.normal(0, 0.03), tz=rng.normal(0, 6),
                scoliosis=abs(rng.normal(0, 2.5)), scol_phase=rng.uniform(0, 2 * np.pi))
    canvas = _Canvas(preset, pose)
    scales, L = _fit_scales(subj, preset, canvas)
    drawn = _paint_anatomy(canvas, subj, L, rng)
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
    swap_low_end = False
    # a whole-body volume draws the same numbers here, and swaps its own slices once it is assembled
    if subj.swap == "full":
        if lumbar:
            water, fat = fat, water
        swap_slices = (0, nz)
    elif subj.swap == "slab":
        # one station of a multi-station acquisition is swapped: 40-60 % of the slab, at one end
        n_sw = int(round(nz * rng.uniform(0.4, 0.6)))
        swap_low_end = bool(rng.random() < 0.5)
        k0, k1 = (0, n_sw) if swap_low_end else (nz - n_sw, nz)
        if lumbar:
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

    if lumbar:
        truth.update(_slab_truth(L, pose, preset, affine, 0, extent))
        return Phantom(water=_to_i16(water), fat=_to_i16(fat), labels=labels, affine=affine, truth=truth,
                       in_phase=_to_i16(in_img), opp_phase=_to_i16(opp_img), extent=extent)

    # ---- whole body: everything above was drawn exactly as for the slab alone; from here on a generator of
    # its own, seeded by the next number of the participant's stream
    del canvas.u, canvas.v
    g = np.random.default_rng(int(rng.integers(0, 2 ** 63 - 1)))
    nz_wb, k0 = whole_body_slices(preset)
    slab = {"water": water, "fat": fat, "in": in_img, "opp": opp_img}
    vols = {c: np.zeros((shape[0], shape[1], nz_wb), np.int16) for c, a in slab.items() if a is not None}
    for c, vol in vols.items():
        vol[:, :, k0:k0 + nz] = _to_i16(slab[c])
    del slab, water, fat, in_img, opp_img
    body = _body_outside(subj, canvas, L, scales, drawn, g, nz_wb, k0)
    _render_outside(vols, body, preset, pose, k0, bias_coef, -np.mean(L["Bp"]), sigma, gain, g)
    labels_wb = np.zeros((shape[0], shape[1], nz_wb), np.uint8)
    labels_wb[:, :, k0:k0 + nz] = labels
    if subj.swap == "full":
        vols["water"], vols["fat"] = vols["fat"], vols["water"]
        truth["swap_slices"] = (0, nz_wb)
    elif subj.swap == "slab":
        # as a whole-body acquisition would show it: one end station exchanged
        from cbp_platform.synth.dicom import stations_for

        stations = stations_for(nz_wb, extent)
        s0, s1 = stations[0] if swap_low_end else stations[-1]
        w_part = vols["water"][:, :, s0:s1].copy()
        vols["water"][:, :, s0:s1] = vols["fat"][:, :, s0:s1]
        vols["fat"][:, :, s0:s1] = w_part
        truth["swap_slices"] = (s0, s1)
    affine_wb = affine.copy()
    affine_wb[2, 3] -= sz * k0          # slice k of the whole body lies where slab slice k - k0 lay
    truth.update(_slab_truth(L, pose, preset, affine, k0, extent))
    return Phantom(water=vols["water"], fat=vols["fat"], labels=labels_wb, affine=affine_wb, truth=truth,
                   in_phase=vols.get("in"), opp_phase=vols.get("opp"), extent=extent)


def _slab_truth(L: dict, pose: dict, preset: Preset, slab_affine: np.ndarray, k0: int, extent: str) -> dict:
    """Where the labelled slab lies in the delivered volume: its slices ``[k0, k1)`` and each vertebral body's
    centre (T10..S1) as a (fractional) slice index and as world z (scanner mm; from the slab's own affine, so the
    same number for either extent) - what a region-of-interest crop of a whole-body scan must find."""
    nz, sz = preset.shape[2], preset.spacing[2]
    ks = {name: float((c + pose["tz"]) / sz + (nz - 1) / 2) for name, c in zip(L["names"], L["centres"])}
    return {"extent": extent, "slab_slices": (k0, k0 + nz), "vertebra_slices": {n: k0 + k for n, k in ks.items()},
            "vertebra_z_mm": {n: float(slab_affine[2, 3] + slab_affine[2, 2] * k) for n, k in ks.items()}}


# ----------------------------------------------------------------------------------------------------------
# whole body: neck to thighs around the slab


def whole_body_slices(preset: Preset) -> tuple[int, int]:
    """``(nz, k0)``: the slice count of a whole-body volume at ``preset`` and the index of the lumbar slab's first
    slice in it. The in-plane grid stays the preset's; the slab keeps its slices, with ``WB_BELOW_MM`` (pelvis,
    thighs) below it and ``WB_ABOVE_MM`` (thorax, shoulders, neck) above: 1080 mm at either preset."""
    sz = preset.spacing[2]
    below, above = int(round(WB_BELOW_MM / sz)), int(round(WB_ABOVE_MM / sz))
    return below + preset.shape[2] + above, below


def _soft_clamp(Z: np.ndarray, lo: float, hi: float, width: float = 150.0) -> np.ndarray:
    """``Z`` inside ``[lo, hi]``; beyond, it approaches ``hi + width`` (``lo - width``) smoothly (the slope is
    continuous at the ends). Pose and coil bias are polynomials fitted to the slab: extrapolated over a metre
    they would run away."""
    Z = np.asarray(Z, np.float64)
    out = np.where(Z > hi, hi + width * np.tanh((Z - hi) / width),
                   np.where(Z < lo, lo + width * np.tanh((Z - lo) / width), Z))
    return out.astype(np.float32)


def _ramp(x, a: float, b: float) -> np.ndarray:
    """Smoothstep from 0 at ``x = a`` to 1 at ``x = b`` (``b`` may lie below ``a``)."""
    if b == a:
        return (np.asarray(x) >= a).astype(np.float32)
    t = np.clip((np.asarray(x, np.float32) - np.float32(a)) / np.float32(b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _dome(x, z0: float, half: float) -> np.ndarray:
    """Cross-section scale of an ellipsoid of half-height ``half`` centred at ``z0`` (0 outside it)."""
    return np.sqrt(np.clip(1.0 - ((np.asarray(x, np.float32) - z0) / half) ** 2, 0.0, 1.0))


def _capsule_sdf(u, v, pu, pv, qu, qv, r):
    """Exact signed distance to a rod: the segment p-q thickened by r (ribs cut obliquely, wings of the ilium,
    femoral necks, clavicles)."""
    du, dv = qu - pu, qv - pv
    wu, wv = u - pu, v - pv
    t = np.clip((wu * du + wv * dv) / np.maximum(du * du + dv * dv, 1e-6), 0.0, 1.0)
    return np.hypot(wu - t * du, wv - t * dv) - r


def _waves(u, v, z, waves) -> np.ndarray:
    """Sum of plane waves (unit variance): analytic, so a texture continues seamlessly across chunks of slices."""
    tex = np.zeros(np.broadcast_shapes(u.shape, v.shape, z.shape), np.float32)
    for kdir, kmag, phase in waves:
        tex += np.cos(kmag * (kdir[0] * u + kdir[1] * v + kdir[2] * z) + phase)
    return tex / math.sqrt(len(waves) / 2)


def _per_slice(n: int, *xs):
    return [np.broadcast_to(np.asarray(x, np.float32), (n,)) for x in xs]


def _egg_at(c: _Canvas, cu, cv, au, bpos, bneg, tissue, kmask=None, grow: float = 0.0):
    """Paint a per-slice egg-shaped section (centre, semi-axes in mm; ``grow`` mm added to each) with a tissue.
    Slices where a semi-axis is below 0.5 mm (or ``kmask`` is false) are left alone."""
    n = c.shape[2]
    cu, cv, au, bpos, bneg = _per_slice(n, cu, cv, au, bpos, bneg)
    ok = (au > 0.5) & (bpos > 0.5) & (bneg > 0.5)
    if kmask is not None:
        ok = ok & np.broadcast_to(kmask, (n,))
    sl = c.bbox(cu, cv, np.maximum(np.maximum(au, bpos), bneg) + grow, kmask=ok)
    if sl is None:
        return
    uu, vv = c.uv(sl)
    d = _egg_sdf(uu, vv, _col(cu, sl), _col(cv, sl), _col(np.maximum(au + grow, 0.5), sl),
                 _col(np.maximum(bpos + grow, 0.5), sl), _col(np.maximum(bneg + grow, 0.5), sl))
    c.paint(sl, _coverage(d, c.h) * _col(ok, sl), tissue)


def _rod_at(c: _Canvas, p, q, r, tissue, kmask=None):
    """Paint a per-slice rod (segment ``p``-``q`` thickened by ``r``, mm)."""
    n = c.shape[2]
    pu, pv, qu, qv, r = _per_slice(n, p[0], p[1], q[0], q[1], r)
    ok = r > 0.3
    if kmask is not None:
        ok = ok & np.broadcast_to(kmask, (n,))
    sl = c.bbox((pu + qu) / 2, (pv + qv) / 2, np.hypot(qu - pu, qv - pv) / 2 + r, kmask=ok)
    if sl is None:
        return
    uu, vv = c.uv(sl)
    d = _capsule_sdf(uu, vv, _col(pu, sl), _col(pv, sl), _col(qu, sl), _col(qv, sl), _col(np.maximum(r, 0.3), sl))
    c.paint(sl, _coverage(d, c.h) * _col(ok, sl), tissue)


def _bone_rod(c: _Canvas, p, q, r, marrow, kmask=None, cortex: float = 2.5):
    _rod_at(c, p, q, r, CORTEX, kmask)
    _rod_at(c, p, q, np.asarray(r, np.float32) - cortex, marrow, kmask)


def _bone_egg(c: _Canvas, cu, cv, au, bpos, bneg, marrow, kmask=None, cortex: float = 2.0):
    _egg_at(c, cu, cv, au, bpos, bneg, CORTEX, kmask)
    _egg_at(c, cu, cv, au, bpos, bneg, marrow, kmask, grow=-cortex)


@dataclass
class _Body:
    """What the anatomy outside the slab needs, fixed per participant: the lumbar layout at the slab's two end
    slices (everything outside continues from there, so nothing jumps at the slab's borders), the slab's texture
    and tissue draws, and the landmarks (anatomical z, mm) of the thorax, neck, pelvis and thighs."""
    subj: Subject
    hs: float
    male: float
    zt: float                 # superior edge of the slab
    zb: float                 # inferior edge of the slab
    top: dict                 # lumbar layout at the slab's top slice
    bot: dict                 # ... at its bottom slice
    scales: np.ndarray
    bowel_waves: list
    texture: np.ndarray       # smooth random field on a coarse grid over the whole volume (muscle texture)
    texture_origin: tuple     # scanner (X, Y, Z) of its first sample, mm
    vat_share: float
    ff_liver: float
    ff_marrow: float
    generic_mfi: float
    muscle_share: float       # intermuscular fat share of the unlabelled back, gluteal and thigh muscles
    bladder: float            # filling (scales the bladder's size)
    bodies: list              # (centre z, body height) of every vertebral body, C2..S1
    tp_centres: np.ndarray    # lumbar transverse processes
    s1_low: float             # inferior endplate of S1: the sacrum below
    z_t1: float
    z_hip: float
    z_crotch: float
    z_knee: float
    a_leg: float
    leg_gap: float


TEXTURE_STEP = (3.0, 3.0, 6.0)      # mm: the grid of the unlabelled muscles' texture field


def _body_outside(subj: Subject, canvas: _Canvas, L: dict, scales, drawn: dict, g: np.random.Generator,
                  nz_wb: int, k0: int) -> _Body:
    hs = L["hs"]
    nx, ny, nz = canvas.shape
    sx, sy, sz = canvas.p.spacing

    def at(k):
        return {key: (float(val[k]) if isinstance(val, np.ndarray) and val.shape == (nz,) else val)
                for key, val in L.items()}

    centres = L["centres"]
    bodies = [(float(c), float(L["body_h"])) for c in centres]
    z_t9 = centres[0] + 29.0 * hs
    bodies += [(float(z_t9 + 24.0 * hs * n), 18.5 * hs) for n in range(9)]          # T9..T1
    z_t1 = z_t9 + 24.0 * hs * 8
    bodies += [(float(z_t1 + 21.0 * hs + 17.0 * hs * m), 12.0 * hs) for m in range(6)]   # C7..C2
    s1 = float(centres[8])
    z_hip = s1 - 100.0 * hs
    bmi = subj.bmi
    female = 1.0 if subj.female else 0.0
    # the intermuscular fat texture as the slab's (:func:`_smooth_field`: ~3 mm in-plane, ~10 mm along z), on a
    # coarse grid over the whole volume and interpolated, so that chunks of slices join without a seam
    origin = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, (-k0 - (nz - 1) / 2) * sz)
    grid = tuple(int(math.ceil(n * s / t)) + 2 for n, s, t in zip((nx, ny, nz_wb), (sx, sy, sz), TEXTURE_STEP))
    field = ndimage.gaussian_filter(g.standard_normal(grid, dtype=np.float32),
                                    (3.0 / TEXTURE_STEP[0], 3.0 / TEXTURE_STEP[1], 10.0 / TEXTURE_STEP[2]),
                                    mode="reflect", truncate=3.0)
    field /= max(float(field.std()), 1e-6)
    vat_share = float(np.clip(0.15 + 0.025 * (bmi - 25) + 0.08 * (1 - female), 0.05, 0.65))
    return _Body(
        subj=subj, hs=hs, male=1.0 - female,
        zt=float(canvas.za[-1] + sz / 2), zb=float(canvas.za[0] - sz / 2), top=at(nz - 1), bot=at(0),
        scales=np.asarray(scales), bowel_waves=drawn["waves"], texture=field, texture_origin=origin,
        vat_share=vat_share,
        ff_liver=drawn["ff_liver"] if drawn["ff_liver"] is not None else 0.05,
        ff_marrow=float(np.clip(0.30 + 0.005 * (subj.age - 20) + (0.05 if subj.female and subj.age > 50 else 0),
                                0.2, 0.7)),
        generic_mfi=float(np.clip(subj.mfi + 0.01, 0.01, 0.2)),
        muscle_share=float(np.clip(subj.imat_pct / 100.0 * 0.8, 0.01, 0.3)),
        bladder=float(g.uniform(0.7, 1.15)),
        bodies=bodies, tp_centres=centres[3:8], s1_low=s1 - L["body_h"] / 2, z_t1=float(z_t1), z_hip=z_hip,
        z_crotch=z_hip - 80.0 * hs, z_knee=z_hip - 420.0 * hs,
        a_leg=float(np.clip((80.0 + 2.6 * (bmi - 25) + 5 * female) * math.sqrt(hs), 55.0, 150.0)),
        leg_gap=float(np.clip(30.0 - 2.5 * (bmi - 22), 0.0, 30.0)))


def _paint_layers(c: _Canvas, parts: list, mfi: float) -> None:
    """Skin, subcutaneous fat and muscle of a body outline that is a union of egg-shaped parts, each
    ``(cu, on, cv, A, Ba, Bp, t_lat, t_ant, t_post)`` per slice (``on``: 1 where the part exists)."""
    h = c.h
    boxes = [c.bbox(cu, cv, np.maximum(np.maximum(A, Ba), Bp), kmask=np.broadcast_to(on, (c.shape[2],)) > 0)
             for cu, on, cv, A, Ba, Bp, *_ in parts]
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return
    sl = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
    u, v = c.uv(sl)
    for layer, tissue in enumerate((SKIN, ADIPOSE, (MUSCLE_PD, mfi))):
        d = None
        for cu, on, cv, A, Ba, Bp, tl, ta, tp in parts:
            off = [(0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (2.0 + tl, 2.0 + ta, 2.0 + tp)][layer]
            ax = [np.maximum(np.asarray(x, np.float32) - o, 0.5) for x, o in zip((A, Ba, Bp), off)]
            dd = _egg_sdf(u, v, _col(cu, sl), _col(cv, sl), *(_col(x, sl) for x in ax))
            dd = np.where(_col(on, sl) > 0, dd, np.float32(1e3))
            d = dd if d is None else np.minimum(d, dd)
        c.paint(sl, _coverage(d, h), tissue)


def _texture_at(c: _Canvas, sl, body: _Body) -> np.ndarray:
    """The body's texture field at the voxels of box ``sl`` (trilinear)."""
    axes = [(a[s] - o) / t for a, s, o, t in zip((c.X, c.Y, c.Z), sl, body.texture_origin, TEXTURE_STEP)]
    coords = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(body.texture, coords, order=1, mode="nearest").astype(np.float32)


def _muscle_wf(c: _Canvas, sl, body: _Body, share: float, septa: np.ndarray | None = None):
    """Lean muscle with intermuscular fat: streaks where the texture field exceeds its ``share`` quantile, and
    the ``septa`` (fat coverage in the box) if given."""
    tex = _texture_at(c, sl, body)
    a = special.expit((tex - special.ndtri(1 - share)) / 0.15).astype(np.float32)
    if septa is not None:
        a = np.maximum(a, septa)
    mfi = body.subj.mfi
    lean_W, lean_F = MUSCLE_PD * (1 - mfi), MUSCLE_PD * mfi
    fat_W, fat_F = ADIPOSE[0] * (1 - ADIPOSE[1]), ADIPOSE[0] * ADIPOSE[1]
    return (1 - a) * lean_W + a * fat_W, (1 - a) * lean_F + a * fat_F


def _paint_muscles(c: _Canvas, body: _Body, sdfs: dict, share: float) -> None:
    """Unlabelled muscles as the labelled compartments are drawn: fascial fat, the fascia, then the muscle."""
    h = c.h
    for sl, sdf in sdfs.values():
        c.paint(sl, _coverage(sdf - 4.0, h), ADIPOSE)
    for sl, sdf in sdfs.values():
        c.paint(sl, _coverage(sdf - FASCIA_MM, h) - _coverage(sdf, h), FASCIA)
    for sl, sdf in sdfs.values():
        W, F = _muscle_wf(c, sl, body, share)
        c.paint(sl, _coverage(sdf, h), W=W, F=F)


def _back_muscle_sdfs(c: _Canvas, body: _Body, Lc: dict, labels=(1, 2)) -> dict:
    """The labelled compartments' shapes continued outside the slab (``Lc``: their layout per slice)."""
    out = {}
    hs = body.hs
    for lab in labels:
        if lab in (1, 2):
            side = 1.0 if lab == 1 else -1.0
            k = body.scales[lab - 1] * Lc["auto_prof"]
            sl = c.bbox(side * (4.5 + 30.0 * hs * k), Lc["v_mpost"] + 20.0 * hs * k, 55.0 * hs * k + 6.0,
                        kmask=k > 0.02)
        else:
            sl = _compartment_box(c, lab, Lc, body.scales)
        if sl is None:
            continue
        uu, vv = c.uv(sl)
        out[lab] = (sl, _compartment_sdf(lab, uu, vv, Lc, sl, body.scales))
    return out


def _paint_bowel(c: _Canvas, body: _Body, cu, ccv, au, bv, kmask) -> None:
    """The abdominal cavity's bowel / visceral fat texture, the slab's own plane waves continued."""
    n = c.shape[2]
    cu, ccv, au, bv = _per_slice(n, cu, ccv, au, bv)
    ok = kmask & (au > 0.5) & (bv > 0.5)
    sl = c.bbox(cu, ccv, np.maximum(au, bv), kmask=ok)
    if sl is None:
        return
    uu, vv = c.uv(sl)
    d = _egg_sdf(uu, vv, _col(cu, sl), _col(ccv, sl), _col(np.maximum(au, 0.5), sl), _col(np.maximum(bv, 0.5), sl),
                 _col(np.maximum(bv, 0.5), sl))
    tex = _waves(uu, vv, _col(c.za, sl), body.bowel_waves)
    a = special.expit((tex - special.ndtri(1 - body.vat_share)) / 0.25)
    Wv = (1 - a) * BOWEL[0] * (1 - BOWEL[1]) + a * ADIPOSE[0] * (1 - ADIPOSE[1])
    Fv = (1 - a) * BOWEL[0] * BOWEL[1] + a * ADIPOSE[0] * ADIPOSE[1]
    c.paint(sl, _coverage(d, c.h) * _col(ok, sl), W=Wv, F=Fv)


def _paint_column(c: _Canvas, body: _Body, R_ap, R_lat, v_vb, kmask) -> None:
    """Vertebral bodies (cortex, marrow) and the discs between them, as :func:`_paint_spine` draws them."""
    za = c.za
    dz = c.p.spacing[2]
    cov_z = np.zeros_like(za)
    for zc, bh in body.bodies:
        cov_z = np.maximum(cov_z, _z_overlap(za, dz, np.float32(zc - bh / 2), np.float32(zc + bh / 2)))
    cov_z = cov_z * kmask
    _egg_at(c, 0.0, v_vb, R_lat, R_ap, R_ap, DISC, kmask)
    n = c.shape[2]
    R_ap, R_lat, v_vb = _per_slice(n, R_ap, R_lat, v_vb)
    sl = c.bbox(0.0, v_vb, np.maximum(R_ap, R_lat), kmask=cov_z > 0)
    if sl is None:
        return
    uu, vv = c.uv(sl)
    cz = _col(cov_z, sl)
    d = _egg_sdf(uu, vv, 0.0, _col(v_vb, sl), _col(R_lat, sl), _col(R_ap, sl), _col(R_ap, sl))
    c.paint(sl, _coverage(d, c.h) * cz, CORTEX)
    d = _egg_sdf(uu, vv, 0.0, _col(v_vb, sl), _col(R_lat - 1.5, sl), _col(R_ap - 1.5, sl), _col(R_ap - 1.5, sl))
    c.paint(sl, _coverage(d, c.h) * cz, (0.75, body.ff_marrow))


def _paint_posterior(c: _Canvas, body: _Body, R_lat, v_canal, v_lam, v_mp, canal, kmask, cord: bool) -> None:
    """Lamina arch, spinous and (lumbar) transverse processes, the canal with CSF (and the cord above L1)."""
    za, h = c.za, c.h
    dz = c.p.spacing[2]
    n = c.shape[2]
    R_lat, v_canal, v_lam, v_mp, canal = _per_slice(n, R_lat, v_canal, v_lam, v_mp, canal)
    sl = c.bbox(0.0, (v_canal + v_mp) / 2, (v_canal - v_mp) / 2 + 60.0, kmask=kmask)
    if sl is None:
        return
    uu, vv = c.uv(sl)
    ok = _col(kmask, sl)
    d_arch = _box_sdf(uu, vv, 0.0, _col(v_lam + 1.0, sl), _col(R_lat * 0.75, sl), 4.0)
    d_spin = _box_sdf(uu, vv, 0.0, _col((v_lam + v_mp) / 2 + 2, sl), 3.0, _col((v_lam - v_mp) / 2, sl))
    c.paint(sl, _coverage(np.minimum(d_arch, d_spin), h) * ok, CORTEX)
    tp_z = np.zeros_like(za)
    for zc in body.tp_centres:
        tp_z = np.maximum(tp_z, _z_overlap(za, dz, np.float32(zc - 5), np.float32(zc + 5)))
    if tp_z[sl[2]].max() > 0:
        d_tp = _box_sdf(np.abs(uu), vv, _col(R_lat * 0.6 + 22.0, sl), _col(v_canal, sl), _col(R_lat * 0.6 + 20.0, sl),
                        4.0)
        c.paint(sl, _coverage(d_tp, h) * _col(tp_z, sl) * ok, CORTEX)
    vc, cs = _col(v_canal, sl), _col(canal, sl)
    c.paint(sl, _coverage(_egg_sdf(uu, vv, 0.0, vc, 10.0 * cs, 8.0 * cs, 8.0 * cs), h) * ok, CSF)
    if cord:
        c.paint(sl, _coverage(_egg_sdf(uu, vv, 0.0, vc, 5.0 * cs, 4.0 * cs, 4.0 * cs), h) * ok, CORD)


def _paint_upper(c: _Canvas, body: _Body) -> None:
    """Above the slab: the upper abdomen closing under the diaphragm (liver dome), the thorax (lungs, heart,
    great vessels, ribs, sternum, scapulae, thoracic spine, the back muscles continuing thinner), the shoulder
    girdle and the neck (cervical spine and cord, trachea, oesophagus, carotids and jugulars, neck muscles).
    Every profile starts from the slab's top slice, so the trunk's outline and layers continue without a step."""
    za, hs, T, subj = c.za, body.hs, body.top, body.subj
    n = za.size
    zt, z_t1 = body.zt, body.z_t1
    r_ch = _ramp(za, zt, zt + 120 * hs)                       # waist -> chest
    r_sh = _ramp(za, z_t1 - 120 * hs, z_t1 - 20 * hs)         # chest -> shoulder girdle
    w_n = _ramp(za, z_t1 - 5 * hs, z_t1 + 45 * hs)            # trunk -> neck
    k_sp = 1.0 - 0.22 * _ramp(za, zt, z_t1) - 0.25 * w_n       # thoracic, then cervical vertebrae are smaller
    R_ap, R_lat = T["R_ap"] * k_sp, T["R_lat"] * k_sp
    v_canal = np.full(n, T["v_canal"], np.float32)
    v_vb = v_canal + 9.0 + R_ap
    v_back = -T["Bp"]
    front_n = v_vb + R_ap + 48.0 * hs
    A_n = max(46.0, (56.0 + 1.2 * (subj.bmi - 25) + 4.0 * body.male) * hs)
    A = (1 - w_n) * T["A"] * (1 + 0.06 * r_ch) * (1 + 0.14 * r_sh) + w_n * A_n
    cv = w_n * (front_n + v_back) / 2
    Ba = (1 - w_n) * T["Ba"] * (1 - 0.12 * r_ch) + w_n * (front_n - v_back) / 2
    Bp = (1 - w_n) * T["Bp"] + w_n * (front_n - v_back) / 2
    thin = 1.0 - 0.55 * w_n
    t_lat, t_ant, t_post = T["t_lat"] * thin, T["t_ant"] * thin, T["t_post"] * thin
    ones = np.ones(n, np.float32)
    _paint_layers(c, [(0.0, ones, cv, A, Ba, Bp, t_lat, t_ant, t_post)], body.generic_mfi)

    # cavities: the abdomen's under the diaphragm, the thorax's (its back reaching the paravertebral gutters),
    # narrowing into the thoracic inlet
    Ai, Bai = A - 2 - t_lat, Ba - 2 - t_ant
    Av, Bav = Ai - 12.0, Bai - 12.0
    r_th = _ramp(za, zt, zt + 60 * hs)
    back = (1 - r_th) * (v_vb - R_ap) + r_th * (v_canal + 4.0)
    k_cav = 1.0 - _ramp(za, z_t1 - 30 * hs, z_t1 + 40 * hs)
    cc, hd = (Bav + back) / 2, (Bav - back) / 2
    in_cav = k_cav > 0.03
    _egg_at(c, 0.0, cc, Av * k_cav, hd * k_cav, hd * k_cav, MEDIASTINUM, in_cav)
    dome = _dome(za, zt, 55 * hs)
    _paint_bowel(c, body, 0.0, cc, Av * dome, hd * dome, dome > 0.02)
    liver = _dome(za, zt, 70 * hs) * float(np.clip((T["s"] - 0.5) / 0.3, 0, 1))
    _egg_at(c, -0.45 * T["A"] + 0.45 * (2 + T["t_lat"]), T["v_vb"] + 0.45 * (T["Ba"] - 2 - T["t_ant"]),
            0.55 * (T["A"] - 2 - T["t_lat"]) * liver, 0.5 * (T["Ba"] - 2 - T["t_ant"]) * liver,
            0.5 * (T["Ba"] - 2 - T["t_ant"]) * liver, (0.8, body.ff_liver), liver > 0.02)

    # lungs from the diaphragm (just above the slab) to the apices above the first rib
    lung = np.sqrt(np.clip((za - (zt + 6.0)) / (60 * hs), 0, 1) * np.clip((z_t1 + 30 * hs - za) / (70 * hs), 0, 1))
    for side in (1.0, -1.0):
        _egg_at(c, side * 0.5 * Av * k_cav, cc - 0.05 * hd * k_cav, 0.47 * Av * k_cav * lung, 0.9 * hd * k_cav * lung,
                0.92 * hd * k_cav * lung, LUNG, in_cav & (lung > 0.02))
    # heart on the diaphragm, left of the midline; the chambers' blood inside the myocardium
    z_h, cz = zt + 80 * hs, 58 * hs
    hp = _dome(za, z_h, cz)
    hu, hv = 0.12 * Av, cc + 0.38 * hd
    ha, hb = np.minimum(52 * hs, 0.42 * Av) * hp, np.minimum(42 * hs, 0.45 * hd) * hp
    _egg_at(c, hu, hv, ha, hb, hb, MYOCARDIUM, hp > 0.05)
    _egg_at(c, hu, hv, ha - 9, hb - 9, hb - 9, BLOOD, hp > 0.05)
    # aorta: descending (moving beside the spine), arch, ascending; inferior vena cava into the right atrium
    z_arch = z_t1 - 40 * hs
    r_d = _ramp(za, zt, zt + 60 * hs)
    du = (1 - r_d) * 12.0 + r_d * (R_lat + 7.0)
    dv = (1 - r_d) * (v_vb + R_ap + 14.0) + r_d * v_vb
    _egg_at(c, du, dv, 11.0, 11.0, 11.0, BLOOD, za < z_arch)
    au_, av_ = -8.0 * hs, hv + 0.1 * hd
    _egg_at(c, au_, av_, 14 * hs, 14 * hs, 14 * hs, BLOOD, (za > z_h + 0.3 * cz) & (za < z_arch))
    _rod_at(c, (du, dv), (au_, av_), 12.0 * _dome(za, z_arch, 14 * hs), BLOOD)
    _egg_at(c, -20.0, T["v_vb"] + T["R_ap"] + 15.0, 12.0, 12.0, 12.0, BLOOD, za < z_h - 0.4 * cz)
    # oesophagus, trachea (air) from the carina up; neck vessels
    _egg_at(c, 3.0, v_vb + R_ap + 8.0, 7.0 * hs, 6.0 * hs, 6.0 * hs, (0.8, 0.05))
    _egg_at(c, 0.0, v_vb + R_ap + 22.0 * hs, 8.0 * hs, 8.0 * hs, 8.0 * hs, AIR, za > z_t1 - 70 * hs)
    neck = za > z_t1 - 35 * hs
    for side in (1.0, -1.0):
        _egg_at(c, side * (R_lat + 14 * hs), v_vb + R_ap + 6 * hs, 4.5 * hs, 4.5 * hs, 4.5 * hs, BLOOD, neck)
        _egg_at(c, side * (R_lat + 25 * hs), v_vb + R_ap + 2 * hs, 6.0 * hs, 6.0 * hs, 6.0 * hs, BLOOD, neck)

    # thoracic and cervical spine, canal and cord
    _paint_column(c, body, R_ap, R_lat, v_vb, ones > 0)
    canal = (1 - 0.2 * _ramp(za, zt, zt + 100 * hs)) * (1 + 0.2 * w_n)
    _paint_posterior(c, body, R_lat, v_canal, T["v_lamina"], T["v_mpost"], canal, ones > 0, cord=True)

    # ribs: a ring around the thoracic cavity, cut obliquely (each rib descends anteriorly), every 24 mm
    fade = _ramp(za, zt, zt + 30 * hs) * (1 - _ramp(za, z_t1, z_t1 + 20 * hs)) * in_cav
    sl = c.bbox(0.0, cc, np.maximum(Av, hd) * k_cav + 12.0, kmask=fade > 0)
    if sl is not None:
        uu, vv = c.uv(sl)
        kc = _col(k_cav, sl)
        ring = np.abs(_egg_sdf(uu, vv, 0.0, _col(cc, sl), _col(Av, sl) * kc + 6, _col(hd, sl) * kc + 6,
                               _col(hd, sl) * kc + 6)) - 3.5
        pitch = 24.0 * hs
        z_eff = _col(za, sl) + 0.45 * (vv - T["v_canal"])
        frac = (z_eff - z_t1) / pitch
        dist = np.abs(frac - np.floor(frac) - 0.5) * pitch
        cov = _coverage(ring, c.h) * _coverage(dist - 5.0, c.p.spacing[2]) * (np.abs(uu) > _col(R_lat, sl) + 8.0)
        c.paint(sl, cov * _col(fade, sl), CORTEX)
    sternum = (za > zt + 25 * hs) & (za < z_t1 - 10 * hs)
    sv = Ba - 2 - t_ant - 9.0
    _egg_at(c, 0.0, sv, 14 * hs, 5.0, 5.0, CORTEX, sternum)
    _egg_at(c, 0.0, sv, 12 * hs, 3.0, 3.0, (0.75, body.ff_marrow), sternum)
    for side in (1.0, -1.0):
        scap = (za > z_t1 - 150 * hs) & (za < z_t1 - 10 * hs)
        _rod_at(c, (side * (R_lat + 45 * hs), v_back + t_post + 28 * hs),
                (side * (Ai - 12 * hs), v_back + t_post + 60 * hs), 3.5, CORTEX, scap)
        clav = np.abs(za - (z_t1 + 5 * hs)) < 9.0 * hs
        _bone_rod(c, (side * 20 * hs, Ba - 2 - t_ant - 12.0), (side * (Ai - 22 * hs), 0.1 * Ba), 7.0 * hs,
                  (0.8, 0.6), clav)

    # the autochthonous back muscles continue upwards, thinner, as unlabelled muscle
    thinner = 1 - 0.3 * _ramp(za, zt, zt + 150 * hs) - 0.15 * _ramp(za, zt + 150 * hs, z_t1)
    Lc = {"auto_prof": T["auto_prof"] * thinner, "v_mpost": np.full(n, T["v_mpost"], np.float32), "hs": hs}
    _paint_muscles(c, body, _back_muscle_sdfs(c, body, Lc), body.muscle_share)


def _paint_lower(c: _Canvas, body: _Body) -> None:
    """Below the slab: the pelvis (sacrum, iliac wings, acetabula, pubic and ischial bones, bowel and bladder,
    iliac vessels, psoas and back muscles ending, gluteal muscles) and the thighs (two legs: skin, subcutaneous
    fat, muscle with intermuscular fat, femur with fatty marrow, femoral vessels). Profiles start from the slab's
    bottom slice."""
    za, hs, Bt, subj = c.za, body.hs, body.bot, body.subj
    n = za.size
    zb, z_hip, z_cr = body.zb, body.z_hip, body.z_crotch
    female = 1.0 - body.male
    r_p = _ramp(za, zb, z_hip)                                   # 0 at the slab, 1 at the hip joints
    A_p = Bt["A"] * (1 + (0.12 + 0.08 * female) * r_p)
    Ba_p = Bt["Ba"] * (1 - 0.18 * r_p)
    r_g = r_p * (1 - _ramp(za, z_cr, z_cr - 40 * hs))            # buttocks
    Bp_p = Bt["Bp"] + 22.0 * hs * r_g
    k_p = 1.0 - _ramp(za, z_hip - 20 * hs, z_cr)                # the pelvis closes: two legs remain
    t_lat, t_ant, t_post = Bt["t_lat"], Bt["t_ant"], Bt["t_post"] + 6.0 * female * r_g
    a_leg = body.a_leg * (1 - 0.22 * _ramp(za, z_cr, body.z_knee))
    b_leg = 0.9 * a_leg
    g_r = _ramp(za, z_hip, z_cr - 80 * hs)
    u_leg = a_leg + ((1 - g_r) * (-0.7 * a_leg) + g_r * body.leg_gap) / 2
    v_leg = -8.0 * hs
    leg_on = (za < z_hip + 20 * hs).astype(np.float32)
    t_leg = float(np.clip(7 + 1.5 * (subj.bmi - 22) + 8 * female, 3, 60))
    parts = [(0.0, (k_p > 0.02).astype(np.float32), 0.0, A_p * k_p, Ba_p * (0.4 + 0.6 * k_p), Bp_p * (0.4 + 0.6 * k_p),
              t_lat, t_ant, t_post)]
    parts += [(side * u_leg, leg_on, v_leg, a_leg, b_leg, b_leg, t_leg, t_leg, t_leg) for side in (1.0, -1.0)]
    _paint_layers(c, parts, body.generic_mfi)
    legs = leg_on > 0

    # hip joints and femora (where the thighs' muscles need them)
    A_hip = Bt["A"] * (1 + 0.12 + 0.08 * female) - 2 - t_lat
    r_t = 17.0 * hs
    u_hj = float(np.clip(0.6 * A_hip, 70 * hs, 95 * hs))
    u_gt = float(max(u_hj + 20 * hs, min(u_hj + 36 * hs, A_hip - 6 - r_t)))
    v_hip = 10.0 * hs
    r_h = 23.0 * hs
    t_f = np.clip((z_hip - 30 * hs - za) / (z_hip - 30 * hs - body.z_knee), 0, 1)
    u_f = (1 - t_f) * (u_gt - 8 * hs) + t_f * (u_leg + 0.08 * a_leg)         # |u| of the femoral shaft
    v_f = v_leg + 6 * hs
    shaft = za < z_hip - 30 * hs

    for side in (1.0, -1.0):
        # thigh muscle; intermuscular septa between the anterior (quadriceps), medial (adductors) and posterior
        # (hamstrings) compartments run from the femur out to the fascia
        m = a_leg - 2 - t_leg
        sl = c.bbox(side * u_leg, v_leg, m, kmask=legs & (m > 1))
        if sl is None:
            continue
        uu, vv = c.uv(sl)
        d = _egg_sdf(uu, vv, _col(side * u_leg, sl), v_leg, _col(np.maximum(m, 1), sl),
                     _col(np.maximum(0.9 * m, 1), sl), _col(np.maximum(0.9 * m, 1), sl))
        fu, al = _col(side * u_f, sl), _col(a_leg, sl)
        d_sep = np.full(d.shape, np.float32(1e3))
        for du, dv in ((0.95, -0.3), (-0.8, -0.6), (-0.25, -0.97)):
            d_sep = np.minimum(d_sep, _capsule_sdf(uu, vv, fu, v_f, fu + side * du * al, v_f + dv * al, 0.8))
        septa = _coverage(d_sep, c.h) * _col(shaft & (za < z_cr), sl)
        W, F = _muscle_wf(c, sl, body, body.muscle_share, septa)
        c.paint(sl, _coverage(d, c.h) * _col(legs, sl), W=W, F=F)

    # pelvic cavity: the bowel narrowing to the pelvic floor, the bladder in front
    Ai, Bai = A_p - 2 - t_lat, Ba_p - 2 - t_ant
    Av, Bav = Ai - 12.0, Bai - 12.0
    back = Bt["v_vb"] - Bt["R_ap"]
    k_c = (1 - 0.45 * r_p) * (1 - _ramp(za, z_hip, z_hip - 40 * hs))
    _paint_bowel(c, body, 0.0, (Bav + back) / 2, Av * k_c, (Bav - back) / 2 * k_c, k_c > 0.03)
    bl = body.bladder
    bp = _dome(za, z_hip + 5 * hs, 38 * hs * bl)
    _egg_at(c, 0.0, Bai - 12.0 - 33 * hs * bl * bp, 45 * hs * bl * bp, 33 * hs * bl * bp, 33 * hs * bl * bp, FLUID,
            bp > 0.05)

    yellow = YELLOW_MARROW
    red = (0.75, float(np.clip(body.ff_marrow + 0.1, 0.2, 0.8)))
    # vessels: iliac to femoral arteries and veins
    for side in (1.0, -1.0):
        start = (side * 16.0 * hs, Bt["v_vb"] + Bt["R_ap"] + 12.0)
        groin = (side * (u_hj - 8 * hs), v_hip + 30 * hs)
        thigh = (side * (u_leg - 0.35 * a_leg), v_leg + 0.45 * b_leg)
        r2 = _ramp(za, z_hip, z_cr)
        au_ = (1 - r_p) * start[0] + r_p * ((1 - r2) * groin[0] + r2 * thigh[0])
        av_ = (1 - r_p) * start[1] + r_p * ((1 - r2) * groin[1] + r2 * thigh[1])
        _egg_at(c, au_, av_, 5.5 * hs, 5.5 * hs, 5.5 * hs, BLOOD)
        _egg_at(c, au_ - side * 11 * hs, av_ - 3.0, 7.0 * hs, 7.0 * hs, 7.0 * hs, BLOOD)

    # muscles: gluteus maximus and medius, psoas into the pelvis, the back muscles ending on the sacrum
    gz = r_p * k_p
    gmed = _ramp(za, zb, zb - 40 * hs) * (1 - _ramp(za, z_hip + 10 * hs, z_hip - 30 * hs))
    sdfs = {}
    for key, side in (("l", 1.0), ("r", -1.0)):
        b_g = 32 * hs * (1 + 0.15 * body.male) * gz
        # under the fat where the outline's back lies at |u| = 0.45 A (0.89 of its depth at the midline)
        cu, cv_, au = side * 0.45 * A_p, -(0.89 * Bp_p * (0.4 + 0.6 * k_p) - 4 - t_post) + b_g, 0.38 * A_p * gz
        sl = c.bbox(cu, cv_, np.maximum(au, b_g) + 8, kmask=gz > 0.05)
        if sl is not None:
            uu, vv = c.uv(sl)
            sdfs["gmax" + key] = (sl, _egg_sdf(uu, vv, _col(cu, sl), _col(cv_, sl), _col(np.maximum(au, 1), sl),
                                               _col(np.maximum(b_g, 1), sl), _col(np.maximum(b_g, 1), sl)))
        cu, cv_, au, bv = side * (Ai - 24 * hs), Bt["v_vb"] - 5 * hs, 20 * hs * gmed, 34 * hs * gmed
        sl = c.bbox(cu, cv_, np.maximum(au, bv) + 8, kmask=gmed > 0.05)
        if sl is not None:
            uu, vv = c.uv(sl)
            sdfs["gmed" + key] = (sl, _egg_sdf(uu, vv, _col(cu, sl), cv_, _col(np.maximum(au, 1), sl),
                                               _col(np.maximum(bv, 1), sl), _col(np.maximum(bv, 1), sl)))
    _paint_muscles(c, body, sdfs, body.muscle_share)
    Lp = {"psoas_prof": Bt["psoas_prof"] * (1 - _ramp(za, zb, z_hip - 20 * hs)), "R_lat": Bt["R_lat"] + 30 * hs * r_p,
          "v_vb": Bt["v_vb"] + 35 * hs * r_p, "R_ap": np.full(n, Bt["R_ap"], np.float32),
          "s": np.full(n, Bt["s"], np.float32), "hs": hs,
          "auto_prof": Bt["auto_prof"] * (1 - _ramp(za, zb, min(zb, body.s1_low) - 50 * hs)),
          "v_mpost": np.full(n, Bt["v_mpost"], np.float32)}
    _paint_muscles(c, body, _back_muscle_sdfs(c, body, Lp, labels=(1, 2, 3, 4)), body.muscle_share)

    # lumbar spine down to S1 where the slab ends above it, then the sacrum curving back to the coccyx
    lumbar = za > body.s1_low
    _paint_column(c, body, Bt["R_ap"], Bt["R_lat"], Bt["v_vb"], lumbar)
    _paint_posterior(c, body, Bt["R_lat"], Bt["v_canal"], Bt["v_lamina"], Bt["v_mpost"], 1.0, lumbar, cord=False)
    t_s = np.clip((body.s1_low - za) / (100 * hs), 0, 1)
    sac = (za <= body.s1_low) & (t_s < 1)
    w_s, r_s = (Bt["R_lat"] + 26 * hs) * (1 - 0.75 * t_s), 13 * hs * (1 - 0.45 * t_s)
    v_s = Bt["v_vb"] - 30 * hs * np.sin(0.5 * np.pi * t_s)
    _bone_rod(c, (-(w_s - r_s), v_s), (w_s - r_s, v_s), r_s, red, sac)
    _egg_at(c, 0.0, v_s - 0.45 * r_s, 8.0, 4.0, 4.0, CSF, sac & (t_s < 0.6))
    z_il = min(z_hip + 20 * hs, zb - 50 * hs)
    t_i = np.clip((zb - za) / (zb - z_il), 0, 1)
    for side in (1.0, -1.0):
        wing = za >= z_il
        post = (side * (Bt["R_lat"] + 30 * hs), Bt["v_canal"] - 8 * hs + 12 * hs * t_i)
        ant = (side * ((1 - t_i) * (Ai - 18 * hs) + t_i * (u_hj + 6 * hs)),
               (1 - t_i) * (Bt["v_vb"] + 40 * hs) + t_i * (v_hip + 12 * hs))
        _bone_rod(c, post, ant, (5 + 8 * t_i) * hs, red, wing)
        hip = np.sqrt(np.clip((r_h + 7 * hs) ** 2 - (za - z_hip) ** 2, 0, None))
        _bone_egg(c, side * u_hj, v_hip, hip, hip, hip, red, hip > 1)                 # acetabulum
        head = np.sqrt(np.clip(r_h ** 2 - (za - z_hip) ** 2, 0, None))
        _bone_egg(c, side * u_hj, v_hip, head, head, head, (0.85, 0.75), head > 1)    # femoral head
        pub = (za > z_hip - 45 * hs) & (za < z_hip - 8 * hs)
        _bone_rod(c, (side * (u_hj - 12 * hs), v_hip + 14 * hs), (side * 7 * hs, Bai - 14 * hs), 8 * hs, red, pub)
        isch = (za > z_hip - 60 * hs) & (za < z_hip - 5 * hs)
        _bone_rod(c, (side * (u_hj - 8 * hs), v_hip - 16 * hs), (side * (u_hj - 30 * hs), v_hip - 42 * hs), 10 * hs,
                  red, isch)
        neck_r = 13 * hs * _dome(za, z_hip - 12 * hs, 22 * hs)
        _bone_rod(c, (side * u_hj, v_hip), (side * u_gt, v_hip - 8 * hs), neck_r, (0.85, 0.75), neck_r > 1)
        tro = r_t * _dome(za, z_hip - 30 * hs, 28 * hs)
        _bone_egg(c, side * u_gt, v_hip - 8 * hs, tro, tro, tro, (0.85, 0.75), tro > 1)
        _bone_egg(c, side * u_f, v_f, 14 * hs, 14 * hs, 14 * hs, yellow, shaft, cortex=5.5 * hs)


def _bias_outside(c: _Canvas, coef: np.ndarray, back: float, pose_z: tuple[float, float]) -> np.ndarray:
    """The slab's coil bias (:func:`_bias_field`, the same coefficients) on slices outside it, its z terms on the
    softly clamped z so that it stays within the range it has on the slab."""
    X = c.X / 200.0
    Y = c.Y / 200.0
    Z = _soft_clamp(c.Z, *pose_z) / 200.0
    logb = (coef[0] * X[:, None, None] + coef[1] * Y[None, :, None] + coef[2] * Z[None, None, :]
            + coef[3] * X[:, None, None] ** 2 + coef[4] * Y[None, :, None] ** 2 + coef[5] * Z[None, None, :] ** 2
            + coef[6] * X[:, None, None] * Y[None, :, None])
    spine_coil = 0.25 * np.exp(-np.clip(c.Y - back, 0, None) / 90.0)
    return (np.exp(logb) * (1.0 + spine_coil[None, :, None])).astype(np.float32)


def _render_outside(vols: dict, body: _Body, preset: Preset, pose: dict, k0: int, bias_coef, back: float,
                    sigma: float, gain: float, g: np.random.Generator) -> None:
    """Paint, bias and noise the whole-body slices outside the slab into ``vols`` (int16, whole-body grid), a few
    slices at a time, so memory stays that of a few slabs' worth of float32 whatever the volume's length."""
    nz, sz = preset.shape[2], preset.spacing[2]
    nz_wb = next(iter(vols.values())).shape[2]
    pose_z = (float((0 - (nz - 1) / 2) * sz), float((nz - 1 - (nz - 1) / 2) * sz))
    chunk = max(4, int(round(72.0 / sz)))
    regions = ((np.arange(-k0, 0), _paint_lower), (np.arange(nz, nz_wb - k0), _paint_upper))
    for ks_all, painter in regions:
        for j in range(0, ks_all.size, chunk):
            ks = ks_all[j:j + chunk]
            c = _Canvas(preset, pose, ks, pose_z=pose_z)
            painter(c, body)
            del c.u, c.v
            bias = _bias_outside(c, bias_coef, back, pose_z)
            shape = c.shape

            def rician(sig):
                re = sig * bias * gain + sigma * g.standard_normal(shape, dtype=np.float32)
                im = sigma * g.standard_normal(shape, dtype=np.float32)
                return np.sqrt(re * re + im * im)

            sl = (slice(None), slice(None), slice(int(ks[0]) + k0, int(ks[-1]) + k0 + 1))
            vols["water"][sl] = _to_i16(rician(c.W))
            vols["fat"][sl] = _to_i16(rician(c.F))
            if "in" in vols:
                vols["in"][sl] = _to_i16(rician(c.W + c.F))
                vols["opp"][sl] = _to_i16(rician(np.abs(c.W - c.F)))
