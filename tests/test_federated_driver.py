"""The round driver: outputs, byte accounting, faults, resume, baselines, config, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import ConfigError, FederationConfig, decode_uplink
from meerkat_hf.federated.protocol.codec import Uplink
from meerkat_hf.federated.driver import FederationHooks, SimulatedCrash, run_federation
from meerkat_hf.federated.federation_config import DEFAULT_CONFIG


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    return root, make_model_dir(root), make_task_files(root)


def _config(tmp_path, assets, **kw) -> FederationConfig:
    _, model_dir, files = assets
    return FederationConfig.from_dict(base_config(tmp_path, model_dir, files, **kw))


def test_cli_federate_writes_metrics_plots_and_counts_bytes(tmp_path, assets, capsys):
    from meerkat_hf.cli import main
    from meerkat_hf.federated.partition import partition

    _, model_dir, files = assets
    cfg = base_config(tmp_path, model_dir, files, plots=True, save_final=True, rounds=3, client_fraction=0.75,
                      partition={"scheme": "dirichlet", "alpha": 0.3, "num_single_label_clients": 1})
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["federate", "--config", str(path), "--set", "local_steps=4"]) == 0
    report = capsys.readouterr().out  # the run's report, for a person
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]  # rounds done (0: zero-shot, in run_info.json)
    info = json.loads((out / "run_info.json").read_text())
    before = info["initial_eval"]["accuracy"]  # the zero-shot evaluation ran before round 0
    assert 0 <= before <= 1
    assert f"zero-shot (before): {before:.4f}   after round 3: {rows[-1]['accuracy']:.4f}" in report
    assert "full-model FedAvg" in report and "x more" in report
    assert ("Meerkat-VP flagged" in report) == (cfg.get("algorithm") == "meerkat-vp")
    T = 4
    for r in rows:
        assert len(r["participants"]) == 3 and r["accepted"] == r["participants"] and not r["rejected"]
        per_client = r["uplink_bytes"] / len(r["accepted"])
        assert per_client == 52 + 4 * T and per_client <= 4 * T + 128
        assert r["fedavg_full_bytes"] == 2 * 4 * info["num_params"] * 3
        assert r["replay_mismatches"] == []
        assert set(r["downlink_kinds"].values()) == {"records"}  # a few scalars beat 4k bytes
        assert r["accuracy"] is not None and 0 <= r["accuracy"] <= 1
        assert set(r["gradip"]) == {str(c) for c in r["accepted"]} and all(len(v) == T for v in r["gradip_steps"].values())
    assert rows[-1]["cumulative_bytes"] == sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows)
    assert rows[-1]["cumulative_fedavg_full_bytes"] > 1000 * rows[-1]["cumulative_bytes"]
    for name in ("accuracy.png", "bytes.png", "gradip.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "final" / "sparse_delta.safetensors").is_file()
    card = (out / "final" / "README.md").read_text()  # ready for push_to_hub: rendered card with the results
    assert "library_name: meerkat-hf" in card and "Accuracy before" in card and "Accuracy after" in card
    assert "Full-model FedAvg bytes" in card and "ZO eps" in card  # readable labels (issue 12)
    # the partition from the config is the one the clients got
    from meerkat_hf.tasks import custom_task, load_task_dataset

    template = custom_task("{text}\nSentiment:", [" bad", " good"], name="toy")
    labels = np.asarray(load_task_dataset(template, "train", data_files=files)["label"])
    parts = partition(labels, 4, "dirichlet", 0, alpha=0.3, num_single_label_clients=1)
    assert info["client_sizes"] == [len(p) for p in parts]
    assert len({int(labels[i]) for i in parts[-1]}) == 1  # the single-label client
    assert "total" in (out / "partition.txt").read_text()


def test_faults_dropout_duplicates_bad_scalars_wrong_mask(tmp_path, assets, caplog):
    def before_client(r, cid):
        if (r, cid) == (1, 1):
            raise ConnectionError("battery died")

    def tamper(r, cid, data):
        up = decode_uplink(data)
        if (r, cid) == (0, 0):
            return [data, data]  # duplicate
        if (r, cid) == (1, 2):
            return [Uplink(**{**up.__dict__, "grads": (float("nan"),) + up.grads[1:]}).encode()]
        if (r, cid) == (1, 3):
            return [Uplink(**{**up.__dict__, "grads": up.grads[:-1]}).encode()]
        if (r, cid) == (2, 3):
            return [Uplink(**{**up.__dict__, "mask_checksum": b"\x07" * 16}).encode()]
        if (r, cid) == (2, 0):
            return [Uplink(**{**up.__dict__, "round": 1}).encode(), data]  # a stale copy, then the real one
        if (r, cid) == (2, 2):
            return [Uplink(**{**up.__dict__, "grads": (1e9,) + up.grads[1:]}).encode()]
        return [data]

    caplog.set_level("WARNING")
    cfg = _config(tmp_path, assets, rounds=4)
    result = run_federation(cfg, hooks=FederationHooks(before_client=before_client, tamper_uplink=tamper))
    rows = result.metrics
    reasons = [{(x["client_id"], x["reason"]) for x in r["rejected"]} for r in rows]
    assert reasons[0] == {(0, "duplicate")} and rows[0]["accepted"] == [0, 1, 2, 3]
    assert reasons[1] == {(2, "non-finite"), (3, "wrong-number-of-scalars")}
    assert rows[1]["accepted"] == [0] and rows[1]["dropped"] == {"1": "ConnectionError: battery died"}
    assert reasons[2] == {(3, "wrong-mask"), (0, "stale-round"), (2, "absurd-magnitude")}
    assert rows[2]["accepted"] == [0, 1]
    for reason in ("duplicate", "non-finite", "wrong-number-of-scalars", "wrong-mask", "stale-round", "dropped out"):
        assert reason in caplog.text
    # client 3's last message was refused before it proved its state: the server offers records from an
    # older round, the client cannot apply them and fetches the dense state instead
    assert rows[3]["downlink_fallbacks"] == {"3": "cache-mismatch"}
    assert rows[3]["accepted"] == [0, 1, 2, 3] and all(not r["replay_mismatches"] for r in rows)
    assert all(r["state_digest"] != rows[0]["state_digest"] for r in rows[1:])
    # the dropped client kept its data pointer (transactional client state)
    from meerkat_hf.federated.checkpoint import load_latest_checkpoint, unpack_client_states

    clients = unpack_client_states(load_latest_checkpoint(tmp_path / "run")["clients"])
    assert clients[1].rounds_done == 3 and clients[0].rounds_done == 4


@pytest.mark.parametrize("algorithm", ["meerkat-vp"])
def test_crash_between_rounds_then_resume_is_bit_exact(tmp_path, assets, algorithm):
    kw = dict(algorithm=algorithm, rounds=4, client_fraction=0.5, local_steps=4, eval_every=2,
              vp={"min_steps": 2, "ratio_threshold": 0.9})
    full = run_federation(_config(tmp_path / "a", assets, **kw))
    assert full.limited_clients  # the VP scheduler state crosses the crash point too

    def crash(r, row):
        if r == 1:
            raise SimulatedCrash("power cut after round 1")

    cfg = _config(tmp_path / "b", assets, **kw)
    with pytest.raises(SimulatedCrash):
        run_federation(cfg, hooks=FederationHooks(after_round=crash))
    resumed = run_federation(_config(tmp_path / "b", assets, resume=True, **kw))
    assert torch.equal(resumed.final_values, full.final_values)
    assert resumed.state_digest == full.state_digest
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.metrics) == strip(full.metrics)
    assert resumed.limited_clients == full.limited_clients
    # resuming with other protocol settings is refused
    with pytest.raises(ValueError, match="differ"):
        run_federation(_config(tmp_path / "b", assets, resume=True, **{**kw, "local_steps": 5}))


def test_simulated_downlinks_match_server_state(tmp_path, assets):
    kw = dict(rounds=3, client_fraction=0.5, eval_every=3)
    a = run_federation(_config(tmp_path / "a", assets, **kw))
    b = run_federation(_config(tmp_path / "b", assets, simulate_downlink=False, **kw))
    assert torch.equal(a.final_values, b.final_values)
    assert [r["downlink_bytes"] for r in a.metrics] == [r["downlink_bytes"] for r in b.metrics]


@pytest.mark.parametrize("algorithm", ["full-fedzo", "lora-fedzo", "magnitude", "random", "fo-fedavg", "random-early-stop"])
def test_baselines_run_through_the_same_driver(tmp_path, assets, algorithm):
    T = 2
    cfg = _config(tmp_path, assets, algorithm=algorithm, rounds=2, local_steps=T, num_clients=3, eval_every=2,
                  vp={"random_count": 1} if algorithm == "random-early-stop" else {})
    result = run_federation(cfg)
    rows = result.metrics
    assert len(rows) == 2 and all(r["accepted"] == [0, 1, 2] for r in rows)
    assert not torch.equal(result.final_values, result.initial_values)
    per_client = rows[0]["uplink_bytes"] // 3
    if algorithm == "fo-fedavg":
        assert per_client == 56 + 4 * result.k  # a dense fp32 delta: counted honestly
        assert set(rows[1]["downlink_kinds"].values()) == {"dense"}
    else:
        assert per_client <= 52 + 4 * T
    method = {"full-fedzo": "full", "magnitude": "magnitude", "random": "random", "lora-fedzo": "full"}.get(algorithm)
    if method:
        assert result.mask.config.method == method
    if algorithm == "full-fedzo":
        assert result.k > 10_000
    if algorithm == "lora-fedzo":
        names = list(result.mask.indices)
        assert names and all("lora_" in n for n in names)
        assert set(rows[0]["downlink_kinds"].values()) == {"dense"}  # the initial adapter must be downloaded
        assert set(rows[1]["downlink_kinds"].values()) == {"records"}
    if algorithm == "random-early-stop":
        assert len(result.limited_clients) == 1
        limited = result.limited_clients[0]
        assert rows[0]["budgets"][str(limited)] == 1


def test_lm_task_reports_eval_loss(tmp_path, assets):
    from conftest import make_corpus

    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_corpus(80, seed=4)))
    cfg = _config(tmp_path, assets, task={"type": "lm", "name": None, "prompt": None, "verbalizer": None,
                                          "data_files": str(data)},
                  partition={"scheme": "iid"}, rounds=2, eval_every=1, local_steps=2)
    result = run_federation(cfg)
    assert all(np.isfinite(r["eval_loss"]) for r in result.metrics)
    assert "eval_loss" in result.final_eval


def test_config_validation_and_yaml(tmp_path, assets):
    _, model_dir, files = assets
    good = base_config(tmp_path, model_dir, files)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(good))
    cfg = FederationConfig.from_yaml(path, ["rounds=7", "mask.density=0.5", "partition.scheme=shard"])
    assert cfg.rounds == 7 and cfg.mask.density == 0.5 and cfg.partition.scheme == "shard"
    # YAML 1.1 reads `1e-3` (no dot) as a string; on the command line and in files it means a number.
    path.write_text(yaml.safe_dump(good).replace("learning_rate: 0.001", "learning_rate: 1e-3"))
    assert "learning_rate: 1e-3" in path.read_text()
    cfg = FederationConfig.from_yaml(path, ["zo_eps=2e-3", "mask.density=5E-2", "output_dir=run1e5"])
    assert (cfg.learning_rate, cfg.zo_eps, cfg.mask.density, cfg.output_dir) == (1e-3, 2e-3, 5e-2, "run1e5")
    bad = [
        ({"algorithm": "fedprox"}, "algorithm"),
        ({"rounds": 0}, "rounds"),
        ({"client_fraction": 1.5}, "client_fraction"),
        ({"lr": -1}, "learning_rate"),
        ({"roundz": 3}, "unknown key"),
        ({"mask": {"densty": 0.1}}, "unknown key"),
        ({"partition": {"scheme": "zipf"}}, "partition.scheme"),
        ({"vp": {"rule": "most"}}, "vp"),
        ({"algorithm": "meerkat-vp", "mask": {"calibration": None, "method": "random"}}, "g_p"),
        ({"algorithm": "magnitude", "mask": {"path": "/x"}}, "mask.path"),
        ({"task": {"type": "lm", "data_files": None}}, "data_files"),
    ]
    for override, needle in bad:
        data = base_config(tmp_path, model_dir, files, **override)
        with pytest.raises(ConfigError, match=needle):
            FederationConfig.from_dict(data)
    with pytest.raises(ConfigError, match="'lr' and 'learning_rate' name the same setting"):
        FederationConfig.from_dict({**good, "lr": 1e-3})
    with pytest.raises(FileNotFoundError):
        FederationConfig.from_yaml(tmp_path / "missing.yaml")
    assert FederationConfig().algorithm == "meerkat"  # defaults validate


def test_old_setting_names_still_load_with_a_warning_for_one_release(tmp_path, assets):
    """One name per setting, the Trainer's: lr/eps/q/estimator are read as learning_rate/zo_eps/
    zo_num_perturbations/zo_estimator, with a FutureWarning naming the new key."""
    _, model_dir, files = assets
    data = base_config(tmp_path, model_dir, files)
    for new in ("learning_rate", "zo_eps"):
        data.pop(new)
    data.update({"lr": 2e-3, "eps": 3e-3, "q": 2, "estimator": "fzoo"})
    with pytest.warns(FutureWarning, match="'lr' is deprecated, use 'learning_rate'"):
        cfg = FederationConfig.from_dict(data)
    assert (cfg.learning_rate, cfg.zo_eps, cfg.zo_num_perturbations, cfg.zo_estimator) == (2e-3, 3e-3, 2, "fzoo")
    with pytest.warns(FutureWarning, match="FederationConfig.lr"):
        assert cfg.lr == 2e-3  # the old attribute reads the new field
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, model_dir, files)))
    # an old --set name overrides the file's new one (no 'both given' error), with the warning
    with pytest.warns(FutureWarning, match="--set lr="):
        assert FederationConfig.from_yaml(path, ["lr=4e-3"]).learning_rate == 4e-3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the packaged default job and examples use the current names
        FederationConfig.from_yaml(DEFAULT_CONFIG, ["output_dir=" + str(tmp_path / "d")])
        for example in sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml")):
            FederationConfig.from_yaml(example)


def test_a_checkpoint_with_the_old_setting_names_still_resumes():
    from meerkat_hf.federated.checkpoint import check_resumable

    old = {"algorithm": "meerkat", "rounds": 3, "lr_schedule": "constant", "lr": 1e-3, "eps": 1e-3, "q": 1}
    new = {"algorithm": "meerkat", "rounds": 3, "lr_schedule": "constant", "learning_rate": 1e-3, "zo_eps": 1e-3,
           "zo_num_perturbations": 1, "zo_estimator": "spsa"}
    check_resumable(old, new, "m", "m")
    with pytest.raises(ValueError, match="learning_rate"):
        check_resumable(old, {**new, "learning_rate": 2e-3}, "m", "m")


def test_class_balanced_loss_uses_the_federation_label_prior(tmp_path, assets):
    """task.loss=balanced: every client's loss weights classes by 1/(C * p_c) of the federation's
    training labels (3:1 negative here), so the run differs from plain candidate cross-entropy."""
    from federated_support import toy_rows, write_csv
    from meerkat_hf.federated.task_data import build_classification_data
    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.tasks import candidate_loss

    _, model_dir, files = assets
    rows = toy_rows(64, 3)
    skewed = rows + [r for r in rows if r["label"] == 0]  # 64 negative, 32 positive
    train = write_csv(tmp_path / "skewed.csv", skewed)
    task = {"data_files": {"train": train, "test": files["test"]}}
    plain = _config(tmp_path / "plain", assets, task=task, rounds=1, partition={"scheme": "iid"}, save_final=True)
    balanced = _config(tmp_path / "balanced", assets, task={**task, "loss": "balanced"}, rounds=1,
                       partition={"scheme": "iid"}, save_final=True)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    data = build_classification_data(balanced, tokenizer)
    batch = data.collate(data.client_examples[0][:8])
    from meerkat_hf.tasks import candidate_token_ids, custom_task

    cand = candidate_token_ids(tokenizer, custom_task("{text}\nSentiment:", [" bad", " good"], ["text"]))
    with torch.no_grad():
        expected = candidate_loss(model, batch, cand, torch.tensor([96 / 128, 96 / 64]))
        torch.testing.assert_close(data.loss_fn(model, batch), expected)
    a, b = run_federation(plain), run_federation(balanced)
    assert torch.equal(a.initial_values, b.initial_values) and not torch.equal(a.final_values, b.final_values)
    assert b.training_summary["loss"] == "class-balanced candidate cross-entropy"
    with pytest.raises(ConfigError, match="task.loss must be one of candidates, balanced"):
        _config(tmp_path, assets, task={"loss": "focal"})


def test_a_dp_run_cannot_be_resumed_with_other_privacy_settings_or_more_rounds():
    from meerkat_hf.federated.checkpoint import check_resumable

    base = {"algorithm": "meerkat", "rounds": 3, "lr_schedule": "constant",
            "dp": {"clip": 4.4, "target_epsilon": 1.0, "delta": 1e-5}}
    check_resumable(base, dict(base), "m", "m")  # the same run: fine
    # the multiplier was solved for 3 rounds: 10 would spend more than the target under one accountant
    with pytest.raises(ValueError, match=r"\['rounds'\]"):
        check_resumable(base, {**base, "rounds": 10}, "m", "m")
    with pytest.raises(ValueError, match=r"dp\.clip"):
        check_resumable(base, {**base, "dp": {**base["dp"], "clip": 1.0}}, "m", "m")
    # without a target epsilon more rounds are allowed (a fixed multiplier composes step by step)
    fixed = {**base, "dp": {"clip": 4.4, "noise_multiplier": 1.0, "delta": 1e-5}}
    check_resumable(fixed, {**fixed, "rounds": 10}, "m", "m")
    plain = {"algorithm": "meerkat", "rounds": 3, "lr_schedule": "constant"}
    check_resumable(plain, {**plain, "rounds": 10}, "m", "m")


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, assets, caplog):
    """Killed while appending a row (a file-size limit did it): --resume used to fail for good on the JSON error."""
    kw = dict(rounds=3, client_fraction=0.5, local_steps=2, eval_every=3)
    full = run_federation(_config(tmp_path / "a", assets, **kw))

    def crash(r, row):
        if r == 1:
            raise SimulatedCrash("killed after round 2's checkpoint")

    with pytest.raises(SimulatedCrash):
        run_federation(_config(tmp_path / "b", assets, **kw), hooks=FederationHooks(after_round=crash))
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    if not metrics.exists():
        metrics = next((tmp_path / "b").rglob("metrics.jsonl"))
    good = metrics.read_text()
    metrics.write_text(good + '{"round": 3, "accuracy": 0.5, "bytes')  # round 3's row, torn mid-write
    caplog.set_level("WARNING")
    resumed = run_federation(_config(tmp_path / "b", assets, resume=True, **kw))
    assert "line 3 is incomplete" in caplog.text and str(metrics) in caplog.text
    assert resumed.state_digest == full.state_digest
    assert [r["round"] for r in resumed.metrics] == [1, 2, 3]
    # a damaged line that is not the last is an error naming the file and the line
    metrics.write_text("not json\n" + metrics.read_text())
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON row"):
        run_federation(_config(tmp_path / "b", assets, resume=True, **{**kw, "rounds": 4}))
