"""A user's file on disk, from the moment it is claimed to done/ or failed/: the one module that moves it.

Layout inside an inbox (all of it on the share, so every host sees it):

    <inbox>/.bgwatch/claimed/<host>/<rel>            taken by <host> (claim: a rename; one host wins)
    <inbox>/.bgwatch/delivering/<host>/<token>/<rel>  fenced: <host> is delivering or failing it
    <inbox>/.bgwatch/delivering/<host>/<token>/marker.json   the output exists (or the failure is final)
    <inbox>/.bgwatch/kept/<digest>.json              an original kept in place (on_success: keep)
    <inbox>/done/<rel>   <inbox>/failed/<rel> (+ NAME.error.txt)

Delivery is fenced: the worker first moves the claimed original into its own `delivering/<host>/<token>/`
folder. That rename is the proof that it still holds the claim: if another host took the claim back
(this one was paused or cut off longer than the lease), the original is not there, and the job is
dropped as superseded instead of being delivered twice. Then the output is written to a temp name,
the marker is written, and the output renamed into place; only then is the original parked. Whoever
finds a delivering folder after a crash — the host itself at start, or another host once this one is
silent — settles it the same way: with a marker whose output is there, the delivery is finished
(original to done/); without one, the original goes back to the inbox to be processed again.

Every move goes through safefs: folder descriptors (no symlink is followed), no-replace moves, one
naming scheme for clashes (`photo-2.jpg`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loguru import logger

from bgwatch import safefs
from bgwatch.kept import KeptRecords
from bgwatch.safefs import Folder
from bgwatch.sidecars import IMAGE_SUFFIXES, SIDECAR_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES
from bgwatch.text import shown

WORK_DIR = ".bgwatch"
CLAIMED = "claimed"
DELIVERING = "delivering"
DONE_DIR = "done"
FAILED_DIR = "failed"
MARKER = "marker.json"
TAKEN = "~from-"  # a silent host's delivery taken over by this one: delivering/<me>/<token>~from-<host>
ERROR_NOTE = ".error.txt"

DISPOSITIONS = ("move", "delete", "keep", "failed")


def check_host(host: str) -> str:
    if not host or host in (".", "..") or host.startswith(".") or "/" in host or "\\" in host or "\0" in host:
        raise ValueError(f"host name {host!r} cannot name a folder (no '/', '\\', or leading '.')")
    return host


def is_user_file(name: str) -> bool:
    """Only images and sidecars are ever moved back into an inbox (never whatever a link led to)."""
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_SUFFIXES or suffix in SIDECAR_SUFFIXES or suffix in UNREADABLE_IMAGE_SUFFIXES


def _parts(rel: str | PurePosixPath) -> tuple[str, ...]:
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or parts[0] in (WORK_DIR, DONE_DIR, FAILED_DIR):
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


@dataclass(frozen=True, slots=True)
class Settled:
    """What happened to a delivering folder: `finished` (parked per its marker) or `returned` to the inbox."""

    token: str
    finished: bool
    disposition: str  # move | delete | keep | failed, or "" when returned
    output: Path | None
    parked: Path | None  # where the original is now (None: deleted, or it could not be filed)
    reason: str = ""  # why it failed (disposition "failed")
    problem: str = ""  # the output is written but the original could not be filed: why


def crash_point(name: str) -> None:
    """A fault-injection point: BGWATCH_CRASH_AT=name[:n] kills this process (SIGKILL) at the n-th pass.

    The multi-host fault suite uses it to leave exactly the state a power cut would, e.g. `delivered`: the
    output is in the outbox and the original not yet in done/."""
    wanted = os.environ.get("BGWATCH_CRASH_AT", "")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    left = int(count or "1") - 1
    if left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
    os.environ["BGWATCH_CRASH_AT"] = f"{point}:{left}"


class Custody:
    """One inbox's files as one host handles them. Thread-safe: every operation opens its own folders."""

    def __init__(self, inbox: Path, host: str, epoch: str, outbox: Path | None = None) -> None:
        self.inbox = Path(inbox)
        self.host = check_host(host)
        self.epoch = epoch
        # The inbox's outbox: the one folder where a taken-over delivery's temp output may be renamed into
        # place (a marker on the share names it; one naming anything else is not trusted with a rename).
        self.outbox = Path(os.path.abspath(outbox)) if outbox is not None else None
        self.kept = KeptRecords(self._work, self.host)

    # ------------------------------------------------------------------ folders

    def root(self) -> Folder:
        """The inbox folder itself; FolderMissing while the share is away (it is never created)."""
        return Folder.open_root(self.inbox)

    def _work(self, *names: str, create: bool = True) -> Folder:
        with self.root() as root:
            return root.sub(WORK_DIR, *names, create=create)

    # ------------------------------------------------------------------ claim

    def claim(self, rel: str, sidecar_rel: str | None = None) -> Claim | None:
        """Take the image at `rel` (and its sidecar) by renaming it into claimed/<host>/. None: gone
        (another host won it). The sidecar is best effort: if it vanished, the image goes alone."""
        parts = _parts(rel)
        with self.root() as root, root.sub(*parts[:-1]) as src, \
                root.sub(WORK_DIR, CLAIMED, self.host, *parts[:-1], create=True) as dst:
            name = safefs.move_into_own(src, parts[-1], dst, parts[-1])
            if name is None:
                return None
            claimed = "/".join((*parts[:-1], name))
            sidecar = None
            if sidecar_rel is not None:
                side_parts = _parts(sidecar_rel)
                side_name = _sidecar_name_for(side_parts[-1], parts[-1], name)
                got = safefs.move_into_own(src, side_parts[-1], dst, side_name)
                sidecar = "/".join((*parts[:-1], got)) if got is not None else None
        return Claim(self.inbox, self.host, "/".join(parts), claimed, sidecar)

    def unclaim(self, claim: Claim) -> str | None:
        """Return a claimed image (and sidecar) to the inbox where it was dropped; the rel it got back."""
        back = self._return(CLAIMED, claim.name, claim.rel)
        if claim.sidecar is not None and back is not None:
            self._return(CLAIMED, claim.sidecar, _sibling(back, claim.sidecar, claim.name))
        return back

    def _return(self, area: str, name: str, rel: str) -> str | None:
        parts = _parts(name)
        target = _parts(rel)
        with self.root() as root, root.sub(WORK_DIR, area, self.host, *parts[:-1]) as src, \
                root.sub(*target[:-1], create=True) as dst:
            got = safefs.move_to_free_name(src, parts[-1], dst, target[-1], unique_tag=self._tag())
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
        parts = _parts(name)
        with self.root() as root, root.sub(WORK_DIR, CLAIMED, host, *parts[:-1]) as folder:
            st = folder.lstat(parts[-1])
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
                return False
            places = [(*parts[:-1],), (DONE_DIR, *parts[:-1]), (FAILED_DIR, *parts[:-1])]
            places += [(WORK_DIR, CLAIMED, other, *parts[:-1]) for other in self._names(CLAIMED) if other != host]
            for place in places:
                try:
                    with root.sub(*place) as there:
                        if any(safefs.same_file(st, there.lstat(n)) for n, _ in there.entries()
                               if n.startswith(os.path.splitext(parts[-1])[0])):
                            folder.unlink(parts[-1])
                            logger.info("{}: a half-finished claim (two links to one file); the extra one "
                                        "was dropped", shown(name))
                            return True
                except OSError:
                    continue
        return False

    # ------------------------------------------------------------------ deliver and fail

    def token(self, run_id: int) -> str:
        return f"{self.epoch}-{run_id}"

    def _fence(self, claim: Claim, token: str) -> Folder | None:
        """Move the claimed original (and sidecar) into delivering/<host>/<token>/: the proof that this
        host still holds the claim. None if it no longer does (taken back while this host was silent)."""
        parts = _parts(claim.name)
        with self.root() as root, root.sub(WORK_DIR, CLAIMED, self.host, *parts[:-1]) as src:
            box = root.sub(WORK_DIR, DELIVERING, self.host, token, create=True)
            try:
                rel_parts = _parts(claim.rel)
                with box.sub(*rel_parts[:-1], create=True) as dst:
                    try:
                        safefs.move_noreplace(src, parts[-1], dst, rel_parts[-1], unique=True)
                    except FileNotFoundError:
                        box.close()
                        self._drop_box(token)
                        return None
                    if claim.sidecar is not None:
                        side = _parts(claim.sidecar)[-1]
                        with contextlib.suppress(FileNotFoundError):
                            safefs.move_noreplace(src, side, dst, _sidecar_name_for(side, parts[-1], rel_parts[-1]),
                                                  unique=True)
            except BaseException:
                box.close()
                raise
        with self.root() as root, root.sub(WORK_DIR, CLAIMED, self.host) as base:
            base.prune(*parts[:-1])
        return box

    def deliver(self, claim: Claim, run_id: int, outbox: Path, output_rel: str, data: bytes | None,
                disposition: str) -> Settled | None:
        """Write the output at outbox/output_rel and park the original per `disposition` (move | delete |
        keep), fenced. None: superseded (the claim was taken back; nothing was written). FolderMissing if
        the outbox is not there (its share is away): the caller returns the claim and waits."""
        if disposition not in DISPOSITIONS[:3]:
            raise ValueError(f"unknown disposition {disposition!r}")
        token = self.token(run_id)
        out_parts = PurePosixPath(output_rel).parts
        output = outbox.joinpath(*out_parts)
        with Folder.open_root(outbox) as out_root, out_root.sub(*out_parts[:-1], create=True) as out_dir:
            box = self._fence(claim, token)
            if box is None:
                return None
            with box:
                if data is None:  # the output is already there: an earlier run's, for these very bytes
                    marker = {"rel": claim.rel, "output": str(output), "sha256": safefs.sha256_at(out_dir, output.name),
                              "disposition": disposition, "run_id": run_id}
                    box.write_atomic(MARKER, json.dumps(marker).encode(), owner=self.host)
                    return self._settle_own(token, marker)
                tmp = out_dir.write_temp(output.name, data, owner=self.host)
                sha = hashlib.sha256(data).hexdigest()
                try:
                    # The marker names the temp output too: a host that took this delivery over after the
                    # marker was written finishes it with that very file (see settle), never undoes it.
                    marker = {"rel": claim.rel, "output": str(output), "sha256": sha, "disposition": disposition,
                              "run_id": run_id, "outbox": str(outbox), "output_rel": output_rel, "temp": tmp}
                    box.write_atomic(MARKER, json.dumps(marker).encode(), owner=self.host)
                    if not self._holds(token, box):  # taken over while this host was paused: the taker decides
                        raise _Superseded
                    try:
                        os.rename(tmp, output.name, src_dir_fd=out_dir.fd, dst_dir_fd=out_dir.fd)
                    except FileNotFoundError:
                        if _has_bytes(output, sha):  # the taker finished it with our temp output
                            return None
                        raise
                except _Superseded:
                    out_dir.unlink(tmp)
                    return None
                except BaseException:
                    out_dir.unlink(tmp)
                    raise
                out_dir.fsync()
            crash_point("delivered")
        return self._settle_own(token, marker)

    def _holds(self, token: str, box: Folder) -> bool:
        """Whether this host's delivering folder `token` is still where it put it (another host takes a
        silent host's deliveries over by renaming them away; the box's descriptor follows the rename)."""
        try:
            with self._work(DELIVERING, self.host, create=False) as mine:
                there = mine.lstat(token)
        except (safefs.FolderMissing, safefs.UnsafeFolder):
            return False
        here = os.fstat(box.fd)
        return there is not None and here.st_nlink > 0 and (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)

    def _finish_output(self, marker: dict[str, object]) -> bool:
        """A delivery taken over between its marker and its output's rename: the marker's temp output,
        whole and fsynced before the marker was written, is renamed into place here. True if the output
        now holds the marker's bytes (renamed here, or by its owner meanwhile)."""
        outbox, rel, temp, sha = (str(marker.get(k) or "") for k in ("outbox", "output_rel", "temp", "sha256"))
        if not (outbox and rel and sha and _is_temp(temp) and "/" not in temp) or self.outbox is None or (
                Path(os.path.abspath(outbox)) != self.outbox):
            return False
        try:
            parts = _parts(rel)
            with Folder.open_root(self.outbox) as root, root.sub(*parts[:-1]) as out_dir:
                with contextlib.suppress(FileNotFoundError):  # the owner renamed (or removed) it meanwhile
                    if safefs.sha256_at(out_dir, temp) == sha:
                        os.rename(temp, parts[-1], src_dir_fd=out_dir.fd, dst_dir_fd=out_dir.fd)
                return safefs.sha256_at(out_dir, parts[-1]) == sha
        except (OSError, ValueError):
            return False

    def fail(self, claim: Claim, run_id: int, reason: str) -> Settled | None:
        """File the original (and sidecar) in failed/ with NAME.error.txt, fenced. None: superseded."""
        token = self.token(run_id)
        box = self._fence(claim, token)
        if box is None:
            return None
        with box:
            marker = {"rel": claim.rel, "disposition": "failed", "reason": reason, "run_id": run_id}
            box.write_atomic(MARKER, json.dumps(marker).encode(), owner=self.host)
        return self._settle_own(token, marker)

    def _settle_own(self, token: str, marker: dict[str, object]) -> Settled:
        """Park the original of this host's finished delivery. The marker is written, so the outcome is
        decided: if the parking fails (done/ or failed/ unusable, the share gone), the original waits in
        its delivering folder, filed at the next start (or by another host), and the run says so."""
        try:
            return self.settle(self.host, token)
        except OSError as exc:
            output = marker.get("output")
            return Settled(token, True, str(marker["disposition"]), Path(str(output)) if output else None, None,
                           str(marker.get("reason", "")),
                           f"the original could not be filed ({exc.strerror or exc}: {exc.filename}); it waits in "
                           f"{WORK_DIR}/{DELIVERING}/{self.host}/{token}/ and is filed at the next start")

    def _drop_box(self, token: str, host: str | None = None) -> None:
        with contextlib.suppress(OSError), self._work(DELIVERING, host or self.host, create=False) as base:
            with contextlib.suppress(OSError), base.sub(token) as box:
                box.unlink(MARKER)
            base.prune(token)

    # ------------------------------------------------------------------ settling (deliver, recover, reclaim)

    def settle(self, host: str, token: str) -> Settled:
        """Finish or undo a delivering folder of `host` (this one, or a silent one)."""
        with self._work(DELIVERING, host, token, create=False) as box:
            marker = _read_marker(box)
            files = [p for p, _ in box.files(any_kind=True) if p != (MARKER,) and not _is_temp(p[-1])]
            images = [p for p in files if os.path.splitext(p[-1])[1].lower() not in SIDECAR_SUFFIXES]
            marker = marker or {}
            disposition = str(marker.get("disposition", ""))
            output = Path(str(marker["output"])) if marker.get("output") else None
            finished = disposition == "failed" or (
                disposition in DISPOSITIONS and output is not None and (
                    _has_bytes(output, str(marker.get("sha256"))) or self._finish_output(marker)))
            parked: Path | None = None
            reason = str(marker.get("reason", ""))
            if finished and images:
                parked = self._park(box, images[0], [p for p in files if p != images[0]], disposition, reason)
            elif not finished:
                for p in files:
                    if is_user_file(p[-1]):
                        with box.sub(*p[:-1]) as src, self.root() as root, root.sub(*p[:-1], create=True) as dst:
                            safefs.move_to_free_name(src, p[-1], dst, p[-1], unique_tag=self._tag())
            for p in [q for q, _ in box.files(any_kind=True)]:
                with box.sub(*p[:-1]) as folder:
                    if p[-1] == MARKER or _is_temp(p[-1]) or not is_user_file(p[-1]):
                        folder.unlink(p[-1])
                box.prune(*p[:-1])
        self._drop_box(token, host)
        return Settled(token, finished, disposition if finished else "", output if finished else None, parked, reason)

    def _park(self, box: Folder, image: tuple[str, ...], sidecars: list[tuple[str, ...]], disposition: str,
              reason: str) -> Path | None:
        rel_dir = image[:-1]
        if disposition == "delete":
            for p in (image, *sidecars):
                with box.sub(*p[:-1]) as folder:
                    folder.unlink(p[-1])
            return None
        with self.root() as root:
            where: tuple[str, ...] = {"move": (DONE_DIR,), "failed": (FAILED_DIR,), "keep": ()}[disposition]
            with box.sub(*rel_dir) as src, root.sub(*where, *rel_dir, create=True) as dst:
                if disposition == "keep":
                    # Recorded before the original reappears (a rename keeps size and mtime): a host that
                    # sees it back in the inbox knows at once that it was processed.
                    self.kept.remember(src, "/".join(image), image[-1])
                name = safefs.move_to_free_name(src, image[-1], dst, image[-1], unique_tag=self._tag())
                if name is None:
                    return None
                for side in sidecars:
                    if side[:-1] == rel_dir and is_user_file(side[-1]):
                        safefs.move_to_free_name(src, side[-1], dst, _sidecar_name_for(side[-1], image[-1], name),
                                                 unique_tag=self._tag())
                parked = self.inbox.joinpath(*where, *rel_dir, name)
                if disposition == "failed":
                    dst.write_atomic(note_name(name), error_note(name, reason).encode(), owner=self.host)
                if disposition == "keep" and name != image[-1]:  # the name was taken meanwhile: numbered
                    self.kept.remember(dst, "/".join((*rel_dir, name)), name)
        return parked

    def reclaim(self, host: str) -> list[str]:
        """A silent host's files: settle its deliveries, return its claims to the inbox. Only regular
        image and sidecar files, only from real folders: a planted link leads nowhere.

        Each is first taken over by one atomic rename into this host's own folders, so that if the silent
        host wakes up mid-way (a paused VM), either its fence or this takeover wins, never both."""
        check_host(host)
        if host == self.host:
            raise ValueError("a host does not reclaim its own files while it runs")
        back: list[str] = []
        for token in self._names(DELIVERING, host):
            mine = f"{token}{TAKEN}{host}"
            try:
                with self._work(DELIVERING, host, create=False) as src, \
                        self._work(DELIVERING, self.host, create=True) as dst:
                    safefs.move_noreplace(src, token, dst, mine, unique=True)
            except FileNotFoundError:
                continue  # another host took it over first
            except OSError as exc:
                logger.error("cannot take over {}'s delivery {} in {}: {}", host, shown(token), self.inbox, exc)
                continue
            try:
                settled = self.settle(self.host, mine)
            except OSError as exc:
                logger.error("cannot settle {}'s delivery {} in {}: {}", host, shown(token), self.inbox, exc)
                continue
            back.append(f"{token}: {'finished' if settled.finished else 'returned'}")
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
                with self.root() as root, root.sub(WORK_DIR, CLAIMED, host, *parts[:-1]) as src, \
                        root.sub(WORK_DIR, CLAIMED, self.host, *parts[:-1], create=True) as dst:
                    taken = safefs.move_into_own(src, parts[-1], dst, parts[-1])
                with self._work(CLAIMED, host, create=False) as base:
                    base.prune(*parts[:-1])
                got = self._return(CLAIMED, "/".join((*parts[:-1], taken)), "/".join(parts)) if taken else None
            except OSError as exc:
                logger.error("cannot return {}'s claim {} to {}: {}", host, shown("/".join(parts)), self.inbox, exc)
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

    def own_deliveries(self) -> list[str]:
        return self._names(DELIVERING, self.host)

    def _names(self, *area: str) -> list[str]:
        try:
            with self._work(*area, create=False) as folder:
                return [n for n, st in folder.entries() if stat.S_ISDIR(st.st_mode)]
        except (safefs.FolderMissing, safefs.UnsafeFolder, NotADirectoryError):
            return []

    # ------------------------------------------------------------------ done/ back to the inbox

    def restore(self, area: str, parked_rel: str, rel: str) -> str | None:
        """Bring an original (and its sidecars) back from done/ or failed/ to `rel` in the inbox: a sidecar
        arrived after its image was processed, or `bgwatch retry`. Returns the rel it got, None if gone."""
        if area not in (DONE_DIR, FAILED_DIR):
            raise ValueError(f"{area!r} is not done/ or failed/")
        src_parts = _parts(parked_rel)
        parts = _parts(rel)
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
                    safefs.move_to_free_name(src, entry, dst, _sidecar_name_for(entry, src_parts[-1], got),
                                             unique_tag=self._tag())
            src.unlink(note_name(src_parts[-1]))
        return "/".join((*parts[:-1], got))

    def park_unclaimed(self, rel: str, where: str, reason: str = "") -> Path | None:
        """A file that is not a job (an orphan or redundant sidecar): straight to done/ or failed/."""
        parts = _parts(rel)
        with self.root() as root, root.sub(*parts[:-1]) as src, root.sub(where, *parts[:-1], create=True) as dst:
            got = safefs.move_to_free_name(src, parts[-1], dst, parts[-1], unique_tag=self._tag())
            if got is None:
                return None
            if where == FAILED_DIR:
                dst.write_atomic(note_name(got), error_note(got, reason).encode(), owner=self.host)
        return self.inbox.joinpath(where, *parts[:-1], got)

    def _tag(self) -> str:
        return f"{self.host}-{os.urandom(3).hex()}"


