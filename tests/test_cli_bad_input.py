"""Bad CLI inputs (issue 11.5): each is one line on stderr, exit code 2, no traceback, nothing written.

Every case is refused while the config / mask spec is validated, before a model is loaded, so the
table stays fast."""

from __future__ import annotations

import json

import pytest
import yaml

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.cli import main


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcli")
    model_dir, files = make_model_dir(root), make_task_files(root)
    path = write_bad_inputs(root, base_config(root, model_dir, files))
    return root, model_dir, path


def write_bad_inputs(root, cfg: dict):
    """The files the tables below name (`{root}/...`), beside a valid config `fed.yaml`; returns its path.
    (research/trust_probe.py replays these tables, so it builds them with this function too.)"""
    path = root / "fed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (root / "empty.yaml").write_text("")
    (root / "latin1.yaml").write_bytes("lr: 1e-3 # d\xe9j\xe0\n".encode("latin-1"))
    (root / "calib.txt").write_text("some calibration text\n" * 10)
    (root / "deep.yaml").write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    (root / "dup.yaml").write_text(yaml.safe_dump(cfg) + "learning_rate: 0.5\n")
    (root / "random.csv").write_bytes(bytes(range(256)) * 40)
    return path


FEDERATE = [  # (--set overrides or extra args, what the one line must say)
    (["--set", "learning_rate=-1"], "learning_rate must be a finite number > 0"),
    (["--set", "learning_rate=abc"], "learning_rate must be a finite number > 0"),
    (["--set", "learning_rate=.inf"], "learning_rate must be a finite number > 0"),
    (["--set", "learning_rate=inf"], "learning_rate must be a finite number > 0"),
    (["--set", "eps=0"], "eps must be a finite number > 0"),
    (["--set", "eps=nan"], "eps must be a finite number > 0"),
    (["--set", "rounds=0"], "rounds must be an integer >= 1"),
    (["--set", "rounds=1.5"], "rounds must be an integer >= 1"),
    (["--set", "rounds=true"], "rounds must be an integer >= 1"),
    (["--set", "local_steps=70000"], "local_steps must be <= 65535"),
    (["--set", "client_fraction=0"], "client_fraction must be in (0, 1]"),
    (["--set", "bogus=1"], "unknown key(s) ['bogus']"),
    (["--set", "mask.bogus=1"], "unknown key(s) ['bogus'] in section 'mask'"),
    (["--set", "mask.density=1.5"], "mask.density must be in (0, 1]"),
    (["--set", "mask.density=abc"], "mask.density must be in (0, 1]"),
    (["--set", "weight_decay=-1"], "weight_decay must be a finite number >= 0"),
    (["--set", "weight_decay=5000"], "learning_rate * weight_decay must be < 1"),
    (["--set", "validation.max_abs_grad=.inf"], "max_abs_grad must be a finite number > 0"),
    (["--set", "validation.max_abs_grad=inf"], "max_abs_grad must be a finite number > 0"),
    (["--set", "validation.max_update_ratio=0"], "max_update_ratio must be a finite number > 0"),
    (["--set", "validation.max_client_weight=1.5"], "max_client_weight must be a finite number in (0, 1]"),
    (["--set", "validation.max_client_weight=nan"], "max_client_weight must be a finite number in (0, 1]"),
    (["--set", "validation.max_client_weight=0.1"], "max_client_weight=0.1 is below 1/num_clients"),
    (["--set", "torch_threads=-1"], "torch_threads must be an integer >= 1"),
    (["--set", "catchup_max_directions=-1"], "catchup_max_directions must be an integer >= 0 or null"),
    (["--set", "seed=1180591620717411303424"], "seed must be an integer in 0..2**63-1"),
    (["--set", "seed=-3"], "seed must be an integer in 0..2**63-1"),
    (["--set", "output_dir="], "output_dir must be a directory path"),
    (["--set", "vp.min_steps=-1"], "vp.min_steps must be >= 1"),
    (["--set", "partition.alpha=0"], "partition.alpha must be > 0"),
    (["--set", "task.data_files.train=/nonexistent/train.csv"], "/nonexistent/train.csv does not exist"),
    (["--set", "lr"], "is not key=value"),
    (["--set", "dp.clip=0", "--set", "dp.noise_multiplier=1"], "dp.clip must be a finite number > 0"),
    (["--set", "dp.clip=-1", "--set", "dp.noise_multiplier=1"], "dp.clip must be a finite number > 0"),
    (["--set", "dp.clip=1", "--set", "dp.noise_multiplier=0"], "dp.noise_multiplier must be a finite number > 0"),
    (["--set", "dp.clip=1", "--set", "dp.noise_multiplier=-1"], "dp.noise_multiplier must be a finite number > 0"),
    (["--set", "dp.clip=1"], "give exactly one of dp.noise_multiplier and dp.target_epsilon"),
    (["--set", "dp.clip=1", "--set", "dp.noise_multiplier=1", "--set", "dp.delta=0"], "dp.delta must be in (0, 1)"),
    (["--set", "dp.clip=1", "--set", "dp.noise_multiplier=1", "--set", "dp.delta=1"], "dp.delta must be in (0, 1)"),
    (["--set", "dp.central_noise_multiplier=0"], "dp.central_noise_multiplier must be a finite number > 0"),
    (["--config", "/nonexistent/fed.yaml"], "/nonexistent/fed.yaml does not exist"),
    (["--config", "{root}/empty.yaml"], "empty.yaml is empty"),
    (["--config", "{root}/latin1.yaml"], "latin1.yaml is not UTF-8"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    # issue 29's malformed invocations
    (["--set", "lr=[1"], "--set lr=[1: is not valid YAML"),
    (["--config", "{root}/deep.yaml"], "deep.yaml nests deeper than YAML can be read"),
    (["--config", "{root}/dup.yaml"], "the key 'learning_rate' is given twice"),
    (["--set", "device=cuda:abc"], "device must be auto, cpu, cuda or cuda:N (got 'cuda:abc')"),
    (["--set", "torch_threads=100000"], "torch_threads=100000 is more than 4 per core"),
    (["--set", "max_length=4.5"], "max_length must be an integer >= 4 (got 4.5)"),
    (["--set", "lr=1e30"], "is above validation.max_lr=10.0"),
    (["--set", "eps=1e300"], "eps=1e+300 is above 1.0"),
    (["--set", "partition.num_single_label_clients=1.5"], "num_single_label_clients must be an integer"),
    (["--set", "validation.max_update_median_ratio=0.5"], "max_update_median_ratio must be >= 1"),
    (["--set", "algorithm=magnitude", "--set", "mask.method=random"], "algorithm 'magnitude' uses a 'magnitude' mask"),
]


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


MASK = [
    (["--density", "1.5"], "density must be in (0, 1]"),
    (["--density", "0"], "density must be in (0, 1]"),
    (["--density", "nan"], "density must be in (0, 1]"),
    (["--density", "inf"], "density must be in (0, 1]"),
    (["--seq-len", "1"], "calibration_seq_len must be >= 2"),
    (["--num-sequences", "0"], "calibration_num_sequences must be >= 1"),
    (["--batch-size", "0"], "calibration_batch_size must be >= 1"),
    (["--exclude", "[unclosed"], "exclude_patterns: '[unclosed' is not a valid regular expression"),
    (["--include", "(?P<"], "include_patterns: '(?P<' is not a valid regular expression"),
    (["--calibration", "/nonexistent/calib.txt"], "calibration source /nonexistent/calib.txt does not exist"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
]


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
