"""benchmarks/gpu_smoke.py's checks, run on the CPU with the tiny model (the GPU run is the same code)."""

from __future__ import annotations

import pytest
from conftest import load_script


def _load():
    return load_script("benchmarks/gpu_smoke.py")


@pytest.mark.usefixtures("one_thread")
def test_gpu_smoke_passes_on_the_cpu_and_prints_one_table(capsys):
    assert _load().main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["mask", "write/gather", "same-seed g", "fp32 g", "trainer lm", "trainer cand", "fp16",
                     "deterministic", "federation"]
    assert all(r.split("|")[2].strip() in ("ok", "skip") for r in rows)
    assert "replay bit-exact" in out


def test_without_cuda_it_says_so_and_exits_0(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load().main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
