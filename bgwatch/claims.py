"""Claims: a user's file taken from an inbox by one host, and given back. The first half of custody
(delivery.py is the second: fenced delivery and parking).

Layout inside an inbox (all of it on the share, so every host sees it):

    <inbox>/.bgwatch/claimed/<host>/<rel>            taken by <host> (claim: a rename; one host wins)
    <inbox>/.bgwatch/delivering/<host>/<token>/<rel>  fenced: <host> is delivering or failing it
    <inbox>/.bgwatch/delivering/<host>/<token>/marker.json   the output exists (or the failure is final)
    <inbox>/.bgwatch/outputs/<digest>.json           which input an output in the outbox belongs to
    <inbox>/.bgwatch/kept/<digest>.json              an original kept in place (on_success: keep)
    <inbox>/.bgwatch/quarantine/                     markers refused as malformed or foreign, with why
    <inbox>/done/<rel>   <inbox>/failed/<rel> (+ NAME.error.txt)

Every move goes through safefs: folder descriptors (no symlink is followed), no-replace moves, one
naming scheme for clashes (`photo-2.jpg`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loguru import logger

from bgwatch import fileid, safefs
from bgwatch.kept import KeptRecords
from bgwatch.safefs import Folder
from bgwatch.sidecars import IMAGE_SUFFIXES, SIDECAR_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES
from bgwatch.text import shown

WORK_DIR = ".bgwatch"
CLAIMED = "claimed"
DELIVERING = "delivering"
DONE_DIR = "done"
FAILED_DIR = "failed"
ERROR_NOTE = ".error.txt"
_MOVE_TRIES = 5  # a claimed subfolder pruned under a move more often than this in a row: an error


def check_host(host: str) -> str:
    if not host or host in (".", "..") or host.startswith(".") or "/" in host or "\\" in host or "\0" in host:
        raise ValueError(f"host name {host!r} cannot name a folder (no '/', '\\', or leading '.')")
    return host


def is_user_file(name: str) -> bool:
    """Only images and sidecars are ever moved back into an inbox (never whatever a link led to)."""
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_SUFFIXES or suffix in SIDECAR_SUFFIXES or suffix in UNREADABLE_IMAGE_SUFFIXES


def parts_of(rel: str | PurePosixPath) -> tuple[str, ...]:
    """The names of a path inside an inbox (or an outbox); ValueError for anything that leaves it."""
    text = str(rel)
    parts = PurePosixPath(text).parts
    if (not parts or text.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts)
            or parts[0] in (WORK_DIR, DONE_DIR, FAILED_DIR)):
        raise ValueError(f"{rel!r} is not a file of the inbox")
    return parts


@dataclass(frozen=True, slots=True)
class Claim:
    """A file (and its sidecar) this host took from an inbox."""

    inbox: Path  # the inbox root
    host: str
    rel: str  # where the image was dropped, relative to the inbox (POSIX)
    name: str  # where it is under claimed/<host>/ (the rel, or rel-N while an older claim of that name lives)
    sidecar: str | None = None  # the sidecar's name under claimed/<host>/, if one came with it

    @property
    def path(self) -> Path:
        """Where the bytes are while the claim holds (the pipeline decodes from here)."""
        return self.inbox / WORK_DIR / CLAIMED / self.host / self.name

    @property
    def sidecar_path(self) -> Path | None:
        return self.inbox / WORK_DIR / CLAIMED / self.host / self.sidecar if self.sidecar else None


class Claims:
    """One inbox's claims as one host handles them. Thread-safe: every operation opens its own folders."""

    def __init__(self, inbox: Path, host: str, epoch: str, outbox: Path | None = None) -> None:
        self.inbox = Path(inbox)
        self.host = check_host(host)
        self.epoch = epoch
        # The inbox's outbox: the one folder a marker on the share may name outputs in (by name, inside it).
        self.outbox = Path(os.path.abspath(outbox)) if outbox is not None else None
        self.kept = KeptRecords(self._work, self.host)

    # ------------------------------------------------------------------ folders

    def root(self) -> Folder:
        """The inbox folder itself; FolderMissing while the share is away (it is never created)."""
        return Folder.open_root(self.inbox)

    def _work(self, *names: str, create: bool = True) -> Folder:
        with self.root() as root:
            return root.sub(WORK_DIR, *names, create=create)

    def _tag(self) -> str:
        return f"{self.host}-{os.urandom(3).hex()}"

    def _names(self, *area: str) -> list[str]:
        try:
            with self._work(*area, create=False) as folder:
                return [n for n, st in folder.entries() if stat.S_ISDIR(st.st_mode)]
        except (safefs.FolderMissing, safefs.UnsafeFolder, NotADirectoryError):
            return []

    # ------------------------------------------------------------------ claim

    def claim(self, rel: str, sidecar_rel: str | None = None) -> Claim | None:
        """Take the image at `rel` (and its sidecar) by renaming it into claimed/<host>/. None: gone
        (another host won it). The sidecar is best effort: if it vanished, the image goes alone."""
        parts = parts_of(rel)
        name = self._into_own(parts[:-1], parts[-1], parts[:-1], parts[-1])
        if name is None:
            return None
        claimed = "/".join((*parts[:-1], name))
        sidecar = None
        if sidecar_rel is not None:
            side_parts = parts_of(sidecar_rel)
            side_name = sidecar_name_for(side_parts[-1], parts[-1], name)
            got = self._into_own(parts[:-1], side_parts[-1], parts[:-1], side_name)
            sidecar = "/".join((*parts[:-1], got)) if got is not None else None
        return Claim(self.inbox, self.host, "/".join(parts), claimed, sidecar)

    def _into_own(self, src_parts: Sequence[str], src_name: str, dst_parts: Sequence[str], name: str) -> str | None:
        """Move a file (its folder `src_parts` below the inbox) into this host's claimed folder. A claimed
        subfolder this host's workers prune once empty may go between its opening and the rename: it is
        opened (made) again and the move tried again; the source is still where it was."""
        tries = 0
        while True:
            with self.root() as root, root.sub(*src_parts) as src, \
                    root.sub(WORK_DIR, CLAIMED, self.host, *dst_parts, create=True) as dst:
                try:
                    return safefs.move_into_own(src, src_name, dst, name)
                except safefs.FolderRemoved:
                    tries += 1
                    if tries == _MOVE_TRIES:
                        raise

    def unclaim(self, claim: Claim) -> str | None:
        """Return a claimed image (and sidecar) to the inbox where it was dropped; the rel it got back."""
        back = self._return(CLAIMED, claim.name, claim.rel)
        if claim.sidecar is not None and back is not None:
            self._return(CLAIMED, claim.sidecar, _sibling(back, claim.sidecar, claim.name))
        return back

    def _return(self, area: str, name: str, rel: str, reservation: str | None = None) -> str | None:
        """`reservation`: what names this return if it is made again after a kill (default: this host's
        claimed name, the same when this host starts again)."""
        parts = parts_of(name)
        target = parts_of(rel)
        with self.root() as root, root.sub(WORK_DIR, area, self.host, *parts[:-1]) as src, \
                root.sub(*target[:-1], create=True) as dst:
            got = safefs.move_to_free_name(src, parts[-1], dst, target[-1], unique_tag=self._tag(),
                                           reservation=reservation or f"{self.host}/{area}/{name}")
        with self.root() as root, root.sub(WORK_DIR, area, self.host) as base:
            base.prune(*parts[:-1])
        return None if got is None else "/".join((*target[:-1], got))

    def own_claims(self) -> list[str]:
        """Names under claimed/<host>/ (images and sidecars), e.g. to find strays after a crash."""
        try:
            with self._work(CLAIMED, self.host, create=False) as folder:
                return ["/".join(p) for p, _ in folder.files()]
        except (safefs.FolderMissing, safefs.UnsafeFolder):
            return []

    def return_claimed(self, name: str) -> str | None:
        """A claimed file nobody works on (no run, or a run that could not be recorded): back to the inbox."""
        if not is_user_file(name) or self._drop_if_linked(self.host, name):
            return None
        return self._return(CLAIMED, name, name)

    def _drop_if_linked(self, host: str, name: str) -> bool:
        """A claim by link + unlink killed between the two leaves the file under two names: in the inbox
        (or already taken on by another host) and in claimed/<host>/. Returning the second name would make
        it two inputs. If the same file is found under its name elsewhere, this extra link is dropped."""
        parts = parts_of(name)
        with self.root() as root, root.sub(WORK_DIR, CLAIMED, host, *parts[:-1]) as folder:
            st = folder.lstat(parts[-1])
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
                return False
            places = [(*parts[:-1],), (DONE_DIR, *parts[:-1]), (FAILED_DIR, *parts[:-1])]
            places += [(WORK_DIR, CLAIMED, other, *parts[:-1]) for other in self._names(CLAIMED) if other != host]
            stem = os.path.splitext(parts[-1])[0]
            for place in places:
                try:
                    with root.sub(*place) as there:
                        if any(fileid.same_file_at(folder, parts[-1], there, n) for n, _ in there.entries()
                               if n.startswith(stem)):
                            folder.unlink(parts[-1])
                            logger.info("{}: a half-finished claim (two links to one file); the extra one "
                                        "was dropped", shown(name))
                            return True
                except OSError:
                    continue
        return False

    def reclaim_claims(self, host: str) -> list[str]:
        """A silent host's claims back to the inbox: each first taken over by one rename into this host's
        claimed folder (so a waking host and this one never both move it). Only regular image and
        sidecar files, only from real folders: a planted link leads nowhere."""
        back: list[str] = []
        try:
            with self._work(CLAIMED, host, create=False) as folder:
                names = [p for p, _ in folder.files()]
        except (safefs.FolderMissing, safefs.UnsafeFolder):
            names = []
        for parts in names:
            if not is_user_file(parts[-1]):
                continue
            try:
                if self._drop_if_linked(host, "/".join(parts)):
                    continue
                taken = self._into_own((WORK_DIR, CLAIMED, host, *parts[:-1]), parts[-1], parts[:-1], parts[-1])
                with self._work(CLAIMED, host, create=False) as base:
                    base.prune(*parts[:-1])
                # Returned in the silent host's name: a return it began and was killed in is finished here.
                got = self._return(CLAIMED, "/".join((*parts[:-1], taken)), "/".join(parts),
                                   f"{host}/{CLAIMED}/{'/'.join(parts)}") if taken else None
            except OSError as exc:
                logger.error("cannot return {}'s claim {} to {}: {}", host, shown("/".join(parts)), self.inbox,
                             shown(str(exc)))
                continue
            if got is not None:
                back.append(got)
        return back

    def other_hosts(self) -> list[str]:
        """Hosts with claims or deliveries in this inbox (real folders with valid names only)."""
        hosts: set[str] = set()
        for area in (CLAIMED, DELIVERING):
            for name in self._names(area):
                with contextlib.suppress(ValueError):
                    hosts.add(check_host(name))
        hosts.discard(self.host)
        return sorted(hosts)

    # ------------------------------------------------------------------ done/ back to the inbox

    def restore(self, area: str, parked_rel: str, rel: str) -> str | None:
        """Bring an original (and its sidecars) back from done/ or failed/ to `rel` in the inbox: a sidecar
        arrived after its image was processed, or `bgwatch retry`. Returns the rel it got, None if gone."""
        if area not in (DONE_DIR, FAILED_DIR):
            raise ValueError(f"{area!r} is not done/ or failed/")
        src_parts = parts_of(parked_rel)
        parts = parts_of(rel)
        with self.root() as root, root.sub(area, *src_parts[:-1]) as src, \
                root.sub(*parts[:-1], create=True) as dst:
            st = src.lstat(src_parts[-1])
            if st is None or not stat.S_ISREG(st.st_mode):
                return None
            got = safefs.move_to_free_name(src, src_parts[-1], dst, parts[-1], unique_tag=self._tag())
            if got is None:
                return None
            stem = os.path.splitext(src_parts[-1])[0]
            for entry, est in src.entries():
                side_stem, ext = os.path.splitext(entry)
                if ext.lower() in SIDECAR_SUFFIXES and side_stem in (stem, src_parts[-1]) and stat.S_ISREG(est.st_mode):
                    safefs.move_to_free_name(src, entry, dst, sidecar_name_for(entry, src_parts[-1], got),
                                             unique_tag=self._tag())
            src.unlink(note_name(src_parts[-1]))
        return "/".join((*parts[:-1], got))

    def park_unclaimed(self, rel: str, where: str, reason: str = "") -> Path | None:
        """A file that is not a job (an orphan or redundant sidecar): straight to done/ or failed/."""
        parts = parts_of(rel)
        with self.root() as root, root.sub(*parts[:-1]) as src, root.sub(where, *parts[:-1], create=True) as dst:
            got = safefs.move_to_free_name(src, parts[-1], dst, parts[-1], unique_tag=self._tag())
            if got is None:
                return None
            if where == FAILED_DIR:
                dst.write_atomic(note_name(got), error_note(got, reason).encode(), owner=self.host)
        return self.inbox.joinpath(where, *parts[:-1], got)


def sidecar_name_for(sidecar: str, image_before: str, image_after: str) -> str:
    """photo.yaml follows photo.jpg to photo-2.jpg as photo-2.yaml (photo.jpg.yaml as photo-2.jpg.yaml)."""
    ext = os.path.splitext(sidecar)[1]
    stem = image_after if sidecar.startswith(image_before + ".") else os.path.splitext(image_after)[0]
    return safefs.fit_name(stem, ext)


def _sibling(image_rel: str, sidecar_name: str, image_name: str) -> str:
    parts = PurePosixPath(image_rel)
    side = PurePosixPath(sidecar_name).name
    return str(parts.parent / sidecar_name_for(side, PurePosixPath(image_name).name, parts.name))


def note_name(name: str) -> str:
    """NAME.error.txt beside a failed original; for a name near the filesystem's limit, its stem is
    shortened so that the note can always be written."""
    return safefs.fit_name(name, ERROR_NOTE)


def error_note(name: str, reason: str) -> str:
    return (f"bgwatch could not process {shown(name)}\n\n{shown(reason.strip(), newlines=True)}\n\n"
            "To try again: fix the cause, then move the file (and its sidecar) back into the inbox,\n"
            "or run `bgwatch retry --failed`.\n")
