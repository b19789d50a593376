"""The benchmark paths do not move: short ACDC and PROMISE12-layout runs (SSCD, BCP, labeled-only;
--amp off, fp32, one torch thread, AVX2 kernels: ``benchmark_paths.PINNED_ENV``) give the losses and
weights pinned in tests/data/benchmark_paths.json. The pins were last recomputed on purpose when the
dropout masks moved to ``networks/dropout.py`` (issue 35; docs/protocol.md)."""
import json

import numpy as np
import pytest

from benchmark_paths import PINNED, PINNED_ENV, RUNS, compute_pinned


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    return compute_pinned(tmp_path_factory.mktemp("paths"))


def test_runs_under_the_pinned_kernels(computed):
    kernels = computed["_kernels"]
    assert kernels["env"] == PINNED_ENV
    assert kernels["cpu_capability"] == "AVX2", "this CPU lacks AVX2: the pins cannot be reproduced here"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_losses_and_weights_match_the_pinned_values(computed, name):
    pinned = json.loads(PINNED.read_text())[name]
    now = computed[name]
    assert sorted(now["losses"]) == sorted(pinned["losses"]) and now["losses"]
    for key, losses in pinned["losses"].items():
        assert sorted(now["losses"][key]) == sorted(losses), key
        for loss, value in losses.items():  # logged with 4 decimals
            assert abs(now["losses"][key][loss] - value) <= 2e-4, (name, key, loss, now["losses"][key][loss], value)
    assert sorted(now["weights"]) == sorted(pinned["weights"])
    for path, stats in pinned["weights"].items():
        np.testing.assert_allclose(now["weights"][path], stats, rtol=1e-4, atol=1e-3, err_msg=f"{name} {path}")
