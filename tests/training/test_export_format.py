"""training/export_format.py: one definition of a servable version folder, and staging
folders that are reclaimed by lock, not by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_until
from training.export import export_version
from training.export_format import (
    LOCK_FILE,
    MAX_METADATA_DEPTH,
    METADATA_LIMIT_BYTES,
    STAGING_GRACE_SECONDS,
    Bounds,
    complete,
    list_versions,
    parse_version,
    read_metadata,
    read_regular,
    reclaim_staging,
    servable,
    signature_problem,
    valid_model_name,
)
from training.models import build_tiny
from training.summary import summarize_model


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A real export of the tiny net with the metadata the server reads."""
    model = build_tiny()
    model_dir = tmp_path_factory.mktemp("contract") / "mnist_tiny"
    return export_version(model, model_dir, {"name": "mnist_tiny",
                                             "summary": summarize_model(model)})


@pytest.fixture
def version(tiny_export, tmp_path):
    """A fresh copy of the export to break."""
    return shutil.copytree(tiny_export, tmp_path / "mnist_tiny" / "7")


@pytest.mark.parametrize(("name", "expected"), [
    ("1", 1), ("12", 12), ("0", 0), ("999999999999999999", 999999999999999999),
    ("²", None), ("٣", None), ("01", None), ("1.5", None), ("-1", None), ("", None),
    (" 1", None), ("1234567890123456789", None), ("latest", None),
])
def test_only_ascii_digits_name_a_version(name, expected):
    assert parse_version(name) == expected


@pytest.mark.parametrize(("name", "ok"), [
    ("mnist_cnn", True), ("a.b-c_1", True), ("123", False), (".hidden", False),
    ("with space", False), ("ümlaut", False), ("x" * 65, False), ("", False),
])
def test_model_names_are_url_and_label_safe(name, ok):
    assert valid_model_name(name) is ok


