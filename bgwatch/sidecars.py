"""Which files bgwatch reads, and which sidecar belongs to which image.

A sidecar is `photo.yaml` (or .yml) or `photo.jpg.yaml` beside `photo.jpg`; both at once is an error, since
bgwatch could not tell which one the person meant.
"""

from __future__ import annotations

import os
from pathlib import Path

from bgwatch.errors import SpecError

# What the decoder reads (pipeline/imageio.py checks the content too; AVIF where Pillow was built with it).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".avif"})
SIDECAR_SUFFIXES = frozenset({".yaml", ".yml"})
# Image formats people drop that bgwatch does not read: claimed and failed with a note saying so, never left
# without a word.
UNREADABLE_IMAGE_SUFFIXES = frozenset({".gif", ".bmp", ".heic", ".heif", ".jxl", ".psd", ".svg", ".eps",
                                       ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".jp2"})


def find_sidecar(image: Path) -> Path | None:
    """photo.yaml, photo.yml, photo.jpg.yaml or photo.jpg.yml beside the image; two of them: SpecError."""
    image = Path(image)
    # A name past the filesystem's limit cannot exist (and stat() would raise ENAMETOOLONG).
    names = [n for n in (base + s for base in (image.stem, image.name) for s in (".yaml", ".yml"))
             if len(os.fsencode(n)) <= 255]
    found = [image.with_name(n) for n in names if _is_file_or_link(image.with_name(n))]
    if len(found) > 1:
        listed = " and ".join(str(p) for p in found)
        raise SpecError(image, "", f"has {len(found)} sidecars, {listed}; bgwatch cannot tell which to use, "
                        "so keep only one")
    return found[0] if found else None


def sidecar_images(sidecar: Path) -> list[Path]:
    """The existing image(s) a sidecar belongs to: photo.yaml -> photo.<any image suffix>; photo.jpg.yaml
    -> photo.jpg (and photo.jpg.<image suffix>)."""
    sidecar = Path(sidecar)
    stem = sidecar.stem
    suffixes = IMAGE_SUFFIXES
    images = []
    try:
        entries = list(os.scandir(sidecar.parent))
    except OSError:
        return []
    for entry in entries:
        name = Path(entry.name)
        if name.suffix.lower() not in suffixes or not (name.stem == stem or entry.name == stem):
            continue
        if entry.is_file():
            images.append(sidecar.parent / entry.name)
    return sorted(images)


def _is_file_or_link(path: Path) -> bool:
    return path.is_file() or path.is_symlink()
