"""A shared inbox for the multi-host fault suite: one backing folder, one FUSE bind mount per host.

The test plays "another workstation": it writes inputs into the backing folder (temp name, then rename,
so no host ever sees half a file), and each daemon reaches the share only through its own `bindfs`
mount, as it would reach an SMB or NFS share. After the daemons have stopped, `check_share` walks the
backing folder and every host's database and reports what went wrong: inputs lost, processed twice or
stranded, and every broken invariant as one line that names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import sqlite3
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

WORK = ".bgwatch"
DONE = "done"
FAILED = "failed"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
# Outputs a host is still writing or left half-written: dot files and known temp suffixes.
_TEMP_MARKS = (".bgwatch-tmp", ".tmp", ".part", ".partial")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ FUSE


def fuse_problem(fs: str = "bindfs") -> str | None:
    """Why FUSE mounts of kind `fs` cannot be used here (None: they can). Installs bindfs, or libfuse 3 and
    mfusepy for tests/fusefs.py, when root and missing."""
    if fs != "bindfs":
        import fusefs

        return fusefs.ensure()
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine: the multi-host suite needs FUSE bind mounts"
    if shutil.which("bindfs") is None:
        if os.geteuid() != 0:
            return "bindfs is not installed and installing it needs root (apt-get install bindfs)"
        if shutil.which("apt-get") is None:
            return "bindfs is not installed and there is no apt-get to install it with"
        if not _apt_install("bindfs"):
            return "bindfs is not installed and `apt-get install -y bindfs` failed"
    if shutil.which("fusermount") is None and shutil.which("fusermount3") is None:
        return "fusermount is missing (it comes with the fuse package)"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable by this user (run as root or join the fuse group)"
    return None


def _apt_install(package: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode == 0:
        return True
    # The package lists may be stale or absent on a fresh image: refresh them once, then try again.
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
    return subprocess.run(install, env=env, capture_output=True, check=False).returncode == 0


def _fusermount() -> str:
    return shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"


def bind_mount(source: Path, mount_point: Path) -> None:
    """`bindfs --no-allow-other source mount_point`; raises with bindfs's message when it refuses."""
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["bindfs", "--no-allow-other", str(source), str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"bindfs {source} {mount_point} failed: {(result.stderr or result.stdout).strip()}")


def unmount(mount_point: Path) -> bool:
    """Lazy unmount (`fusermount -u -z`): works while a daemon still has files open on it."""
    result = subprocess.run([_fusermount(), "-u", "-z", str(mount_point)], capture_output=True, check=False)
    return result.returncode == 0


# ------------------------------------------------------------------ inputs


def image_bytes(seed: int, size: int = 48, fmt: str = "PNG") -> bytes:
    """A small product shot: an object on a plain backdrop, with per-seed noise so every file differs."""
    rng = np.random.default_rng(seed)
    backdrop = rng.integers(215, 250)
    pixels = np.full((size, size, 3), backdrop, np.int16)
    yy, xx = np.mgrid[0:size, 0:size]
    radius = size * rng.uniform(0.2, 0.3)
    cy, cx = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    pixels[inside] = rng.integers(20, 160, 3)
    pixels += rng.integers(-4, 5, pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 90}))
    return buffer.getvalue()


@dataclass(frozen=True, slots=True)
class Drop:
    """One file the test dropped into the share's inbox."""

    name: str  # posix path relative to the inbox
    sha256: str
    mark: tuple[float, ...] | None = None  # its subject's centre pixels: find its output by content

    @property
    def stem(self) -> str:
        return str(PurePosixPath(self.name).with_suffix(""))

    @property
    def is_image(self) -> bool:
        return PurePosixPath(self.name).suffix.lower() in IMAGE_SUFFIXES


