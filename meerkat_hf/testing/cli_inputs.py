"""Bad command-line inputs and the one error line each must give (exit 2, nothing written).

Shared by tests/test_cli_bad_input.py (the suite) and research/trust_probe.py (which replays the tables).
Every case is refused while the config / mask spec is validated, before a model is loaded.
"""

from __future__ import annotations

import yaml

__all__ = ["write_bad_inputs", "FEDERATE", "MASK"]


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
    (["--set", "zo_eps=0"], "zo_eps must be a finite number > 0"),
    (["--set", "zo_eps=nan"], "zo_eps must be a finite number > 0"),
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
    (["--set", "learning_rate=[1"], "--set learning_rate=[1: is not valid YAML"),
    (["--config", "{root}/deep.yaml"], "deep.yaml nests deeper than YAML can be read"),
    (["--config", "{root}/dup.yaml"], "the key 'learning_rate' is given twice"),
    (["--set", "device=cuda:abc"], "device must be auto, cpu, cuda or cuda:N (got 'cuda:abc')"),
    (["--set", "torch_threads=100000"], "torch_threads=100000 is more than 4 per core"),
    (["--set", "max_length=4.5"], "max_length must be an integer >= 4 (got 4.5)"),
    (["--set", "learning_rate=1e30"], "is above validation.max_lr=10.0"),
    (["--set", "zo_eps=1e300"], "zo_eps=1e+300 is above 1.0"),
    (["--set", "partition.num_single_label_clients=1.5"], "num_single_label_clients must be an integer"),
    (["--set", "validation.max_update_median_ratio=0.5"], "max_update_median_ratio must be >= 1"),
    (["--set", "algorithm=magnitude", "--set", "mask.method=random"], "algorithm 'magnitude' uses a 'magnitude' mask"),
]


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
