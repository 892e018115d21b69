"""Analytic adult head-and-neck anatomy painted on a :class:`Canvas` in head coordinates.

Proportions follow adult anthropometry (Farkas): face height in three ~63 mm thirds
(trichion–glabella–subnasale–menton), inter-pupillary distance ~63 mm, nose length ~48 mm,
mouth width ~50 mm, head breadth ~152 mm, head length ~196 mm. HU: air −1000, skin +40,
fat −100, muscle +45, cortical bone 1300 with diploe 550, enamel 2500, brain 30–38, CSF 8,
eye globe 10, lens 90, contrast-filled arteries 300.

Head coordinates: +x left, +y posterior, +z superior, mm; origin between the ear canals on
the Frankfurt plane. :data:`LANDMARKS` names a few points the tests and docs rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.phantom import sdf as S
from inference.phantom.canvas import BONE, FOREIGN, INTRACRANIAL, Canvas

SIDES = (-1.0, 1.0)  # right (−x), left (+x)

HU_SKIN, HU_FAT, HU_MUSCLE = 40.0, -100.0, 45.0
HU_CORTICAL, HU_DIPLOE, HU_CANCELLOUS = 1300.0, 550.0, 300.0
HU_ENAMEL, HU_DENTIN = 2500.0, 1700.0
HU_BRAIN_GREY, HU_BRAIN_WHITE, HU_CSF = 38.0, 30.0, 8.0
HU_GLOBE, HU_LENS, HU_NERVE = 10.0, 90.0, 30.0
HU_ARTERY, HU_VEIN, HU_DISC, HU_CARTILAGE = 300.0, 140.0, 80.0, 110.0
HU_AIR = -1000.0
HU_SHIELD = {"metal": 3000.0, "leadglass": 1500.0}
HU_TUBE_WALL = 100.0

#: Facemask: soft tissue within this depth (mm) under the skin, in the face region.
FACEMASK_DEPTH = 28.0


@dataclass(frozen=True)
class Variation:
    """Per-seed anatomical variation (small: every seed must stay a plausible adult face)."""

    nose: float = 1.0  # nose length/projection factor
    face_width: float = 1.0
    jaw: float = 1.0  # jaw/chin projection factor
    fat: float = 5.0  # subcutaneous fat thickness, mm

    @classmethod
    def from_rng(cls, rng: np.random.Generator) -> Variation:
        u = rng.uniform(-1.0, 1.0, size=4)
        return cls(
            nose=1.0 + 0.07 * u[0],
            face_width=1.0 + 0.04 * u[1],
            jaw=1.0 + 0.05 * u[2],
            fat=5.0 + 1.5 * u[3],
        )


def landmarks(v: Variation) -> dict[str, np.ndarray]:
    """Named surface points in head coordinates (before rotation and global scale)."""
    n = v.nose
    return {
        "nose_tip": np.array([0.0, -108.0 - 13.0 * n, -12.0]),
        "nasion": np.array([0.0, -91.5, 24.0]),
        "pupil_right": np.array([-31.5, -80.0, 15.0]),
        "pupil_left": np.array([31.5, -80.0, 15.0]),
        "stomion": np.array([0.0, -104.0, -45.0]),
        "menton": np.array([0.0, -80.0 * v.jaw, -98.0]),
        "vertex": np.array([0.0, 8.0, 130.0]),
        "porion_right": np.array([-76.0, 0.0, 0.0]),
        "porion_left": np.array([76.0, 0.0, 0.0]),
    }


# ----------------------------------------------------------------------------- skin envelope


def _skull_cavity(x, y, z):
    """Cranial cavity: inner table ellipsoid above a skull base stepping down backwards."""
    inner = S.ellipsoid(x, y, z, (0, 8, 30), (63, 85, 87))
    base = np.interp(y, [-200, -40, -22, 12, 28, 200], [34, 34, -8, -8, -30, -30]).astype(
        np.float32
    )
    return S.smax(inner, base - z, 5.0)


def _outer_table(x, y, z):
    return S.ellipsoid(x, y, z, (0, 8, 30), (70, 92, 94))


def build_envelope(c: Canvas, v: Variation, *, tube: bool) -> None:
    """The skin surface as one smooth signed-distance field (``c.skin``)."""
    w, n, j = v.face_width, v.nose, v.jaw
    # Cranium and neck.
    c.blend_skin(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, 8, 30), (76, 98, 100)),
        ((-82, 82), (-96, 112), (-76, 136)),
        0,
    )

    def neck(x, y, z):
        cy = 12.0 + 0.03 * (-60.0 - z)
        d2 = np.sqrt((x / 57.0) ** 2 + ((y - cy) / 62.0) ** 2) * 57.0 - 57.0
        return S.smax(d2, z - (-40.0), 20.0)

    c.blend_skin(neck, ((-70, 70), (-70, 90), (-262, -10)), 25)
    # Midface, jaw, chin, cheeks.
    c.blend_skin(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -30, -5), (68 * w, 64, 52)),
        ((-80, 80), (-100, 40), (-70, 50)),
        12,
    )
    c.blend_skin(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -35, -58), (56 * w, 55 * j, 36)),
        ((-70, 70), (-100, 30), (-100, -15)),
        14,
    )
    c.blend_skin(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -80 * j, -82), (20, 14, 15)),
        ((-30, 30), (-100, -55), (-105, -60)),
        10,
    )
    for s in SIDES:
        c.blend_skin(
            lambda x, y, z, s=s: S.ellipsoid(x, y, z, (s * 44 * w, -66, -2), (22, 20, 20)),
            ((s * 44 - 30, s * 44 + 30), (-95, -35), (-30, 25)),
            10,
        )
    # Eye sockets, then the lids over the globes with an almond-shaped opening.
    for s in SIDES:
        ex = s * 31.5
        c.blend_skin(
            lambda x, y, z, ex=ex: S.ellipsoid(x, y, z, (ex, -90, 16), (18, 14, 13)),
            ((ex - 25, ex + 25), (-110, -65), (-5, 35)),
            6,
            mode="subtract",
        )

    for s in SIDES:
        ex = s * 31.5

        def lids(x, y, z, ex=ex, s=s):
            lid = S.sphere(x, y, z, (ex, -67.5, 15), 13.0)
            u = (x - ex) / 14.0
            half = 4.8 * np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0)) - 0.2
            zc = 15.5 + 0.8 * u * s  # lateral canthus slightly higher
            fissure = np.maximum(np.abs(z - zc) - half, np.abs(x - ex) - 14.0)
            fissure = np.maximum(fissure, y - (-72.0))
            opened = S.ssub(lid, fissure, 0.8)
            globe = S.sphere(x, y, z, (ex, -67.5, 15), 12.0)
            return np.minimum(opened, globe)

        c.blend_skin(lids, ((ex - 20, ex + 20), (-90, -50), (-5, 35)), 2.5)
    # Brows.
    for s in SIDES:
        c.blend_skin(
            lambda x, y, z, s=s: S.capsule(x, y, z, (s * 14, -92, 33), (s * 46, -83, 30), 4.0, 3.0),
            ((s * 30 - 30, s * 30 + 30), (-110, -65), (15, 50)),
            8,
        )
    # Nose: bridge, tip, alae, columella; then nostrils.
    tip = (0.0, -99.0 - 13.0 * n, -12.0)

    def nose(x, y, z):
        d = S.capsule(x, y, z, (0, -87, 24), (0, tip[1] + 2.0, -6.0), 5.5, 7.5)
        # side walls: the dorsum sits on a wedge that widens towards the cheeks
        d = S.smin(d, S.ellipsoid(x, y, z, (0, -93, -4), (12, 12, 20)), 5.0)
        d = S.smin(d, S.sphere(x, y, z, tip, 9.0), 4.0)
        for s in SIDES:
            d = S.smin(d, S.ellipsoid(x, y, z, (s * 14, -98, -18), (7.5, 9, 7)), 4.0)
        d = S.smin(d, S.capsule(x, y, z, (0, tip[1] + 3, -17), (0, -97, -24), 4.0, 3.5), 3.0)
        for s in SIDES:
            nostril = S.ellipsoid(x, y, z, (s * 7.5, tip[1] + 12.5, -22.5), (4.0, 6.5, 3.4))
            d = S.ssub(d, nostril, 1.2)
        return d

    c.blend_skin(nose, ((-30, 30), (-135, -75), (-35, 32)), 3.5)
    # Perioral region (over the teeth), lips with a mouth line and a philtrum groove.
    c.blend_skin(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -55, -44), (40 * w, 45, 24)),
        ((-50, 50), (-105, -5), (-72, -16)),
        8,
    )
    c.blend_skin(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -96, -35), (25, 8, 11)),
        ((-35, 35), (-115, -80), (-52, -20)),
        5,
    )
    c.blend_skin(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -96 * j, -52), (23, 7.5, 7)),
        ((-35, 35), (-115, -80), (-65, -40)),
        5,
    )
    c.blend_skin(
        lambda x, y, z: S.box(x, y, z, (0, -104, -45.2), (25, 10, 0.6), 0.5),
        ((-30, 30), (-120, -90), (-50, -40)),
        1.2,
        mode="subtract",
    )
    c.blend_skin(
        lambda x, y, z: S.capsule(x, y, z, (0, -104.5, -26), (0, -106.5, -36), 2.0),
        ((-8, 8), (-115, -95), (-40, -20)),
        1.5,
        mode="subtract",
    )
    # Ears: a tilted plate with a concha, set slightly back from the head's side.
    for s in SIDES:

        def ear(x, y, z, s=s):
            u, vv = (x - s * 79.0) * s, y - 6.0
            a = np.radians(25.0)
            u2, v2 = u * np.cos(a) - vv * np.sin(a), u * np.sin(a) + vv * np.cos(a)
            zz = z - 16.0
            zt = zz * np.cos(np.radians(12)) + v2 * np.sin(np.radians(12))
            plate = S.ellipsoid(u2, v2, zt, (0, 0, 0), (4.0, 17, 30))
            concha = S.ellipsoid(u2, v2, zt, (3.5, -3, -6), (3.5, 8, 11))
            return S.ssub(plate, concha, 1.5)

        c.blend_skin(ear, ((s * 80 - 25, s * 80 + 25), (-25, 40), (-25, 55)), 3.0)
    if tube:
        c.blend_skin(
            lambda x, y, z: S.capsule(x, y, z, (0, -120, -45), (0, -85, -45), 6.0),
            ((-12, 12), (-130, -75), (-55, -35)),
            2.0,
            mode="subtract",
        )


# ----------------------------------------------------------------------------- tissues


def paint_soft_tissue(c: Canvas, v: Variation) -> None:
    """Skin, subcutaneous fat and deep soft tissue by depth under the envelope."""
    depth = -c.skin
    tissue = np.where(depth < 1.8, HU_SKIN, np.where(depth < 1.8 + v.fat, HU_FAT, HU_MUSCLE))
    f = c.coverage(c.skin)
    c.hu[...] = HU_AIR + f * (tissue.astype(np.float32) - HU_AIR)


def _bone_value(d_outer, d_inner):
    """Cortical tables (2.2 mm) around diploe, from the distances to both surfaces."""
    return np.where(np.minimum(d_outer, d_inner) < 2.2, HU_CORTICAL, HU_DIPLOE).astype(np.float32)


def paint_skull(c: Canvas) -> None:
    """Vault, skull base, facial skeleton with sinuses and orbits, mandible and teeth."""
    w = c.window(((-80, 80), (-100, 105), (-50, 130)))
    if w is not None:
        sl, x, y, z = w
        cav = _skull_cavity(x, y, z)
        outer = _outer_table(x, y, z)
        base = np.interp(y, [-200, -40, -22, 12, 28, 200], [34, 34, -8, -8, -30, -30])
        slab = (base.astype(np.float32) - 13.0) - z
        d = np.maximum(np.maximum(outer, -cav), slab)
        c.paint_at(sl, d, _bone_value(-outer, cav), set_bits=BONE)
        del d, outer, slab
    # Foramen magnum.
    c.paint(
        lambda x, y, z: S.capsule(x, y, z, (0, 20, -55), (0, 18, -20), 15.0),
        ((-20, 20), (0, 40), (-75, -5)),
        HU_MUSCLE,
        clear_bits=BONE,
    )

    # Facial skeleton (cancellous core with a cortical shell).
    def face_bones(x, y, z):
        d = S.ellipsoid(x, y, z, (0, -78, 33), (48, 10, 10))  # brow ridge / glabella
        d = S.smin(d, S.ellipsoid(x, y, z, (0, -62, -14), (37, 26, 22)), 6)  # maxilla
        d = S.smin(d, S.capsule(x, y, z, (0, -84, 24), (0, -95, 2), 4.5, 3.0), 3)  # nasal
        for s in SIDES:
            d = S.smin(d, S.ellipsoid(x, y, z, (s * 50, -62, 6), (12, 18, 12)), 5)  # zygoma
            d = np.minimum(d, S.capsule(x, y, z, (s * 58, -52, 4), (s * 64, -8, 2), 4.0))
            d = S.smin(d, S.capsule(x, y, z, (s * 49, -73, 30), (s * 48, -70, 2), 4.5), 4)
            d = S.smin(d, S.capsule(x, y, z, (s * 46, -71, -1), (s * 12, -80, 2), 4.0), 4)
        return d

    def face_bone_hu(d, x, y, z):
        return np.where(d > -2.0, HU_CORTICAL, HU_CANCELLOUS).astype(np.float32)

    fb = ((-75, 75), (-105, 0), (-40, 48))
    c.paint(face_bones, fb, face_bone_hu, set_bits=BONE)
    # Orbits (fat), sinuses and nasal cavity (air), carved out of the bone.
    for s in SIDES:
        c.paint(
            lambda x, y, z, s=s: S.ellipsoid(x, y, z, (s * 31.5, -60, 15), (17, 26, 15)),
            ((s * 31.5 - 20, s * 31.5 + 20), (-90, -30), (-3, 33)),
            HU_FAT,
            clear_bits=BONE,
            inside_skin=2.5,
        )
        c.paint(
            lambda x, y, z, s=s: S.ellipsoid(x, y, z, (s * 26, -62, -9), (12, 15, 13)),
            ((s * 26 - 15, s * 26 + 15), (-80, -45), (-25, 5)),
            HU_AIR,
            clear_bits=BONE,
        )
    c.paint(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -81, 38), (15, 4.0, 9)),
        ((-18, 18), (-88, -75), (28, 49)),
        HU_AIR,
        clear_bits=BONE,
    )
    # Ethmoid air cells between the orbits, under the anterior cranial fossa.
    for s in SIDES:
        c.paint(
            lambda x, y, z, s=s: S.ellipsoid(x, y, z, (s * 6.5, -56, 18), (5.5, 18, 10)),
            ((s * 6.5 - 8, s * 6.5 + 8), (-78, -34), (5, 31)),
            HU_AIR,
            clear_bits=BONE,
        )
    c.paint(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -24, 4), (11, 11, 9)),
        ((-13, 13), (-37, -11), (-7, 15)),
        HU_AIR,
        clear_bits=BONE,
    )

    def nasal_cavity(x, y, z):
        d = S.ellipsoid(x, y, z, (0, -55, -6), (13, 34, 22))
        d = S.smin(d, S.ellipsoid(x, y, z, (0, -88, -12), (10, 10, 13)), 3)
        for s in SIDES:
            d = np.minimum(d, S.capsule(x, y, z, (s * 7, -104, -21), (s * 6, -86, -13), 3.2))
        return d

    c.paint(nasal_cavity, ((-16, 16), (-115, -18), (-30, 18)), HU_AIR, clear_bits=BONE)
    # Septum: a thin plate down the middle of the nasal cavity, behind the piriform aperture
    # (the cartilage in front of it belongs to the nose, i.e. to the face).
    c.paint(
        lambda x, y, z: np.maximum(
            np.maximum(nasal_cavity(x, y, z) - 0.5, np.abs(x) - 1.0), -86.0 - y
        ),
        ((-3, 3), (-90, -20), (-30, 18)),
        HU_CARTILAGE * 3,
        set_bits=BONE,
    )
    paint_mandible_and_teeth(c)
    if w is not None:
        paint_brain(c, sl, cav)


def paint_mandible_and_teeth(c: Canvas) -> None:
    """U-shaped mandible body with rami, and upper and lower dental arches."""

    def arch_dist(x, y, front, back, halfwidth):
        t = np.clip(np.abs(x) / halfwidth, 0.0, 1.2)
        yc = front + (back - front) * t * t
        slope = 2 * (back - front) * t / halfwidth
        return (y - yc) / np.sqrt(1.0 + slope * slope)

    def mandible(x, y, z):
        ax = np.abs(x)
        da = np.abs(arch_dist(x, y, -86.0, -14.0, 50.0)) - (7.0 - 2.5 * np.clip(ax / 30, 0, 1))
        zb = -96.0 + 26.0 * np.clip(ax / 50, 0, 1)
        zt = -57.0 + 4.0 * np.clip(ax / 50, 0, 1)
        body = np.maximum(np.maximum(da, zb - z), np.maximum(z - zt, ax - 52.0))
        ramus = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), 1e3, np.float32)
        for s in SIDES:
            ramus = np.minimum(
                ramus,
                S.box(x, y - 0.25 * (z + 40), z, (s * 50, -16, -38), (3.5, 12, 32), 2.0),
            )
            ramus = np.minimum(ramus, S.sphere(x, y, z, (s * 52, -6, -6), 6.0))  # condyle
        return S.smin(body, ramus, 4)

    def bone_hu(d, x, y, z):
        return np.where(d > -2.0, HU_CORTICAL, HU_CANCELLOUS).astype(np.float32)

    c.paint(mandible, ((-60, 60), (-100, 10), (-100, 2)), bone_hu, set_bits=BONE)

    def teeth(front, back, zc, direction):
        def fn(x, y, z):
            d = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), 1e3, np.float32)
            for i in range(7):
                ang = (i + 0.5) / 7.0
                for s in SIDES:
                    tx = s * 40.0 * ang
                    ty = front + (back - front) * ang * ang
                    crown = S.ellipsoid(
                        x, y, z, (tx, ty, zc), (4.0 + 1.0 * ang, 3.5 + 2 * ang, 6.0)
                    )
                    root = S.capsule(x, y, z, (tx, ty, zc), (tx, ty, zc + direction * 14), 2.2)
                    d = np.minimum(d, np.minimum(crown, root))
            return d

        return fn

    def tooth_hu(d, x, y, z):
        return np.where(d > -1.2, HU_ENAMEL, HU_DENTIN).astype(np.float32)

    # Upper alveolar process: the bony arch that holds the upper teeth.
    def alveolus(x, y, z):
        da = np.abs(arch_dist(x, y, -83.0, -38.0, 42.0)) - 5.5
        return np.maximum(np.maximum(da, np.abs(z + 28.0) - 9.0), np.abs(x) - 44.0)

    c.paint(alveolus, ((-50, 50), (-95, -15), (-40, -16)), bone_hu, set_bits=BONE)
    c.paint(
        teeth(-85.5, -40.0, -42.5, 1.0),
        ((-50, 50), (-95, -30), (-50, -20)),
        tooth_hu,
        set_bits=BONE,
    )
    c.paint(
        teeth(-83.0, -40.0, -50.0, -1.0),
        ((-50, 50), (-95, -30), (-70, -40)),
        tooth_hu,
        set_bits=BONE,
    )


def _canal_y(z):
    return 22.0 + 0.06 * (-40.0 - z)


def paint_neck(c: Canvas) -> None:
    """Cervical spine, spinal canal and cord, airway, neck vessels are in paint_vessels."""
    box = ((-40, 40), (-30, 70), (-260, -20))

    def canal(x, y, z):
        return np.maximum(np.sqrt(x * x + (y - _canal_y(z)) ** 2) - 8.0, z - (-30.0))

    def vertebrae(x, y, z):
        cy = _canal_y(z)
        body = np.sqrt((x / 10.0) ** 2 + ((y - cy + 19.0) / 8.5) ** 2) * 8.5 - 8.5
        period = 18.0
        zz = np.mod(z + 45.0, period) - period / 2
        body = np.maximum(body, np.abs(zz) - 7.0)
        arch = np.abs(np.sqrt(x * x + (y - cy) ** 2) - 10.5) - 2.5
        arch = np.maximum(arch, np.abs(zz) - 5.0)
        spinous = S.box(x, y - cy, zz, (0, 20, 0), (3, 10, 4))
        trans = S.box(x, y - cy + 10, zz, (0, 0, 0), (24, 3.5, 3.5))
        d = np.minimum(np.minimum(body, arch), np.minimum(spinous, trans))
        dens = S.capsule(x, y, z, (0, 2, -45), (0, 2, -33), 5.0)
        return np.maximum(np.minimum(d, dens), z - (-31.0))

    def vert_hu(d, x, y, z):
        return np.where(d > -1.5, 700.0, 250.0).astype(np.float32)

    def discs(x, y, z):
        cy = _canal_y(z)
        body = np.sqrt((x / 10.0) ** 2 + ((y - cy + 19.0) / 8.5) ** 2) * 8.5 - 8.5
        return np.maximum(body, z - (-45.0))

    c.paint(discs, box, HU_DISC)
    c.paint(vertebrae, box, vert_hu, set_bits=BONE)
    c.paint(canal, box, HU_CSF, clear_bits=BONE)
    c.paint(
        lambda x, y, z: np.maximum(np.sqrt(x * x + (y - _canal_y(z)) ** 2) - 5.0, z - (-25.0)),
        box,
        35.0,
    )
    # Airway: nasopharynx → oropharynx → larynx → trachea; cartilage ring at the larynx.
    pts = [
        (0, -35, -8),
        (0, -18, -22),
        (0, -14, -60),
        (0, -16, -95),
        (0, -26, -125),
        (0, -24, -260),
    ]
    radii = [8.0, 8.0, 7.0, 7.0, 8.5, 9.0]
    c.paint(
        lambda x, y, z: S.ellipsoid(x, y, z, (0, -27, -112), (16, 14, 14)),
        ((-20, 20), (-50, -10), (-130, -95)),
        HU_CARTILAGE,
    )
    c.paint(
        lambda x, y, z: S.polyline(x, y, z, pts, radii),
        ((-15, 15), (-50, 0), (-260, 0)),
        HU_AIR,
    )


def paint_brain(c: Canvas, sl: tuple[slice, slice, slice], cav: np.ndarray) -> None:
    """CSF-filled cranial cavity with grey/white matter, ventricles; marks intracranial.

    ``cav`` is the cavity's signed distance over window ``sl``.
    """
    c.paint_at(
        sl, cav, np.float32(HU_CSF), set_bits=INTRACRANIAL, clear_bits=BONE, inside_skin=None
    )
    brain = cav + np.float32(2.5)
    grey_white = np.where(brain > -6.0, np.float32(HU_BRAIN_GREY), np.float32(HU_BRAIN_WHITE))
    c.paint_at(sl, brain, grey_white, inside_skin=None, only_bits=INTRACRANIAL)
    for s in SIDES:
        c.paint(
            lambda x, y, z, s=s: S.ellipsoid(x, y, z, (s * 9, 8, 42), (6, 26, 8)),
            ((s * 9 - 8, s * 9 + 8), (-20, 36), (32, 52)),
            HU_CSF,
            inside_skin=None,
            only_bits=INTRACRANIAL,
        )


def paint_eyes(c: Canvas) -> None:
    """Globes (vitreous 10 HU) with lenses and optic nerves."""
    for s in SIDES:
        ex = s * 31.5
        c.paint(
            lambda x, y, z, ex=ex: S.sphere(x, y, z, (ex, -67.5, 15), 11.8),
            ((ex - 13, ex + 13), (-81, -54), (2, 28)),
            HU_GLOBE,
            inside_skin=0.4,
        )
        c.paint(
            lambda x, y, z, ex=ex: S.ellipsoid(x, y, z, (ex, -76.5, 15), (4.5, 2.0, 4.5)),
            ((ex - 6, ex + 6), (-80, -73), (9, 21)),
            HU_LENS,
            inside_skin=0.4,
        )
        c.paint(
            lambda x, y, z, ex=ex, s=s: S.capsule(x, y, z, (ex, -56, 15), (s * 12, -25, 18), 2.2),
            ((ex - 25, ex + 25), (-60, -20), (8, 25)),
            HU_NERVE,
            clear_bits=BONE,
        )


def paint_vessels(c: Canvas) -> None:
    """Contrast-filled arteries (carotids, vertebrals, basilar, circle of Willis) and veins."""
    box_all = ((-70, 70), (-90, 60), (-260, 90))
    arteries: list[tuple[list[tuple[float, float, float]], list[float]]] = []
    for s in SIDES:
        arteries.append(
            (
                [
                    (s * 22, -12, -260),
                    (s * 22, -10, -105),
                    (s * 25, 2, -70),
                    (s * 24, 6, -35),
                    (s * 18, -4, -12),
                    (s * 15, -14, 2),
                    (s * 14, -12, 10),
                ],
                [3.5, 3.5, 2.8, 2.6, 2.4, 2.2, 2.0],
            )
        )  # common + internal carotid
        arteries.append(
            (
                [
                    (s * 22, -10, -105),
                    (s * 30, -24, -80),
                    (s * 40, -40, -60),
                    (s * 46, -62, -40),
                    (s * 28, -88, -20),
                ],
                [2.4, 2.0, 1.6, 1.4, 1.1],
            )
        )  # external carotid → facial artery
        arteries.append(
            (
                [
                    (s * 16, 14, -260),
                    (s * 17, 12, -60),
                    (s * 22, 26, -42),
                    (s * 8, 18, -32),
                    (0, 2, -24),
                ],
                [2.0, 2.0, 1.9, 1.8, 1.8],
            )
        )  # vertebral
        arteries.append(
            ([(s * 14, -12, 10), (s * 30, -10, 14), (s * 52, -4, 22)], [1.8, 1.6, 1.2])
        )  # MCA
        arteries.append(
            (
                [(s * 14, -12, 10), (s * 3, -22, 14), (s * 3, -50, 40), (s * 3, -40, 75)],
                [1.4, 1.3, 1.2, 1.0],
            )
        )  # ACA
        arteries.append(
            ([(0, -6, 4), (s * 10, 0, 6), (s * 24, 20, 12), (s * 30, 55, 20)], [1.6, 1.5, 1.3, 1.0])
        )  # PCA
        arteries.append(([(s * 14, -12, 10), (s * 10, 0, 6)], [1.0, 1.0]))  # PComm
    arteries.append(([(0, 2, -24), (0, -6, 4)], [2.2, 2.0]))  # basilar
    arteries.append(([(-3, -22, 14), (3, -22, 14)], [1.0, 1.0]))  # AComm

    def art(x, y, z):
        d = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), 1e3, np.float32)
        for pts, radii in arteries:
            d = np.minimum(d, S.polyline(x, y, z, pts, radii))
        return d

    def jugular(x, y, z):
        d = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), 1e3, np.float32)
        for s in SIDES:
            d = np.minimum(
                d,
                S.polyline(
                    x,
                    y,
                    z,
                    [(s * 30, 0, -260), (s * 30, 2, -60), (s * 34, 14, -38)],
                    [6.0, 6.0, 5.0],
                ),
            )
        return d

    c.paint(jugular, ((-45, 45), (-15, 25), (-260, -30)), HU_VEIN)
    # Arteries cross the skull base: they replace bone along their path.
    for pts, radii in arteries:
        p = np.asarray(pts)
        r = max(radii) + 2
        bbox = tuple((float(p[:, i].min() - r), float(p[:, i].max() + r)) for i in range(3))
        c.paint(
            lambda x, y, z, pts=pts, radii=radii: S.polyline(x, y, z, pts, radii),
            bbox,  # type: ignore[arg-type]
            HU_ARTERY,
            clear_bits=BONE,
        )
    del box_all


def paint_eye_shield(c: Canvas, kind: str) -> None:
    """A 2 mm curved plate over each eye, 4.5 mm in front of the lids (follows the face)."""
    for s in SIDES:
        ex = s * 31.5

        def plate(x, y, z, ex=ex):
            return S.box(x, y, z, (ex, -90, 15), (19, 30, 14), 3.0)

        w = c.window(((ex - 20, ex + 20), (-125, -60), (0, 30)))
        if w is None:
            continue
        sl, x, y, z = w
        region = plate(x, y, z)
        skin = c.skin[sl]
        shell = (region < 0) & (skin > 4.5) & (skin < 6.5)
        # keep only the front-most shell (not the layer behind the nose or brows)
        c.hu[sl][shell] = HU_SHIELD[kind]
        c.labels[sl][shell] |= FOREIGN


TUBE_PATH = [
    (0.0, -140.0, -40.0),
    (0.0, -100.0, -45.0),
    (0.0, -70.0, -45.0),
    (0.0, -40.0, -40.0),
    (0.0, -20.0, -55.0),
    (0.0, -16.0, -90.0),
    (0.0, -26.0, -125.0),
    (0.0, -24.0, -200.0),
]


def paint_tube(c: Canvas) -> None:
    """Endotracheal tube from in front of the mouth down the airway: plastic wall, air lumen."""
    n = len(TUBE_PATH)
    bbox = ((-12.0, 12.0), (-150.0, 0.0), (-210.0, -30.0))
    c.paint(
        lambda x, y, z: S.polyline(x, y, z, TUBE_PATH, [6.0] * n),
        bbox,
        HU_AIR,
        clear_bits=BONE,
        inside_skin=None,
    )
    c.paint(
        lambda x, y, z: S.polyline(x, y, z, TUBE_PATH, [4.8] * n),
        bbox,
        HU_TUBE_WALL,
        set_bits=FOREIGN,
        inside_skin=None,
    )
    c.paint(
        lambda x, y, z: S.polyline(x, y, z, TUBE_PATH, [3.3] * n), bbox, HU_AIR, inside_skin=None
    )


def facemask(c: Canvas) -> np.ndarray:
    """Ground-truth facemask on the canvas (bool ``[z, y, x]``).

    Face region: from 60 mm above the Frankfurt plane (above the frontal sinus, whose top is
    at ~47 mm) down to 1 mm below the lower border of the mandible, anterior to the
    temporo-mandibular joints (y < −8 mm) and medial to the ears (|x| < 72 mm). Inside it:
    soft tissue (not bone, not internal air) within ``FACEMASK_DEPTH`` of the skin whose
    straight path to the front (−y) crosses no bone (gaps under ~3 mm between bones, e.g.
    between teeth, count as closed), plus foreign objects on the face (eye shield, tube)
    that are in front of the facial bones. Never intracranial.
    """
    from scipy import ndimage

    out = np.zeros(c.shape, dtype=bool)
    w = c.window(((-72.0, 72.0), (-200.0, -8.0), (-100.0, 60.0)))
    if w is None:
        return out
    sl, x, y, z = w
    inside = c.skin[sl] < 0
    depth = ndimage.distance_transform_edt(inside, sampling=c.res).astype(np.float32)
    labels = c.labels[sl]
    bone = (labels & BONE) != 0
    # blocked: some bone lies in front (smaller y) in the same (z, x) column; gaps under ~3 mm
    # across (z, x), e.g. between teeth, are closed first so that they do not leak
    n = max(1, round(1.5 / c.res))
    wall = bone | ndimage.binary_closing(bone, structure=np.ones((2 * n + 1, 1, 2 * n + 1), bool))
    blocked = np.logical_or.accumulate(wall, axis=1)
    soft = inside & ~bone & (c.hu[sl] > -500.0) & (depth <= FACEMASK_DEPTH)
    foreign = ((labels & FOREIGN) != 0) & (~inside | (depth <= FACEMASK_DEPTH))
    # lower limit: the mandible's lower border (chin soft tissue down to the menton)
    z_low = -97.0 + 26.0 * np.clip(np.abs(x) / 50.0, 0.0, 1.0)
    inreg = (np.abs(x) < 72.0) & (y < -8.0) & (z >= z_low) & (z <= 60.0)
    region = np.broadcast_to(inreg, soft.shape)
    m = region & ~blocked & (soft | foreign) & ((labels & INTRACRANIAL) == 0)
    out[sl] = m
    return out
