"""Findings: parsing ``TYPE[:key=value,...]``, drawing unspecified parameters from the seed, and painting them.

Size ranges are clinical ones (Fleischner nodules 5-30 mm, stones 2-15 mm, ...).  Visibility limits (documented in
``FINDING_TYPES[...]['limits']``): a finding smaller than about half the slice spacing is averaged away by partial
volume -- a 2 mm stone at 5 mm slices peaks at ~40 % of its HU and may label no voxel at all (then
``Finding.visible`` is False and ``voxels`` is 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .anatomy import LABEL_IDS, LOBE_SIDE, LUNG_LOBES, Anatomy, Modifiers
from .geometry import (BelowDome, Canvas, Capsule, Complement, Ellipsoid, HalfSpace, Intersection, Union, ZTube,
                       rotation_from_axis)
from .texture import TextureField

SIDES = ("left", "right")
AMOUNTS = ("small", "moderate", "large")

# type -> parameter name -> (kind, choices or (lo, hi)); 'limits' documents what the sampling can show
FINDING_TYPES: dict[str, dict[str, Any]] = {
    "lung_nodule": {"params": {"lobe": ("choice", LUNG_LOBES), "size_mm": ("float", (5.0, 30.0)),
                               "kind": ("choice", ("solid", "subsolid", "part_solid")), "hu": ("float", None)},
                    "limits": "nodules < slice spacing lose contrast; < 0.5x slice spacing may vanish"},
    "pleural_effusion": {"params": {"side": ("choice", SIDES), "amount": ("choice", AMOUNTS), "hu": ("float", (0.0, 25.0))},
                         "limits": "posterior dependent layer; visible at any sampling"},
    "pneumothorax": {"params": {"side": ("choice", SIDES), "amount": ("choice", AMOUNTS)},
                     "limits": "small (~1 cm rim) needs in-plane pixels < 3 mm"},
    "emphysema": {"params": {"severity": ("choice", ("mild", "moderate", "severe")),
                             "distribution": ("choice", ("upper", "diffuse"))},
                  "limits": "low-attenuation clusters ~5-15 mm; smoothed away at > 5 mm sampling"},
    "consolidation": {"params": {"lobe": ("choice", LUNG_LOBES), "extent": ("choice", ("segmental", "lobar")),
                                 "hu": ("float", (20.0, 50.0))},
                      "limits": "visible at any sampling"},
    "liver_lesion": {"params": {"size_mm": ("float", (5.0, 60.0)), "kind": ("choice", ("cyst", "metastasis")),
                                "hu": ("float", None)},
                     "limits": "lesions < 10 mm need slices <= 5 mm; cyst contrast ~50 HU, metastasis ~25 HU"},
    "kidney_stone": {"params": {"side": ("choice", SIDES), "size_mm": ("float", (2.0, 15.0)),
                                "hu": ("float", (500.0, 1500.0))},
                     "limits": "a 2 mm stone at 5 mm slices peaks near 40% of its HU and may label no voxel"},
    "splenomegaly": {"params": {"scale": ("float", (1.3, 1.8))},
                     "limits": "visible at any sampling (spleen length > 130 mm)"},
    "ascites": {"params": {"amount": ("choice", AMOUNTS), "hu": ("float", (0.0, 20.0))},
                "limits": "small (5 mm rim) needs pixels <= 2.5 mm"},
    "pericardial_effusion": {"params": {"amount": ("choice", AMOUNTS), "hu": ("float", (5.0, 25.0))},
                             "limits": "small (5 mm) needs pixels <= 2.5 mm"},
    "lymph_node": {"params": {"station": ("choice", ("subcarinal", "paratracheal_right", "aortopulmonary",
                                                     "retroperitoneal")),
                              "size_mm": ("float", (10.0, 30.0)), "hu": ("float", (30.0, 50.0))},
                   "limits": "short axis >= 10 mm (pathological); visible at any sampling"},
}
GLOBAL_TYPES = {"splenomegaly", "emphysema", "ascites", "pericardial_effusion"}  # at most one each


@dataclass
class FindingSpec:
    """A requested finding: type + the parameters given (others are drawn from the seed)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_text(self) -> str:
        if not self.params:
            return self.type
        return self.type + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))


