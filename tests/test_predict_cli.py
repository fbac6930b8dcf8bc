"""A newcomer's command line (issue 12): `predict`, `--version`, and one-line errors for bad models."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from conftest import build_tiny_tokenizer, tiny_model
from hub_server import fake_hub  # noqa: F401  (fixture)
from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model
from meerkat_hf.cli import main
from meerkat_hf.hub.loading import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = {"name": "mood", "type": "classification", "prompt": "{text} It was", "verbalizer": [" bad", " good"],
        "text_columns": ["text"], "label_column": "label"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `meerkat-hf federate` leaves it: run_info.json (with the task) and final/."""
    root = tmp_path_factory.mktemp("runs")
    base = root / "tiny-base"
    tiny_model("llama").save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    model, _ = load_model_and_tokenizer(str(base))
    mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(density=0.02, method="random"), progress=False))
    mm.set_values(mm.values + 0.05 * torch.randn(mm.num_selected, generator=torch.Generator().manual_seed(0)))
    run = root / "run"
    mm.save_pretrained(run / "final", training_summary={"task": "mood: 10 train / 4 eval examples, 2 classes"})
    (run / "run_info.json").write_text(json.dumps({"config": {"task": TASK, "max_length": 64}}))
    mm.save_pretrained(root / "lm-delta", training_summary={"task": "lm: 10 train / 2 eval texts"})
    return run


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("meerkat-hf: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_predict_classifies_with_the_runs_task(run_dir, capsys):
    assert main(["predict", str(run_dir), "great fun movie", "boring bad plot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "task mood: labels bad, good"
    assert len(lines) == 3 and all(line.split("\t")[0] in ("bad", "good") for line in lines[1:])
    assert lines[1].endswith("great fun movie") and lines[2].endswith("boring bad plot")

    assert main(["predict", str(run_dir / "final"), "great fun movie", "--json"]) == 0  # the delta folder too
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in ("bad", "good") and abs(sum(row["scores"].values()) - 1) < 1e-3


def test_predict_generates_for_an_lm_delta_or_when_asked(run_dir, capsys):
    assert main(["predict", str(run_dir.parent / "lm-delta"), "the movie", "--max-new-tokens", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["text"] == "the movie" and isinstance(row["generated"], str) and "label" not in row
    assert main(["predict", str(run_dir), "the movie", "--generate", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("the movie")


def test_predict_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "no_such_run"), "x"]) == 2
    assert "does not exist" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "x"]) == 2
    assert "neither a run folder" in one_line_error(capsys)
    assert main(["predict", str(run_dir), "x", "--task", "no_such_task"]) == 2
    assert "unknown task" in one_line_error(capsys)
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(run_dir / "final", damaged)
    blob = bytearray((damaged / "sparse_delta.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / "sparse_delta.safetensors").write_bytes(bytes(blob))
    assert main(["predict", str(damaged), "x"]) == 2
    assert "sparse_delta.safetensors" in one_line_error(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("meerkat-hf 0.1.0") and "transformers" in out and "torch" in out


@pytest.mark.parametrize("model", ["./no_such_dir", "no_such_dir/", "~/no/such/model", "no such dir", "/abs/missing"])
@pytest.mark.parametrize("command", ["mask", "federate"])
def test_missing_local_model_is_a_one_line_error(tmp_path, capsys, model, command):
    argv = (["mask", "compute", "--model", model, "--calibration", "python_docs", "--out", str(tmp_path / "o")]
            if command == "mask" else ["federate", "--model", model, "--output-dir", str(tmp_path / "o")])
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "not found: no such local directory" in err and "Repo id must" not in err
    assert not (tmp_path / "o").exists()  # nothing started


def test_unknown_hub_id_offline_and_on_an_unreachable_hub_fails_in_seconds(tmp_path, capsys, monkeypatch):
    assert main(["federate", "--model", "someone/no-such-model", "--output-dir", str(tmp_path / "o")]) == 2
    assert "HF_HUB_OFFLINE=1" in one_line_error(capsys)

    import huggingface_hub.constants as constants

    silent = socket.socket()  # accepts connections (kernel backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("MEERKAT_HF_HUB_CHECK_TIMEOUT", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    try:
        t0 = time.perf_counter()
        assert main(["federate", "--model", "someone/no-such-model", "--output-dir", str(tmp_path / "o")]) == 2
        assert time.perf_counter() - t0 < 20
        assert "could not reach the Hub within 1 s" in one_line_error(capsys)
        t0 = time.perf_counter()  # a delta named by a Hub id: the same
        assert main(["predict", "someone/no-such-delta", "hello"]) == 2
        assert time.perf_counter() - t0 < 20
        assert "did not answer within 1 s" in one_line_error(capsys)
    finally:
        silent.close()


def test_unknown_hub_id_on_a_reachable_hub(fake_hub, capsys, monkeypatch, tmp_path):  # noqa: F811
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(["mask", "compute", "--model", "someone/no-such-model", "--calibration", "python_docs",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a Hub model you can access" in one_line_error(capsys)
