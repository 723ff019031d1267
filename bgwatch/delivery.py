"""Delivery and parking: the second half of custody (claims.py is the first).

Delivery is fenced: the worker first moves the claimed original into its own `delivering/<host>/<token>/`
folder. That rename is the proof that it still holds the claim: if another host took the claim back
(this one was paused or cut off longer than the lease), the original is not there, and the job is
dropped as superseded instead of being delivered twice. Then the output is written to a temp name, the
marker is written (the output's sha256, the name it wants, the temp name), and the output is moved into
place by a no-replace move that takes the first free name (outputs.py); only then is the original parked.
Before each of those moves the delivery proves again that its folder is still where it put it.

Whoever finds a delivering folder after a crash — the host itself at start, or another host once this one
is silent — settles it the same way: with a marker whose output is there (found by its bytes, under the
name it wanted or a numbered one) or whose temp output can still be placed, the delivery is finished
(original to done/); without one, the original goes back to the inbox to be processed again.

A marker is a file on the share, so it is data, never an instruction: it may name only its own folder's
files and the inbox's outbox, by name; it is read without following links and with a size cap. One that
is malformed or names anything else is moved to `.bgwatch/quarantine/` with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from bgwatch import fileid, markers, outputs, safefs
from bgwatch.claims import (
    CLAIMED,
    DELIVERING,
    DONE_DIR,
    FAILED_DIR,
    WORK_DIR,
    Claim,
    Claims,
    check_host,
    error_note,
    is_user_file,
    note_name,
    parts_of,
    sidecar_name_for,
)
from bgwatch.markers import DISPOSITIONS, MARKER, is_temp, out_parts
from bgwatch.outputs import OutputRecords, Owner
from bgwatch.safefs import Folder
from bgwatch.sidecars import SIDECAR_SUFFIXES
from bgwatch.text import shown

TAKEN = "~from-"  # a silent host's delivery taken over by this one: delivering/<me>/<token>~from-<host>
QUARANTINE = "quarantine"
# Errors of the storage itself: a full disk or quota, a read-only or failing mount. Retried, never a reason
# to think another host took the file.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})

Step = Callable[[str], None]  # named moments of a delivery ("marker", "delivered", "filing"); a seam for tests


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
    returned: str = ""  # not finished: why the original went back to the inbox
    handed_over: bool = False  # taken over mid-way by another host, which finishes (or files) it


class DeliveryBlocked(Exception):
    """The output could not be written or placed: the original is back in this host's claimed folder, the
    claim still holds, and nothing was delivered. `storage` errors (full, read-only, failing) are worth
    retrying; the message names the folder and the cause."""

    def __init__(self, folder: Path | str, error: OSError) -> None:
        self.folder = str(folder)
        self.error = error
        self.errno = error.errno or 0
        self.storage = self.errno in STORAGE_ERRNOS
        name = errno.errorcode.get(self.errno, "")
        super().__init__(f"{self.folder}: {error.strerror or error}" + (f" ({name})" if name else ""))


class _Lost(Exception):
    """This host's delivering folder was taken over by another host: it decides from here on."""


