"""Two CPU processes under `accelerate launch` reach the single-process final state bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import FederationConfig
from meerkat_hf.federated.checkpoint import load_latest_checkpoint
from meerkat_hf.federated.driver import run_federation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_processes_equal_single_process(tmp_path):
    model_dir = make_model_dir(tmp_path)
    files = make_task_files(tmp_path)
    kw = dict(algorithm="meerkat-vp", rounds=3, client_fraction=0.75, local_steps=3, eval_every=3,
              vp={"min_steps": 2, "ratio_threshold": 0.9})
    multi = base_config(tmp_path, model_dir, files, output_dir=str(tmp_path / "multi"), **kw)
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(multi))
    # Through the example script a user would run (examples/accelerate_federation.sh).
    script = Path(__file__).resolve().parents[1] / "examples" / "accelerate_federation.sh"
    cmd = ["bash", str(script), "--config", str(path), "--summary-json", str(tmp_path / "summary.json")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(sys.path),
           "NUM_PROCESSES": "2", "MAIN_PROCESS_PORT": str(_free_port()),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2

    single = run_federation(FederationConfig.from_dict(
        base_config(tmp_path, model_dir, files, output_dir=str(tmp_path / "single"), **kw)))
    multi_values = load_latest_checkpoint(tmp_path / "multi")["server"]["values"]
    assert torch.equal(multi_values, single.final_values)
    assert summary["state_digest"] == single.state_digest
    rows = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert {rank for r in rows for rank in r["client_ranks"].values()} == {0, 1}  # clients really were split
    drop = ("seconds", "client_ranks")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in single.metrics]
