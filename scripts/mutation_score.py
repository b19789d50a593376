"""Mutation score of the method and its guarantees (mutmut 3): each module with its unit tests.

    python scripts/mutation_score.py [--modules utils/sscd.py ...] [--work /tmp/sscd_mutants] [--out mutation.json]

Slow (minutes per module on 2 cores), so not part of the test suite. mutmut is installed on first use
(``pip install mutmut``). The repository is copied into ``--work`` with ``code/`` as ``src/``: mutmut
names mutants by the module path under its source folder, and the tests import ``utils.sscd``, not
``code.utils.sscd``. Prints killed / survived per module and writes every survivor's name and diff to
``--out``, for docs/mutation.md's triage.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# module (under code/) -> the unit tests that check it
MODULES = {
    "utils/sscd.py": ["tests/test_sscd.py", "tests/test_sscd_contracts.py",
                      "tests/test_speed_paths.py::test_device_lcc_equals_scipy_on_random_maps",
                      "tests/test_speed_paths.py::test_device_lcc_equals_scipy_on_hand_made_maps"],
    "utils/losses.py": ["tests/test_losses.py"],
    "evaluation/metrics.py": ["tests/test_metrics.py"],
    "common/checkpoint.py": ["tests/test_checkpoint.py"],
    "common/geometry.py": ["tests/test_preprocess_promise12.py", "tests/test_own_data.py"],
    # the prediction path: preprocessing replayed on a user's scan, and the network over its slices
    "dataloaders/volume_io.py": ["tests/test_volume_io.py", "tests/test_own_data.py", "tests/test_preprocess_promise12.py",
                                 *[f"tests/test_own_data_hostile.py::{t}" for t in (
                                     "test_spacings_within_a_tolerance_cut_along_the_same_axis",
                                     "test_an_axis_of_one_voxel_is_the_slice_axis",
                                     "test_zero_or_nan_nifti_voxel_size_is_refused",
                                     "test_cases_cut_along_different_axes_are_named_in_a_warning",
                                     "test_the_header_check_of_predict_ends_in_one_line_with_the_readers_cause")]],
    "evaluation/inference.py": ["tests/test_inference.py", "tests/test_test_script.py", "tests/test_own_data.py"],
}


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", nargs="+", default=list(MODULES), choices=list(MODULES))
    p.add_argument("--work", default="/tmp/sscd_mutants", help="scratch copy of the repository (replaced)")
    p.add_argument("--out", default=None, help="write the counts and every survivor as JSON here")
    return p


def prepare(work):
    """A copy of the tracked tree in ``work`` with code/ renamed src/ (and the tests pointed at it)."""
    if work.exists():
        shutil.rmtree(work)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        target = work / ("src" + name[len("code"):] if name.startswith("code/") else name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    conftest = work / "tests" / "conftest.py"
    conftest.write_text(conftest.read_text().replace('CODE = REPO / "code"', 'CODE = REPO / "src"'))


def run_module(work, module, tests):
    """mutmut over ``module`` with ``tests``; returns (counts, survivors {name: diff})."""
    shutil.rmtree(work / "mutants", ignore_errors=True)
    selection = "".join(f"\n    {t}" for t in tests)  # one per line: mutmut splits list values on newlines
    (work / "setup.cfg").write_text(f"[mutmut]\nsource_paths=src\nonly_mutate=src/{module}\n"
                                    f"pytest_add_cli_args_test_selection={selection}\n"
                                    "also_copy=\n    pytest.ini\n    bench\n    configs\n    experiments\n")
    start = time.time()
    subprocess.run(["mutmut", "run"], cwd=work, capture_output=True, text=True)
    listing = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, capture_output=True, text=True).stdout
    status = dict(re.findall(r"^\s*(\S+): (\w[\w ]*)$", listing, flags=re.M))
    counts = {}
    for state in status.values():
        counts[state] = counts.get(state, 0) + 1
    survivors = {name: subprocess.run(["mutmut", "show", name], cwd=work, capture_output=True, text=True).stdout
                 for name, state in status.items() if state in ("survived", "no tests")}  # both need triage
    return {"mutants": len(status), **counts, "seconds": round(time.time() - start)}, survivors


def main(argv=None):
    args = build_parser().parse_args(argv)
    if shutil.which("mutmut") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "mutmut"], check=True)
    work = Path(args.work)
    prepare(work)
    report = {}
    for module in args.modules:
        counts, survivors = run_module(work, module, MODULES[module])
        killed = counts.get("killed", 0)
        print(f"{module}: {counts['mutants']} mutants, {killed} killed, {counts.get('survived', 0)} survived "
              f"({100 * killed / max(counts['mutants'], 1):.1f} %), {counts['seconds']} s; {counts}")
        report[module] = {"counts": counts, "survivors": survivors}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
