"""Bad CLI inputs (issue 11.5): each is one line on stderr, exit code 2, no traceback, nothing written.

Every case is refused while the config / mask spec is validated, before a model is loaded, so the
table stays fast."""

from __future__ import annotations

import json

import pytest

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.cli import main
from meerkat_hf.testing.cli_inputs import FEDERATE, MASK, write_bad_inputs


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcli")
    model_dir, files = make_model_dir(root), make_task_files(root)
    path = write_bad_inputs(root, base_config(root, model_dir, files))
    return root, model_dir, path


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("extra,message", FEDERATE, ids=[" ".join(a) for a, _ in FEDERATE])
def test_federate_bad_input(job, extra, message, capsys):
    root, _, path = job
    extra = [a.replace("{root}", str(root)) for a in extra]
    argv = ["federate"] + ([] if "--config" in extra else ["--config", str(path)]) + extra
    code, err = _run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("meerkat-hf: error:"), err
    assert message in lines[0], lines[0]
    assert not (root / "run").exists()  # nothing written


DP_ACCOUNTANT = [  # refused by the accountant's floor, before a model loads (needs the [dp] extra)
    (["--set", "dp.clip=1", "--set", "dp.target_epsilon=0.01"], "dp.target_epsilon=0.01 is unreachable"),
    (["--set", "dp.clip=1", "--set", "dp.target_epsilon=0.05", "--set", "dp.delta=1e-9"], "is unreachable"),
]


@pytest.mark.parametrize("extra,message", DP_ACCOUNTANT, ids=[" ".join(a) for a, _ in DP_ACCOUNTANT])
def test_federate_unreachable_epsilon(job, extra, message, capsys):
    pytest.importorskip("opacus")
    test_federate_bad_input(job, extra, message, capsys)


@pytest.mark.parametrize("extra,message", MASK, ids=[" ".join(a) for a, _ in MASK])
def test_mask_compute_bad_input(job, extra, message, capsys):
    root, model_dir, _ = job
    args = {"--model": model_dir, "--calibration": str(root / "calib.txt"), "--out": str(root / "mask-out")}
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[flag] = value
    argv = ["mask", "compute"] + [x for kv in args.items() for x in kv] + \
        [x for flag, value in zip(extra[::2], extra[1::2]) if flag not in args for x in (flag, value)]
    code, err = _run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("meerkat-hf: error:"), err
    assert message in lines[0], lines[0]
    assert not (root / "mask-out").exists()


@pytest.mark.parametrize("argv", [["federate", "--set"], ["mask", "compute", "--density", "abc"], ["bogus"]])
def test_argparse_errors_exit_2_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("meerkat-hf")


def test_device_cuda_without_cuda_is_one_line(job, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root, _, path = job
    code, err = _run(["federate", "--config", str(path), "--set", "device=cuda"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "device=cuda but torch" in lines[0] and "sees no CUDA device" in lines[0]
    assert not (root / "run").exists()


def test_a_run_whose_every_uplink_was_rejected_exits_non_zero_with_the_reason(job, capsys, tmp_path):
    _, _, path = job
    summary = tmp_path / "summary.json"
    code, err = _run(["federate", "--config", str(path), "--set", "validation.max_examples=1", "--set", "rounds=1",
                      "--set", f"output_dir={tmp_path / 'run'}", "--summary-json", str(summary)], capsys)
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("meerkat-hf: error:")]
    assert line and "rejected every uplink of the run" in line[0] and "bad-example-count x" in line[0]
    assert "rejected every uplink" in json.loads(summary.read_text())["error"]


def test_a_train_file_of_random_bytes_is_one_error_line_naming_it(job, capsys, tmp_path):
    root, _, path = job  # read after the model loads (the file is the sites' data), so logs may come first
    code, err = _run(["federate", "--config", str(path), "--set", f"task.data_files.train={root}/random.csv",
                      "--set", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2  # (datasets logs its own reader's failure first; the CLI's verdict is the last line)
    assert err.strip().splitlines()[-1].startswith(f"meerkat-hf: error: cannot read '{root}/random.csv' as csv")


def test_an_old_setting_name_on_the_command_line_is_one_warning_line(job, capsys):
    import warnings

    root, _, path = job
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as a fresh process would show it once
        code, err = _run(["federate", "--config", str(path), "--set", "lr=-1"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert lines == ["meerkat-hf: warning: federation config: '--set lr=' is deprecated, use 'learning_rate' (the "
                     "name MeerkatZOArguments uses); the old name goes in the next release",
                     "meerkat-hf: error: federation config: learning_rate must be a finite number > 0 (got -1)"], lines
