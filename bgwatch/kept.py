"""Originals processed and put back in place (`on_success: keep`), recorded on the share so that no host
takes them again: `<inbox>/.bgwatch/kept/<digest of the rel path>.json` holds the original's size and
mtime (a rename keeps both) and those of its sidecars. A changed image or sidecar is input again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable

from bgwatch.safefs import Folder
from bgwatch.sidecars import SIDECAR_SUFFIXES

KEPT = "kept"


class KeptRecords:
    def __init__(self, work: Callable[..., Folder], host: str) -> None:
        self._work = work  # opens a folder under <inbox>/.bgwatch/ (custody's, through descriptors)
        self.host = host

    def remember(self, folder: Folder, rel: str, name: str) -> None:
        """Record the original `name` in `folder` (its place, or where it waits to go back) as done."""
        st = folder.lstat(name)
        if st is None:
            return
        stem = os.path.splitext(name)[0]
        sides = {entry: [est.st_size, est.st_mtime_ns] for entry, est in folder.entries()
                 if os.path.splitext(entry)[1].lower() in SIDECAR_SUFFIXES
                 and os.path.splitext(entry)[0] in (stem, name)}
        record = {"rel": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sidecars": sides}
        with self._work(KEPT, create=True) as kept:
            kept.write_atomic(_key(rel), json.dumps(record).encode(), owner=self.host)

    def record(self, rel: str) -> dict[str, object] | None:
        try:
            with self._work(KEPT, create=False) as kept:
                data = json.loads(kept.read_bytes(_key(rel), 1 << 16))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("rel") == rel else None

    def is_kept(self, rel: str, st: os.stat_result) -> bool:
        """This image was processed and put back unchanged (by any host): not input again."""
        record = self.record(rel)
        return record is not None and [record.get("size"), record.get("mtime_ns")] == [st.st_size, st.st_mtime_ns]

    def sidecar_unchanged(self, image_rel: str, sidecar_name: str, st: os.stat_result) -> bool:
        record = self.record(image_rel)
        sides = record.get("sidecars") if record else None
        return isinstance(sides, dict) and sides.get(sidecar_name) == [st.st_size, st.st_mtime_ns]

    def forget(self, rel: str) -> None:
        with contextlib.suppress(OSError), self._work(KEPT, create=False) as kept:
            kept.unlink(_key(rel))


def _key(rel: str) -> str:
    return hashlib.sha256(os.fsencode(rel)).hexdigest()[:40] + ".json"
