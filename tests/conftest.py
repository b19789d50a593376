"""Shared fixtures.

Real data: set ``SSCD_SHARED_DATA`` to the folder holding ``ACDC/`` and ``prostate/``
(CI sets it to ``../shared/data``). Without it, the ACDC fixtures fall back to a small
synthetic data set in exactly the ACDC layout, so the suite still exercises every path.
"""
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE = REPO / "code"
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))
# slice indexes of folders the tests did not write go to a fresh folder, never to ~/.cache/sscd
os.environ["SSCD_CACHE_DIR"] = tempfile.mkdtemp(prefix="sscd_test_cache_")


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``cuda`` (pytest.ini) where torch sees no CUDA device."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (bench/device_check.sh runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def load_script(relative):
    """The module of a script outside the package (``experiments/ablate_stage.py``, ``experiments/run_table.py``)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_data_dir():
    """The real-data folder named by SSCD_SHARED_DATA, or None when unset (an error when
    SSCD_REQUIRE_REAL_DATA=1, as CI sets it: there a real-data test may not be skipped)."""
    value = os.environ.get("SSCD_SHARED_DATA")
    if not value:
        if os.environ.get("SSCD_REQUIRE_REAL_DATA") == "1":
            raise RuntimeError("SSCD_REQUIRE_REAL_DATA=1 but SSCD_SHARED_DATA is not set")
        return None
    path = Path(value)
    if not path.is_dir():
        raise RuntimeError(f"SSCD_SHARED_DATA={value!r} is not a directory")
    return path


@pytest.fixture(scope="session")
def real_acdc_root():
    """Root of the real processed ACDC data, or None when SSCD_SHARED_DATA is unset."""
    base = shared_data_dir()
    return None if base is None else base / "ACDC"


@pytest.fixture(scope="session")
def real_prostate_root():
    """Root of the real prostate MRI (PROMISE12 layout), or None when SSCD_SHARED_DATA is unset."""
    base = shared_data_dir()
    return None if base is None else base / "prostate"


@pytest.fixture(scope="session")
def acdc_root(real_acdc_root, tmp_path_factory):
    """The real ACDC root when SSCD_SHARED_DATA is set, else a generated synthetic set in the same layout."""
    if real_acdc_root is not None:
        return real_acdc_root
    from dataloaders.synthetic import make_synthetic_acdc
    return make_synthetic_acdc(tmp_path_factory.mktemp("synthetic_acdc"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic ACDC-layout data set (always generated, never the real data)."""
    from dataloaders.synthetic import make_synthetic_acdc
    return make_synthetic_acdc(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: the tensors are tiny, and on a shared 2-core machine OpenMP
    spin-waits make multi-threaded CPU runs crawl."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skip_without_real_data(root, what="real data"):
    """Skip the calling test when ``root`` (a real-data fixture) is None: locally without
    SSCD_SHARED_DATA only, never under SSCD_REQUIRE_REAL_DATA=1 (CI), where it fails instead."""
    if root is not None:
        return
    if os.environ.get("SSCD_REQUIRE_REAL_DATA") == "1":
        pytest.fail(f"{what}: SSCD_REQUIRE_REAL_DATA=1 forbids skipping a real-data test")
    pytest.skip(f"{what} not available (set SSCD_SHARED_DATA)")
