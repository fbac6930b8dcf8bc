"""Every example in examples/ runs, on a tiny model, the way its docstring tells a user to run it.

(The Flower app is exercised by tests/test_flower.py, the Accelerate script by
tests/test_federated_accelerate.py.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from federated_support import make_model_dir
from hub_server import fake_hub, run_with_hub  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_federated_quickstart_tiny(tmp_path, capsys):
    result = load_example("federated_quickstart").main(["--tiny", "--rounds", "2", "--output-dir", str(tmp_path)])
    report = capsys.readouterr().out
    assert "zero-shot (before)" in report and "full-model FedAvg" in report and "Meerkat-VP flagged" in report
    assert result.initial_eval and result.final_eval and len(result.metrics) == 2
    final = tmp_path / "meerkat-vp" / "final"
    assert {"mask.safetensors", "sparse_delta.safetensors", "README.md"} <= {p.name for p in final.iterdir()}


def test_single_site_trainer_swaps_trainer(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from meerkat_hf import MeerkatModel

    model_dir = make_model_dir(tmp_path)
    out = tmp_path / "run"
    result = load_example("single_site_trainer").main([
        "--model", model_dir, "--task", "tweets_binary", "--max-steps", "6", "--batch-size", "4",
        "--train-examples", "48", "--eval-examples", "16", "--calibration-sequences", "2",
        "--calibration-seq-len", "32", "--density", "0.01", "--learning-rate", "1e-2", "--output-dir", str(out),
    ])
    assert 0 <= result["before"]["eval_accuracy"] <= 1 and 0 <= result["after"]["eval_accuracy"] <= 1
    assert "sparse delta saved" in capsys.readouterr().out
    # The saved delta loads on a fresh base and changes exactly the masked coordinates.
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    loaded = MeerkatModel.from_pretrained(base, out / "final")
    assert not torch.equal(loaded.values, loaded.base_values)  # 6 ZO steps moved w_S
    changed = {n for n, p in loaded.base_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(loaded.mask.indices)


def test_compute_and_push_mask_example(fake_hub, tmp_path):  # noqa: F811
    model_dir = make_model_dir(tmp_path)
    result = run_with_hub(fake_hub, f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("ex", {str(EXAMPLES / "compute_and_push_mask.py")!r})
        ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
        mask = ex.main(["--model", {model_dir!r}, "--num-sequences", "2", "--seq-len", "32", "--density", "0.01",
                        "--out", {str(tmp_path / "mask")!r}, "--repo-id", "federation/tiny-mask"])
        print(json.dumps({{"checksum": mask.checksum, "k": mask.num_selected}}))
    """)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    files = fake_hub.files("federation/tiny-mask")
    assert {"mask_config.json", "mask.safetensors", "README.md"} <= set(files)
    config = json.loads(files["mask_config.json"])
    assert config["meerkat_mask"]["checksum"] == out["checksum"] and config["meerkat_mask"]["num_selected"] == out["k"]
    assert "python_docs" in config["calibration_source"]
    assert "federation/tiny-mask" in files["README.md"].decode()


def test_main_job_command_runs_the_packaged_default_on_any_model(tmp_path, capsys):
    """`meerkat-hf federate --model DIR` = the README's main job (default config) on another model."""
    from meerkat_hf.cli import main
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG
    from meerkat_hf.federated.federation_config import FederationConfig

    default = FederationConfig.from_yaml(DEFAULT_CONFIG)  # the packaged default is valid as shipped
    assert default.model.model_name_or_path == "smollm2" and default.algorithm == "meerkat-vp"
    assert default.task.name == "tweets_binary" and default.partition.num_single_label_clients >= 1
    model_dir = make_model_dir(tmp_path)
    out = tmp_path / "main-job"
    assert main(["federate", "--model", model_dir, "--output-dir", str(out), "--set", "rounds=2",
                 "--set", "num_clients=3", "--set", "partition.num_single_label_clients=1",
                 "--set", "task.max_train_examples=60", "--set", "eval_examples=16", "--set", "batch_size=4",
                 "--set", "mask.calibration_num_sequences=2", "--set", "mask.calibration_seq_len=32",
                 "--set", "mask.density=1e-2", "--set", "vp.calibration_local_steps=4", "--set", "local_steps=2",
                 "--set", "progress=false", "--set", "device=cpu"]) == 0
    report = capsys.readouterr().out
    assert "zero-shot (before)" in report and "after round 2" in report and "Meerkat-VP flagged" in report
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["model"]["model_name_or_path"] == model_dir and info["config"]["model"]["gguf_file"] is None
    assert (out / "final" / "README.md").is_file() and (out / "plots" / "accuracy.png").is_file()
    assert yaml.safe_load(DEFAULT_CONFIG.read_text())["mask"]["cache"] is True  # the mask is computed once


def test_sft_trainer_example_lowers_the_completion_loss_without_grad(tmp_path, capsys):
    pytest.importorskip("trl")
    model_dir = make_model_dir(tmp_path)
    result = load_example("sft_trainer").main([
        "--model", model_dir, "--density", "0.2", "--max-steps", "40", "--learning-rate", "0.1",
        "--num-perturbations", "4", "--calibration-sequences", "2", "--max-length", "48",
        "--output-dir", str(tmp_path / "sft")])
    assert result["after"]["eval_loss"] < result["before"]["eval_loss"]
    assert "eval_mean_token_accuracy" in result["after"]  # TRL's token metrics, under the eval prefix
    assert "sparse delta saved" in capsys.readouterr().out
    assert (tmp_path / "sft" / "final" / "sparse_delta.safetensors").is_file()
