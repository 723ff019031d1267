"""Generated product shots with a known subject mask, for `make demo`, the tests and the benchmarks.

Each shot is a small studio scene: one to three shaded products (bottles, boxes, mugs, spheres, shoes)
standing on a backdrop (white sweep, grey paper, gradient, light vignette), with soft contact and cast
shadows, a touch of lens softness and sensor noise. The mask is the true subject coverage; shadows are
part of the background, as a retoucher would cut them. Deterministic from the seed and fast (well under
0.3 s for 1024x1024), so benchmarks can make hundreds of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

BACKDROPS = ("white_sweep", "grey_paper", "gradient", "vignette")
PRODUCTS = ("bottle", "box", "mug", "sphere", "shoe")
_TALLNESS = {"bottle": 2.6, "box": 1.6, "mug": 1.1, "sphere": 1.2, "shoe": 0.8}  # height / unit, at most
_WIDTH = {"bottle": 0.8, "box": 1.5, "mug": 1.25, "sphere": 1.2, "shoe": 1.8}

# Product paints (sRGB). A grey in the middle of the tonal range is left out on purpose: on a neutral
# backdrop it reads exactly like a shadow, which no colour-based cut (nor a retoucher's eye) can tell apart.
_PAINTS = (
    (178, 32, 42), (28, 52, 112), (32, 112, 64), (142, 74, 28), (26, 26, 30), (232, 122, 30),
    (22, 128, 140), (98, 48, 128), (226, 186, 38), (214, 104, 146), (60, 40, 34), (40, 90, 170),
    (236, 226, 198), (120, 160, 40), (190, 60, 20), (16, 70, 60),
)


@dataclass(frozen=True)
class StudioShot:
    rgb: NDArray[np.uint8]  # HxWx3
    mask: NDArray[np.float32]  # HxW in [0, 1]: the products only, never their shadows
    backdrop: str  # one of BACKDROPS
    shadow: NDArray[np.float32] | None = None  # HxW: share of the backdrop's light the shadows take away


def studio_shot(seed: int, size: tuple[int, int] = (1024, 1024), backdrop: str | None = None) -> StudioShot:
    """One product shot. `size` is (width, height); `backdrop` None picks one from the seed."""
    import cv2

    width, height = size
    if width < 64 or height < 64:
        raise ValueError(f"size must be at least 64x64, got {width}x{height}")
    rng = np.random.default_rng(seed)
    kind = backdrop if backdrop is not None else BACKDROPS[int(rng.integers(len(BACKDROPS)))]
    if kind not in BACKDROPS:
        raise ValueError(f"unknown backdrop {kind!r} (known: {', '.join(BACKDROPS)})")

    bg = _backdrop(kind, width, height, rng)
    bg_mean = bg.reshape(-1, 3).mean(axis=0)
    scene = _Scene(height, width, rng, bg_mean)
    floor = height * rng.uniform(0.74, 0.9)
    count = int(rng.choice([1, 1, 1, 2, 2, 3]))
    # Spread the products across the frame; neighbours may overlap a little.
    centres = np.sort(rng.uniform(0.25, 0.75, size=count)) if count > 1 else np.array([rng.uniform(0.4, 0.6)])
    if count > 1:
        centres = np.linspace(0.5 - 0.17 * (count - 1), 0.5 + 0.17 * (count - 1), count)
        centres += rng.uniform(-0.04, 0.04, size=count)
    unit = min(width, height) / (2.2 + 0.6 * count)
    for i, cx in enumerate(centres):
        product = PRODUCTS[int(rng.integers(len(PRODUCTS)))]
        paint = _paint_for(bg_mean, rng)
        base_y = floor + rng.uniform(-0.02, 0.02) * height + i * 0.01 * height
        # A product shot never crops the product: tall ones are scaled to leave headroom.
        room = min(cx, 1 - cx) * width * 2 * 0.92
        size_unit = min(unit * rng.uniform(0.8, 1.1), (base_y - 0.08 * height) / _TALLNESS[product],
                        room / _WIDTH[product])
        getattr(scene, product)(cx * width, base_y, size_unit, paint)

    shadow = scene.shadow_map()
    image = bg * (1.0 - shadow[..., None])
    image = image * (1.0 - scene.alpha[..., None]) + scene.colour
    sigma = 0.6 * min(width, height) / 1024  # lens softness: real edges are never a perfect step
    soft = cv2.GaussianBlur(image, (0, 0), max(sigma, 0.3))
    noise_sigma = rng.uniform(1.2, 2.8)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * (noise_sigma * 0.35)
    noise += rng.standard_normal((height, width, 1), dtype=np.float32) * noise_sigma
    soft += noise * np.sqrt(np.clip(soft, 16, 255) / 128.0)
    rgb = np.clip(soft + 0.5, 0, 255).astype(np.uint8)
    visible_shadow = (shadow * (1.0 - scene.alpha)).astype(np.float32)
    return StudioShot(rgb=rgb, mask=np.clip(scene.alpha, 0, 1).astype(np.float32), backdrop=kind,
                      shadow=visible_shadow)


def write_samples(
    folder: Path, count: int, size: tuple[int, int] = (1024, 1024), seed: int = 0, quality: int = 90
) -> list[Path]:
    """`count` shots as JPEG files (cycling through the backdrops); returns their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        kind = BACKDROPS[i % len(BACKDROPS)]
        shot = studio_shot(seed + i, size=size, backdrop=kind)
        path = folder / f"shot_{seed + i:04d}_{kind}.jpg"
        Image.fromarray(shot.rgb).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- backdrops


