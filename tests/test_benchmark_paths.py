"""The benchmark paths do not move: short ACDC and PROMISE12-layout runs (SSCD, BCP, labeled-only;
--amp off, fp32, one torch thread) give the losses and weights pinned in
tests/data/benchmark_paths.json, which were computed on the code before issue 26 (custom datasets,
predict) changed the data loading, the checkpoint and the test pipeline."""
import json

import numpy as np
import pytest

from benchmark_paths import PINNED, RUNS, compute_all


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    return compute_all(tmp_path_factory.mktemp("paths"))


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
