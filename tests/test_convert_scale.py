"""convert_dataset.py at scale: --workers N writes the bytes one process writes, an interrupted
conversion resumes keeping only what still verifies, and the guarantees stay (issue 36)."""
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dataloaders import conversion, convert_dataset, slice_index
from own_data import error_of, make_nnunet, phantom, write_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "code", "dataloaders", "convert_dataset.py")


def convert(raw, out, *flags):
    return convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "32", "--val_cases",
                                 "case_04", *flags])


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale") / "Dataset002_Phantom"
    make_nnunet(folder, n_labeled=6, n_unlabeled=4)
    return folder


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    convert(raw, out)
    return tree(out)


def test_two_workers_write_the_bytes_of_one(raw, reference, tmp_path):
    convert(raw, tmp_path / "out", "--workers", "2")
    assert tree(tmp_path / "out") == reference
    assert not (tmp_path / ".out.partial").exists()


def test_the_index_is_the_one_the_slices_give(raw, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    ids = (out / "train_slices.list").read_text().split()
    unlabeled = [s for s in ids if s.startswith("nolabel_")]
    written = slice_index.read_index(out / "slice_index.npz", slice_index.list_digest(out), len(ids))
    built = slice_index.build_index(out, ids, unlabeled)
    assert written.labeled.tolist() == built.labeled.tolist() == [not s.startswith("nolabel_") for s in ids]
    assert np.array_equal(written.counts, built.counts) and written.counts[:, 1:].sum() > 0


def interrupted(raw, out, monkeypatch, after):
    """Convert in this process and stop it (KeyboardInterrupt, as Ctrl-C) after ``after`` cases."""
    real, done = conversion.convert_case, []

    def stop_after(job):
        if len(done) == after:
            raise KeyboardInterrupt
        done.append(job["case"])
        return real(job)

    monkeypatch.setattr(conversion, "convert_case", stop_after)
    with pytest.raises(KeyboardInterrupt):
        convert(raw, out)
    monkeypatch.undo()
    return done


def test_an_interrupted_conversion_resumes_keeping_the_verified_cases(raw, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    done = interrupted(raw, out, monkeypatch, after=4)
    partial = tmp_path / ".out.partial"
    assert not out.exists() and sorted(p.stem for p in (partial / ".cases").glob("*.json")) == sorted(done)
    first = json.loads((partial / ".cases" / f"{done[0]}.json").read_text())
    damaged = partial / sorted(first["files"])[-1]
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")  # its CRC no longer matches: converted again
    (partial / "data" / "slices" / "left_over_slice_0.h5.tmp").write_bytes(b"a write cut short")
    with caplog.at_level(logging.INFO, logger="convert_dataset"):
        convert(raw, out)
    assert tree(out) == reference
    assert not partial.exists()
    total = 6 + 4  # cases
    assert (f"resumed an interrupted conversion: kept 3 of {total} cases already written and verified, converted "
            f"{total - 3}") in caplog.text


def test_a_changed_source_is_converted_again(raw, tmp_path, monkeypatch):
    work = tmp_path / "raw"
    shutil.copytree(raw, work)
    out = tmp_path / "out"
    done = interrupted(work, out, monkeypatch, after=3)
    changed = next(c for c in done if c.startswith("case_") and c != "case_04")
    image, label = phantom((6, 36, 40), seed=77)
    write_image(image, work / "imagesTr" / f"{changed}_0000.nii.gz", (0.8, 0.8, 3.0))
    write_image(label, work / "labelsTr" / f"{changed}.nii.gz", (0.8, 0.8, 3.0))
    convert(work, out)
    fresh = tmp_path / "fresh"
    convert(work, fresh)
    assert tree(out) == tree(fresh)


def test_a_killed_parallel_conversion_resumes(raw, reference, tmp_path):
    """SIGKILL while two workers write (no clean-up runs at all), then the same command."""
    out = tmp_path / "out"
    command = [sys.executable, SCRIPT, "--input", str(raw), "--out", str(out), "--image_size", "32", "--val_cases",
               "case_04", "--workers", "2"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = tmp_path / ".out.partial" / ".cases"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*.json"))) < 2 and child.poll() is None:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the workers too
    child.wait()
    assert not out.exists(), "the conversion finished before it could be killed: make the data set larger"
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resumed an interrupted conversion: kept" in result.stderr
    assert tree(out) == reference


def test_other_settings_are_refused_and_overwrite_discards(raw, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted(raw, out, monkeypatch, after=2)
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(out), "--image_size", "64",
                                              "--val_cases", "case_04"])
    assert message == (f"error: --out {out}: an interrupted conversion with other settings (preprocessing.size: 32 "
                       f"there, 64 now) is in {tmp_path / '.out.partial'}; rerun with its settings to finish it, or "
                       f"pass --overwrite to discard it")
    convert_dataset.main(["--input", str(raw), "--out", str(out), "--image_size", "64", "--val_cases", "case_04",
                          "--overwrite"])
    assert json.loads((out / "dataset.json").read_text())["image_size"] == 64


def test_a_conversion_in_progress_is_not_disturbed(raw, tmp_path):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "marker").write_text("another conversion's file")
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running conversion holds
    try:
        message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "out"),
                                                  "--image_size", "32", "--val_cases", "case_04"])
    finally:
        os.close(fd)
    assert message == (f"error: --out {tmp_path / 'out'}: another conversion is writing it ({partial}); wait for it "
                       f"to end")
    assert (partial / "marker").read_text() == "another conversion's file"


def test_damaged_voxels_stop_the_conversion_and_a_rerun_after_the_fix_resumes(raw, tmp_path, caplog):
    """A compressed .mha whose header is sound and whose zlib stream is damaged: found while its case is
    written (the last one), after the other cases; once the file is replaced the rerun keeps them."""
    extra = tmp_path / "extra"
    extra.mkdir()
    victim = extra / "zz_extra.mha"
    write_image(phantom((6, 36, 40), seed=60)[0], victim, (0.8, 0.8, 3.0))  # written compressed
    good = victim.read_bytes()
    assert b"CompressedData = True" in good
    damaged = bytearray(good)
    damaged[-40] ^= 0xFF  # in the zlib stream: the header and its CompressedDataSize still agree
    victim.write_bytes(bytes(damaged))
    flags = ["--unlabeled", str(extra)]
    message = error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "out"), "--image_size",
                                              "32", "--val_cases", "case_04", *flags])
    assert message.startswith(f"error: {victim}: ")
    assert not (tmp_path / "out").exists()
    victim.write_bytes(good)
    with caplog.at_level(logging.INFO, logger="convert_dataset"):
        convert(raw, tmp_path / "out", *flags)
    assert "kept 10 of 11 cases already written and verified, converted 1" in caplog.text
    convert(raw, tmp_path / "fresh", *flags)
    assert tree(tmp_path / "out") == tree(tmp_path / "fresh")


def test_workers_flag_is_checked(raw, tmp_path):
    assert error_of(convert_dataset.main, ["--input", str(raw), "--out", str(tmp_path / "o"), "--workers",
                                           "0"]) == "error: --workers 0: expected 1 or more processes"