def test_list_versions_skips_names_that_are_not_versions(tmp_path):
    for name in ("1", "2", "10", "²", "01", ".tmp-x", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file, not a version")
    (tmp_path / "4").symlink_to("4")
    (tmp_path / "5").symlink_to("/usr")
    assert list_versions(tmp_path) == [1, 2, 10]


def read_in_thread(folder) -> str:
    """read_metadata's error, from a thread the test waits on with a generous bound: a
    read that blocks fails the test instead of hanging it."""
    outcome = []

    def read() -> None:
        try:
            read_metadata(folder)
        except ValueError as err:
            outcome.append(str(err))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "read_metadata blocked"
    return outcome[0]


def test_a_fifo_named_metadata_json_is_refused_without_blocking(version):
    (version / "metadata.json").unlink()
    os.mkfifo(version / "metadata.json")
    assert read_in_thread(version) == ("unreadable metadata.json: metadata.json is a FIFO, "
                                       "not a regular file")
    assert complete(version).reason == read_in_thread(version)


def test_a_huge_sparse_metadata_json_is_refused_unread(version):
    with open(version / "metadata.json", "r+b") as handle:
        handle.truncate(64 * METADATA_LIMIT_BYTES)
    assert read_in_thread(version) == (
        f"unreadable metadata.json: metadata.json has {64 * METADATA_LIMIT_BYTES} bytes, "
        f"more than the {METADATA_LIMIT_BYTES} allowed")


def test_metadata_json_may_not_lead_out_of_its_folder(version, tmp_path):
    (tmp_path / "elsewhere.json").write_bytes((version / "metadata.json").read_bytes())
    (version / "metadata.json").unlink()
    (version / "metadata.json").symlink_to(tmp_path / "elsewhere.json")
    assert read_in_thread(version) == ("unreadable metadata.json: metadata.json leads "
                                       "outside its folder")


@pytest.mark.parametrize("levels", [40, 246, 5000])
def test_metadata_nested_too_deep_is_refused_with_a_reason(version, levels):
    """Validating (or merely parsing) a deep enough document raised RecursionError,
    which no caller expects: --if-missing crashed and the store said "load failed"."""
    metadata = json.loads((version / "metadata.json").read_text())
    metadata["input"] = {"deep": "DEEP"}  # json.dumps itself cannot write 5,000 levels
    (version / "metadata.json").write_text(
        json.dumps(metadata).replace('"DEEP"', "[" * levels + "]" * levels))
    check = servable(version)
    assert not check
    assert check.reason == f"metadata.json is nested deeper than {MAX_METADATA_DEPTH} levels"


def test_metadata_nested_as_deep_as_the_limit_is_read(version):
    metadata = json.loads((version / "metadata.json").read_text())
    metadata["input"] = {"deep": "DEEP"}  # below the top level and "input"
    levels = MAX_METADATA_DEPTH - 2
    (version / "metadata.json").write_text(
        json.dumps(metadata).replace('"DEEP"', "[" * levels + "]" * levels))
    assert servable(version)


def test_a_fresh_export_is_complete_and_lists_its_files(tiny_export):
    assert complete(tiny_export)
    files = json.loads((tiny_export / "metadata.json").read_text())["files"]
    assert {"saved_model.pb", "variables/variables.index", "model.keras"} <= set(files)
    assert LOCK_FILE not in files and "metadata.json" not in files
    for name, entry in files.items():
        assert (tiny_export / name).stat().st_size == entry["bytes"]


def truncate_variables(folder):
    (data,) = (folder / "variables").glob("variables.data-*")
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size // 2)


def flip_a_byte(folder):
    (data,) = (folder / "variables").glob("variables.data-*")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def edit_metadata(change):
    def mutilate(folder):
        metadata = json.loads((folder / "metadata.json").read_text())
        change(metadata)
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return mutilate


@pytest.mark.parametrize(("mutilate", "reason"), [
    (lambda f: (f / "saved_model.pb").unlink(), "no saved_model.pb"),
    (lambda f: (f / "variables" / "variables.index").unlink(), "no variables/variables.index"),
    (lambda f: (f / "metadata.json").unlink(), "no metadata.json"),
    (lambda f: (f / "metadata.json").write_text("{ half written"), "unreadable metadata.json"),
    (lambda f: (f / "metadata.json").write_bytes(b"\xff\xfe"), "unreadable metadata.json"),
    (edit_metadata(lambda m: m["summary"].pop("totals")), "invalid at summary: 'totals'"),
    (edit_metadata(lambda m: m["summary"]["totals"].update(params="many")),
     "invalid at summary/totals/params"),
    (edit_metadata(lambda m: m.update(summary=[])), "invalid at summary"),
    (truncate_variables, "(truncated?)"),
    (flip_a_byte, "does not match its SHA-256"),
    (lambda f: (f / "model.keras").unlink(), "model.keras is missing"),
    (edit_metadata(lambda m: m["files"].update({"../escape": {"bytes": 0, "sha256": "0" * 64}})),
     "../escape is missing"),
    (edit_metadata(lambda m: m["files"].update({"/etc/hostname": {"bytes": 0,
                                                                  "sha256": "0" * 64}})),
     "/etc/hostname is missing"),
    (edit_metadata(lambda m: m["summary"]["totals"].update(activations_per_image=10**20)),
     "invalid at summary/totals/activations_per_image"),
    (edit_metadata(lambda m: m.pop("files")), 'metadata.json has no manifest ("files")'),
    (lambda f: (f / "variables" / "extra.bin").write_bytes(b"x"),
     "variables/extra.bin is not in the manifest"),
    (lambda f: (f / "saved_model.link").symlink_to("/etc/passwd"),
     "saved_model.link is a symlink, not a regular file"),
])
def test_an_incomplete_version_says_why(version, mutilate, reason):
    mutilate(version)
    check = complete(version)
    assert not check
    assert reason in check.reason


def list_file(folder, name: str, size: int, sha256: str = "0" * 64) -> None:
    """Add ``name`` to the manifest in metadata.json as ``size`` bytes."""
    edit_metadata(lambda m: m["files"].update({name: {"bytes": size,
                                                      "sha256": sha256}}))(folder)


def test_a_sparse_file_in_the_manifest_is_refused_from_its_stat(version):
    """Hashing it would read every hole: a 60 GB one froze the watch for minutes."""
    with open(version / "big.bin", "wb") as handle:
        handle.truncate(64 << 20)
    list_file(version, "big.bin", 64 << 20)
    check = complete(version)
    assert not check and not check.retry
    assert check.reason.startswith("big.bin is sparse (")
    assert check.reason.endswith(" of its 67108864 bytes are on disk): no export writes one")


def test_a_manifest_over_the_size_limit_is_refused_before_any_file_is_read(version):
    list_file(version, "huge.bin", 10**12)  # not even there: never looked at
    check = complete(version, Bounds(max_bytes=1 << 30))
    assert not check and not check.retry
    assert check.reason.startswith("its files total 1000000")
    assert check.reason.endswith(" bytes, more than the 1073741824 allowed (MODEL_MAX_BYTES)")


def test_hashing_past_the_time_bound_is_refused_for_now(version):
    check = servable(version, bounds=Bounds(seconds=0))
    assert not check and check.retry
    assert check.reason.endswith(" could not be checked within 0 s (a slow filesystem?); "
                                 "tried again at a later poll")
    assert servable(version)  # the same folder, given the time


def test_an_export_without_a_summary_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unservable export: metadata\.json is invalid"):
        export_version(build_tiny(), tmp_path / "m", {"name": "m"})
    assert list((tmp_path / "m").iterdir()) == []


def test_an_export_the_server_would_refuse_is_not_published(tmp_path):
    """The exporter asks the server's own question (servable), not only "are the files
    whole": a network for 32×32 colour images never becomes a version."""
    import keras

    colour = keras.Sequential([keras.Input((32, 32, 3), name="image"), keras.layers.Flatten(),
                               keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(ValueError, match=r"unservable export: serving_default input is "
                                         r"DT_FLOAT \[-1, 32, 32, 3\], expected"):
        export_version(colour, tmp_path / "m", {"summary": summarize_model(colour)})
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: m.pop("signature_defs"), "has no signature_defs, which model.tflite needs"),
    (lambda m: m["signature_defs"].update(serving_default={}), "must have one input"),
    (lambda m: m["signature_defs"]["serving_default"]["outputs"].clear(),
     "must have one input"),
])
def test_a_signature_the_server_cannot_serve_makes_a_version_unservable(version, change,
                                                                       reason):
    edit_metadata(change)(version)
    assert complete(version)  # the files alone are whole
    check = servable(version)
    assert not check and reason in check.reason


