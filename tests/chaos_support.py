"""Seeded faults and their audit: the library's (meerkat_hf.testing.faults)."""

from meerkat_hf.testing.faults import FaultRates, SeededFaults, audit, expected_row, in_flight  # noqa: F401