def subject_colour(data: bytes) -> tuple[float, ...] | None:
    """The centre 5x5 pixels of an image (inside the subject every test image has there, with its own
    noise): an output keeps its input's subject pixels, so this ties each output to its own input,
    whatever its name."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    except (OSError, ValueError):
        return None
    h, w = rgb.shape[:2]
    return tuple(float(v) for v in rgb[h // 2 - 2: h // 2 + 3, w // 2 - 2: w // 2 + 3].ravel())


MARK_TOLERANCE = 3.0  # mean absolute difference: the same subject pixels, through a lossless encoder


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / max(1, len(a)) if len(a) == len(b) else 1e9


def owner_of(mark: tuple[float, ...] | None, drops: Sequence[Drop]) -> Drop | None:
    """The dropped image whose subject these pixels are (None: no input's)."""
    if mark is None:
        return None
    scored = [(_distance(d.mark, mark), i) for i, d in enumerate(drops) if d.mark is not None]
    if not scored:
        return None
    distance, index = min(scored)
    return drops[index] if distance <= MARK_TOLERANCE else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Share:
    """The backing folder of the emulated share and the mounts made of it: bindfs (the default), or the
    FUSE passthrough of tests/fusefs.py that answers like a network share ("posix", "nfs", "smb")."""

    def __init__(self, root: Path, fs: str = "bindfs") -> None:
        self.root = root
        self.fs = fs
        self._servers: dict[Path, subprocess.Popen[bytes]] = {}
        self.backing = root / "share"
        self.inbox = self.backing / "inbox"
        self.outbox = self.backing / "outbox"
        self._incoming = self.backing / ".incoming"  # outside the inbox: temp files no host may see
        for folder in (self.inbox, self.outbox, self._incoming):
            folder.mkdir(parents=True, exist_ok=True)
        self.drops: list[Drop] = []
        self.mounts: list[Path] = []
        self._seed = 0
        self._hashes: dict[tuple[str, int, int], str] = {}

    # mounts

    def mount(self, mount_point: Path) -> None:
        if self.fs == "bindfs":
            bind_mount(self.backing, mount_point)
        else:
            import fusefs

            self._servers[mount_point] = fusefs.mount(self.backing, mount_point, self.fs)
        if mount_point not in self.mounts:
            self.mounts.append(mount_point)

    def unmount(self, mount_point: Path) -> bool:
        done = unmount(mount_point)
        server = self._servers.pop(mount_point, None)
        if server is not None:  # the passthrough's loop does not always notice a lazy unmount: end it
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        return done

    def close(self) -> None:
        """Undo every mount, whatever state it is in (a dead bindfs leaves a mount that ismount() denies)."""
        for mount_point in self.mounts:
            self.unmount(mount_point)
        for server in self._servers.values():
            server.kill()

    # drops

    def drop(self, name: str, data: bytes) -> Drop:
        """Write `data` as inbox/name the way a copy tool should: a temp file, then one rename."""
        target = self.inbox / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._incoming / f"{len(self.drops)}-{PurePosixPath(name).name}"
        tmp.write_bytes(data)
        os.rename(tmp, target)
        is_image = PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
        drop = Drop(name, hashlib.sha256(data).hexdigest(), subject_colour(data) if is_image else None)
        self.drops.append(drop)
        return drop

    def drop_images(self, count: int, *, prefix: str = "img", size: int = 48, fmt: str = "PNG",
                    sidecar: str | None = None) -> list[Drop]:
        """`count` unique images named img-0001.png... (numbering continues across calls); with
        `sidecar`, a YAML sidecar `img-0001.yaml` holding that text is dropped first."""
        dropped = []
        ext = ".png" if fmt == "PNG" else ".jpg"
        for _ in range(count):
            self._seed += 1
            name = f"{prefix}-{self._seed:04d}{ext}"
            if sidecar is not None:
                self.drop(f"{prefix}-{self._seed:04d}.yaml", sidecar.encode())
            dropped.append(self.drop(name, image_bytes(self._seed * 7919 + len(self.drops), size, fmt)))
        return dropped

    @property
    def images(self) -> list[Drop]:
        return [d for d in self.drops if d.is_image]

    # state while waiting

    def hash_of(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            try:
                self._hashes[key] = sha256_of(path)
            except OSError:
                return None
        return self._hashes[key]

    def parked(self) -> dict[str, int]:
        """sha256 -> how many copies lie in done/ or failed/."""
        found: dict[str, int] = defaultdict(int)
        for where in (DONE, FAILED):
            for path in files_under(self.inbox / where):
                digest = self.hash_of(path)
                if digest is not None:
                    found[digest] += 1
        return found

    def claimed_files(self) -> list[Path]:
        return [p for sub in ("claimed", "delivering") for p in files_under(self.inbox / WORK / sub)]

    def inbox_images(self) -> list[Path]:
        """Images waiting in the inbox itself (not in done/, failed/ or the work folder)."""
        return [p for p in files_under(self.inbox) if _area(self.inbox, p) == "inbox"
                and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]

    def all_parked(self) -> bool:
        """Move mode: every dropped image lies in done/ or failed/, and nothing waits or is claimed."""
        parked = self.parked()
        return (all(parked.get(d.sha256, 0) >= 1 for d in self.images) and not self.inbox_images()
                and not self.claimed_files())

    def outputs(self) -> list[Path]:
        return files_under(self.outbox)

    def all_output(self, ext: str = ".png") -> bool:
        """Keep mode: an output exists for every dropped image name."""
        names = {p.relative_to(self.outbox).as_posix() for p in self.outputs()}
        return all(f"{d.stem}{ext}" in names for d in self.images)


def files_under(folder: Path) -> list[Path]:
    """Every regular file below `folder` (symlinks are not followed), sorted."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                found.extend(files_under(Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                found.append(Path(entry.path))
        except OSError:
            continue
    return sorted(found)


def _area(inbox: Path, path: Path) -> str:
    """'done', 'failed', 'work' (under .bgwatch/) or 'inbox' (anywhere else in the inbox)."""
    first = path.relative_to(inbox).parts[0]
    return {DONE: "done", FAILED: "failed", WORK: "work"}.get(first, "inbox")


# ------------------------------------------------------------------ the invariant checker


@dataclass(slots=True)
class Report:
    """What one fault scenario left behind. `violations` empty means every invariant held."""

    fault: str
    rounds: int
    files: int
    lost: int = 0
    twice: int = 0
    stranded: int = 0
    failed: int = 0
    overwritten: int = 0  # outputs a 'done' run wrote that now hold another input's pixels
    no_output: int = 0  # inputs that finished without an output of their own (by content) in the outbox
    renamed: int = 0  # originals filed under another name although nothing clashed
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    HEADER = ("fault | rounds | files | lost | processed twice | stranded | outputs overwritten | "
              "inputs without their own output | renamed without a clash")

    def row(self) -> str:
        return (f"{self.fault} | {self.rounds} | {self.files} | {self.lost} | {self.twice} | {self.stranded} | "
                f"{self.overwritten} | {self.no_output} | {self.renamed}")

    def describe(self, limit: int = 40) -> str:
        lines = [self.HEADER, self.row(), f"failed: {self.failed}", *(f"note: {n}" for n in self.notes)]
        lines += [f"violation: {v}" for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"... and {len(self.violations) - limit} more violation(s)")
        return "\n".join(lines)


def _output_stem(name: str, stems: set[str], ext: str) -> tuple[str, int] | None:
    """`img-0001.png` -> (img-0001, 1); `img-0001-2.png` or `img-0001 (2).png` -> (img-0001, 2).

    `img-0001-h1-5f0b5b.png` -> (img-0001, 2): on a share with neither no-replace renames nor links, an
    original that goes back to the inbox while a newer drop holds its name gets a name unique by
    construction (safefs.move_to_free_name: `stem-<host>-<6 hex>`), and its output follows that name. It
    counts as a second output of the stem: a name dropped once that has one is reported as done twice."""
    if not name.endswith(ext):
        return None
    base = name[: -len(ext)]
    if base in stems:
        return base, 1
    for pattern in (r"^(.*)-(\d+)$", r"^(.*) \((\d+)\)$"):
        match = re.match(pattern, base)
        if match and match.group(1) in stems:
            return match.group(1), int(match.group(2))
    match = re.match(r"^(.*)-[^-/]+-[0-9a-f]{6}$", base)
    if match and match.group(1) in stems:
        return match.group(1), 2
    return None


# A run as the checker reads it: host, the host's folder (<host>/mnt/outbox is its view of the outbox), id,
# rel_path, input_sha256, status, output_path.
StoreRun = tuple[str, Path, int, str, str, str, str]


def check_share(share: Share, databases: Sequence[Path], *, fault: str = "", rounds: int = 0,
                keep: bool = False, ext: str = ".png", suffix: str = "",
                store_runs: Sequence[StoreRun] = ()) -> Report:
    """Check the share and the hosts' databases once every daemon has exited.

    Inputs are followed by their bytes (every dropped file differs), so a name dropped twice is two
    inputs. Move mode: each ends exactly once in done/ or failed/ (failed with NAME.error.txt). Keep mode:
    each stays in the inbox, and exactly one 'done' row and no 'skipped' row exist across all hosts.
    Always: nothing left claimed or half-written, one output per finished input, no numbered output for
    a name dropped once, no original overwritten, databases intact with no open row, and no input with
    two 'done' rows across all hosts. `store_runs`: the runs of a studio store (PostgreSQL), checked as
    the hosts' own databases are, beside them.
    """
    images = share.images
    report = Report(fault=fault, rounds=rounds, files=len(images))
    violations = report.violations
    lost: set[str] = set()
    twice: set[str] = set()
    stranded: set[str] = set()

    where: dict[str, list[Path]] = defaultdict(list)
    for path in files_under(share.inbox):
        digest = share.hash_of(path)
        if digest is not None:
            where[digest].append(path)

    def rel(path: Path) -> str:
        return path.relative_to(share.backing).as_posix()

    # -- every input ends exactly once
    ok_areas = ("inbox", "failed") if keep else ("done", "failed")
    succeeded: dict[str, Drop] = {}
    for drop in images:
        places = where.get(drop.sha256, [])
        ended = [p for p in places if _area(share.inbox, p) in ok_areas]
        others = [p for p in places if p not in ended]
        if len(ended) > 1:
            twice.add(drop.sha256)
            inodes = {(p.stat().st_dev, p.stat().st_ino) for p in ended}
            how = " (hard links to one file: a link whose unlink never happened)" if len(inodes) == 1 else ""
            violations.append(f"{drop.name}: ends {len(ended)} times: {', '.join(rel(p) for p in ended)}{how}")
        if not ended:
            if others:
                stranded.add(drop.sha256)
                violations.append(f"{drop.name}: stranded at {', '.join(rel(p) for p in others)}")
            else:
                lost.add(drop.sha256)
                stem = PurePosixPath(drop.name).stem
                clash = [rel(p) for area in (DONE, FAILED) for p in (share.inbox / area).glob(f"{stem}*")
                         if p.is_file() and not p.name.endswith(".error.txt")]
                hint = f" (overwritten? same name in {', '.join(clash)})" if clash else ""
                violations.append(f"{drop.name}: lost, its bytes are nowhere on the share{hint}")
            continue
        if others:
            stranded.add(drop.sha256)
            violations.append(f"{drop.name}: also left at {', '.join(rel(p) for p in others)}")
        final = ended[0]
        if _area(share.inbox, final) == "failed":
            report.failed += 1
            note = final.with_name(final.name + ".error.txt")
            reason = note.read_text(errors="replace").strip().splitlines()[2:3] if note.exists() else []
            if not note.exists():
                violations.append(f"{drop.name}: in failed/ without {note.name}")
            violations.append(f"{drop.name}: failed although it is a valid image: {' '.join(reason)}")
        else:
            succeeded[drop.sha256] = drop
            if keep and final.relative_to(share.inbox).as_posix() != drop.name:
                violations.append(f"{drop.name}: kept under another name: {rel(final)}")

    # -- nothing waits, nothing is left claimed
    known = {d.sha256 for d in share.drops}
    empty_reservations: set[str] = set()
    for path in files_under(share.inbox):
        area, name = _area(share.inbox, path), path.relative_to(share.inbox).as_posix()
        if area == "inbox" and path.name.startswith(".bgwatch-doctor-"):
            report.notes.append(f"a start-up check's probe left in the inbox by a daemon killed meanwhile "
                                f"(doctor.py): {name}")
        elif area == "inbox" and not keep:
            violations.append(f"left in the inbox: {name}")
        elif area == "inbox" and share.hash_of(path) not in known:
            violations.append(f"an unknown file in the inbox: {name}")
        elif area == "work" and path.relative_to(share.inbox / WORK).parts[0] in ("claimed", "delivering"):
            violations.append(f"left in the work folder: {name}")
        elif area == "done" and share.fs == "smb" and path.stat().st_size == 0:
            # The one window the SMB-like share leaves open (safefs.Folder.reserve): a kill between the
            # exclusive create of a name's reservation and the write of its tag (one round trip) leaves it
            # empty, and the original is filed under a unique name beside it. Taking an empty file over is
            # not safe (a mover paused in that window would rename over the file that took it), so this
            # stray is cosmetic by design; a reservation with its tag is still a violation.
            empty_reservations.add(path.relative_to(share.inbox / DONE).as_posix())
            report.notes.append(f"an empty reservation left by a kill between its create and its tag: {name}")
        elif area in ("done", "failed") and path.suffix.lower() in IMAGE_SUFFIXES and (
                share.hash_of(path) not in known):
            violations.append(f"{name}: an image in {area}/ that was never dropped (a damaged copy?)")
    if keep:
        for drop in share.drops:
            if not drop.is_image and not (share.inbox / drop.name).is_file():
                violations.append(f"{drop.name}: sidecar not kept in the inbox")

    # -- outputs: one per finished input, no numbered twins, no temp files
    stems: dict[str, list[Drop]] = defaultdict(list)
    for drop in images:
        stems[drop.stem + suffix].append(drop)
    outputs: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for path in share.outputs():
        name = path.relative_to(share.outbox).as_posix()
        if path.name.startswith(".") or path.name.endswith(_TEMP_MARKS):
            violations.append(f"a temp file left in the outbox: {name}")
            continue
        parsed = _output_stem(name, set(stems), ext)
        if parsed is None:
            violations.append(f"an output that belongs to no input: {name}")
            continue
        outputs[parsed[0]].append((parsed[1], name))
        if ext == ".png" and path.read_bytes()[:8] != _PNG_MAGIC:
            violations.append(f"{name}: not a whole PNG")
    for stem, drops in stems.items():
        made = sorted(outputs.get(stem, []))
        good = [d for d in drops if d.sha256 in succeeded]
        if len(drops) == 1:
            numbered = [n for i, n in made if i > 1]
            if numbered:
                twice.add(drops[0].sha256)
                violations.append(f"{drops[0].name}: processed twice, outputs {', '.join(n for _, n in made)}")
            if good and not any(i == 1 for i, _ in made):
                violations.append(f"{drops[0].name}: finished but no output {stem}{ext}")
            if not good and made:
                violations.append(f"{drops[0].name}: did not finish, yet has output(s) {', '.join(n for _, n in made)}")
        else:  # a name dropped k times: its inputs may share one output or get numbered ones, never more
            if good and not made:
                violations.append(f"{stem}: {len(good)} input(s) finished but there is no output")
            if len(made) > len(good) or any(i > len(drops) for i, _ in made):
                violations.append(f"{stem}: {len(made)} outputs for {len(good)} finished input(s): "
                                  f"{', '.join(n for _, n in made)}")

    # -- outputs by their content: each finished input has exactly one output of its own
    owners: dict[str, Drop | None] = {}
    for path in share.outputs():
        if path.name.startswith(".") or not path.name.endswith(ext):
            continue
        try:
            owners[path.relative_to(share.outbox).as_posix()] = owner_of(subject_colour(path.read_bytes()), images)
        except OSError:
            continue
    for name, owner in sorted(owners.items()):
        if owner is None:
            violations.append(f"{name}: an output whose pixels are no dropped input's")
    for drop in succeeded.values():
        own = [name for name, owner in owners.items() if owner is drop]
        if not own:
            report.no_output += 1
            violations.append(f"{drop.name}: finished, but no output in the outbox holds its pixels")
        elif len(own) > 1:
            twice.add(drop.sha256)
            violations.append(f"{drop.name}: {len(own)} outputs hold its pixels: {', '.join(sorted(own))}")
    # -- originals renamed although nothing clashed (a name dropped once keeps it in done/)
    names_dropped: dict[str, int] = defaultdict(int)
    for drop in images:
        names_dropped[drop.name] += 1
    for drop in succeeded.values():
        places = [p for p in where.get(drop.sha256, []) if _area(share.inbox, p) == "done"]
        if names_dropped[drop.name] == 1 and places and not keep and all(
                p.relative_to(share.inbox / DONE).as_posix() != drop.name for p in places):
            if drop.name in empty_reservations:  # its name held by its own empty reservation (see above)
                report.notes.append(f"{drop.name}: filed as {rel(places[0])} beside its empty reservation")
                continue
            report.renamed += 1
            violations.append(f"{drop.name}: filed as {rel(places[0])} although nothing clashed")

    # -- the databases
    done_rows: dict[tuple[str, str], list[str]] = defaultdict(list)
    skipped = 0
    failed_rows: list[tuple[str, str, str]] = []
    all_rows: list[StoreRun] = []
    for db in databases:
        host = db.parent.parent.name if db.parent.name == "state" else db.parent.name
        if not db.exists():
            continue
        try:
            conn = sqlite3.connect(str(db), timeout=10)
            try:
                check = conn.execute("PRAGMA integrity_check").fetchone()[0]
                rows = conn.execute("SELECT id, rel_path, input_sha256, status, output_path FROM runs").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            violations.append(f"{host}: database unreadable: {exc}")
            continue
        if check != "ok":
            violations.append(f"{host}: PRAGMA integrity_check says {check!r}")
        all_rows.extend((host, db.parent.parent, *row) for row in rows)
    all_rows.extend(store_runs)
    for host, host_root, run_id, rel_path, sha, status, output_path in all_rows:
        if status in ("running", "queued"):
            violations.append(f"{host}: run {run_id} ({rel_path}) left {status!r}")
        elif status == "done":
            done_rows[(rel_path, sha or "")].append(f"{host}#{run_id}")
            written = _on_share(output_path or "", host_root)
            owner = owners.get(written) if written is not None else None
            if written is not None and written in owners and (owner is None or owner.sha256 != sha):
                report.overwritten += 1
                whose = "no input's" if owner is None else (
                    f"another input's also named {owner.name}" if owner.name == rel_path else f"{owner.name}'s")
                violations.append(f"{host}: run {run_id} ({rel_path}) wrote {written}, which now holds "
                                  f"{whose} pixels: overwritten")
        elif status == "skipped":
            skipped += 1
        elif status == "failed":
            failed_rows.append((host, rel_path, sha or ""))
    by_sha = {d.sha256: d for d in images}
    for (rel_path, sha), runs in sorted(done_rows.items()):
        if len(runs) > 1:
            if sha in by_sha:
                twice.add(sha)
            violations.append(f"{rel_path}: {len(runs)} 'done' rows ({', '.join(runs)})")
    for host, rel_path, sha in failed_rows:
        if sha in succeeded:
            violations.append(f"{host}: {rel_path} recorded 'failed' although it finished")
    if keep:
        if skipped:
            violations.append(f"{skipped} 'skipped' row(s): kept originals were taken again")
        for drop in succeeded.values():
            if not done_rows.get((drop.name, drop.sha256)):
                violations.append(f"{drop.name}: finished without a 'done' row in any database")

    report.lost, report.twice, report.stranded = len(lost), len(twice), len(stranded)
    return report


def _on_share(output_path: str, host_root: Path) -> str | None:
    """A host's output path (through its mount, <host>/mnt/outbox/...) as a name in the share's outbox."""
    mount = host_root / "mnt" / "outbox"
    try:
        return Path(output_path).relative_to(mount).as_posix()
    except ValueError:
        return None


def listing(folder: Path) -> list[str]:
    """Everything below `folder` (folders too), relative, for reporting what a daemon wrote there."""
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() + ("/" if p.is_dir() else "") for p in folder.rglob("*"))


def move_aside(folder: Path, to: Path) -> None:
    """Empty `folder` into `to` (a daemon's writes into an empty mount point), so it can be mounted."""
    to.mkdir(parents=True, exist_ok=True)
    for entry in list(folder.iterdir()):
        with contextlib.suppress(OSError):
            shutil.move(str(entry), str(to / entry.name))
