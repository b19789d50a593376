"""bench/bench_predict.py runs end to end on small inputs and reports what it promises (no timing asserted)."""
from conftest import load_script


def test_bench_predict_reports_each_measurement(acdc_root, tmp_path, capsys):
    bench = load_script("bench/bench_predict.py")
    results = bench.main(["--acdc_root", str(acdc_root), "--acdc_cases", "2", "--large_size", "40", "32", "6",
                          "--threads", "1", "--out", str(tmp_path / "r.json")])
    acdc, channels_last, fast, large = results["runs"]
    assert channels_last["flags"] == "--channels_last off"
    assert fast["flags"] == "--amp bf16" and fast["volumes"] == acdc["volumes"]
    # every flag set predicted every volume afresh (none skipped as already written by an earlier run)
    assert acdc["written"] == channels_last["written"] == fast["written"] == acdc["volumes"]
    volumes = 2  # --acdc_cases
    assert acdc["volumes"] == volumes and abs(acdc["seconds_per_volume"] * volumes - acdc["wall_seconds"]) < 1e-9
    assert acdc["wall_seconds"] > acdc["predict_seconds"] > 0 and acdc["peak_rss_mib"] > results["import_rss_mib"] * 0.9
    assert large["float32_volume_mib"] == 40 * 32 * 6 * 4 / 2 ** 20
    assert large["goal_mib"] == 3 * large["float32_volume_mib"] + 1024
    printed = capsys.readouterr().out
    assert f"acdc, defaults (fp32, as the test scripts): {volumes} val volumes" in printed and "large 40x32x6:" in printed
    assert (tmp_path / "r.json").is_file()
