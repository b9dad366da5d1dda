"""One spawn of two gloo processes runs every HF Transformers / Accelerate scenario
(``hf_scenarios.py``); the tests of both files read its results."""

import pytest


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
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        if isinstance(res, dict) and "error" in res:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{res['error']}")
    return per_rank
