"""Output names: which file in the outbox an input's result is written to.

Chosen by the intake (one thread) when a run is recorded, so that two inputs never write one file:
`photo.jpg` and `photo.png` dropped together get `photo.png` and `photo-2.png` (the one naming scheme of
safefs.numbered). An output belongs to the input that wrote it — the same dropped path with the same bytes
— and only that input replaces it (processed again with another spec). A different image dropped later
under an old name gets a new output name: a delivered result is never overwritten by someone else's file.
The bytes are written by custody.deliver, fenced and atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

from bgwatch import safefs

OwnerOf = Callable[[Path], "tuple[str, str] | None"]  # output -> (rel_path, input_sha256) of its run


class OutputNames:
    """Reserves output names for in-flight runs; the owner of an existing output comes from the store."""

    def __init__(self, owner_of: OwnerOf) -> None:
        self._owner_of = owner_of
        self._reserved: dict[Path, tuple[str, str]] = {}

    def reserve(self, outbox: Path, rel_path: str, input_sha256: str, suffix: str, extension: str) -> str:
        """The output path (relative to the outbox) for this input, reserved until release()."""
        rel = PurePosixPath(rel_path)
        me = (rel_path, input_sha256)
        for n in range(1, 100_000):
            name = safefs.numbered(f"{rel.stem}{suffix}{extension}", n)
            out_rel = str(rel.parent / name) if rel.parent.parts else name
            candidate = outbox / out_rel
            holder = self._reserved.get(candidate)
            if holder is None and (candidate.exists() or candidate.is_symlink()):
                holder = self._owner_of(candidate) or ("?", "?")
            if holder is None or holder == me:
                self._reserved[candidate] = me
                return out_rel
        raise FileExistsError(f"no free output name for {rel_path} in {outbox}")

    def hold(self, outbox: Path, output_rel: str, rel_path: str, input_sha256: str) -> None:
        """Reserve a name chosen earlier (a run taken again after a restart)."""
        self._reserved[outbox / output_rel] = (rel_path, input_sha256)

    def release(self, outbox: Path, output_rel: str) -> None:
        self._reserved.pop(outbox / output_rel, None)
