"""The error tree. Each error builds its own one-line message from its fields.

The CLI is the one place that turns a BgwatchError into a message and an exit code; the daemon turns
one into a failed run (row 'failed', the original in failed/ with NAME.error.txt) and carries on.
"""

from __future__ import annotations

from pathlib import Path


class BgwatchError(Exception):
    """Anything bgwatch can explain to its user in one line."""


class _KeyError(BgwatchError):
    """An error about one key of one file: says where, which key, what is wrong and what is allowed."""

    def __init__(self, source: str | Path, key: str, problem: str, allowed: str = "") -> None:
        self.source = str(source)
        self.key = key
        self.problem = problem
        self.allowed = allowed
        where = f"{self.source}: {key}" if key else self.source
        text = f"{where}: {problem}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class ConfigError(_KeyError):
    """config.yaml (or an environment override) is invalid; the daemon does not start."""


class SpecError(_KeyError):
    """A rule, folder file or sidecar asks for something invalid; that image fails, others go on."""


class InputError(BgwatchError):
    """The image itself cannot be used (broken, empty, too large, not an image)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{Path(self.path).name}: {reason}")


class EngineError(BgwatchError):
    """A mask or background engine failed or is unavailable; the message says what to do."""

    def __init__(self, engine: str, reason: str) -> None:
        self.engine = engine
        self.reason = reason
        super().__init__(f"{engine} engine: {reason}")