class _Superseded(Exception):
    """Raised inside deliver() when the fence was lost between the marker and the output's rename."""


def _sidecar_name_for(sidecar: str, image_before: str, image_after: str) -> str:
    """photo.yaml follows photo.jpg to photo-2.jpg as photo-2.yaml (photo.jpg.yaml as photo-2.jpg.yaml)."""
    ext = os.path.splitext(sidecar)[1]
    stem = image_after if sidecar.startswith(image_before + ".") else os.path.splitext(image_after)[0]
    return safefs.fit_name(stem, ext)


def _sibling(image_rel: str, sidecar_name: str, image_name: str) -> str:
    parts = PurePosixPath(image_rel)
    side = PurePosixPath(sidecar_name).name
    return str(parts.parent / _sidecar_name_for(side, PurePosixPath(image_name).name, parts.name))


def _is_temp(name: str) -> bool:
    return name.endswith(safefs.TEMP_SUFFIX)


def _read_marker(box: Folder) -> dict[str, object] | None:
    try:
        data = json.loads(box.read_bytes(MARKER, 1 << 16))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_bytes(path: Path, sha256: str) -> bool:
    try:
        return safefs.sha256_file(path) == sha256
    except OSError:
        return False


def note_name(name: str) -> str:
    """NAME.error.txt beside a failed original; for a name near the filesystem's limit, its stem is
    shortened so that the note can always be written."""
    return safefs.fit_name(name, ERROR_NOTE)


def error_note(name: str, reason: str) -> str:
    return (f"bgwatch could not process {shown(name)}\n\n{shown(reason.strip(), newlines=True)}\n\n"
            "To try again: fix the cause, then move the file (and its sidecar) back into the inbox,\n"
            "or run `bgwatch retry --failed`.\n")
