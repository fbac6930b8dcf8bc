"""Shared pieces of the federated tests: the library's toy federation (meerkat_hf.testing)."""

from meerkat_hf.testing.toy_federation import (  # noqa: F401
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    base_config,
    make_model_dir,
    make_task_files,
    toy_rows,
    write_csv,
)
