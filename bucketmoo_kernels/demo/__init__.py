"""Multilingual demo: one language per DDP rank, plain DDP vs static weighting vs bucket-level MOO.

Run ``python -m bucketmoo_kernels.demo --help``. The pieces are importable for notebooks:
:mod:`.data` (CLDR text from Babel), :mod:`.model` (byte-level decoder LM), :mod:`.train`
(:class:`DemoSettings`), :mod:`.run` (:func:`run_demo`) and :mod:`.report` (table, markdown, plots).
"""

from .model import ByteLM, ModelConfig
from .run import run_demo
from .train import DemoSettings, RunSpec, parse_run

__all__ = ["ByteLM", "DemoSettings", "ModelConfig", "RunSpec", "parse_run", "run_demo"]
