"""Issue 20, item 1: a user's file is read through descriptors, never through a link swapped in after the
claim. The attacker is a second share user (`nobody`, a real setuid) who cannot read the secret they aim at;
the daemon (root here: it can read everything, the worst case) must refuse the link, not follow it."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bgwatch.config import Config
from bgwatch.custody import Custody
from bgwatch.daemon import Daemon
from bgwatch.errors import InputError
from bgwatch.jobs import Job, JobSpec, job_key
from bgwatch.pipeline import stages
from bgwatch.pipeline.backgrounds import load_backdrop
from bgwatch.samples import write_samples
from bgwatch.store import Store
from tests.helpers import files_under, make_config
from tests.unprivileged import as_nobody, open_to_all, shared_root

SWAP = """
import os, sys
claimed, secret = sys.argv[1], sys.argv[2]
try:
    open(secret, "rb")
except PermissionError:
    pass
else:
    sys.exit("the secret is readable by this user: the test proves nothing")
os.unlink(claimed)
os.symlink(secret, claimed)
"""


@pytest.fixture
def share() -> Iterator[Path]:
    with shared_root() as root:
        yield root


def private_image(root: Path, seed: int) -> Path:
    """An image only root can read (0600 in a 0700 folder), as someone's private photo."""
    [secret] = write_samples(root / "private", 1, size=(96, 72), seed=seed)
    secret.chmod(0o600)
    (root / "private").chmod(0o700)
    return secret


def claimed_job(inbox: Path, rel: str, spec: JobSpec | None = None) -> Job:
    """A file claimed as the intake claims it, and its job as the intake records it (hash at claim time)."""
    claim = Custody(inbox, "ws1", "e1").claim(rel)
    assert claim is not None
    sha = hashlib.sha256(claim.path.read_bytes()).hexdigest()
    spec = spec or JobSpec()
    return Job(run_id=1, inbox=str(inbox), rel_path=rel, source=claim.path, spec=spec, input_sha256=sha,
               key=job_key(sha, spec), ticket=claim, root=claim.inbox)


def test_a_claimed_file_swapped_for_a_link_by_another_user_is_never_decoded(share: Path) -> None:
    config = make_config(share)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    secret = private_image(share, seed=90)
    [dropped] = write_samples(inbox, 1, size=(120, 90), seed=91)
    daemon = Daemon(config, once=True)
    submit: Callable[[Job], None] = daemon.intake.submit
    swapped: list[Path] = []

    def swap_then_submit(job: Job) -> None:  # after the claim (and its hash), before any worker reads it
        open_to_all(job.source.parent)  # a share: every user may write its folders
        proc = as_nobody(SWAP, str(job.source), str(secret))
        swapped.append(proc.stderr if proc.returncode else "swapped" if job.source.is_symlink() else "not swapped")
        submit(job)

    daemon.intake.submit = swap_then_submit
    assert daemon.run() == 1
    assert swapped == ["swapped"], swapped
    assert files_under(outbox) == [], "nothing was published"
    note = (inbox / "failed" / f"{dropped.name}.error.txt").read_text()
    assert "symbolic link" in note and "refused unread" in note
    assert str(share) not in note, "the note names the file as dropped, not a path on the server"
    [row] = Store(config.db_path).history()
    assert row["status"] == "failed" and "symbolic link" in row["error"] and "\n" not in row["error"]
    assert secret.read_bytes()[:3] == b"\xff\xd8\xff"


