"""bench/bench_train.py and bench/profile_step.py at a tiny size: the benchmark names the machine,
resolves the fast path's precision like the trainers, and reports progress block by block; the
profile prints the step's operator table."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_train  # noqa: E402
import profile_step  # noqa: E402
from training import speed  # noqa: E402

TINY = ["--device", "cpu", "--image_size", "32", "--batch_size", "4", "--labelnum", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from dataloaders.synthetic import make_synthetic_acdc
    return make_synthetic_acdc(tmp_path_factory.mktemp("bench_data"), n_patients=8, n_val=2, n_test=1,
                               slices_per_volume=6, size=(40, 48))


def test_bench_records_the_cpu_and_reports_progress(tiny_root, capsys):
    out = bench_train.main([*TINY, "--root_path", str(tiny_root), "--path", "both", "--iterations", "1",
                            "--repeats", "2", "--warmup", "1"])
    assert {k: out[k] for k in speed.cpu_description()} == speed.cpu_description()
    assert out["device_name"] == speed.cpu_model() and out["torch"] and out["platform"]
    assert out["fast"]["settings"]["amp"] == speed.auto_amp("cpu")  # --amp auto, as the trainers resolve it
    assert out["plain"]["settings"]["amp"] == "off"
    err = capsys.readouterr().err
    assert "native bf16" in err and f"fast path --amp auto -> {speed.auto_amp('cpu')}" in err
    for path in ("fast", "plain"):
        for key in ("pretrain", "pretrain_sda", "self_train", "validation"):
            assert len(out[path]["block_s"][key]) == 2
            assert f"{path} {key} block 2: 1 it in " in err, (path, key)
        assert f"{path} self_train warm-up: 1 it in" in err and f"{path} FLOP count" in err


def test_bench_fast_path_precision_follows_the_cpu(tiny_root, monkeypatch):
    monkeypatch.setattr(speed, "cpu_bf16_flags", lambda: [])  # a CPU without native bf16
    out = bench_train.main([*TINY, "--root_path", str(tiny_root), "--path", "fast", "--iterations", "1",
                            "--repeats", "1", "--warmup", "1"])
    assert out["fast"]["settings"]["amp"] == "off" and out["cpu_bf16"] == []


@pytest.mark.parametrize("step", ["self_train", "pretrain_sda"])
def test_profile_prints_the_top_operators(tiny_root, capsys, step):
    profile_step.main([*TINY, "--root_path", str(tiny_root), "--step", step, "--warmup", "1", "--top", "5"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if " s/step under the profiler" in line)
    assert header.startswith(f"{step}: ") and "'amp': 'off'" in header and "cpu_capability" in header
    assert "aten::convolution_backward" in out and "Self CPU time total" in out


def test_each_path_runs_under_its_own_backend_flags(tiny_root):
    """cuDNN's flags are process-wide and the plain path is built after the fast one: every timed
    block must still run under its own path's settings (fast: autotuned, non-deterministic; plain:
    deterministic, and IEEE fp32 convolutions for its --amp off), and the JSON must say so."""
    out = bench_train.main([*TINY, "--root_path", str(tiny_root), "--path", "both", "--iterations", "1",
                            "--repeats", "2", "--warmup", "1", "--amp", "bf16"])
    fast, plain = out["fast"], out["plain"]
    assert fast["settings"]["deterministic"] == 0 and plain["settings"]["deterministic"] == 1
    assert fast["backend_flags"] == [{"cudnn_benchmark": True, "cudnn_deterministic": False,
                                      "deterministic_algorithms": False, "conv_tf32": True}]
    assert plain["backend_flags"] == [{"cudnn_benchmark": False, "cudnn_deterministic": True,
                                       "deterministic_algorithms": False, "conv_tf32": False}]


def test_bench_pool_links_a_pool_of_any_size_that_trains_from_disk(tmp_path):
    """``bench_pool.py --startup`` times start-up on pools linked from one converted pool: the linked
    folder must hold the labeled slices and exactly the asked number of unlabeled ones, each a link to
    a slice of the source pool, with lists and an index the disk path reads as they are."""
    import bench_pool
    from dataloaders import convert_dataset
    from dataloaders.converted import ConvertedTrainData
    from dataloaders.slice_index import load_index
    from own_data import make_nnunet
    names = make_nnunet(tmp_path / "raw", n_labeled=5, n_unlabeled=2)
    source = tmp_path / "pool"
    convert_dataset.main(["--input", str(tmp_path / "raw"), "--out", str(source), "--image_size", "32",
                          "--val_cases", "case_04"])
    ids = (source / "train_slices.list").read_text().split()
    pool = [s for s in ids if s.startswith("nolabel_")]
    labeled = [s for s in ids if not s.startswith("nolabel_")]
    out = bench_pool.linked_pool(source, 450, tmp_path / "linked")
    linked = (out / "train_slices.list").read_text().split()
    assert linked[:len(labeled)] == labeled and len(linked) == len(labeled) + 450
    assert (out / "unlabeled.list").read_text().split() == ["v000000", "v000001", "v000002"]  # 200 slices each
    for k, sid in enumerate(linked[len(labeled):]):
        assert sid == f"v{k // 200:06d}_slice_{k % 200}"
        assert (out / "data" / "slices" / f"{sid}.h5").resolve() == \
            (source / "data" / "slices" / f"{pool[k % len(pool)]}.h5").resolve()
    index = load_index(out, linked)
    assert index.labeled.tolist() == [True] * len(labeled) + [False] * 450
    data = ConvertedTrainData(out, labelnum=len(names["labeled"]) - 1, image_size=32, num_classes=3,
                              data_cache="disk")
    assert len(data.unlabeled) == 450 and len(data.labeled) == len(labeled)
