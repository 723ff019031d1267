"""Edges at full resolution: a net's small mask scaled up plainly (bicubic, as before) against guided
upsampling (bgwatch.pipeline.edges), on 12-24 MP composites whose alpha is known.

Each composite is a cut-out (products from bgwatch.samples, drawn at ~2 MP and scaled up, with a crisp
synthetic alpha made at full size from their true mask) placed over a different background: real photos
from scikit-image scaled up, a dark solid colour, a gradient, a studio sweep. The "net's mask" is the true
alpha reduced to 320x320 and rounded to uint8, as a perfect U²-Net would give it; both methods scale that
same mask up (`--mask u2net`: the real U²-Net's own mask of the composite instead, int8 when its variant
passed, as bench_cleanup.py fetches it). Measured: alpha MAE in the edge band (pixels within --band px of
the true edge), raw and after the daemon's refine_mask; the same within 16 px after refine, where halos
show; and the time of each. Then the peak RSS per pixel of a whole 25 MP job
(bench_memory.py, tiny net), which includes the guided upsampling.

    python bench/bench_edges.py [--band 3] [--mask truth|u2net] [--out bench/out/edges] [--no-memory]

Prints a table; writes 100% crops of the edges (truth, plain, guided) as PNGs under --out to look at.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

# (width, height, subject seed, background)
CASES = [
    (4240, 2832, 11, "coffee"), (4896, 3264, 12, "dark"), (5472, 3648, 13, "chelsea"),
    (6000, 4000, 14, "gradient"), (6000, 4000, 15, "astronaut"), (4240, 2832, 16, "sweep"),
]


def cutout(seed: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(foreground colour HxWx3 uint8, alpha HxW float32) at full size: the products of a studio shot,
    drawn small, their colour pushed outwards past the edge (no backdrop in it), their alpha a crisp
    (about 1.5 px) edge along the smooth outline of the scaled-up mask."""
    import cv2

    from bgwatch.samples import studio_shot

    scale = 1600 / max(width, height)
    small = studio_shot(seed, (round(width * scale), round(height * scale)), "white_sweep")
    m = small.mask.astype(np.float32)
    inside = (m > 0.98).astype(np.float32)
    # Colour pushed out from the solid inside (normalised blur), so F at the edge is the product's own.
    rgb = small.rgb.astype(np.float32)
    fill = cv2.GaussianBlur(rgb * inside[..., None], (0, 0), 6) / np.maximum(cv2.GaussianBlur(inside, (0, 0), 6),
                                                                           1e-4)[..., None]
    colour = np.where(inside[..., None] > 0, rgb, fill)
    fg = np.clip(cv2.resize(colour, (width, height), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    up = cv2.resize(cv2.GaussianBlur(m, (0, 0), 0.8), (width, height), interpolation=cv2.INTER_CUBIC)
    alpha = np.clip((up - 0.5) * (1.33 / scale) + 0.5, 0, 1).astype(np.float32)  # ~1.5 px from 0 to 1
    return fg, alpha


def background(kind: str, width: int, height: int) -> np.ndarray:
    import cv2

    if kind == "dark":
        return np.full((height, width, 3), (32, 36, 40), np.uint8)
    if kind == "gradient":
        ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
        top, bottom = np.array([90, 140, 200], np.float32), np.array([235, 225, 200], np.float32)
        return np.broadcast_to(top + (bottom - top) * ramp, (height, width, 3)).astype(np.uint8)
    if kind == "sweep":
        from bgwatch.samples import studio_shot

        plate = studio_shot(99, (800, round(800 * height / width)), "white_sweep").rgb
        return np.asarray(cv2.resize(plate, (width, height), interpolation=cv2.INTER_CUBIC))
    from skimage import data

    photo = np.ascontiguousarray(getattr(data, kind)()[..., :3])
    return np.asarray(cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC))


def composite(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return np.clip(np.round(fg * a + bg * (1 - a)), 0, 255).astype(np.uint8)


def edge_band(alpha: np.ndarray, px: int) -> np.ndarray:
    """Pixels within `px` of the true edge (the alpha's 0.5 line)."""
    import cv2

    solid = (alpha > 0.5).astype(np.uint8)
    inside = cv2.distanceTransform(solid, cv2.DIST_L2, 3)
    outside = cv2.distanceTransform(1 - solid, cv2.DIST_L2, 3)
    return np.asarray(((inside > 0) & (inside <= px + 0.5)) | ((outside > 0) & (outside <= px + 0.5)))


def crop_png(path: Path, truth: np.ndarray, plain: np.ndarray, guided: np.ndarray, band: np.ndarray,
             rgb: np.ndarray) -> None:
    """A 200x200 crop at 100% on a slanted stretch of the edge (where stair steps show), side by side: the
    photo, truth, plain, guided (alphas as grey)."""
    from PIL import Image

    ys, xs = np.nonzero(band[::7, ::7])
    ys, xs = ys * 7, xs * 7
    gy = truth[np.minimum(ys + 2, truth.shape[0] - 1), xs] - truth[np.maximum(ys - 2, 0), xs]
    gx = truth[ys, np.minimum(xs + 2, truth.shape[1] - 1)] - truth[ys, np.maximum(xs - 2, 0)]
    slant = np.minimum(np.abs(gx), np.abs(gy)) / np.maximum(np.maximum(np.abs(gx), np.abs(gy)), 1e-6)
    i = int(np.argmax(slant))
    y, x = int(ys[i]), int(xs[i])
    y0, x0 = max(0, y - 100), max(0, x - 100)
    tiles = [rgb[y0:y0 + 200, x0:x0 + 200]]
    for a in (truth, plain, guided):
        grey = (np.clip(a[y0:y0 + 200, x0:x0 + 200], 0, 1) * 255).astype(np.uint8)
        tiles.append(np.repeat(grey[..., None], 3, axis=2))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def _u2net_masker() -> Any:
    """rgb -> U2-Net's uint8 320x320 mask, through bgwatch's engine (the bench's model home)."""
    import os

    from bench_cleanup import ensure_int8, model_home

    home, model = model_home(ROOT / "bench" / "out", "u2net")
    os.environ["U2NET_HOME"] = str(home)
    print(ensure_int8(home, model))
    from bgwatch.jobs import MaskSpec
    from bgwatch.pipeline import masking
    from bgwatch.pipeline.onnxnets import mask8

    engine = masking.load_mask_engine(MaskSpec(engine="rembg", model=model), "cpu")
    assert isinstance(engine, masking.RembgMaskEngine)
    return lambda rgb: mask8(engine.run(engine.preprocess(rgb)))


def main() -> int:
    import cv2

    from bgwatch.pipeline.edges import guided_upsample, plain_upsample
    from bgwatch.pipeline.refine import refine_mask, to_alpha8

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--band", type=int, default=3, help="edge band half-width in pixels")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "edges")
    parser.add_argument("--no-memory", action="store_true", help="skip the 25 MP peak-RSS job")
    parser.add_argument("--cases", type=int, default=len(CASES))
    parser.add_argument("--mask", choices=("truth", "u2net"), default="truth",
                        help="the small mask: the true alpha at 320x320, or U2-Net's own")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    net_mask = _u2net_masker() if args.mask == "u2net" else None

    source = "U2-Net's own (320x320)" if net_mask else "the true alpha at 320x320, uint8"
    print(f"\nalpha MAE within {args.band} px of the true edge (and within 16 px, after refine: halos); "
          f"the net's mask: {source}\n")
    print(f"{'image':28} {'MP':>5} {'plain':>8} {'guided':>8} {'change':>8} {'+refine plain':>14} "
          f"{'+refine guided':>15} {'change':>8} {'16px plain':>11} {'16px guided':>12} {'plain s':>8} "
          f"{'guided s':>9}")
    worse = 0
    changes: list[float] = []
    skipped: list[str] = []
    colours: list[list[float]] = []
    for width, height, seed, kind in CASES[:args.cases]:
        fg, truth = cutout(seed, width, height)
        rgb = composite(fg, background(kind, width, height), truth)
        net = (net_mask(rgb) if net_mask else
               to_alpha8(cv2.resize(truth, (320, 320), interpolation=cv2.INTER_AREA)))
        band = edge_band(truth, args.band)
        wide = edge_band(truth, 16)
        start = time.perf_counter()
        plain = plain_upsample(net, height, width).astype(np.float32) / 255
        t_plain = time.perf_counter() - start
        start = time.perf_counter()
        guided = guided_upsample(net, rgb)
        t_guided = time.perf_counter() - start
        mae = [float(np.abs(a[band] - truth[band]).mean()) for a in (plain, guided)]
        refined = [refine_mask(to_alpha8(a), post_process=True) for a in (plain, guided)]
        mae_r = [float(np.abs(a[band] - truth[band]).mean()) for a in refined]
        halo = [float(np.abs(a[wide] - truth[wide]).mean()) for a in refined]
        # The cut-out over black, against the true one: the photo's own colour at the edge (the old
        # backdrop shows through it) and the transparent cleanup's decontaminated colour, both with the
        # guided alpha.
        from bgwatch.jobs import JobSpec
        from bgwatch.pipeline.cleanup import cleanup

        cut = cleanup(rgb, refined[1], JobSpec(mode="transparent"))
        a = (cut[..., 3][band].astype(np.float32) / 255)[:, None]
        true_over_black = fg[band] * truth[band][:, None]
        colour = [float(np.abs(rgb[band] * a - true_over_black).mean()),
                  float(np.abs(cut[..., :3][band] * a - true_over_black).mean())]
        del cut
        name = f"shot {seed} over {kind}"
        crop_png(args.out / f"edge_{seed}_{kind}.png", truth, refined[0], refined[1], band, rgb)
        change, change_r = 1 - mae[1] / mae[0], 1 - mae_r[1] / mae_r[0]
        cut = (plain > 0.5, truth > 0.5)
        net_iou = float((cut[0] & cut[1]).sum() / max((cut[0] | cut[1]).sum(), 1))
        if net_iou >= 0.9:  # a net that cut the wrong thing says nothing about its edges
            changes.append(change_r)
            worse += int(mae_r[1] > mae_r[0])
        else:
            skipped.append(f"shot {seed} over {kind} (the net's cut: IoU {net_iou:.2f} with the truth)")
        print(f"{name:28} {width * height / 1e6:>5.1f} {mae[0]:>8.4f} {mae[1]:>8.4f} {-change:>+8.0%} "
              f"{mae_r[0]:>14.4f} {mae_r[1]:>15.4f} {-change_r:>+8.0%} {halo[0]:>11.4f} {halo[1]:>12.4f} "
              f"{t_plain:>8.2f} {t_guided:>9.2f}")
        colours.append(colour)
        del rgb, fg, truth, plain, guided, refined, band, wide
    print(f"\nafter refine: edge-band error {np.mean(changes):.0%} lower on average (least {min(changes):.0%}); "
          f"{worse} image(s) worse than plain upscaling. Crops (photo | truth | plain | guided): {args.out}")
    photo, clean = (float(np.mean([c[i] for c in colours])) for i in (0, 1))
    print(f"the cut-out over black, mean |error| in the edge band (0-255): {photo:.1f} with the photo's own colour, "
          f"{clean:.1f} with the cleanup's decontaminated colour ({1 - clean / photo:.0%} lower)")
    if skipped:
        print(f"left out of the summary, the net's cut being wrong: {'; '.join(skipped)}")
    if not args.no_memory:
        print("\npeak RSS of one whole 25 MP cleanup job (tiny net, guided upsampling included):")
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--sizes", "25",
                        "--engine", "rembg-tiny", "--modes", "transparent"], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
