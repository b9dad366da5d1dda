"""``run_demo``: the demo's entry point, one engine or the other.

``settings.engine`` picks the trainer: ``ddp`` and ``fsdp`` run the demo's own loop
(:func:`.train.run_ddp_demo`), ``hf`` the HF Transformers Trainer (:func:`.hf.run_hf_demo`,
imported only then). Both return rank 0's summary, the dict :mod:`.report` reads.
"""

from __future__ import annotations

from .train import DemoSettings, run_ddp_demo

__all__ = ["run_demo"]


def run_demo(settings: DemoSettings) -> dict:
    """Train every run of ``settings`` on ``len(languages)`` processes; return the results."""
    if settings.engine == "hf":  # the same comparison through the HF Transformers Trainer
        from .hf import run_hf_demo

        return run_hf_demo(settings)
    return run_ddp_demo(settings)