@pytest.fixture(scope="module")
def real_reference(mnist):
    """A drift reference as training records it, on 200 real digits."""
    from training.data import to_model_input
    from training.reference import drift_reference

    return drift_reference(to_model_input(mnist.x_test[:200]), mnist.y_test[:200])


def with_reference(reference, change):
    """Give the version a copy of ``reference``, then ``change`` it."""
    def edit(metadata):
        metadata["drift_reference"] = json.loads(json.dumps(reference))
        change(metadata["drift_reference"])
    return edit_metadata(edit)


def statistic(name):
    return lambda reference: reference["statistics"][name]


@pytest.mark.parametrize(("change", "reason"), [
    (lambda r: r.update(images=201), "drift_reference digit counts 200 images, not the 201"),
    (lambda r: statistic("bbox_size")(r)["counts"].append(0),
     "drift_reference bbox_size needs rising edges, one more than its 11 counts"),
    (lambda r: statistic("ink_fraction")(r)["edges"].reverse(),
     "drift_reference ink_fraction needs rising edges"),
    (lambda r: statistic("digit")(r)["counts"].append(0),
     "invalid at drift_reference/statistics/digit/counts"),
    (lambda r: statistic("mean_intensity")(r)["edges"].append(1.5),
     "invalid at drift_reference/statistics/mean_intensity/edges/11"),
    (lambda r: statistic("ink_fraction")(r)["counts"].__setitem__(0, "50"),
     "invalid at drift_reference/statistics/ink_fraction/counts/0"),
    (lambda r: r["statistics"].pop("bbox_size"), "invalid at drift_reference/statistics"),
    (lambda r: statistic("ink_fraction")(r)["edges"].__setitem__(5, float("nan")),
     "drift_reference ink_fraction needs rising edges"),
], ids=["images", "a count too many", "falling edges", "eleven digits", "edge past 1",
        "a count as text", "a statistic missing", "a NaN edge"])
