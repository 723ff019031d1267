"""The folder source's recovery of inboxes that waited for their work folder, while the studio store is away."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bgwatch.sources import folder
from bgwatch.storebase import StoreUnavailable


def test_an_inbox_recovered_while_the_store_is_away_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery reads the inbox's open runs from the store: with the store away the daemon carries on (it
    had exited with the error) and reads them at a later look, when the store is back."""
    site = SimpleNamespace(waits="its work folder cannot be opened", inbox=SimpleNamespace(path="/share/in"))
    submitted: list[Any] = []
    intake: Any = SimpleNamespace(sites={"in": site}, submit=submitted.append)
    source = folder.FolderSource(intake, "h1", "e1", lambda config, sites: sites)
    answers: list[Any] = [StoreUnavailable("the studio store is unavailable"), ["job"]]

    def recover(intake_: Any, host: str, only: Any = None) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(folder, "recover", recover)
    source._recover_waiting()  # the store away: nothing raised, nothing submitted
    assert submitted == [] and answers == [["job"]]
    source._next_recovery = 0.0  # the next look
    source._recover_waiting()
    assert submitted == ["job"] and answers == []