def _backdrop(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    import cv2

    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    tint = rng.uniform(-4, 4, size=3).astype(np.float32)
    if kind == "white_sweep":
        base = rng.uniform(238, 250) + tint
        # The sweep curves from wall to floor: a little darker high up, brightest where the light hits.
        fall = 0.9 + 0.1 * np.clip(yy * 1.4, 0, 1) - 0.03 * (xx - 0.5) ** 2
        field = fall[..., None] * base
    elif kind == "grey_paper":
        base = rng.uniform(138, 190) + tint * 1.5
        blotch = rng.standard_normal((12, 12)).astype(np.float32)
        blotch = cv2.resize(blotch, (width, height), interpolation=cv2.INTER_CUBIC) * 0.015
        fall = 1.02 - 0.06 * yy + blotch
        field = fall[..., None] * base
        grain = rng.standard_normal((height, width), dtype=np.float32) * 1.2
        field = field + grain[..., None]
    elif kind == "gradient":
        top = np.array(_pick_light(rng), dtype=np.float32)
        bottom = top * rng.uniform(0.7, 0.85) + rng.uniform(-6, 6, size=3)
        angle = rng.uniform(-0.4, 0.4)
        t = np.clip((yy * np.cos(angle) + (xx - 0.5) * np.sin(angle)), 0, 1)
        field = top * (1 - t[..., None]) + bottom * t[..., None]
    elif kind == "vignette":
        base = rng.uniform(222, 242) + tint
        cx, cy = rng.uniform(0.42, 0.58), rng.uniform(0.4, 0.55)
        aspect = width / height
        r2 = ((xx - cx) * aspect) ** 2 + (yy - cy) ** 2
        strength = rng.uniform(0.18, 0.3)
        field = (1.0 - strength * np.clip(r2 / 0.5, 0, 1.5) ** 1.3)[..., None] * base
    else:  # pragma: no cover - studio_shot checks the name
        raise ValueError(kind)
    return np.broadcast_to(field, (height, width, 3)).astype(np.float32)


def _pick_light(rng: np.random.Generator) -> tuple[float, float, float]:
    choices = ((236, 238, 244), (244, 236, 226), (226, 236, 240), (232, 232, 232), (240, 228, 232))
    r, g, b = choices[int(rng.integers(len(choices)))]
    return (float(r), float(g), float(b))


def _paint_for(bg_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A product colour that stands out from this backdrop by colour or by a clear difference in tone."""
    bg_luma = float(bg_mean @ np.array([0.299, 0.587, 0.114]))
    for _ in range(50):
        paint = np.array(_PAINTS[int(rng.integers(len(_PAINTS)))], dtype=np.float32)
        paint = np.clip(paint + rng.uniform(-12, 12, size=3), 0, 255)
        luma = float(paint @ np.array([0.299, 0.587, 0.114]))
        chroma = float(paint.max() - paint.min())
        if chroma > 60 and abs(luma - bg_luma) > 12:
            return paint
        if luma < 0.3 * bg_luma or luma > bg_luma + 45:
            return paint
    return np.array((26.0, 26.0, 30.0), dtype=np.float32)


# ---------------------------------------------------------------- products


_LIGHT = np.array([-0.55, -0.45, 0.70], dtype=np.float32)
_LIGHT /= np.linalg.norm(_LIGHT)


class _Scene:
    """Products composited back to front; remembers coverage (alpha) and where the shadows fall."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, backdrop_mean: np.ndarray) -> None:
        self.h, self.w, self.rng = height, width, rng
        self.backdrop_mean = backdrop_mean
        self.alpha = np.zeros((height, width), np.float32)
        self.colour = np.zeros((height, width, 3), np.float32)  # premultiplied
        self.contacts: list[tuple[float, float, float]] = []  # (x, y, half-width) where products touch down
        self.silhouettes = np.zeros((height, width), np.float32)
        self._yx: np.ndarray | None = None

    # -- drawing primitives

    def _coverage(self, polygons: list[np.ndarray], holes: list[np.ndarray] | None = None) -> np.ndarray:
        import cv2

        canvas = np.zeros((self.h, self.w), np.uint8)
        cv2.fillPoly(canvas, [np.round(p * 16).astype(np.int32) for p in polygons], 255, cv2.LINE_AA, shift=4)
        if holes:
            cv2.fillPoly(canvas, [np.round(p * 16).astype(np.int32) for p in holes], 0, cv2.LINE_AA, shift=4)
        return canvas

    def _paint(self, cover: np.ndarray, shade: np.ndarray | float, paint: np.ndarray,
               gloss: np.ndarray | float = 0.0) -> None:
        """Composite one part over what is there: colour = paint x shade, blended to white by gloss."""
        ys, xs = np.nonzero(cover)
        if len(ys) == 0:
            return
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        a = cover[box].astype(np.float32)[..., None] / 255.0
        sh = np.asarray(shade, np.float32)
        gl = np.asarray(gloss, np.float32)
        sh = sh[box][..., None] if sh.ndim == 2 else sh
        gl = gl[box][..., None] if gl.ndim == 2 else gl
        col = paint[None, None, :] * sh * (1 - gl) + 250.0 * gl
        self.colour[box] = self.colour[box] * (1 - a) + col * a
        self.alpha[box] = self.alpha[box] * (1 - a[..., 0]) + a[..., 0]

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        if self._yx is None:
            self._yx = np.mgrid[0 : self.h, 0 : self.w].astype(np.float32)
        return self._yx[0], self._yx[1]

    def _cylinder_shade(self, cx: float, half: float, gloss_amount: float) -> tuple[np.ndarray, np.ndarray]:
        x = np.arange(self.w, dtype=np.float32)
        u = np.clip((x - cx) / max(half, 1.0), -1, 1)
        nz = np.sqrt(1 - u * u)
        lam = np.clip(u * _LIGHT[0] + nz * _LIGHT[2], 0, 1)
        shade = 0.32 + 0.78 * lam
        gloss = gloss_amount * np.exp(-(((u + 0.42) / 0.09) ** 2))
        return (np.broadcast_to(shade[None, :], (self.h, self.w)),
                np.broadcast_to(gloss[None, :], (self.h, self.w)))

    @staticmethod
    def _ellipse(cx: float, cy: float, rx: float, ry: float, t0: float = 0.0, t1: float = 2 * np.pi,
                 n: int = 96) -> np.ndarray:
        t = np.linspace(t0, t1, n)
        return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)

    def _accent(self, paint: np.ndarray) -> np.ndarray:
        """A label or print colour. A white label running to the product's edge on a white backdrop has no
        edge a colour-based cut could find (rembg models do better there), so it only appears where the
        backdrop is darker."""
        cream = np.array((238, 234, 222), np.float32)
        if float(self.backdrop_mean.mean()) < 195 and paint.mean() < 150:
            return cream
        if paint.mean() > 120:
            return paint * 0.35
        return _paint_for(self.backdrop_mean, self.rng)

    def _touch_down(self, x: float, y: float, half: float, cover: np.ndarray) -> None:
        self.contacts.append((x, y, half))
        np.maximum(self.silhouettes, cover.astype(np.float32) / 255.0, out=self.silhouettes)

    # -- products

    def bottle(self, x: float, base: float, unit: float, paint: np.ndarray) -> None:
        rng = self.rng
        half = unit * rng.uniform(0.28, 0.38)
        body_h = unit * rng.uniform(1.1, 1.6)
        neck = half * rng.uniform(0.3, 0.42)
        shoulder = unit * rng.uniform(0.2, 0.35)
        neck_h = unit * rng.uniform(0.22, 0.35)
        top = base - body_h
        t = np.linspace(0, np.pi / 2, 16)
        right_shoulder = np.stack([x + neck + (half - neck) * np.sin(t), top - shoulder * np.cos(t)], 1)
        corner = half * 0.12
        outline = np.concatenate([
            [[x - neck, top - shoulder - neck_h], [x + neck, top - shoulder - neck_h]],
            right_shoulder,
            [[x + half, base - corner], [x + half - corner, base], [x - half + corner, base],
             [x - half, base - corner]],
            right_shoulder[::-1] * [-1, 1] + [2 * x, 0],
        ])
        cover = self._coverage([outline])
        shade, gloss = self._cylinder_shade(x, half, 0.55)
        self._paint(cover, shade, paint, gloss)
        cap_h = neck_h * 0.55
        lip = top - shoulder - neck_h
        cap = np.array([[x - neck * 1.18, lip - cap_h], [x + neck * 1.18, lip - cap_h],
                        [x + neck * 1.18, lip + cap_h * 0.4], [x - neck * 1.18, lip + cap_h * 0.4]])
        cap_cover = self._coverage([cap])
        cap_paint = np.array(_PAINTS[int(rng.integers(len(_PAINTS)))], np.float32) * 0.6 + 20
        cshade, cgloss = self._cylinder_shade(x, neck * 1.18, 0.3)
        self._paint(cap_cover, cshade, cap_paint, cgloss)
        # A paper label: products are rarely one flat colour.
        if rng.random() < 0.7:
            ly0, ly1 = base - body_h * 0.75, base - body_h * 0.3
            label = np.array([[x - half, ly0], [x + half, ly0], [x + half, ly1], [x - half, ly1]])
            label_paint = self._accent(paint)
            self._paint(self._coverage([label]), shade, label_paint, gloss * 0.2)
        self._touch_down(x, base, half, np.maximum(cover, cap_cover))

    def box(self, x: float, base: float, unit: float, paint: np.ndarray) -> None:
        rng = self.rng
        w = unit * rng.uniform(0.7, 1.1)
        h = unit * rng.uniform(0.7, 1.3)
        dx, dy = w * rng.uniform(0.2, 0.35), w * rng.uniform(0.12, 0.2)
        x0, x1 = x - w / 2 - dx / 2, x + w / 2 - dx / 2
        front = np.array([[x0, base - h], [x1, base - h], [x1, base], [x0, base]])
        side = np.array([[x1, base - h], [x1 + dx, base - h - dy], [x1 + dx, base - dy], [x1, base]])
        top = np.array([[x0, base - h], [x0 + dx, base - h - dy], [x1 + dx, base - h - dy], [x1, base - h]])
        yy, _ = self._grid()
        grad = 0.86 + 0.1 * np.clip((base - yy) / max(h, 1), 0, 1)
        self._paint(self._coverage([front]), grad, paint)
        self._paint(self._coverage([side]), grad * 0.62, paint)
        self._paint(self._coverage([top]), 1.12, paint)
        if rng.random() < 0.6:  # a printed band across the front
            by = base - h * rng.uniform(0.35, 0.6)
            band = np.array([[x0, by], [x1, by], [x1, by + h * 0.12], [x0, by + h * 0.12]])
            band_paint = self._accent(paint)
            self._paint(self._coverage([band]), grad, band_paint)
        self._touch_down(x - dx / 2 + dx / 2, base - dy / 3, w / 2 + dx / 2,
                         self._coverage([front, side, top]))

    def mug(self, x: float, base: float, unit: float, paint: np.ndarray) -> None:
        rng = self.rng
        half = unit * rng.uniform(0.32, 0.42)
        h = unit * rng.uniform(0.75, 1.0)
        rim = half * 0.22
        # Seen from a little above: the rim's far half on top, the base's near half below.
        body = np.concatenate([
            self._ellipse(x, base - h, half, rim, np.pi, 2 * np.pi, 48),
            self._ellipse(x, base - rim * 0.6, half, rim * 0.6, 0, np.pi, 48),
        ])
        side = 1 if rng.random() < 0.5 else -1
        hx = x + side * (half + half * 0.28)
        hy = base - h * 0.52
        outer = self._ellipse(hx, hy, half * 0.46, h * 0.32)
        inner = self._ellipse(hx, hy, half * 0.24, h * 0.19)
        handle = self._coverage([outer], [inner])
        body_cover = self._coverage([body])
        handle[body_cover > 0] = 0  # the handle sits behind the body's edge
        yy, _ = self._grid()
        hshade = 0.45 + 0.5 * np.clip(1 - np.abs(yy - hy) / (h * 0.35), 0, 1)
        self._paint(handle, hshade, paint)
        shade, gloss = self._cylinder_shade(x, half, 0.45)
        self._paint(body_cover, shade, paint, gloss)
        opening = self._coverage([self._ellipse(x, base - h, half * 0.9, rim * 0.85)])
        self._paint(opening, 0.45 + 0.25 * np.clip((yy - (base - h)) / rim, -1, 1), paint)
        self._touch_down(x, base, half, np.maximum(body_cover, handle))

    def sphere(self, x: float, base: float, unit: float, paint: np.ndarray) -> None:
        r = unit * self.rng.uniform(0.4, 0.6)
        cy = base - r
        cover = self._coverage([self._ellipse(x, cy, r, r, n=160)])
        yy, xx = self._grid()
        u, v = (xx - x) / r, (yy - cy) / r
        nz = np.sqrt(np.clip(1 - u * u - v * v, 0, 1))
        lam = np.clip(u * _LIGHT[0] + v * _LIGHT[1] + nz * _LIGHT[2], 0, 1)
        refl = np.clip(2 * lam * nz - _LIGHT[2], 0, 1) ** 24
        self._paint(cover, 0.28 + 0.82 * lam, paint, 0.6 * refl)
        self._touch_down(x, base, r * 0.5, cover)

    def shoe(self, x: float, base: float, unit: float, paint: np.ndarray) -> None:
        import cv2

        rng = self.rng
        length = unit * rng.uniform(1.3, 1.7)
        height = length * rng.uniform(0.36, 0.46)
        sole = length * 0.06
        flip = 1 if rng.random() < 0.5 else -1
        t = np.linspace(0, 1, 60)
        # Upper, heel to toe: a rounded heel counter, the collar opening, then the vamp sloping to the toe.
        heel = 0.92 - 0.25 * np.exp(-(((t - 0.24) / 0.09) ** 2))
        slope = np.clip((t - 0.3) / 0.7, 0, 1)
        profile = heel * (1 - slope) + slope * (0.92 - 0.62 * slope**1.2)
        profile *= np.sqrt(np.clip(t / 0.06, 0, 1)) * np.sqrt(np.clip((1 - t) / 0.1, 0, 1)) * 0.3 + 0.7
        top_y = base - sole - height * profile
        xs = x + flip * (t - 0.5) * length
        toe_x, heel_x = x + flip * 0.5 * length, x - flip * 0.5 * length
        upper = np.concatenate([np.stack([xs, top_y], 1), [[toe_x, base - sole], [heel_x, base - sole]]])
        sole_poly = np.array([[x - length * 0.52, base - sole * 1.4], [x + length * 0.52, base - sole * 1.4],
                              [x + length * 0.5, base], [x - length * 0.5, base]])
        cover = self._coverage([upper])
        # Pillow shading from the distance to the outline: a rounded leather look without a 3D model.
        dist = cv2.distanceTransform((cover > 127).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        dome = np.sqrt(np.clip(dist / (height * 0.35), 0, 1))
        gy, gx = np.gradient(cv2.GaussianBlur(dome, (0, 0), 3))
        n = np.stack([-gx * height * 0.2, -gy * height * 0.2, np.ones_like(gx)], -1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        lam = np.clip(n @ _LIGHT, 0, 1)
        self._paint(cover, 0.3 + 0.8 * lam, paint, 0.15 * lam**12)
        sole_cover = self._coverage([sole_poly])
        soles = ((176, 118, 62), (40, 38, 36), (150, 40, 30))  # gum, black rubber, red rubber
        sole_paint = np.array(soles[int(rng.integers(len(soles)))], np.float32)
        self._paint(sole_cover, 1.0, sole_paint)
        self._touch_down(x, base, length * 0.5, np.maximum(cover, sole_cover))

    # -- shadows

    def shadow_map(self) -> np.ndarray:
        """How much light each backdrop pixel loses: soft contact shadows plus a faint cast shadow."""
        import cv2

        small = 4  # shadows are smooth: draw them at a quarter of the size, then scale up
        sh, sw = max(self.h // small, 8), max(self.w // small, 8)
        contact = np.zeros((sh, sw), np.float32)
        for x, y, half in self.contacts:
            cv2.ellipse(contact, (int(x / small), int(y / small)), (max(int(half * 1.1 / small), 1),
                        max(int(half * 0.12 / small), 1)), 0, 0, 360, 1.0, -1)
        reach = max(self.contacts, key=lambda c: c[2])[2] if self.contacts else 10.0
        contact_soft = cv2.GaussianBlur(contact, (0, 0), max(reach * 0.08 / small, 1.0))
        # Cast shadow: the silhouettes squashed onto the floor, leaning away from the key light.
        cast_src = cv2.resize(self.silhouettes, (sw, sh), interpolation=cv2.INTER_AREA)
        floor_y = max(c[1] for c in self.contacts) / small if self.contacts else sh * 0.8
        lean = self.rng.uniform(0.3, 0.7)
        matrix = np.array([[1, lean, -lean * floor_y], [0, 0.22, floor_y * 0.78]], dtype=np.float32)
        cast = cv2.warpAffine(cast_src, matrix, (sw, sh))
        cast = cv2.GaussianBlur(cast, (0, 0), max(reach * 0.18 / small, 1.5))
        # A studio's fill light keeps even the contact shadow at 40% or more of the backdrop's brightness.
        strength_contact = self.rng.uniform(0.3, 0.5)
        strength_cast = self.rng.uniform(0.1, 0.25)
        total = np.clip(contact_soft * strength_contact + cast * strength_cast, 0, 0.6)
        return cv2.resize(total, (self.w, self.h), interpolation=cv2.INTER_LINEAR)