@dataclass
class Finding:
    """A finding as rendered (ground truth)."""

    index: int  # value in the finding mask (1-based)
    type: str
    location: str  # lobe / organ / side / station
    size_mm: float
    center_xyz_anat: tuple[float, float, float]  # anatomical frame (patient LPS minus the table offset)
    hu: float
    params: dict[str, Any]
    voxels: int = 0
    visible: bool = False
    note: str = ""
    center_patient: tuple[float, float, float] = (0.0, 0.0, 0.0)  # DICOM patient LPS mm, filled by generate_study
    center_voxel: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (z, y, x) index, filled by generate_study

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "type": self.type, "location": self.location, "size_mm": round(self.size_mm, 2),
                "center_patient_mm": [round(v, 2) for v in self.center_patient],
                "center_voxel_zyx": [round(v, 2) for v in self.center_voxel], "hu": round(self.hu, 1),
                "voxels": self.voxels, "visible": self.visible, "note": self.note, "params": self.params}


def parse_finding(text: str) -> FindingSpec:
    """``lung_nodule:lobe=lung_upper_lobe_right,size_mm=8`` -> FindingSpec; ValueError with the allowed values."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in FINDING_TYPES:
        raise ValueError(f"unknown finding type {name!r}; known: {', '.join(sorted(FINDING_TYPES))}")
    spec = FINDING_TYPES[name]["params"]
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in spec:
            raise ValueError(f"{name}: unknown parameter {item!r}; known: {', '.join(spec)}")
        params[key] = _convert(name, key, value)
    return FindingSpec(name, params)


def _convert(name: str, key: str, value: Any) -> Any:
    kind, rng = FINDING_TYPES[name]["params"][key]
    if kind == "choice":
        if value not in rng:
            raise ValueError(f"{name}: {key}={value!r} not one of {', '.join(rng)}")
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {key}={value!r} is not a number") from None
    if rng is not None and key != "hu" and not (rng[0] * 0.5 <= v <= rng[1] * 1.5):
        raise ValueError(f"{name}: {key}={v} outside the supported range {rng[0]}-{rng[1]} (x0.5-x1.5 tolerated)")
    return v


def resolve_params(fs: FindingSpec, rng: np.random.Generator) -> dict[str, Any]:
    """All parameters of a finding: given ones checked, missing ones drawn from ``rng``."""
    out: dict[str, Any] = {}
    for key, (kind, choices) in FINDING_TYPES[fs.type]["params"].items():
        if key in fs.params:
            out[key] = _convert(fs.type, key, fs.params[key])
        elif kind == "choice":
            out[key] = str(choices[int(rng.integers(len(choices)))])
        elif choices is not None:
            lo, hi = choices
            # sizes: log-uniform so small findings (the hard, common ones) are frequent
            out[key] = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if key == "size_mm" else float(rng.uniform(lo, hi))
    return out


def modifiers_for(findings: list[tuple[int, str, dict[str, Any]]]) -> Modifiers:
    """Anatomy changes (splenomegaly, lung collapse) from resolved findings."""
    mod = Modifiers()
    for index, kind, params in findings:
        if kind == "splenomegaly":
            mod.spleen_scale = float(params["scale"])
        elif kind == "pneumothorax":
            mod.lung_collapse[params["side"]] = {"small": 0.9, "moderate": 0.78, "large": 0.6}[params["amount"]]
            mod.pneumothorax_finding[params["side"]] = index
    return mod


# --------------------------------------------------------------------------------------------------------------
def _sphere_points(center: np.ndarray, r: float) -> np.ndarray:
    dirs = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1],
                     [1, 1, 1], [1, 1, -1], [1, -1, 1], [1, -1, -1], [-1, 1, 1], [-1, 1, -1], [-1, -1, 1], [-1, -1, -1]],
                    float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.vstack([center[None], center[None] + dirs * r])


def _lobe_bounds(anat: Anatomy, lobe: str) -> np.ndarray:
    b = anat.lung(LOBE_SIDE[lobe]).bounds()
    return np.asarray(b, float)


class FindingPainter:
    """Paints resolved findings into a canvas; returns ``Finding`` records."""

    def __init__(self, anat: Anatomy, canvas: Canvas, seed_seq: list[int]):
        self.anat = anat
        self.cv = canvas
        self.seed_seq = seed_seq
        # focal findings painted so far: later ones do not paint over them (emphysema is background, not protected)
        self.protected: list[int] = list(anat.mod.pneumothorax_finding.values())

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng(self.seed_seq + [index, 7])

    def paint(self, index: int, kind: str, params: dict[str, Any]) -> Finding:
        fn = getattr(self, f"_paint_{kind}")
        f: Finding = fn(index, params, self.rng_for(index))
        f.voxels = int((self.cv.findings == index).sum())
        f.visible = f.voxels > 0
        if kind != "emphysema":
            self.protected.append(index)
        return f

    def _cv_paint(self, shape, hu, label=None, **kw) -> int:
        return self.cv.paint(shape, hu, label, protect=self.protected, **kw)

    def _labels_at(self, pts: np.ndarray) -> np.ndarray:
        """Current label (255 outside the grid, 254 where a protected finding is) at the voxels nearest to points."""
        g = self.cv.grid
        i = np.round((pts[:, 0] - g.origin[0]) / g.spacing[2]).astype(int)
        j = np.round((pts[:, 1] - g.origin[1]) / g.spacing[1]).astype(int)
        k = np.round((pts[:, 2] - g.origin[2]) / g.spacing[0]).astype(int)
        inside = (i >= 0) & (i < g.shape[2]) & (j >= 0) & (j < g.shape[1]) & (k >= 0) & (k < g.shape[0])
        out = np.full(len(pts), 255, np.int32)
        ii, jj, kk = i[inside], j[inside], k[inside]
        lab = self.cv.labels[kk, jj, ii].astype(np.int32)
        lab[np.isin(self.cv.findings[kk, jj, ii], self.protected)] = 254
        out[inside] = lab
        return out

    def _place(self, bounds: np.ndarray, r: float, ok_labels: list[int], rng: np.random.Generator,
               analytic=None, tries: int = 800) -> np.ndarray | None:
        """Random centre whose sphere (radius r) lies inside the allowed labels of the SAMPLED grid (so the finding
        is in the field of view and not under an earlier finding) and, if given, inside an analytic shape test."""
        g = self.cv.grid
        lo = np.maximum(bounds[:, 0], [g.xs[0], g.ys[0], g.zs[0]])
        hi = np.minimum(bounds[:, 1], [g.xs[-1], g.ys[-1], g.zs[-1]])
        if np.any(hi < lo):
            return None
        for _ in range(tries):
            c = rng.uniform(lo, hi)
            pts = _sphere_points(c, r)
            if not np.all(np.isin(self._labels_at(pts), ok_labels)):
                continue
            if analytic is not None and not np.all(analytic(pts)):
                continue
            return c
        return None

    def _best_spot(self, center: np.ndarray, r: float, ok_labels: list[int], rng: np.random.Generator,
                   jitter: float = 15.0, n: int = 60) -> np.ndarray:
        """Of ``n`` candidates around ``center``, the one whose sphere holds the most allowed-label voxels."""
        offsets = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], float) * (r * 0.6)
        best, best_score = center, -1.0
        for m in range(n):
            c = center + (rng.normal(0, jitter / 2, 3) if m else 0)
            score = float(np.isin(self._labels_at(c + offsets), ok_labels).mean())
            if score > best_score:
                best, best_score = c, score
        return best

    # lungs ---------------------------------------------------------------------------------------------------
    def _lobe_test(self, lobe: str):  # analytic lobe membership (independent of the sampling)
        return lambda pts: np.array([lb == lobe for lb in self.anat.lobe_of_points(pts)])

    def _paint_lung_nodule(self, index, params, rng) -> Finding:
        lobe, d = params["lobe"], float(params["size_mm"])
        kind = params["kind"]
        hu = params.get("hu")
        if hu is None:
            hu = {"solid": rng.uniform(20, 60), "subsolid": rng.uniform(-650, -350), "part_solid": rng.uniform(-600, -400)}[kind]
            params["hu"] = float(hu)
        r = d / 2
        lid = [LABEL_IDS[lobe]]
        c = self._place(_lobe_bounds(self.anat, lobe), r + 2.0, lid, rng, analytic=self._lobe_test(lobe))
        note = ""
        if c is None:  # lobe too small for this nodule (collapsed lung, effusion, thick slices): largest that fits
            for shrink in (0.75, 0.5, 0.3, 0.0):
                c = self._place(_lobe_bounds(self.anat, lobe), r * shrink, lid, rng)
                if c is not None:
                    break
            note = "placed partly outside the lobe (did not fit)"
        if c is None:
            return Finding(index, "lung_nodule", lobe, d, (0.0, 0.0, 0.0), hu, params, note="no room in the lobe")
        radii = r * rng.uniform(0.88, 1.12, 3)
        R = rotation_from_axis(rng.normal(size=3))
        lobes = [LABEL_IDS[n] for n in LUNG_LOBES]
        shape = Ellipsoid(c, radii, rotation=R, wobble=0.07 if kind == "solid" else 0.04,
                          wobble_phase=rng.uniform(0, 6.28, 3))
        self._cv_paint(shape, hu, only_labels=lobes, finding=index)
        if kind == "part_solid":
            self._cv_paint(Ellipsoid(c, radii * 0.4, rotation=R), rng.uniform(20, 50), only_labels=lobes)
        return Finding(index, "lung_nodule", lobe, d, tuple(c), float(hu), params, note=note)

    def _paint_consolidation(self, index, params, rng) -> Finding:
        lobe = params["lobe"]
        lid = LABEL_IDS[lobe]
        hu = float(params["hu"])
        if params["extent"] == "lobar":
            b = _lobe_bounds(self.anat, lobe)
            region = Ellipsoid(b.mean(1), (b[:, 1] - b[:, 0]))  # covers the whole lung; the lobe label restricts
            c = None
            r = 40.0
        else:
            r = float(rng.uniform(18, 35))
            c = self._place(_lobe_bounds(self.anat, lobe), r * 0.5, [lid], rng)
            if c is None:
                c = self._place(_lobe_bounds(self.anat, lobe), 0.0, [lid], rng)
            if c is None:
                return Finding(index, "consolidation", lobe, 2 * r, (0.0, 0.0, 0.0), hu, params, note="no room in the lobe")
            region = Ellipsoid(c, r * rng.uniform(0.8, 1.2, 3), wobble=0.08, wobble_phase=rng.uniform(0, 6.28, 3))
        self._cv_paint(region, hu, only_labels=[lid], finding=index)
        mask = self.cv.findings == index
        zz, yy, xx = np.nonzero(mask)
        if len(zz) == 0:
            return Finding(index, "consolidation", lobe, 2 * r, (0.0, 0.0, 0.0), hu, params, note="lobe not in the sampled grid")
        g = self.cv.grid
        cen = np.array([g.xs[xx].mean(), g.ys[yy].mean(), g.zs[zz].mean()])
        ext = np.array([np.ptp(g.xs[xx]), np.ptp(g.ys[yy]), np.ptp(g.zs[zz])])
        # air bronchograms: air tubes running from the hilum side through the consolidation
        side = LOBE_SIDE[lobe]
        h = self.anat.hilum[side]
        for _ in range(3):
            target = cen + rng.normal(0, 0.25, 3) * ext
            d = target - h
            cap = Capsule(h + d * 0.3, target + d * 0.3, 2.8, 1.2)
            self._cv_paint(Intersection([cap, region]), -920.0, only_labels=[lid])
        return Finding(index, "consolidation", lobe, float(ext.max()), tuple(cen), hu, params)

    def _paint_emphysema(self, index, params, rng) -> Finding:
        frac = {"mild": 0.06, "moderate": 0.15, "severe": 0.3}[params["severity"]]
        lobes = np.array([LABEL_IDS[n] for n in LUNG_LOBES], np.uint8)
        g = self.cv.grid
        lung = np.isin(self.cv.labels, lobes)
        if not lung.any():
            return Finding(index, "emphysema", "lungs", 0.0, (0.0, 0.0, 0.0), -960.0, params, note="no lung in grid")
        field = TextureField(g, rng, np.array([[-260, 260], [-260, 260], [-190, 170]], float)).volume()
        if params["distribution"] == "upper":  # centrilobular: upper-lobe predominant
            field += np.clip((g.zs - g.zs.mean()) / 80.0, -1.5, 1.5)[:, None, None]
        thr = np.quantile(field[lung], 1 - frac)
        w = np.clip((field - thr) * 3.0, 0, 1) * lung
        self.cv.hu += w * (-975.0 - self.cv.hu)
        em = w >= 0.5
        self.cv.findings[em] = index
        zz, yy, xx = np.nonzero(em)
        cen = (float(g.xs[xx].mean()), float(g.ys[yy].mean()), float(g.zs[zz].mean())) if len(zz) else (0.0, 0.0, 0.0)
        params["lung_fraction"] = round(float(em.sum()) / max(int(lung.sum()), 1), 3)
        return Finding(index, "emphysema", "lungs", 0.0, cen, -975.0, params)

    def _paint_pleural_effusion(self, index, params, rng) -> Finding:
        side = params["side"]
        depth = {"small": rng.uniform(12, 25), "moderate": rng.uniform(35, 55), "large": rng.uniform(70, 100)}[params["amount"]]
        hu = float(params["hu"])
        anat = self.anat
        post = anat.p.offset_y + anat.at(anat.cav_ay, -40)
        z0 = anat.p.dome_right - 30
        # fluid surface: a plane tilted so the layer thins towards the apex (meniscus), supine -> posterior
        normal = np.array([0.0, -1.0, 0.35])  # fluid where y >= y0 + 0.35 (z - z0): thick at the base, none at the apex
        p0 = np.array([0.0, post - depth, z0])
        hemi = anat.lungs_full[side]
        lobes = [LABEL_IDS[n] for n in LUNG_LOBES if LOBE_SIDE[n] == side]
        # compressive atelectasis: the lung just above the fluid is denser
        self._cv_paint(Intersection([hemi, HalfSpace(p0 - np.array([0, 6.0, 0]), normal)]), -150.0, only_labels=lobes)
        self._cv_paint(Intersection([hemi, HalfSpace(p0, normal)]), hu, 0, only_labels=lobes, finding=index)
        center = np.array([anat.hilum[side][0] + (-30 if side == "right" else 30), post - depth / 2, z0])
        params["depth_mm"] = round(float(depth), 1)
        return Finding(index, "pleural_effusion", side, float(depth), tuple(center), hu, params)

    def _paint_pneumothorax(self, index, params, rng) -> Finding:
        # the anatomy already collapsed the lung and filled the rim with air (Modifiers)
        side = params["side"]
        c, f = self.anat.collapse_transform(side)
        lateral = self.anat.at(self.anat.cav_ax, 40.0) - abs(c[0] - self.anat.p.offset_x)
        rim = (1 - f) * (lateral + 40)
        center = c + np.array([(-1 if side == "right" else 1) * lateral * 0.9, -20.0, 30.0])
        params["lung_fraction_linear"] = f
        return Finding(index, "pneumothorax", side, float(rim), tuple(center), -1000.0, params)

    # mediastinum / abdomen -------------------------------------------------------------------------------------
    def _paint_pericardial_effusion(self, index, params, rng) -> Finding:
        t = {"small": 5.0, "moderate": 10.0, "large": 18.0}[params["amount"]]
        hu = float(params["hu"])
        heart = self.anat.heart_shape()
        spine_front = HalfSpace((0, self.anat.y_vb(float(heart.center[2])) - 22, 0), (0, 1, 0))
        shell = Intersection([self.anat.heart_shape(grow=t), Complement(heart), spine_front])
        allowed = [0, LABEL_IDS["torso_fat"]] + [LABEL_IDS[n] for n in LUNG_LOBES]
        self._cv_paint(shell, hu, 0, only_labels=allowed, finding=index)
        return Finding(index, "pericardial_effusion", "pericardium", t, tuple(map(float, heart.center)), hu, params)

    def _paint_ascites(self, index, params, rng) -> Finding:
        t = {"small": 5.0, "moderate": 15.0, "large": 30.0}[params["amount"]]
        hu = float(params["hu"])
        anat = self.anat
        shrunk = Intersection([ZTube(anat.zk, anat.cx, anat.cy, anat.cav_ax - 4 - t, anat.cav_ay - 4 - t),
                               Union([BelowDome(d.x0, d.y0, d.z0 - 5 - t, d.kx, d.ky) for d in anat.dome.values()])])
        peritoneal = HalfSpace((0, anat.y_vb(-100) - 5, 0), (0, 1, 0))  # in front of the retroperitoneum
        band = Intersection([anat.abdomen, Complement(shrunk), peritoneal])
        allowed = [0] + [LABEL_IDS[n] for n in ("torso_fat", "liver", "spleen", "colon", "small_bowel")]
        self._cv_paint(band, hu, 0, only_labels=allowed, finding=index)
        c = (anat.p.offset_x - 60.0, anat.p.offset_y - 40.0, -120.0)
        return Finding(index, "ascites", "peritoneum", t, c, hu, params)

    def _paint_splenomegaly(self, index, params, rng) -> Finding:
        shape = self.anat.spleen_shape()
        self._cv_paint(shape, None, only_labels=[LABEL_IDS["spleen"]], finding=index)
        length = 2 * 52 * self.anat.p.spleen_scale * float(params["scale"])
        return Finding(index, "splenomegaly", "spleen", float(length), tuple(shape.parts[0].center), 48.0, params,
                       note="size_mm = craniocaudal length")

    def _paint_liver_lesion(self, index, params, rng) -> Finding:
        d = float(params["size_mm"])
        hu = params.get("hu")
        if hu is None:
            hu = rng.uniform(0, 12) if params["kind"] == "cyst" else rng.uniform(22, 40)
            params["hu"] = float(hu)
        liver = self.anat.liver_shape()
        b = np.asarray(liver.bounds(), float)
        b = np.stack([np.maximum(b[:, 0], [-400, -400, -170]), np.minimum(b[:, 1], [400, 400, 150])], 1)
        liver_id = [LABEL_IDS["liver"]]
        c = self._place(b, d / 2 + 3, liver_id, rng)
        if c is None:  # a large lesion near the capsule may bulge the contour
            c = self._place(b, d / 4, liver_id, rng)
        if c is None:
            return Finding(index, "liver_lesion", "liver", d, (0.0, 0.0, 0.0), hu, params, note="no room in the liver")
        cyst = params["kind"] == "cyst"
        shape = Ellipsoid(c, d / 2 * rng.uniform(0.9, 1.1, 3), wobble=0.0 if cyst else 0.08,
                          wobble_phase=rng.uniform(0, 6.28, 3))
        self._cv_paint(shape, hu, only_labels=[LABEL_IDS["liver"]], finding=index)
        return Finding(index, "liver_lesion", "liver", d, tuple(c), float(hu), params)

    def _paint_kidney_stone(self, index, params, rng) -> Finding:
        side, d, hu = params["side"], float(params["size_mm"]), float(params["hu"])
        shape, sinus = self.anat.kidney_shapes()[side]
        kid = [LABEL_IDS[f"kidney_{side}"]]
        for attempt in range(60):  # in the collecting system, not on top of another stone
            c = sinus + rng.normal(0, 1, 3) * np.array([3.0, 3.0, 12.0]) * (1 + attempt / 20)
            if np.all(np.isin(self._labels_at(_sphere_points(c, d / 4)), kid)):
                break
        stone = Ellipsoid(c, d / 2 * rng.uniform(0.8, 1.1, 3), rotation=rotation_from_axis(rng.normal(size=3)))
        self._cv_paint(stone, hu, only_labels=[LABEL_IDS[f"kidney_{side}"]], finding=index)
        dz = self.cv.grid.spacing[0]
        params["expected_peak_hu"] = round(float(hu * min(1.0, d / dz) * min(1.0, d / max(self.cv.grid.spacing[1:]))), 0)
        note = "smaller than the slice spacing: partial-volume averaged" if d < dz else ""
        return Finding(index, "kidney_stone", f"kidney_{side}", d, tuple(c), hu, params, note=note)

    def _paint_lymph_node(self, index, params, rng) -> Finding:
        anat = self.anat
        d, hu = float(params["size_mm"]), float(params["hu"])
        ox = anat.p.offset_x
        zc = anat.level_center("T4") - 14  # carina
        yc = anat.y_vb(zc)
        where = {
            "subcarinal": (ox + 2, yc - 30, zc - 18),
            "paratracheal_right": (ox - 16, yc - 52, zc + 22),
            "aortopulmonary": (ox + 22, yc - 45, zc + 2),
            "retroperitoneal": (ox - 8, anat.y_vb(-115) - 24, -115.0),
        }[params["station"]]
        allowed = [0, LABEL_IDS["torso_fat"]] + [LABEL_IDS[n] for n in LUNG_LOBES]
        c = self._best_spot(np.asarray(where, float), d / 2, [0, LABEL_IDS["torso_fat"]], rng)
        shape = Ellipsoid(c, (d / 2, d / 2 * 0.9, d / 2 * 1.4), wobble=0.04, wobble_phase=rng.uniform(0, 6.28, 3))
        self._cv_paint(shape, hu, 0, only_labels=allowed, finding=index)
        return Finding(index, "lymph_node", params["station"], d, tuple(c), hu, params, note="size_mm = short axis")


PAINT_ORDER = ["emphysema", "pleural_effusion", "pneumothorax", "pericardial_effusion", "ascites", "splenomegaly",
               "consolidation", "lung_nodule", "liver_lesion", "kidney_stone", "lymph_node"]