def test_a_drift_reference_the_server_could_not_compare_with_is_refused(
        version, real_reference, change, reason):
    """The server bins live inputs by these edges and divides by these counts."""
    with_reference(real_reference, lambda r: None)(version)
    assert servable(version)
    with_reference(real_reference, change)(version)
    check = servable(version)
    assert not check and reason in check.reason


def first_input_dim(value):
    def change(metadata):
        image = metadata["signature_defs"]["serving_default"]["inputs"]["image"]
        image["tensor_shape"]["dim"][0] = value
    return edit_metadata(change)


def first_input_shape(**fields):
    def change(metadata):
        image = metadata["signature_defs"]["serving_default"]["inputs"]["image"]
        image["tensor_shape"].update(fields)
    return edit_metadata(change)


@pytest.mark.parametrize("mutilate", [
    first_input_dim({"name": ""}), first_input_dim({"size": 10.9, "name": ""}),
    first_input_dim({"size": -1, "name": ""}), first_input_dim({"size": "-2", "name": ""}),
    first_input_dim({"size": "01", "name": ""}), first_input_dim({"size": " 1", "name": ""}),
    first_input_dim({"size": "-1", "name": 5}), first_input_dim("-1"),
    first_input_shape(unknown_rank=True), first_input_shape(dim="-1"),
], ids=["no size", "fractional size", "size as a number", "negative size",
        "leading zero", "space", "name as a number", "dim as a string", "unknown rank",
        "dims as a string"])
def test_a_signature_not_as_protobuf_writes_it_makes_a_version_unservable(version, mutilate):
    """The metadata endpoints describe the tensors from these fields as they are: a
    version whose signature they could not describe exactly is never served."""
    mutilate(version)
    check = servable(version)
    assert not check
    assert "metadata.json is invalid at signature_defs/serving_default/inputs/image" in \
        check.reason


@pytest.mark.parametrize("dim", [{"name": ""}, {"size": 10.9}, {"size": -1}, {"size": "٣"}])
def test_a_signature_read_from_the_graph_is_held_to_the_same_form(tiny_export, dim):
    """signature_problem is what a SavedModel's own signature meets too (read_graph)."""
    signature_defs = read_metadata(tiny_export)["signature_defs"]
    assert signature_problem(signature_defs) is None
    signature_defs["serving_default"]["outputs"]["output_0"]["tensor_shape"]["dim"][0] = dim
    assert signature_problem(signature_defs) == (
        "serving_default output has a tensor_shape not in protobuf's JSON form "
        '(each dim {"size": "<int64>"}, a known rank)')


WRITER = """
import os, sys, time
from pathlib import Path
from training.export_format import staging
with staging(Path(sys.argv[1])) as folder:
    (folder / "saved_model.pb").write_bytes(b"half an export")
    print(os.getpid(), folder, flush=True)
    time.sleep(600)
"""