def test_a_folder_on_the_claimed_path_swapped_for_a_link_is_refused(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    write_samples(inbox / "shoot", 1, size=(96, 72), seed=92)[0].rename(inbox / "shoot" / "photo.jpg")
    job = claimed_job(inbox, "shoot/photo.jpg")
    private = tmp_path / "private"
    write_samples(private, 1, size=(96, 72), seed=93)[0].rename(private / "photo.jpg")
    claimed_folder = job.source.parent
    claimed_folder.rename(tmp_path / "moved-away")
    os.symlink(private, claimed_folder)  # claimed/ws1/shoot -> someone's private folder with a photo.jpg
    for read in (stages.input_size, lambda j: stages.prepare(j, Config())):
        with pytest.raises(InputError, match="the folder 'shoot' is a symbolic link") as caught:
            read(job)
        assert str(tmp_path) not in str(caught.value)


def test_another_file_linked_in_place_of_the_claimed_one_fails_the_hash_check(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    write_samples(inbox, 1, size=(96, 72), seed=94)[0].rename(inbox / "photo.jpg")
    job = claimed_job(inbox, "photo.jpg")
    other = write_samples(tmp_path / "elsewhere", 1, size=(96, 72), seed=95)[0]
    job.source.unlink()
    os.link(other, job.source)  # a hard link: no symlink to refuse, but not the bytes that were claimed
    with pytest.raises(InputError, match="changed after it was claimed"):
        stages.prepare(job, Config())
    same = dataclasses.replace(job, input_sha256=hashlib.sha256(other.read_bytes()).hexdigest())
    assert stages.prepare(same, Config()).image.width == 96, "matching bytes decode"


def test_a_writer_holding_the_file_open_cannot_change_what_is_decoded_after_the_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename does not take a descriptor away: someone who opened the photo before it was claimed can
    rewrite it after its bytes were checked. The pixels are decoded from the bytes checked, never from
    the file again."""
    from bgwatch.pipeline import imageio

    inbox = tmp_path / "inbox"
    write_samples(inbox, 1, size=(96, 72), seed=94)[0].rename(inbox / "photo.jpg")
    writer = os.open(inbox / "photo.jpg", os.O_WRONLY)  # opened before the claim
    other = write_samples(tmp_path / "elsewhere", 1, size=(96, 72), seed=95)[0].read_bytes()
    job = claimed_job(inbox, "photo.jpg")
    claimed = stages.prepare(job, Config()).image.rgb.copy()
    probe = imageio.probe_size
    rewrites: list[int] = []

    def rewritten_after_the_check(path: Path, *, fd: int | None = None) -> tuple[int, int]:
        rewrites.append(os.pwrite(writer, other, 0))  # between the hash check and the decode
        return probe(path, fd=fd)

    monkeypatch.setattr(imageio, "probe_size", rewritten_after_the_check)
    try:
        decoded = stages.prepare(job, Config()).image.rgb
    finally:
        os.close(writer)
    assert rewrites == [len(other)] and job.source.read_bytes()[:len(other)] == other, "the file did change"
    assert (decoded == claimed).all(), "the pixels are the claimed bytes', not the rewritten file's"


def test_a_backdrop_swapped_for_a_link_after_the_sidecar_was_checked_is_refused(share: Path) -> None:
    config = make_config(share, {"replace": {"rules": {"operation": "replace", "engine": "image"}}})
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    secret = private_image(share, seed=96)
    [backdrop] = write_samples(inbox / "_assets", 1, size=(120, 90), seed=97)
    backdrop.rename(inbox / "_assets" / "oak.jpg")
    [photo] = write_samples(inbox, 1, size=(120, 90), seed=98)
    photo.with_suffix(".yaml").write_text("background_image: _assets/oak.jpg\n")  # checked: inside the inbox
    daemon = Daemon(config, once=True)
    submit: Callable[[Job], None] = daemon.intake.submit

    swapped: list[str] = []

    def swap_then_submit(job: Job) -> None:
        open_to_all(inbox / "_assets")
        proc = as_nobody(SWAP, job.spec.background_image, str(secret))
        swapped.append(proc.stderr if proc.returncode else job.spec.background_image)
        submit(job)

    daemon.intake.submit = swap_then_submit
    assert daemon.run() == 1
    assert swapped == [str(inbox / "_assets" / "oak.jpg")]
    assert files_under(outbox) == []
    [note] = [p for p in (inbox / "failed").iterdir() if p.name.endswith(".error.txt")]
    text = note.read_text()
    assert "background_image" in text and "symbolic link" in text and str(share) not in text


def test_a_backdrop_folder_swapped_for_a_link_is_refused(tmp_path: Path) -> None:
    assets = tmp_path / "inbox" / "_assets"
    [backdrop] = write_samples(assets, 1, size=(80, 64), seed=99)
    assert load_backdrop(backdrop, 10**6).shape == (64, 80, 3)
    private = tmp_path / "private"
    private.mkdir()
    (private / backdrop.name).write_bytes(backdrop.read_bytes())
    assets.rename(tmp_path / "old-assets")
    os.symlink(private, assets)
    with pytest.raises(InputError, match="the folder '_assets' is a symbolic link"):
        load_backdrop(backdrop, 10**6)
    (tmp_path / "fifo.jpg").parent.mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "fifo.jpg")
    with pytest.raises(InputError, match="not a regular file"):
        load_backdrop(tmp_path / "fifo.jpg", 10**6)


def test_a_path_decode_never_follows_a_link(tmp_path: Path) -> None:
    from bgwatch.pipeline import imageio

    [image] = write_samples(tmp_path, 1, size=(80, 64), seed=100)
    os.symlink(image, tmp_path / "link.jpg")
    for read in (lambda p: imageio.decode(p, max_pixels=10**6), imageio.probe_size):
        with pytest.raises(InputError, match="symbolic link"):
            read(tmp_path / "link.jpg")


def test_a_sidecar_read_is_checked_on_the_open_file_not_its_name(tmp_path: Path) -> None:
    from bgwatch.errors import SpecError
    from bgwatch.yamlsafe import load_yaml_mapping

    inbox = tmp_path / "inbox"
    (inbox / "shoot").mkdir(parents=True)
    (inbox / "shared.yaml").write_text("mode: color\n")
    (tmp_path / "private.yaml").write_text("password: hunter2\n")
    os.symlink(inbox / "shared.yaml", inbox / "shoot" / "photo.yaml")  # a link inside the inbox: allowed
    assert load_yaml_mapping(inbox / "shoot" / "photo.yaml", inside=inbox) == {"mode": "color"}
    os.unlink(inbox / "shoot" / "photo.yaml")
    os.symlink(tmp_path / "private.yaml", inbox / "shoot" / "photo.yaml")  # swapped after the name was checked
    with pytest.raises(SpecError, match="outside the inbox") as caught:
        load_yaml_mapping(inbox / "shoot" / "photo.yaml", inside=inbox)
    assert "hunter2" not in str(caught.value) and "password" not in str(caught.value)
    (inbox / "shoot").rename(tmp_path / "moved")
    os.symlink(tmp_path, inbox / "shoot")  # or its folder swapped for a link out of the inbox
    with pytest.raises(SpecError, match="outside the inbox"):
        load_yaml_mapping(inbox / "shoot" / "private.yaml", inside=inbox)
