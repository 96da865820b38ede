"""app/repository.py: the folder scanner lists every entry of a hostile MODELS_DIR with
its reason, alone, follows links only inside MODELS_DIR, bounds the work per entry and
per scan, and never waits on the filesystem without a bound."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from app.repository import BoundedCalls, NoAnswer, Scanner
from training.export_format import MAX_VERSION_DEPTH, MAX_VERSION_ENTRIES

WAIT_S = 60.0  # far above what any call here needs: reaching it means a hang


def version(models: Path, model: str, name: str) -> Path:
    """A version folder with a few files, as an export has (scanning reads no model)."""
    folder = models / model / name
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"pb")
    (folder / "variables" / "variables.index").write_bytes(b"ix")
    return folder


@pytest.fixture
def models(tmp_path) -> Path:
    root = tmp_path / "models"
    version(root, "mnist_cnn", "1")
    return root


def test_a_symlink_loop_in_place_of_a_version_is_refused_alone(models):
    (models / "mnist_cnn" / "8").symlink_to("8")
    snapshot = Scanner(models).scan()
    folder = snapshot.models["mnist_cnn"]
    assert list(folder.versions) == [1] and folder.versions[1].fingerprint
    assert folder.odd == {"8": "a symlink loop"}


def test_a_symlink_loop_at_the_top_level_is_listed_and_the_models_scanned(models):
    (models / "loop").symlink_to("loop")
    (models / "up").symlink_to(".")
    snapshot = Scanner(models).scan()
    assert snapshot.error is None and list(snapshot.models) == ["mnist_cnn"]
    assert snapshot.odd == {"loop": "a symlink loop",
                            "up": "a symlink to a folder that holds it (a loop)"}


def test_links_out_of_models_dir_are_refused_unread(models, tmp_path):
    outside = tmp_path / "outside"
    for index in range(MAX_VERSION_ENTRIES + 5):  # more than a version may hold
        (outside / str(index)).mkdir(parents=True)
    (models / "mnist_cnn" / "3").symlink_to("/usr")
    (models / "mnist_cnn" / "4").symlink_to(outside)
    (models / "mnist_cnn" / "5").symlink_to("..")
    (models / "elsewhere").symlink_to(outside)
    snapshot = Scanner(models).scan()
    assert snapshot.models["mnist_cnn"].odd == {
        "3": "a symlink that leads outside MODELS_DIR",
        "4": "a symlink that leads outside MODELS_DIR",
        "5": "a symlink to a folder that holds it (a loop)"}
    assert snapshot.odd == {"elsewhere": "a symlink that leads outside MODELS_DIR"}


def test_links_inside_models_dir_are_followed(models):
    """An atomic switch (``ln -sfn``) to a folder elsewhere in the repository works."""
    version(models, "releases", "7")
    (models / "mnist_cnn" / "2").symlink_to(models / "releases" / "7")
    (models / "digits").symlink_to("mnist_cnn")
    snapshot = Scanner(models).scan()
    assert list(snapshot.models["mnist_cnn"].versions) == [1, 2]
    assert snapshot.models["mnist_cnn"].versions[2].fingerprint
    assert list(snapshot.models["digits"].versions) == [1, 2]


def test_a_config_base_path_relinked_out_of_models_dir_is_refused_at_each_scan(
        models, tmp_path):
    """MODEL_CONFIG_FILE's base_path is checked when the file is read; a link inside
    MODELS_DIR switched afterwards (the file unchanged) must not lead the scan out."""
    version(tmp_path / "outside", "m", "7")
    (models / "current").symlink_to(models / "mnist_cnn")
    scanner = Scanner(models)
    assert list(scanner.scan_folders({"digits": models / "current"}).models["digits"]
                .versions) == [1]
    (models / "next").symlink_to(tmp_path / "outside" / "m")
    os.replace(models / "next", models / "current")  # ln -sfn, as a rollout would
    folder = scanner.scan_folders({"digits": models / "current"}).models["digits"]
    assert folder.versions == {}
    assert folder.odd == {"": "base_path leads outside MODELS_DIR"}


def test_every_entry_that_is_no_version_is_listed_with_its_reason(models):
    model = models / "mnist_cnn"
    (model / "2").write_text("a file where a version belongs")
    (model / "3").symlink_to("nowhere")
    os.mkfifo(model / "4")
    (model / "latest").mkdir()
    (model / ".tmp-abc").mkdir()  # a staging folder: no part of the repository
    (models / "README.md").write_text("notes")
    (models / "not a name").mkdir()
    snapshot = Scanner(models).scan()
    assert snapshot.models["mnist_cnn"].odd == {
        "2": "a file, not a folder", "3": "a dangling symlink", "4": "a FIFO, not a folder",
        "latest": "not a version number (ASCII digits only)"}
    assert snapshot.odd == {
        "README.md": "a file, not a folder",
        "not a name": "not a model name (letters, digits, '_', '-', '.'; not only digits)"}


def test_a_device_in_place_of_a_version_is_listed(models):
    try:
        os.mknod(models / "mnist_cnn" / "2", 0o600 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod of a character device is refused here (no CAP_MKNOD)")
    snapshot = Scanner(models).scan()
    assert snapshot.models["mnist_cnn"].odd == {"2": "a character device, not a folder"}


def test_a_version_with_too_many_files_is_refused_and_not_walked_again(models):
    big = version(models, "mnist_cnn", "2")
    for index in range(MAX_VERSION_ENTRIES):
        (big / "variables" / f"shard-{index}").write_bytes(b"")
    scanner = Scanner(models)
    refused = scanner.scan().models["mnist_cnn"].versions[2]
    assert refused.error == f"unreadable: more than {MAX_VERSION_ENTRIES} entries (not an export?)"
    assert scanner.scan().models["mnist_cnn"].versions[1].fingerprint
    # Files removed below the version folder leave its own stat as it was: not re-walked.
    for index in range(MAX_VERSION_ENTRIES):
        (big / "variables" / f"shard-{index}").unlink()
    assert scanner.scan().models["mnist_cnn"].versions[2].error == refused.error
    (big / "README").write_text("the folder itself changed: read it again")
    assert scanner.scan().models["mnist_cnn"].versions[2].error is None


def test_a_version_too_deep_is_refused(models):
    deep = version(models, "mnist_cnn", "2")
    deep.joinpath(*["d"] * (MAX_VERSION_DEPTH + 1)).mkdir(parents=True)
    versions = Scanner(models).scan().models["mnist_cnn"].versions
    assert versions[2].error == (f"unreadable: more than {MAX_VERSION_DEPTH} folder levels "
                                 "(not an export?)")
    assert versions[1].error is None


def test_a_stuck_call_is_given_up_on_and_not_started_again(tmp_path):
    """A FIFO nobody writes to blocks ``open`` in the kernel, as a hung NFS server does."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    calls = BoundedCalls(timeout=0.2)
    started = []

    def read_fifo() -> bytes:
        started.append(1)
        with open(fifo, "rb") as handle:
            return handle.read()

    for _ in range(3):
        with pytest.raises(NoAnswer, match=r"no answer within 0\.2 s"):
            calls.run("fifo", read_fifo)
    assert len(started) == 1 and calls.stuck == 1
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"late"))
    writer.start()
    calls.timeout = WAIT_S
    assert calls.run("fifo", read_fifo) == b"late"
    writer.join()
    assert calls.stuck == 0 and len(started) == 1


def test_a_scan_that_cannot_read_a_version_in_time_rejects_it_and_retries(models):
    """The walk of version 2 is held (its folder is locked out by a stuck call of the
    same key); version 1 is scanned, and 2 is read at the next scan once it returns."""
    version(models, "mnist_cnn", "2")
    scanner = Scanner(models, timeout=0.2)
    gate = threading.Event()
    path = models / "mnist_cnn" / "2"
    with pytest.raises(NoAnswer):
        scanner.calls.run(("walk", path), lambda: gate.wait(WAIT_S) and ())
    versions = scanner.scan().models["mnist_cnn"].versions
    assert versions[1].error is None
    assert versions[2].error.startswith("unreadable: no answer within 0.2 s")
    gate.set()
    scanner.calls.timeout = WAIT_S
    scanner.scan()  # collects the stuck call's (stale) answer
    assert scanner.scan().models["mnist_cnn"].versions[2].fingerprint
