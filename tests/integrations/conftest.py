"""One spawn of two gloo processes runs every HF Transformers / Accelerate scenario
(``hf_scenarios.py``); the tests of both files read its results."""

import pytest

from tests.ddp.ddp_helpers import case_results


@pytest.fixture(scope="session")
def hf_results():
    # imported here, not at collection: importing transformers takes seconds
    pytest.importorskip("transformers", reason="needs pip install 'bucketmoo_kernels[hf]'")
    pytest.importorskip("accelerate", reason="needs pip install 'bucketmoo_kernels[hf]'")
    import hf_scenarios

    results = hf_scenarios.run_all(2)
    print("HF scenario seconds (rank 0):",
          ", ".join(f"{k} {v:.1f}" for k, v in results[0].get("_seconds", {}).items()))
    return results


def get(results, name):
    """The scenario's per-rank results; fails with the worker's traceback if it raised."""
    return case_results(results, name)
