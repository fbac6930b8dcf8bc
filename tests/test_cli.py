"""`meerkat-hf mask compute` / `mask info` as a user runs them (tiny local model directory)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import build_tiny_tokenizer, make_corpus, tiny_model
from meerkat_hf import SparseMask
from meerkat_hf.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def test_mask_compute_then_info(tmp_path, model_dir, capsys):
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"text": t}) for t in make_corpus(60)))
    out = tmp_path / "mask"
    rc = main(["mask", "compute", "--model", str(model_dir), "--calibration", str(cal), "--density", "0.01",
               "--num-sequences", "4", "--seq-len", "16", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "concentration" in printed and "per module type" in printed
    mask = SparseMask.from_pretrained(out)
    assert mask.config.base_model_name_or_path == str(model_dir)
    assert main(["mask", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_selected"] == mask.num_selected and info["checksum"] == mask.checksum


def test_mask_compute_on_offline_python_docs(tmp_path, model_dir):
    out = tmp_path / "mask"
    assert main(["mask", "compute", "--model", str(model_dir), "--calibration", "python_docs", "--density", "0.01",
                 "--num-sequences", "2", "--seq-len", "16", "--out", str(out)]) == 0
    mask = SparseMask.from_pretrained(out)
    assert "python_docs" in mask.config.calibration_source and mask.pretrain_grad is not None


def test_cli_reports_bad_input_clearly(tmp_path, model_dir, capsys):
    rc = main(["mask", "compute", "--model", str(model_dir), "--calibration", str(tmp_path / "missing.txt"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["mask", "info", str(tmp_path / "nothing-here")]) == 2


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "meerkat_hf.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "mask" in res.stdout
