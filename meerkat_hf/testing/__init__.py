"""Test utilities shipped with the library: tiny models, a toy federation, seeded faults and their audit.

Public so that the test suite, `research/` and users' own tests share one copy (no study imports `tests/`).
"""

from .faults import FaultRates, SeededFaults, audit, expected_row, in_flight
from .tiny import WORDS, build_tiny_tokenizer, make_corpus, tiny_config, tiny_model
from .toy_federation import base_config, make_model_dir, make_task_files, toy_rows, write_csv

__all__ = ["FaultRates", "SeededFaults", "audit", "expected_row", "in_flight", "WORDS", "build_tiny_tokenizer",
           "make_corpus", "tiny_config", "tiny_model", "base_config", "make_model_dir", "make_task_files", "toy_rows",
           "write_csv"]