class Custody(Claims):
    """One inbox's files as one host handles them, from claim to done/ or failed/. Thread-safe."""

    def __init__(self, inbox: Path, host: str, epoch: str, outbox: Path | None = None, *,
                 step: Step | None = None) -> None:
        super().__init__(inbox, host, epoch, outbox)
        self.outputs = OutputRecords(self._work, self.host)
        self.step: Step = step or (lambda _name: None)

    def token(self, run_id: int) -> str:
        return f"{self.epoch}-{run_id}"

    def own_deliveries(self) -> list[str]:
        return self._names(DELIVERING, self.host)

    # ------------------------------------------------------------------ fence

    def _fence(self, claim: Claim, token: str) -> Folder | None:
        """Move the claimed original (and sidecar) into delivering/<host>/<token>/: the proof that this
        host still holds the claim. None if it no longer does (taken back while this host was silent)."""
        parts = parts_of(claim.name)
        with self.root() as root, root.sub(WORK_DIR, CLAIMED, self.host, *parts[:-1]) as src:
            box = root.sub(WORK_DIR, DELIVERING, self.host, token, create=True)
            try:
                rel_parts = parts_of(claim.rel)
                with box.sub(*rel_parts[:-1], create=True) as dst:
                    try:
                        safefs.move_noreplace(src, parts[-1], dst, rel_parts[-1], unique=True)
                    except FileNotFoundError:
                        box.close()
                        self._drop_box(token)
                        return None
                    if claim.sidecar is not None:
                        side = parts_of(claim.sidecar)[-1]
                        with contextlib.suppress(FileNotFoundError):
                            safefs.move_noreplace(src, side, dst, sidecar_name_for(side, parts[-1], rel_parts[-1]),
                                                  unique=True)
            except BaseException:
                box.close()
                raise
        with self.root() as root, root.sub(WORK_DIR, CLAIMED, self.host) as base:
            base.prune(*parts[:-1])
        return box

    def _unfence(self, claim: Claim, token: str) -> None:
        """Undo a fence whose delivery could not go on: the original (and sidecar) back to its claimed name,
        the delivering folder removed. The claim holds as before; nothing was delivered."""
        parts, rel_parts = parts_of(claim.name), parts_of(claim.rel)
        with self.root() as root, root.sub(WORK_DIR, DELIVERING, self.host, token, *rel_parts[:-1]) as src, \
                root.sub(WORK_DIR, CLAIMED, self.host, *parts[:-1], create=True) as dst:
            safefs.move_noreplace(src, rel_parts[-1], dst, parts[-1], unique=True)
            if claim.sidecar is not None:
                side = parts_of(claim.sidecar)[-1]
                with contextlib.suppress(FileNotFoundError):
                    safefs.move_noreplace(src, sidecar_name_for(side, parts[-1], rel_parts[-1]), dst, side,
                                          unique=True)
        self._drop_box(token)

    def _holds(self, token: str) -> bool:
        """Whether this host's delivering folder `token` is still where it put it. Another host takes a
        silent host's deliveries over by renaming them away, and tokens are never reused, so the name
        alone proves it (inode numbers are not trusted: FUSE and SMB mounts make them up)."""
        try:
            with self._work(DELIVERING, self.host, create=False) as mine:
                there = mine.lstat(token)
        except (safefs.FolderMissing, safefs.UnsafeFolder):
            return False
        return there is not None and stat.S_ISDIR(there.st_mode)

    def _taken_over(self, token: str) -> bool:
        """This host's delivering folder is reachable and `token` is no longer in it (not: the share away)."""
        try:
            with self._work(DELIVERING, self.host, create=False) as mine:
                return mine.lstat(token) is None
        except OSError:
            return False

    def still_holds(self, token: str) -> bool:
        return self._holds(token)

    def _check_holds(self, token: str) -> None:
        if not self._holds(token):
            raise _Lost

    # ------------------------------------------------------------------ deliver and fail

    def deliver(self, claim: Claim, run_id: int, outbox: Path, output_rel: str, data: bytes | None,
                disposition: str, *, input_sha256: str = "") -> Settled | None:
        """Write the output at outbox/output_rel (or its first free numbered name) and park the original per
        `disposition` (move | delete | keep), fenced. `data` None: the output there is already this input's
        own (an earlier run of the same bytes and spec), kept as it is. None: superseded (the claim was taken
        back; nothing was written by this host). FolderMissing if the outbox is not there (its share is away);
        DeliveryBlocked if the output could not be written (the claim still holds). `handed_over`: another
        host took the delivery over after its marker, and finishes it with this output."""
        if disposition not in DISPOSITIONS[:3]:
            raise ValueError(f"unknown disposition {disposition!r}")
        token = self.token(run_id)
        out_path = out_parts(output_rel)
        if self.outbox is None:  # the inbox's outbox, from now on the one its markers may name
            self.outbox = Path(os.path.abspath(outbox))
        try:
            out_root = Folder.open_root(outbox)
        except safefs.FolderMissing:
            raise
        except OSError as exc:
            raise DeliveryBlocked(outbox, exc) from exc
        with out_root:
            try:
                out_dir = out_root.sub(*out_path[:-1], create=True)
                box = self._fence(claim, token)
            except (safefs.FolderMissing, safefs.UnsafeFolder):
                raise
            except OSError as exc:
                raise DeliveryBlocked(outbox if not isinstance(exc, FileNotFoundError) else self.inbox, exc) from exc
            with out_dir:
                if box is None:
                    return None
                with box:
                    return self._write(claim, run_id, token, out_dir, outbox, output_rel, data, disposition, box,
                                       input_sha256)

    def _write(self, claim: Claim, run_id: int, token: str, out_dir: Folder, outbox: Path, output_rel: str,
               data: bytes | None, disposition: str, box: Folder, input_sha256: str) -> Settled | None:
        rel_parts = parts_of(claim.rel)
        try:
            if not input_sha256:
                with box.sub(*rel_parts[:-1]) as held:
                    input_sha256 = fileid.sha256_at(held, rel_parts[-1])
            if data is None:
                return self._keep_own(claim, run_id, token, out_dir, outbox, output_rel, disposition, box,
                                      input_sha256)
            tmp = out_dir.write_temp(out_parts(output_rel)[-1], data, owner=self.host)
        except OSError as exc:
            self._unfence(claim, token)
            raise DeliveryBlocked(outbox, exc) from exc
        sha = hashlib.sha256(data).hexdigest()
        # The marker names the temp output too: a host that took this delivery over after the marker was
        # written finishes it with that very file (see settle), never undoes it.
        marker: dict[str, object] = {"rel": claim.rel, "output_rel": output_rel, "sha256": sha, "temp": tmp,
                                     "input": input_sha256, "disposition": disposition, "run_id": run_id,
                                     "host": self.host}
        try:
            box.write_atomic(MARKER, json.dumps(marker).encode(), owner=self.host)
        except OSError as exc:
            out_dir.unlink(tmp)
            self._unfence(claim, token)
            raise DeliveryBlocked(self.inbox / WORK_DIR / DELIVERING, exc) from exc
        self.step("marker")
        owner = Owner(claim.rel, input_sha256, self.host, run_id)
        try:
            final = outputs.place(out_dir, tmp, output_rel, sha, owner, self.outputs,
                                  lambda: self._check_holds(token))
        except _Lost:  # taken over while this host was paused: the taker decides, with our temp output
            return Settled(token, False, "", None, None, handed_over=True)
        except FileNotFoundError:
            if outputs.find(out_dir, output_rel, sha) is not None and not self._holds(token):
                return Settled(token, False, "", None, None, handed_over=True)  # the taker placed our output
            out_dir.unlink(tmp)
            self._unfence(claim, token)
            raise
        except OSError as exc:
            out_dir.unlink(tmp)
            with contextlib.suppress(OSError):
                box.unlink(MARKER)
            self._unfence(claim, token)
            raise DeliveryBlocked(outbox, exc) from exc
        self._record_output(final, owner, sha)
        marker["output"] = final
        with contextlib.suppress(OSError):  # settle finds the output by its bytes without this
            box.write_atomic(MARKER, json.dumps(marker).encode(), owner=self.host)
        self.step("delivered")
        return self._settle_own(token, marker)

    def _keep_own(self, claim: Claim, run_id: int, token: str, out_dir: Folder, outbox: Path, output_rel: str,
                  disposition: str, box: Folder, input_sha256: str) -> Settled:
        """The output is already this input's own (its record says so and it holds the recorded bytes):
        not written again; the marker names it, and the original is parked."""
        sha = self.outputs.owned_by(output_rel, Owner(claim.rel, input_sha256))
        if sha is None or not outputs.holds(out_dir, out_parts(output_rel)[-1], sha):
            raise FileExistsError(errno.EEXIST, "the earlier output is not this input's any more",
                                  str(outbox / output_rel))
        marker = {"rel": claim.rel, "output_rel": output_rel, "output": output_rel, "sha256": sha,
                  "input": input_sha256, "disposition": disposition, "run_id": run_id, "host": self.host}
        box.write_atomic(MARKER, json.dumps(marker).encode(), owner=self.host)
        return self._settle_own(token, marker)

    def _record_output(self, output_rel: str, owner: Owner, sha: str) -> None:
        try:
            self.outputs.put(output_rel, owner, sha)
        except OSError as exc:  # the output is in place; only a later re-run of this input is numbered
            logger.warning("{}: cannot record who owns the output {} ({})", self.inbox, shown(output_rel),
                           exc.strerror or exc)

    def fail(self, claim: Claim, run_id: int, reason: str) -> Settled | None:
        """File the original (and sidecar) in failed/ with NAME.error.txt, fenced. None: superseded."""
        token = self.token(run_id)
        box = self._fence(claim, token)
        if box is None:
            return None
        with box:
            marker = {"rel": claim.rel, "disposition": "failed", "reason": reason, "run_id": run_id,
                      "host": self.host}
            box.write_atomic(MARKER, json.dumps(marker).encode(), owner=self.host)
        return self._settle_own(token, marker)

    def _settle_own(self, token: str, marker: dict[str, object]) -> Settled:
        """Park the original of this host's finished delivery. The marker is written, so the outcome is
        decided: if the parking fails (done/ or failed/ unusable, the share gone), the original waits in
        its delivering folder, filed later (by this host's sweep, at the next start, or by another host)."""
        output = marker.get("output")
        try:
            return self.settle(self.host, token)
        except OSError as exc:
            # Taken over between the output's placing and the filing (its folder gone): the taker files it.
            taken = isinstance(exc, FileNotFoundError) and self._taken_over(token)
            return Settled(token, True, str(marker["disposition"]),
                           self.outbox / str(output) if output and self.outbox else None, None,
                           str(marker.get("reason", "")), "" if taken else waiting(self.host, token, exc),
                           handed_over=taken)

    def _drop_box(self, token: str, host: str | None = None) -> None:
        with contextlib.suppress(OSError), self._work(DELIVERING, host or self.host, create=False) as base:
            with contextlib.suppress(OSError), base.sub(token) as box:
                box.unlink(MARKER)
                box.prune_tree()
            base.prune(token)

    # ------------------------------------------------------------------ settling (deliver, recover, reclaim)

    def settle(self, host: str, token: str) -> Settled:
        """Finish or undo a delivering folder of this host (its own, or one it took over)."""
        with self._work(DELIVERING, host, token, create=False) as box:
            marker = self._read_marker(box, host, token)
            files = [p for p, _ in box.files(any_kind=True) if p != (MARKER,) and not is_temp(p[-1])]
            images = [p for p in files if os.path.splitext(p[-1])[1].lower() not in SIDECAR_SUFFIXES]
            disposition = str(marker.get("disposition", ""))
            output = self._finished_output(marker) if disposition in DISPOSITIONS[:3] else None
            finished = disposition == "failed" or output is not None
            reason = str(marker.get("reason", ""))
            parked: Path | None = None
            problem = ""
            try:
                if finished and images:
                    parked = self._park(box, images[0], [p for p in files if p != images[0]], disposition, reason,
                                        host, token)
                elif not finished:
                    for p in files:
                        if is_user_file(p[-1]):
                            self._check_holds_of(host, token)
                            with box.sub(*p[:-1]) as src, self.root() as root, \
                                    root.sub(*p[:-1], create=True) as dst:
                                safefs.move_to_free_name(src, p[-1], dst, p[-1], unique_tag=self._tag(),
                                                         reservation=_reserved_by(host, token))
            except _Lost:  # another host took this delivery over while it was being filed: that host files it
                return Settled(token, finished, disposition if finished else "", output, None, reason,
                               handed_over=True)
            if not finished and marker.get("temp"):
                self._drop_temp(marker)
            for p in [q for q, _ in box.files(any_kind=True)]:
                with box.sub(*p[:-1]) as folder:
                    if p[-1] == MARKER or is_temp(p[-1]) or not is_user_file(p[-1]):
                        folder.unlink(p[-1])
            box.prune_tree()
        self._drop_box(token, host)
        why = "" if finished else ("its output was not written" if not marker else "its output is not in the outbox")
        return Settled(token, finished, disposition if finished else "", output, parked, reason, problem, why)

    def _drop_temp(self, marker: dict[str, object]) -> None:
        """An undone delivery's temp output (whatever is left of it) is removed from the outbox."""
        if self.outbox is None:
            return
        with contextlib.suppress(OSError, ValueError), Folder.open_root(self.outbox) as root, \
                root.sub(*out_parts(str(marker["output_rel"]))[:-1]) as out_dir:
            out_dir.unlink(str(marker["temp"]))

    def _check_holds_of(self, host: str, token: str) -> None:
        if host == self.host:
            self._check_holds(token)

    def _finished_output(self, marker: dict[str, object]) -> Path | None:
        """Where the marker's output is (found by its bytes), placing its temp output first if the owner
        was cut off before doing so; None if there is no such output."""
        if self.outbox is None:
            return None
        wanted, sha = str(marker.get("output_rel", "")), str(marker.get("sha256", ""))
        parts = out_parts(wanted)
        try:
            with Folder.open_root(self.outbox) as root, root.sub(*parts[:-1]) as out_dir:
                final = marker.get("output")
                found = str(final) if final and outputs.holds(out_dir, str(final).rpartition("/")[2], sha) else (
                    outputs.find(out_dir, wanted, sha))
                owner = Owner(str(marker.get("rel", "")), str(marker.get("input", "")), str(marker.get("host", "")),
                              int(str(marker.get("run_id", 0))))
                temp = str(marker.get("temp", ""))
                if found is None and temp and outputs.holds(out_dir, temp, sha):
                    try:
                        found = outputs.place(out_dir, temp, wanted, sha, owner, self.outputs)
                    except FileNotFoundError:  # its owner placed it meanwhile (it woke up mid-takeover)
                        found = outputs.find(out_dir, wanted, sha)
                if found is None:
                    return None
                if self.outputs.owned_by(found, owner) != sha:
                    self._record_output(found, owner, sha)
                return self.outbox / found
        except (OSError, ValueError):
            return None

    def _park(self, box: Folder, image: tuple[str, ...], sidecars: list[tuple[str, ...]], disposition: str,
              reason: str, host: str, token: str) -> Path | None:
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
                self.step("filing")
                self._check_holds_of(host, token)
                # Reserved in this delivery's name: filed again after a kill (by this host or a taker), the
                # original takes the name it reserved, never a unique one beside an empty stray.
                name = safefs.move_to_free_name(src, image[-1], dst, image[-1], unique_tag=self._tag(),
                                                reservation=_reserved_by(host, token))
                if name is None:
                    return None
                for side in sidecars:
                    if side[:-1] == rel_dir and is_user_file(side[-1]):
                        self._check_holds_of(host, token)
                        safefs.move_to_free_name(src, side[-1], dst, sidecar_name_for(side[-1], image[-1], name),
                                                 unique_tag=self._tag(), reservation=_reserved_by(host, token))
                parked = self.inbox.joinpath(*where, *rel_dir, name)
                if disposition == "failed":
                    dst.write_atomic(note_name(name), error_note(name, reason).encode(), owner=self.host)
                if disposition == "keep" and name != image[-1]:  # the name was taken meanwhile: numbered
                    self.kept.remember(dst, "/".join((*rel_dir, name)), name)
        return parked

    # ------------------------------------------------------------------ markers are data

    def _read_marker(self, box: Folder, host: str, token: str) -> dict[str, object]:
        """The marker, checked (markers.py); {} when there is none. One that is refused is quarantined with
        the reason, and counts as none: the original goes back to the inbox."""
        try:
            return markers.read(box, self.outbox)
        except markers.Refused as refused:
            self._quarantine(box, host, token, str(refused))
            return {}

    def _quarantine(self, box: Folder, host: str, token: str, why: str) -> None:
        name = f"{host}-{token}"
        try:
            with self._work(QUARANTINE, create=True) as folder:
                safefs.move_noreplace(box, MARKER, folder, f"{name}.json", unique=True)
                folder.write_atomic(f"{name}.txt", f"{why}\n".encode(), owner=self.host)
        except OSError as exc:
            box.unlink(MARKER)
            why = f"{why}; removed (could not be quarantined: {exc.strerror or exc})"
        logger.warning("{}: the marker of delivery {} of {} was refused: {}; its original goes back to the "
                       "inbox (marker in {}/{}/)", self.inbox, shown(token), shown(host), shown(why), WORK_DIR,
                       QUARANTINE)

    # ------------------------------------------------------------------ a silent host

    def reclaim(self, host: str) -> list[str]:
        """A silent host's files: settle its deliveries, return its claims to the inbox.

        Each delivery is first taken over by one atomic rename into this host's own folders, so that if the
        silent host wakes up mid-way (a paused VM), either its fence or this takeover wins, never both."""
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
        back.extend(self.reclaim_claims(host))
        return back


def _reserved_by(host: str, token: str) -> str:
    """What a name reserved for this delivery's files holds: the delivery as its first host named it, the
    same after any number of takeovers (delivering/<me>/<token>~from-<host>[~from-<host>...])."""
    first, _, rest = token.partition(TAKEN)
    return f"{rest.partition(TAKEN)[0] or host}-{first}"


def waiting(host: str, token: str, exc: OSError) -> str:
    """Why an original waits in its delivering folder although its output is delivered."""
    return (f"the original could not be filed ({exc.strerror or exc}: {exc.filename}); it waits in "
            f"{WORK_DIR}/{DELIVERING}/{host}/{token}/ and is filed when that works again")