def start_writer(model_dir, *prefix):
    """An export that has begun writing and stalls, as a process of its own."""
    writer = subprocess.Popen([*prefix, sys.executable, "-c", WRITER, str(model_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = writer.stdout.readline().split()
    assert line, "the writer did not start"
    writer.pid_inside = int(line[0])
    return writer, model_dir / os.path.basename(line[1])


def kill(writer):
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()


def test_a_live_writers_staging_folder_is_kept(tmp_path):
    writer, folder = start_writer(tmp_path)
    try:
        assert reclaim_staging(tmp_path) == []
        assert (folder / "saved_model.pb").is_file()
    finally:
        kill(writer)


def test_a_killed_writers_staging_folder_is_reclaimed(tmp_path):
    writer, folder = start_writer(tmp_path)
    kill(writer)
    assert folder.is_dir()
    assert reclaim_staging(tmp_path) == [folder]
    assert not folder.exists()


REUSED_PID = """
import os, sys
from pathlib import Path
from training.export_format import staging
writing = staging(Path(sys.argv[1]))  # kept referenced: a collected one cleans up
folder = writing.__enter__()
print(os.getpid(), folder, flush=True)
os.execv("/bin/sleep", ["sleep", "600"])  # the writer is gone; its PID lives on
"""


def runs_sleep_without(pid: str, folder: str) -> bool:
    """The exec done: the kernel names the new program (/proc/PID/exe) a moment before it
    closes the old program's close-on-exec descriptors, the lock among them."""
    if Path(f"/proc/{pid}/exe").resolve().name != "sleep":
        return False
    try:
        held = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:  # a descriptor closing as it is read
        return False
    return not any(target.startswith(folder) for target in held)


def test_a_dead_writer_whose_pid_is_alive_again_is_reclaimed(tmp_path):
    """The stale owner that a PID check cannot see through, made without a namespace: the
    writer's process becomes another program (exec) under the same, live PID, as PID 1
    of a container or a recycled PID does; its lock went with the writer."""
    writer = subprocess.Popen([sys.executable, "-c", REUSED_PID, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        pid, folder = writer.stdout.readline().split()
        wait_until(lambda: runs_sleep_without(pid, folder),
                   "the writer's PID to run sleep, its lock closed")
        assert int(pid) == writer.pid and writer.poll() is None  # the PID is alive
        assert reclaim_staging(tmp_path) == [Path(folder)]
        assert not Path(folder).exists()
    finally:
        kill(writer)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_killed_writer_that_was_pid_1_is_reclaimed_too(tmp_path):
    """As in a container, where training.fit runs as PID 1: PID 1 is always alive to a
    PID check in another namespace, so only the lock can tell."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.decode()[:200]}")
    writer, folder = start_writer(tmp_path, "unshare", "--pid", "--fork", "--mount-proc",
                                  "--kill-child")
    assert writer.pid_inside == 1
    kill(writer)  # unshare --kill-child takes the writer with it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not reclaim_staging(tmp_path):
        time.sleep(0.1)
    assert not folder.exists()


def test_a_lockless_staging_folder_is_kept_while_young_and_reclaimed_when_old(tmp_path):
    young, old = tmp_path / ".tmp-1-young", tmp_path / ".tmp-1-old"  # an older release's
    young.mkdir()
    old.mkdir()
    stale = time.time() - STAGING_GRACE_SECONDS - 60
    os.utime(old, (stale, stale))
    assert reclaim_staging(tmp_path) == [old]
    assert young.is_dir()


def test_export_reclaims_abandoned_staging_before_writing(tmp_path):
    writer, _ = start_writer(tmp_path / "mnist_tiny")
    kill(writer)
    model = build_tiny()
    export_version(model, tmp_path / "mnist_tiny", {"summary": summarize_model(model)})
    assert sorted(p.name for p in (tmp_path / "mnist_tiny").iterdir()) == ["1"]


def test_an_unlisted_fifo_among_the_variables_is_refused_without_blocking(version):
    """The loader would open it and wait for a writer for good (a worker timed out in
    boot); the check refuses it from its ``lstat``."""
    data = next((version / "variables").glob("variables.data-*"))
    data.unlink()
    os.mkfifo(data)
    check = complete(version)
    assert check.reason == f"variables/{data.name} is a FIFO, not a regular file"


def test_a_name_swapped_for_a_link_out_while_it_is_opened_never_reads_outside(tmp_path):
    """A rename race (a link to /etc/passwd swapped in between the check of the name and
    the open): what is opened is checked on its descriptor, so nothing outside is read."""
    folder = tmp_path / "plots"
    folder.mkdir()
    png, link, name = folder / "real.png", folder / "link.png", folder / "history.png"
    png.write_bytes(b"\x89PNG real plot")
    link.symlink_to("/etc/passwd")
    stop, swaps = threading.Event(), []

    def swap() -> None:
        while not stop.is_set():
            for source in (png, link):
                os.link(source, folder / "next", follow_symlinks=False)
                os.rename(folder / "next", name)
                swaps.append(1)

    swapper = threading.Thread(target=swap)
    swapper.start()
    read, refused = [], 0
    try:
        for _ in range(3000):
            try:
                read.append(read_regular(name, 1 << 20, inside=folder))
            except OSError:
                refused += 1
    finally:
        stop.set()
        swapper.join()
    assert len(swaps) > 100 and refused > 0 and read  # the race really ran both ways
    assert set(read) == {b"\x89PNG real plot"}
