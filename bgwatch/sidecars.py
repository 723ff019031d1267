"""Which files bgwatch reads, and which sidecar belongs to which image.

A sidecar is `photo.yaml` (or .yml) or `photo.jpg.yaml` beside `photo.jpg`; both at once is an error, since
bgwatch could not tell which one the person meant.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Literal

from bgwatch.errors import SpecError

# What the decoder reads (pipeline/imageio.py checks the content too; AVIF where Pillow was built with it).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".avif"})
SIDECAR_SUFFIXES = frozenset({".yaml", ".yml"})
# Image formats people drop that bgwatch does not read: claimed and failed with a note saying so, never left
# without a word.
UNREADABLE_IMAGE_SUFFIXES = frozenset({".gif", ".bmp", ".heic", ".heif", ".jxl", ".psd", ".svg", ".eps",
                                       ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".jp2"})


FOLDER_FILE = ".bgwatch.yaml"  # a folder's rules, for it and below (rules.py)
RULES_FILE_NAMES = frozenset({FOLDER_FILE})
# bgwatch's own, at the inbox root only; `_assets/` holds backdrops and other files that rules and sidecars
# name (`background_image: _assets/oak.jpg`): never taken as input.
ASSETS_DIR = "_assets"
WORK_FOLDERS = frozenset({"done", "failed", ".bgwatch", ASSETS_DIR})

FileKind = Literal["image", "sidecar", "rules", "unreadable"]


# Names no one means as input: OS litter, NAS metadata, and copy tools' names for unfinished files.
# Dot names cover .DS_Store, ._* (macOS), .syncthing.*.tmp, rsync's `.photo.jpg.Ab12Cd`, .nfs*.
_LITTER = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "$recycle.bin", "system volume information",
                     "@eadir", "#recycle", "#snapshot", "lost+found"})  # compared in lower case
_TEMP_SUFFIXES = (".part", ".crdownload", ".partial", ".download", ".tmp", ".temp", ".!qb", "~")


def is_rules_file(rel: PurePath) -> bool:
    """A folder rule file (`.bgwatch.yaml`): a dot file that the daemon must still hear about."""
    return rel.name in RULES_FILE_NAMES


def is_ignored(rel: PurePath) -> bool:
    """Whether a path relative to its inbox root is never input: hidden and dot files (not rule files),
    copy tools' temp names, OS litter, and bgwatch's own done/, failed/ and .bgwatch/ at the root."""
    parts = rel.parts
    if not parts or parts[0] in WORK_FOLDERS or ".." in parts:
        return True
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        low = part.lower()
        if last and part in RULES_FILE_NAMES:
            return False
        if part.startswith((".", "~$")) or low in _LITTER:
            return True  # hidden and dot files, Office's ~$lock files, OS and NAS litter
        if last and low.endswith(_TEMP_SUFFIXES):
            return True
    return False


def file_kind(rel: PurePath) -> FileKind | None:
    """"rules" for `.bgwatch.yaml`, "image" or "sidecar" by suffix (any case), None for anything else."""
    if is_rules_file(rel):
        return "rules"
    suffix = rel.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in SIDECAR_SUFFIXES:
        return "sidecar"
    if suffix in UNREADABLE_IMAGE_SUFFIXES:
        return "unreadable"
    return None


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
