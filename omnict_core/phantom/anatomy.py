"""Chest + upper-abdomen anatomy built from analytic shapes in patient mm.

The anatomical frame: x to the patient's left, y posterior, z superior (DICOM LPS directions); z = 0 is mid-chest,
the fixed scan range is [-170, +150] mm (thoracic inlet to the lower poles of the kidneys, L2/L3).  The phantom is
sampled on whatever grid is asked for, so 32 slices and 300 slices show the same patient.

Label ids are FIXED across all studies (``LABELS``) and named as TotalSegmentator names its classes, so a model can
be trained on the phantom label map exactly as on TotalSegmentator masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import (BIG, BelowDome, Bounded, Canvas, Capsule, Ellipsoid, HalfSpace, Intersection, Scaled, Shape,
                       Union, ZTube, rotation_from_axis, rotation_z)

Z_MIN, Z_MAX = -170.0, 150.0  # default scan range in the anatomical frame (mm)

_LABEL_LIST = [
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
    "lung_lower_lobe_right", "trachea", "esophagus", "heart", "aorta", "pulmonary_artery", "superior_vena_cava",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "liver", "gallbladder", "spleen", "stomach", "pancreas",
    "kidney_left", "kidney_right", "adrenal_gland_left", "adrenal_gland_right", "spinal_cord", "sternum",
    "costal_cartilages", "clavicula_left", "clavicula_right", "scapula_left", "scapula_right", "autochthon_left",
    "autochthon_right", "iliopsoas_left", "iliopsoas_right", "subcutaneous_fat", "skeletal_muscle", "torso_fat",
    "colon", "small_bowel", "duodenum", "urinary_bladder",
]
VERTEBRA_LEVELS = [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
_LABEL_LIST += [f"vertebrae_{lv}" for lv in VERTEBRA_LEVELS]
_LABEL_LIST += [f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]

#: label id -> TotalSegmentator-style name (0 = background / unnamed tissue).  Fixed for every study.
LABELS: dict[int, str] = {i + 1: name for i, name in enumerate(_LABEL_LIST)}
LABEL_IDS: dict[str, int] = {name: i for i, name in LABELS.items()}
LUNG_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
              "lung_lower_lobe_right")
LOBE_SIDE = {"lung_upper_lobe_left": "left", "lung_lower_lobe_left": "left", "lung_upper_lobe_right": "right",
             "lung_middle_lobe_right": "right", "lung_lower_lobe_right": "right"}

#: label -> (mean HU, smooth-texture amplitude HU).  Non-contrast values.
TISSUE = {
    "fat": (-100.0, 8.0), "muscle": (45.0, 6.0), "skin": (30.0, 5.0), "blood": (40.0, 3.0), "liver": (60.0, 5.0),
    "spleen": (48.0, 4.0), "kidney": (32.0, 4.0), "pancreas": (38.0, 12.0), "lung": (-860.0, 25.0),
    "cortical": (850.0, 60.0), "cancellous": (230.0, 40.0), "cartilage": (130.0, 20.0), "csf": (12.0, 3.0),
    "cord": (35.0, 3.0), "fluid": (12.0, 3.0), "air": (-1000.0, 0.0), "bile": (8.0, 2.0), "wall": (40.0, 4.0),
    "disc": (85.0, 8.0),
}
# per-label amplitude of the smooth tissue texture (applied after painting, see texture.py)
TEXTURE_AMPLITUDE = np.zeros(256, np.float32)
for _name, _amp in [("liver", 5), ("spleen", 4), ("kidney_left", 4), ("kidney_right", 4), ("pancreas", 12),
                    ("subcutaneous_fat", 8), ("torso_fat", 10), ("skeletal_muscle", 6), ("autochthon_left", 6),
                    ("autochthon_right", 6), ("iliopsoas_left", 6), ("iliopsoas_right", 6), ("heart", 3),
                    ("stomach", 6), ("colon", 15), ("small_bowel", 10), ("esophagus", 4)]:
    TEXTURE_AMPLITUDE[LABEL_IDS[_name]] = _amp
for _lobe in LUNG_LOBES:
    TEXTURE_AMPLITUDE[LABEL_IDS[_lobe]] = 25
for _name in LABEL_IDS:
    if _name.startswith(("vertebrae_", "rib_", "sternum", "clavicula", "scapula")):
        TEXTURE_AMPLITUDE[LABEL_IDS[_name]] = 45


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


@dataclass
class Patient:
    """Seeded patient variation (sizes in mm, factors ~1)."""

    sex: str
    age: int
    half_width: float  # body half width at mid chest (x)
    half_depth: float  # body half depth at mid chest (y)
    belly: float  # extra abdominal depth factor
    fat_mm: float
    muscle_mm: float
    offset_x: float
    offset_y: float
    vertebra_scale: float
    t1_top: float
    dome_right: float
    dome_left: float
    heart_scale: float
    liver_scale: float
    spleen_scale: float
    kidney_scale: float
    organ_jitter: dict[str, np.ndarray] = field(default_factory=dict)
    fissure_jitter: np.ndarray = field(default_factory=lambda: np.zeros(4))
    wobble_phase: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Patient":
        sex = "M" if rng.random() < 0.5 else "F"
        size = _u(rng, 0.9, 1.1) * (1.0 if sex == "M" else 0.93)
        jitter = {name: rng.normal(0, 6.0, 3) for name in
                  ("heart", "liver", "spleen", "stomach", "kidney_left", "kidney_right", "pancreas", "gallbladder",
                   "aorta", "lung_left", "lung_right")}
        return cls(
            sex=sex, age=int(rng.integers(25, 86)), half_width=165 * size * _u(rng, 0.94, 1.06),
            half_depth=112 * size * _u(rng, 0.92, 1.08), belly=_u(rng, -0.05, 0.2), fat_mm=_u(rng, 6, 30),
            muscle_mm=_u(rng, 9, 15), offset_x=_u(rng, -10, 10), offset_y=_u(rng, -15, 15),
            vertebra_scale=_u(rng, 0.94, 1.06), t1_top=_u(rng, 150, 166), dome_right=_u(rng, -42, -20),
            dome_left=0.0, heart_scale=_u(rng, 0.9, 1.1), liver_scale=_u(rng, 0.9, 1.1),
            spleen_scale=_u(rng, 0.85, 1.1), kidney_scale=_u(rng, 0.9, 1.1), organ_jitter=jitter,
            fissure_jitter=rng.normal(0, 1, 4), wobble_phase=rng.uniform(0, 2 * np.pi, 3),
        )

    def __post_init__(self) -> None:
        if not self.dome_left:
            self.dome_left = self.dome_right - 12.0


@dataclass
class Modifiers:
    """Anatomy changes requested by findings (applied while building, not painted on top)."""

    spleen_scale: float = 1.0
    lung_collapse: dict[str, float] = field(default_factory=dict)  # side -> remaining lung fraction (linear)
    pneumothorax_finding: dict[str, int] = field(default_factory=dict)  # side -> finding index for the air rim


# ---------------------------------------------------------------------------------------------------------------
class Anatomy:
    """Shapes of one patient; ``paint(canvas)`` renders it.  Findings query the shapes to place lesions."""

    def __init__(self, patient: Patient, rng: np.random.Generator, modifiers: Modifiers | None = None):
        self.p = patient
        self.rng = rng  # anatomy stream only: the same seed gives the same anatomy whatever the findings
        self.mod = modifiers or Modifiers()
        self._build_profiles()
        self._build_spine()
        self._build_lungs()

    # ----- body profile -------------------------------------------------------------------------------------
    def _build_profiles(self) -> None:
        p = self.p
        self.zk = np.array([-175.0, -110, -50, 10, 70, 120, 160])
        wf = np.array([1.0, 1.0, 1.0, 0.98, 0.93, 0.84, 0.76])
        df = np.array([1.02 + p.belly, 1.0 + 0.6 * p.belly, 0.96, 0.95, 0.93, 0.88, 0.82])
        fat_f = np.array([1.3, 1.2, 1.0, 0.8, 0.7, 0.6, 0.6])
        self.W = p.half_width * wf
        self.D = p.half_depth * df
        self.fat = p.fat_mm * fat_f
        self.cx = np.full_like(self.zk, p.offset_x)
        self.cy = np.full_like(self.zk, p.offset_y)
        inset_fat = 2.0
        inset_muscle = inset_fat + self.fat
        inset_cavity = inset_muscle + p.muscle_mm
        self.body = ZTube(self.zk, self.cx, self.cy, self.W, self.D)
        self.fat_tube = ZTube(self.zk, self.cx, self.cy, self.W - inset_fat, self.D - inset_fat)
        self.muscle_tube = ZTube(self.zk, self.cx, self.cy, self.W - inset_muscle, self.D - inset_muscle)
        self.cav_ax = self.W - inset_cavity
        self.cav_ay = self.D - inset_cavity
        self.cavity = ZTube(self.zk, self.cx, self.cy, self.cav_ax, self.cav_ay)

    def at(self, arr: np.ndarray, z: float) -> float:
        return float(np.interp(z, self.zk, arr))

    def cavity_point(self, side: float, theta: float, z: float, extra: float = 0.0) -> np.ndarray:
        """Point on the cavity wall (+extra mm outward); theta from posterior midline (0) to anterior (pi)."""
        ax, ay = self.at(self.cav_ax, z) + extra, self.at(self.cav_ay, z) + extra
        return np.array([self.p.offset_x + side * ax * np.sin(theta), self.p.offset_y + ay * np.cos(theta), z])

    # ----- spine ---------------------------------------------------------------------------------------------
    def _build_spine(self) -> None:
        p = self.p
        self.levels: list[tuple[str, float, float]] = []  # (name, z_top, z_bottom)
        z = p.t1_top
        for lv in VERTEBRA_LEVELS:
            h = (22.0 if lv.startswith("T") else 29.0) * p.vertebra_scale
            self.levels.append((lv, z, z - h))
            z -= h

    def y_vb(self, z: float) -> float:
        """Vertebral body centre (y) at height z: 32 mm in front of the posterior cavity wall."""
        return self.p.offset_y + self.at(self.cav_ay, z) - 30.0

    def vb_radii(self, z: float) -> tuple[float, float]:
        f = np.clip((60.0 - z) / 230.0, 0, 1)  # thoracic -> lumbar vertebral bodies grow
        return 15.0 + 9.0 * f, 13.0 + 4.0 * f

    def level_center(self, name: str) -> float:
        for lv, top, bot in self.levels:
            if lv == name:
                return 0.5 * (top + bot)
        raise KeyError(name)

    # ----- lungs ---------------------------------------------------------------------------------------------
    def _build_lungs(self) -> None:
        p = self.p
        ox, oy = p.offset_x, p.offset_y
        self.dome = {
            "right": BelowDome(ox - 55, oy - 15, p.dome_right, 100.0**2 / 55, 110.0**2 / 60),
            "left": BelowDome(ox + 60, oy - 15, p.dome_left, 90.0**2 / 50, 110.0**2 / 60),
        }
        self.lungs_full: dict[str, Shape] = {}
        self.hilum: dict[str, np.ndarray] = {}
        inner = ZTube(self.zk, self.cx, self.cy, self.cav_ax - 1.0, self.cav_ay - 1.0)
        for side, sgn in (("right", -1), ("left", 1)):
            # a tall ellipsoid centred so the apex sits posteromedially, cut laterally by the chest wall, medially by
            # the mediastinum and below by the diaphragm dome
            cax = self.at(self.cav_ax, 0.0)
            medial = 12.0 if side == "right" else 20.0
            j = p.organ_jitter[f"lung_{side}"]
            ell = Ellipsoid((ox + sgn * (medial + 0.33 * cax), oy + 14 + j[1] * 0.5, -25.0),
                            (0.95 * cax, self.at(self.cav_ay, 0) + 15, 166.0))
            mediastinum = HalfSpace((ox + sgn * medial, 0, 0), (-sgn, 0, 0))
            above = ~self.dome[side]
            self.lungs_full[side] = Intersection([ell, inner, mediastinum, above])
            self.hilum[side] = np.array([ox + sgn * 48.0, self.y_vb(40.0) - 32.0, 38.0 + (5 if side == "left" else 0)])
        # fissures: oblique (both) from posterior-superior (~T4) to anterior diaphragm; horizontal (right)
        fj = p.fissure_jitter
        self.fissures = {}
        for side in ("right", "left"):
            zp = self.level_center("T4") + (0 if side == "right" else 8) + 4 * fj[0]
            yp = self.y_vb(zp) + 35.0
            za, ya = p.dome_right - 20 + 4 * fj[1], oy - self.at(self.cav_ay, -30) * 0.8
            d = np.array([0.0, ya - yp, za - zp])
            # perpendicular to d in the y-z plane, tilted so the fissure runs posteromedial -> anterolateral
            n = np.array([0.0, -d[2], d[1]])
            n = n / np.linalg.norm(n)
            n[0] = (1 if side == "left" else -1) * (0.35 + 0.08 * fj[2])
            if n[1] < 0:  # normal points posterior-inferior (lower lobe side positive)
                n = -n
            self.fissures[side] = (np.array([ox, yp, zp]), n / np.linalg.norm(n))
        zh = 18.0 + 5 * fj[3]
        self.horizontal = (np.array([ox, oy, zh]), np.array([0.0, 0.12, 1.0]) / np.linalg.norm([0, 0.12, 1.0]))

    def collapse_transform(self, side: str) -> tuple[np.ndarray, float]:
        return self.hilum[side], self.mod.lung_collapse.get(side, 1.0)

    def lung(self, side: str) -> Shape:
        """The (possibly collapsed) lung."""
        c, f = self.collapse_transform(side)
        return self.lungs_full[side] if f == 1.0 else Scaled(self.lungs_full[side], c, f)

    def _plane(self, X, Y, Z, plane):
        p0, n = plane
        return (X - p0[0]) * n[0] + (Y - p0[1]) * n[1] + (Z - p0[2]) * n[2]

    def lobe_labels(self, side: str, X, Y, Z) -> np.ndarray:
        """Lobe label ids for points of a lung (fissure planes follow a collapsed lung)."""
        c, f = self.collapse_transform(side)
        if f != 1.0:
            X, Y, Z = (X - c[0]) / f + c[0], (Y - c[1]) / f + c[1], (Z - c[2]) / f + c[2]
        lower = self._plane(X, Y, Z, self.fissures[side]) > 0
        if side == "left":
            return np.where(lower, LABEL_IDS["lung_lower_lobe_left"], LABEL_IDS["lung_upper_lobe_left"]).astype(np.uint8)
        middle = self._plane(X, Y, Z, self.horizontal) < 0
        return np.where(lower, LABEL_IDS["lung_lower_lobe_right"],
                        np.where(middle, LABEL_IDS["lung_middle_lobe_right"],
                                 LABEL_IDS["lung_upper_lobe_right"])).astype(np.uint8)

    def lobe_of_points(self, points: np.ndarray) -> list[str | None]:
        """Lobe name (or None) for each (x, y, z) point."""
        pts = np.asarray(points, np.float32).reshape(-1, 3)
        out: list[str | None] = [None] * len(pts)
        for side in ("left", "right"):
            inside = self.lung(side).contains(pts)
            ids = self.lobe_labels(side, pts[:, 0], pts[:, 1], pts[:, 2])
            for i in np.nonzero(inside)[0]:
                out[i] = LABELS[int(ids[i])]
        return out

    # ----- organ shapes (used by findings too) ----------------------------------------------------------------
    def _j(self, name: str) -> np.ndarray:
        return self.p.organ_jitter[name]

    @property
    def abdomen(self) -> Shape:
        """Cavity below the diaphragm (5 mm muscle) -- peritoneal + retroperitoneal space."""
        down = [BelowDome(d.x0, d.y0, d.z0 - 5, d.kx, d.ky) for d in self.dome.values()]
        inner = ZTube(self.zk, self.cx, self.cy, self.cav_ax - 4, self.cav_ay - 4)
        top = max(d.z0 for d in self.dome.values())
        return Bounded(Intersection([inner, Union(down)]), np.array([[-BIG, BIG], [-BIG, BIG], [-BIG, top]]))

    def liver_shape(self) -> Shape:
        p, j = self.p, self._j("liver")
        s = p.liver_scale
        ox, oy = p.offset_x, p.offset_y
        right = Ellipsoid((ox - 62 + j[0], oy - 5 + j[1], p.dome_right - 55 + j[2]), (88 * s, 95 * s, 80 * s),
                          wobble=0.04, wobble_phase=p.wobble_phase)
        left = Ellipsoid((ox + 5 + j[0], oy - 55 + j[1], p.dome_right - 35 + j[2]), (65 * s, 38 * s, 35 * s),
                         rotation=rotation_z(-0.3))
        return Intersection([Union([right, left]), self.abdomen])

    def spleen_shape(self) -> Shape:
        p, j = self.p, self._j("spleen")
        ox, oy = p.offset_x, p.offset_y
        c = np.array([ox + self.at(self.cav_ax, -90) - 35 + j[0], oy + 35 + j[1], p.dome_left - 55 + j[2]])
        s = p.spleen_scale
        ell = Ellipsoid(c, (22 * s, 55 * s, 52 * s), rotation=rotation_z(0.55), wobble=0.05, wobble_phase=p.wobble_phase)
        if self.mod.spleen_scale != 1.0:  # splenomegaly grows mostly anteriorly and downwards
            f = self.mod.spleen_scale
            ell = Ellipsoid(c + np.array([-10.0, -25.0, -30.0]) * (f - 1), (22 * s * (0.6 + 0.4 * f), 55 * s * f, 52 * s * f),
                            rotation=rotation_z(0.55), wobble=0.05, wobble_phase=p.wobble_phase)
        return Intersection([ell, self.abdomen])

    def kidney_shapes(self) -> dict[str, tuple[Shape, np.ndarray]]:
        """side -> (kidney shape, renal sinus centre)."""
        p = self.p
        out = {}
        for side, sgn, z in (("left", 1, -128.0), ("right", -1, -140.0)):
            j = self._j(f"kidney_{side}")
            c = np.array([p.offset_x + sgn * 72 + j[0], self.y_vb(z) + 12 + j[1] * 0.5, z + j[2]])
            axis = np.array([-sgn * 0.22, -0.25, 1.0])  # upper pole medial and posterior
            R = rotation_from_axis(axis, roll=sgn * 0.5)
            k = p.kidney_scale
            shape = Ellipsoid(c, (27 * k, 22 * k, 55 * k), rotation=R)
            sinus = c + np.array([-sgn * 12.0, -8.0, 0.0])
            out[side] = (shape, sinus)
        return out

    def heart_shape(self, grow: float = 0.0) -> Ellipsoid:
        p, j = self.p, self._j("heart")
        # the heart scales with the chest (80 mm: cavity half depth of an average adult) and keeps clear of the spine
        s = p.heart_scale * float(np.clip(self.at(self.cav_ay, 0) / 80.0, 0.8, 1.15))
        y_ant = p.offset_y - self.at(self.cav_ay, 0)
        zc = p.dome_right + 30 + j[2] * 0.5
        yc = min(y_ant + 52 * s + j[1] * 0.4, self.y_vb(zc) - 22 - 36 * s)
        c = (p.offset_x + 16 + j[0], yc, zc)
        R = rotation_from_axis((0.55, -0.45, -0.70), roll=0.3)
        return Ellipsoid(c, (44 * s + grow, 38 * s + grow, 58 * s + grow), rotation=R)

    # ----- painting -------------------------------------------------------------------------------------------
    def paint(self, cv: Canvas) -> None:
        self._paint_table(cv)
        self._paint_body_wall(cv)
        if self.p.sex == "F":
            self._paint_breasts(cv)
        self._paint_lungs(cv)
        self._paint_mediastinum(cv)
        self._paint_abdomen(cv)
        self._paint_spine(cv)
        self._paint_ribs_and_girdle(cv)

    def _paint_table(self, cv: Canvas) -> None:
        p = self.p
        y_top = p.offset_y + max(self.D) + 6.0
        shell = Intersection([HalfSpace((0, y_top, 0), (0, -1, 0)), HalfSpace((0, y_top + 45, 0), (0, 1, 0)),
                              Ellipsoid((0, y_top - 150, 0), (260, 210, 1e5))])
        cv.paint(shell, -950.0)  # foam core
        cv.paint(Intersection([HalfSpace((0, y_top, 0), (0, -1, 0)), HalfSpace((0, y_top + 2.5, 0), (0, 1, 0)),
                               Ellipsoid((0, y_top - 150, 0), (258, 208, 1e5))]), 250.0)  # carbon top skin

    def _paint_body_wall(self, cv: Canvas) -> None:
        L = LABEL_IDS
        zk, fat = self.zk, self.fat
        cv.paint_layers(self.body, [
            (0.0, TISSUE["skin"][0], None),
            (2.0, TISSUE["fat"][0], L["subcutaneous_fat"]),
            (lambda z: 2.0 + np.interp(z, zk, fat), TISSUE["muscle"][0], L["skeletal_muscle"]),
            (lambda z: 2.0 + np.interp(z, zk, fat) + self.p.muscle_mm, -85.0, L["torso_fat"]),  # mediastinal fat
        ])
        # diaphragm: 5 mm muscle under each dome; abdominal fat below it
        # the costal diaphragm lines the lower chest wall down to the costal margin, not the whole abdomen
        costal_margin = HalfSpace((0, 0, self.p.dome_right - 95), (0, 0, -1))
        under = Bounded(Intersection([self.cavity, Union(list(self.dome.values())), costal_margin]),
                        np.array([[-BIG, BIG], [-BIG, BIG], [-BIG, max(d.z0 for d in self.dome.values())]]))
        cv.paint(under, TISSUE["muscle"][0], L["skeletal_muscle"])
        cv.paint(self.abdomen, -90.0, L["torso_fat"])

    def _lung_hu(self, side: str):
        y_ant = self.p.offset_y - self.at(self.cav_ay, 0)
        depth = 2 * self.at(self.cav_ay, 0)

        def hu(X, Y, Z):  # gravity gradient: dependent (posterior) lung is denser in a supine patient
            return -885.0 + 70.0 * np.clip((Y - y_ant) / depth, 0, 1)
        return hu

    def _paint_lungs(self, cv: Canvas) -> None:
        lobes = [LABEL_IDS[n] for n in LUNG_LOBES]
        for side in ("right", "left"):
            c, f = self.collapse_transform(side)
            if f != 1.0:  # pneumothorax: the hemithorax fills with air, the lung shrinks towards its hilum
                cv.paint(self.lungs_full[side], -1000.0, 0, finding=self.mod.pneumothorax_finding.get(side))
            cv.paint(self.lung(side), self._lung_hu(side), label_fn=lambda X, Y, Z, s=side: self.lobe_labels(s, X, Y, Z),
                     finding=0 if f != 1.0 else None)
        side_lobes = {side: [LABEL_IDS[n] for n in LUNG_LOBES if LOBE_SIDE[n] == side] for side in ("left", "right")}
        # fissures: 1 mm pleural double layer, faint at thick slices (partial volume)
        for side in ("right", "left"):
            c, f = self.collapse_transform(side)
            p0, n = self.fissures[side]
            p0 = c + (p0 - c) * f
            slab = Intersection([HalfSpace(p0 + n * 0.5, n), HalfSpace(p0 - n * 0.5, -n)])
            if side == "right":
                h0, hn = self.horizontal
                h0 = c + (h0 - c) * f
                hslab = Intersection([HalfSpace(h0 + hn * 0.5, hn), HalfSpace(h0 - hn * 0.5, -hn),
                                      HalfSpace(p0, n)])  # horizontal fissure only in front of the oblique one
                cv.paint(Bounded(hslab, self.lung(side).bounds()), -300.0, only_labels=side_lobes[side])
            # the lobe labels confine the plane to this lung: no need to evaluate the lung shape again
            cv.paint(Bounded(slab, self.lung(side).bounds()), -300.0, only_labels=side_lobes[side])
        self._paint_lung_vessels(cv, lobes)

    def _paint_lung_vessels(self, cv: Canvas, lobes: list[int]) -> None:
        """Branching vessel trees from each hilum (the bright dots/lines that make nodule search non-trivial).

        Branches thinner than a quarter pixel are not drawn: at that size their partial-volume contribution is
        below the noise, and skipping them keeps small volumes fast."""
        rng = np.random.default_rng(self.rng.integers(1 << 31))
        min_r = 0.25 * min(cv.grid.spacing[1], cv.grid.spacing[2])
        for side, sgn in (("right", -1), ("left", 1)):
            c, f = self.collapse_transform(side)
            targets = np.array([[0.7, 0.0, 1.0], [0.8, -0.6, -0.4], [0.6, 0.5, -0.8], [0.9, 0.1, 0.1],
                                [0.5, -0.8, 0.5], [0.5, 0.8, 0.3], [0.3, 0.6, -1.0], [0.6, -0.5, -1.0]])
            targets[:, 0] *= sgn
            for a, b, ra, rb in self.vessel_tree(rng, self.lungs_full[side], self.hilum[side], targets):
                if rb * f**0.5 < min_r:
                    continue
                a2, b2 = c + (a - c) * f, c + (b - c) * f
                cv.paint(Capsule(a2, b2, ra * f**0.5, rb * f**0.5), TISSUE["blood"][0], only_labels=lobes)

    @staticmethod
    def vessel_tree(rng: np.random.Generator, lung: Shape, root: np.ndarray, directions: np.ndarray,
                    r0: float = 4.8, length0: float = 32.0, levels: int = 7) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
        """Binary branching, one level at a time (inside tests batched): (start, end, r_start, r_end) segments."""
        a = np.repeat(root[None], len(directions), 0).astype(float)
        d = directions / np.linalg.norm(directions, axis=1, keepdims=True)
        r, length = r0, length0
        out = []
        for _ in range(levels):
            if r < 0.8 or len(a) == 0:
                break
            b = a + d * length
            ok = lung.contains(b)
            half = a + d * length * 0.5
            b = np.where(ok[:, None], b, half)
            keep = ok | lung.contains(half)
            a, b, d = a[keep], b[keep], d[keep]
            out += [(a[i], b[i], r, r * 0.85) for i in range(len(a))]
            # two children per branch, +-25..40 degrees about a random perpendicular
            perp = np.cross(d, rng.normal(size=d.shape))
            perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
            angle = rng.uniform(0.35, 0.7, (len(d), 1))
            kids = np.concatenate([d * np.cos(angle) + perp * np.sin(angle), d * np.cos(angle) - perp * np.sin(angle)])
            d = kids / np.linalg.norm(kids, axis=1, keepdims=True)
            a = np.concatenate([b, b])
            r, length = r * 0.72, length * 0.78
        return out

    def _paint_mediastinum(self, cv: Canvas) -> None:
        p, L = self.p, LABEL_IDS
        ox = p.offset_x
        # esophagus and trachea in front of the spine
        zk = np.array([Z_MIN - 10, -60, 0, 60, 120, Z_MAX + 10])
        y_es = np.array([self.y_vb(z) - 24 for z in zk])
        x_es = ox + np.array([30, 25, 12, 4, 2, 2])
        cv.paint(ZTube(zk, x_es, y_es, np.full(6, 9.0), np.full(6, 6.5), z_range=(-62.0, Z_MAX + 10)), TISSUE["wall"][0],
                 L["esophagus"])
        carina = np.array([ox + 2.0, self.y_vb(60) - 48, self.level_center("T4") - 14])
        zt = np.array([carina[2], Z_MAX + 10])
        y_tr = np.array([carina[1], self.y_vb(140) - 45])
        cv.paint(ZTube(zt, [ox + 2, ox], y_tr, [10.5, 9.5], [9.5, 9.0]), TISSUE["wall"][0], L["trachea"])
        cv.paint(ZTube(zt, [ox + 2, ox], y_tr, [8.5, 7.5], [7.5, 7.0]), TISSUE["air"][0], L["trachea"])
        for side, sgn in (("right", -1), ("left", 1)):
            h = self.hilum[side]
            mid = carina + np.array([sgn * 22.0, 2.0, -8.0 if side == "right" else -5.0])
            for a, b in ((carina, mid), (mid, h)):
                cv.paint(Capsule(a, b, 8.0, 6.5), TISSUE["wall"][0], L["trachea"])
            for a, b in ((carina, mid), (mid, h)):
                cv.paint(Capsule(a, b, 6.3, 4.8), TISSUE["air"][0], L["trachea"])
            # lobar bronchi (air tubes with thin walls inside the lung)
            for d in ((sgn * 0.4, -0.3, 0.9), (sgn * 0.5, -0.7, -0.4), (sgn * 0.5, 0.5, -0.8)):
                d = np.asarray(d) / np.linalg.norm(d)
                cv.paint(Capsule(h, h + d * 28, 4.2, 3.0), TISSUE["wall"][0])
                cv.paint(Capsule(h, h + d * 30, 3.0, 1.8), TISSUE["air"][0])
        # heart in its pericardial fat, pulmonary trunk, aorta, venae cavae
        cv.paint(self.heart_shape(grow=5.0), -95.0, L["torso_fat"])
        heart = self.heart_shape()
        cv.paint(heart, TISSUE["blood"][0], L["heart"])
        hc = np.asarray(heart.center)
        pa0 = hc + np.array([-2.0, -20.0, 35.0])
        bif = np.array([ox + 8.0, carina[1] + 18, carina[2] - 8])
        cv.paint(Capsule(pa0, bif, 13.5, 12.5), TISSUE["blood"][0], L["pulmonary_artery"])
        for side in ("right", "left"):
            cv.paint(Capsule(bif, self.hilum[side] + np.array([0, 6.0, 4.0]), 10.5, 8.5), TISSUE["blood"][0],
                     L["pulmonary_artery"])
        self._paint_aorta(cv, hc)
        ivc_y = self.y_vb(-60) - 30
        cv.paint(ZTube([Z_MIN - 10, hc[2] - 25], [ox - 22, ox - 20], [ivc_y, ivc_y - 5], [12.0, 13.0], [10.0, 11.0]),
                 TISSUE["blood"][0], L["inferior_vena_cava"])
        svc_y = carina[1] - 12
        cv.paint(ZTube([hc[2] + 30, Z_MAX + 10], [ox - 32, ox - 30], [svc_y, svc_y - 5], [10.0, 9.0], [10.0, 9.0]),
                 TISSUE["blood"][0], L["superior_vena_cava"])

    def aorta_path(self, heart_center: np.ndarray) -> list[tuple[np.ndarray, float]]:
        p = self.p
        ox = p.offset_x
        j = self._j("aorta") * 0.4
        root = heart_center + np.array([-12.0, 5.0, 30.0])
        top_z = self.level_center("T3") - 5 + j[2]
        pts = [(root, 15.0), (np.array([ox - 15, root[1] - 6, top_z - 30]), 15.5),
               (np.array([ox - 8, root[1] + 8, top_z - 5]), 14.5), (np.array([ox + 8, self.y_vb(top_z) - 30, top_z]), 13.5),
               (np.array([ox + 22, self.y_vb(top_z) - 12, top_z - 20]), 13.0)]
        for z in (top_z - 60, 0.0, -60.0, -110.0, Z_MIN - 10):
            x = ox + (22 if z > -40 else 14) + j[0]
            pts.append((np.array([x, self.y_vb(z) - 26 + (5 if z > -40 else 0), z]), 12.5 if z > -60 else 11.0))
        return pts

    def _paint_aorta(self, cv: Canvas, hc: np.ndarray) -> None:
        pts = self.aorta_path(hc)
        for (a, ra), (b, rb) in zip(pts[:-1], pts[1:]):
            cv.paint(Capsule(a, b, ra, rb), TISSUE["blood"][0], LABEL_IDS["aorta"])
        self._paint_calcifications(cv, pts, hc)

    def _paint_calcifications(self, cv: Canvas, aorta: list[tuple[np.ndarray, float]], hc: np.ndarray) -> None:
        """Age-dependent wall calcifications (aorta, coronary arteries): small dense plaques, HU only."""
        age = self.p.age
        rng = np.random.default_rng([int(self.rng.integers(1 << 31)), 13])
        n_aorta = max(0, (age - 45) // 4) + int(rng.integers(0, 3)) if age > 45 else 0
        for _ in range(n_aorta):
            i = int(rng.integers(0, len(aorta) - 1))
            (a, ra), (b, rb) = aorta[i], aorta[i + 1]
            u = rng.random()
            c, r = a + (b - a) * u, ra + (rb - ra) * u
            axis = (b - a) / (np.linalg.norm(b - a) + 1e-9)
            radial = np.cross(axis, rng.normal(size=3))
            radial /= np.linalg.norm(radial) + 1e-9
            p0 = c + radial * (r - 1.0)
            cv.paint(Capsule(p0, p0 + axis * rng.uniform(2, 7), rng.uniform(0.8, 1.6)), float(rng.uniform(350, 900)))
        if age > 55:
            heart = self.heart_shape()
            base = np.asarray(heart.center) + heart.rotation[:, 2] * -40  # towards the base of the heart
            for _ in range(int(rng.integers(0, (age - 50) // 8 + 1))):
                d = rng.normal(size=3)
                d /= np.linalg.norm(d)
                p0 = base + d * 22
                cv.paint(Capsule(p0, p0 + rng.normal(0, 2.5, 3), rng.uniform(0.8, 1.5)), float(rng.uniform(300, 800)))

    def _paint_abdomen(self, cv: Canvas) -> None:
        p, L = self.p, LABEL_IDS
        ox, oy = p.offset_x, p.offset_y
        cv.paint(self.liver_shape(), TISSUE["liver"][0], L["liver"])
        # portal vein (hypodense to liver without contrast), gallbladder under the liver
        cv.paint(Capsule((ox - 5, oy - 5, -125), (ox - 48, oy - 8, p.dome_right - 65), 7.0, 6.0), TISSUE["blood"][0],
                 L["portal_vein_and_splenic_vein"])
        jg = self._j("gallbladder")
        gb = Ellipsoid((ox - 48 + jg[0], oy - 55 + jg[1], -120 + jg[2]), (15, 16, 34),
                       rotation=rotation_from_axis((0.3, -0.5, 1.0)))
        cv.paint(Intersection([gb, self.abdomen]), TISSUE["bile"][0], L["gallbladder"])
        # stomach: wall, fluid, and air rising anteriorly (supine)
        js = self._j("stomach")
        sc = np.array([ox + 52 + js[0], oy - 25 + js[1], p.dome_left - 45 + js[2]])
        Rs = rotation_from_axis((0.3, -0.35, 1.0), roll=0.4)
        outer = Intersection([Ellipsoid(sc, (40, 34, 58), rotation=Rs), self.abdomen])
        inner = Intersection([Ellipsoid(sc, (35, 29, 53), rotation=Rs), self.abdomen])
        cv.paint(outer, TISSUE["wall"][0], L["stomach"])
        cv.paint(inner, 18.0, L["stomach"])
        cv.paint(Intersection([inner, HalfSpace(sc + np.array([0, -8.0, 0]), (0, 1, 0))]), -1000.0, L["stomach"])
        cv.paint(self.spleen_shape(), TISSUE["spleen"][0], L["spleen"])
        # pancreas: head by the duodenum to tail at the splenic hilum, lobulated (texture)
        jp = self._j("pancreas")
        yv = self.y_vb(-110)
        pts = [np.array([ox - 32, yv - 42, -128]), np.array([ox - 2, yv - 50, -116]), np.array([ox + 35, yv - 40, -106]),
               np.array([ox + 72, yv - 10, -98])]
        radii = [15.0, 10.0, 10.0, 9.0]
        for (a, ra), (b, rb) in zip(zip(pts[:-1], radii[:-1]), zip(pts[1:], radii[1:])):
            cv.paint(Capsule(a + jp, b + jp, ra, rb), TISSUE["pancreas"][0], L["pancreas"])
        cv.paint(Capsule(pts[0] + jp + np.array([-14.0, 0, 8]), pts[0] + jp + np.array([-16.0, 5, -45]), 11.0, 10.0),
                 TISSUE["wall"][0], L["duodenum"])
        cv.paint(Capsule(pts[1] + np.array([0, 12.0, 0]), pts[3] + np.array([0, 14.0, 0]), 4.0, 4.0), TISSUE["blood"][0],
                 L["portal_vein_and_splenic_vein"])
        # kidneys (parenchyma + sinus fat) and adrenals
        for side, (shape, sinus) in self.kidney_shapes().items():
            cv.paint(shape, TISSUE["kidney"][0], L[f"kidney_{side}"])
            cv.paint(Ellipsoid(sinus, (8, 9, 24)), -60.0)
            top = np.asarray(shape.center) + np.array([(-1 if side == "left" else 1) * 8.0, 0, 60.0])
            cv.paint(Capsule(top, top + np.array([0, -14.0, 22]), 3.0, 2.5), TISSUE["muscle"][0], L[f"adrenal_gland_{side}"])
        self._paint_bowel(cv)

    def _paint_bowel(self, cv: Canvas) -> None:
        """Colon (hepatic flexure -> transverse -> splenic flexure, air over stool) and small-bowel loops (fluid),
        only into abdominal fat so they pack around the solid organs."""
        p, L = self.p, LABEL_IDS
        ox, oy = p.offset_x, p.offset_y
        rng = np.random.default_rng([int(self.rng.integers(1 << 31)), 11])
        free = [L["torso_fat"]]
        ax = self.at(self.cav_ax, -140)
        ay = self.at(self.cav_ay, -140)
        z_t = -150 + rng.uniform(-8, 8)
        path = [np.array([ox - ax + 30, oy + 10, -175.0]), np.array([ox - ax + 35, oy - 20, z_t + 10]),
                np.array([ox - 0.3 * ax, oy - ay + 35, z_t]), np.array([ox + 0.3 * ax, oy - ay + 35, z_t + 5]),
                np.array([ox + ax - 35, oy - 15, p.dome_left - 75]), np.array([ox + ax - 30, oy + 15, -175.0])]
        wall_to = lambda y_air: (lambda X, Y, Z: np.where(Y < y_air, -1000.0, -40.0).astype(np.float32))  # noqa: E731
        for a, b in zip(path[:-1], path[1:]):
            r = float(rng.uniform(17, 23))
            cv.paint(Capsule(a, b, r + 3), TISSUE["wall"][0], L["colon"], only_labels=free + [L["colon"]])
            cv.paint(Capsule(a, b, r), wall_to(float(min(a[1], b[1])) - r * 0.1), L["colon"], only_labels=[L["colon"]])
        # small bowel: random walks of 12 mm tubes in the anterior lower abdomen
        for _ in range(10):
            pt = np.array([ox + rng.uniform(-0.6, 0.6) * ax, oy + rng.uniform(-0.75, -0.1) * ay, rng.uniform(-175, -115)])
            d = rng.normal(size=3)
            for _ in range(5):
                d = d + rng.normal(0, 0.8, 3)
                d[2] *= 0.5
                d /= np.linalg.norm(d)
                q = pt + d * rng.uniform(18, 30)
                cv.paint(Capsule(pt, q, 12.0), TISSUE["wall"][0], L["small_bowel"], only_labels=free + [L["small_bowel"]])
                cv.paint(Capsule(pt, q, 9.0), float(rng.uniform(5, 30)), L["small_bowel"], only_labels=[L["small_bowel"]])
                pt = q

    def _paint_breasts(self, cv: Canvas) -> None:
        """Female patients: fatty breast mounds with glandular tissue on the anterior chest wall."""
        p, L = self.p, LABEL_IDS
        z = p.dome_right + 55
        size = 0.8 + 0.4 * float(self.rng.random())
        for sgn in (-1, 1):
            c = np.array([p.offset_x + sgn * 0.5 * self.at(self.W, z), p.offset_y - self.at(self.D, z) + 14, z])
            cv.paint(Ellipsoid(c, (68 * size, 30 * size, 58 * size), rotation=rotation_z(sgn * 0.35)), TISSUE["fat"][0],
                     L["subcutaneous_fat"], only_labels=[0, L["subcutaneous_fat"]])
            cv.paint(Ellipsoid(c - np.array([0, 6.0 * size, 0]), (38 * size, 14 * size, 32 * size), wobble=0.15,
                               wobble_phase=p.wobble_phase), 25.0, only_labels=[L["subcutaneous_fat"]])

    def _paint_spine(self, cv: Canvas) -> None:
        p, L = self.p, LABEL_IDS
        ox = p.offset_x
        zk = np.linspace(Z_MIN - 20, Z_MAX + 20, 9)
        yvb = np.array([self.y_vb(z) for z in zk])
        rxy = np.array([self.vb_radii(z) for z in zk])
        # paraspinal (autochthon) and psoas muscles
        for side, sgn in (("left", 1), ("right", -1)):
            cv.paint(ZTube(zk, ox + sgn * (rxy[:, 0] + 14), yvb + 36, np.full(9, 22.0), np.full(9, 18.0)),
                     TISSUE["muscle"][0], L[f"autochthon_{side}"])
            zp = np.array([Z_MIN - 10, -60.0])
            cv.paint(ZTube(zp, [ox + sgn * 40, ox + sgn * 30], [self.y_vb(-150) - 5, self.y_vb(-60)], [22.0, 3.0],
                           [20.0, 3.0]), TISSUE["muscle"][0], L[f"iliopsoas_{side}"])
        # spinal canal: CSF around the cord
        canal_y = yvb + rxy[:, 1] + 10
        cv.paint(ZTube(zk, np.full(9, ox), canal_y, np.full(9, 9.0), np.full(9, 8.0)), TISSUE["csf"][0])
        cv.paint(ZTube(zk, np.full(9, ox), canal_y, np.full(9, 5.0), np.full(9, 4.5)), TISSUE["cord"][0], L["spinal_cord"])
        disc = 4.5
        for name, top, bot in self.levels:
            zc = 0.5 * (top + bot)
            if bot > Z_MAX + 30 or top < Z_MIN - 30:
                continue
            lab = L[f"vertebrae_{name}"]
            yc = self.y_vb(zc)
            rx, ry = self.vb_radii(zc)
            cv.paint(ZTube([bot - 5, top + 5], [ox, ox], [yc, yc], [rx + 1.5, rx + 1.5], [ry + 1.5, ry + 1.5]),
                     TISSUE["disc"][0])  # the disc space around the body
            body = ZTube([bot, top], [ox, ox], [yc, yc], [rx, rx], [ry, ry], z_range=(bot + disc / 2, top - disc / 2))
            cv.paint(body, TISSUE["cortical"][0] - 150, lab)
            core = ZTube([bot, top], [ox, ox], [yc, yc], [rx - 1.8, rx - 1.8], [ry - 1.8, ry - 1.8],
                         z_range=(bot + disc / 2 + 1.5, top - disc / 2 - 1.5))
            cv.paint(core, TISSUE["cancellous"][0] - 1.5 * max(p.age - 40, 0), lab)
            # posterior elements: pedicles, laminae, spinous and transverse processes
            back = yc + ry
            thoracic = name.startswith("T")
            for sgn in (-1, 1):
                ped_a = np.array([ox + sgn * (rx - 5), back - 3, zc])
                ped_b = np.array([ox + sgn * 11, back + 12, zc])
                lam_b = np.array([ox, back + 22, zc - 2])
                tp_b = np.array([ox + sgn * (38 if thoracic else 45), back + (16 if thoracic else 8), zc + (2 if thoracic else 0)])
                for a, b, r in ((ped_a, ped_b, 4.5), (ped_b, lam_b, 3.8), (ped_b, tp_b, 4.5)):
                    cv.paint(Capsule(a, b, r), TISSUE["cortical"][0] - 250, lab)
            sp_a = np.array([ox, back + 22, zc - 2])
            sp_b = np.array([ox, back + 44, zc - (16 if thoracic else 4)])
            cv.paint(Capsule(sp_a, sp_b, 4.5, 3.5), TISSUE["cortical"][0] - 250, lab)

    def rib_paths(self) -> list[tuple[str, list[np.ndarray], list[np.ndarray]]]:
        """(label name, bone points, cartilage points) for each rib."""
        out = []
        st_top, st_bot = self.sternum_range()
        sternal_z = np.linspace(st_top - 12, st_bot + 18, 7)
        for side, sgn in (("left", 1), ("right", -1)):
            for k in range(1, 13):
                zp = self.level_center(f"T{k}") + 4
                if k <= 7:
                    theta_cc, z_end = np.deg2rad(148 + 2 * k), sternal_z[k - 1]
                    z_cc = z_end - 6 - 3 * k
                elif k <= 10:
                    theta_cc = np.deg2rad(150 - 6 * (k - 7))
                    z_cc = sternal_z[6] - 20 * (k - 7) - 10
                    z_end = sternal_z[6] - 8
                else:
                    theta_cc = np.deg2rad(105 if k == 11 else 80)
                    z_cc = zp - 35
                    z_end = None
                thetas = np.linspace(np.deg2rad(28), theta_cc, 9)
                u = (thetas - thetas[0]) / (thetas[-1] - thetas[0])
                zs = zp - (zp - z_cc) * u**1.3
                bone = [np.array([self.p.offset_x + sgn * 18, self.y_vb(zp) + 14, zp + 2])]
                bone += [self.cavity_point(sgn, th, z, extra=5.0) for th, z in zip(thetas, zs)]
                cart: list[np.ndarray] = []
                if z_end is not None:
                    th_end = np.deg2rad(171)
                    for th, z in zip(np.linspace(theta_cc, th_end, 4), np.linspace(z_cc, z_end, 4)):
                        cart.append(self.cavity_point(sgn, th, z, extra=5.0))
                out.append((f"rib_{side}_{k}", bone, cart))
        return out

    def sternum_range(self) -> tuple[float, float]:
        return self.level_center("T2") - 12, self.level_center("T10")

    def _paint_ribs_and_girdle(self, cv: Canvas) -> None:
        p, L = self.p, LABEL_IDS
        ox, oy = p.offset_x, p.offset_y
        # sternum: a flat bar in the anterior wall
        top, bot = self.sternum_range()
        zk = np.array([bot - 20, bot, top - 30, top])
        ys = np.array([oy - self.at(self.cav_ay, z) - 7 for z in zk])
        cv.paint(ZTube(zk, np.full(4, ox), ys, [5, 12, 14, 24], [4, 6, 6, 7], z_range=(bot - 20, top)),
                 TISSUE["cortical"][0] - 250, L["sternum"])
        cv.paint(ZTube(zk, np.full(4, ox), ys, [3, 10, 12, 22], [2, 4, 4, 5], z_range=(bot - 18, top - 2)),
                 TISSUE["cancellous"][0], L["sternum"])
        for name, bone, cart in self.rib_paths():
            k = int(name.rsplit("_", 1)[1])
            r = 4.8 if k > 1 else 5.5
            for a, b in zip(bone[:-1], bone[1:]):
                cv.paint(Capsule(a, b, r), TISSUE["cortical"][0] - 100, L[name])
            for a, b in zip(bone[:-1], bone[1:]):
                cv.paint(Capsule(a, b, r - 1.6), TISSUE["cancellous"][0] + 20)
            for a, b in zip(cart[:-1], cart[1:]):
                cv.paint(Capsule(a, b, 4.3), TISSUE["cartilage"][0] + max(p.age - 40, 0) * 3, L["costal_cartilages"])
        # clavicles and scapulae (upper chest, arms up)
        for side, sgn in (("left", 1), ("right", -1)):
            a = np.array([ox + sgn * 18, oy - self.at(self.cav_ay, top) - 10, top + 6])
            m = np.array([ox + sgn * 0.45 * self.at(self.W, top + 25), oy - self.at(self.D, top + 25) + 16, top + 25])
            b = np.array([ox + sgn * (self.at(self.W, top + 35) - 22), oy - 25, top + 35])
            for u, v in ((a, m), (m, b)):
                cv.paint(Intersection([Capsule(u, v, 7.0, 6.5), self.muscle_tube]), TISSUE["cortical"][0] - 200,
                         L[f"clavicula_{side}"])
            zc = self.level_center("T4")
            th = np.deg2rad(50)
            c = self.cavity_point(sgn, th, zc - 10, extra=18.0)
            ax, ay = self.at(self.cav_ax, zc), self.at(self.cav_ay, zc)
            angle = np.arctan2(-ay * np.sin(th), sgn * ax * np.cos(th))  # tangent to the chest wall
            cv.paint(Intersection([Ellipsoid(c, (40, 4.5, 58), rotation=rotation_z(angle)), self.muscle_tube]),
                     TISSUE["cortical"][0] - 350, L[f"scapula_{side}"])
