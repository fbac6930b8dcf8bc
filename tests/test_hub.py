"""Tests for meerkat_hf.hub: atomic saves, folder resolution errors, model cards, and a Hub round trip.

The Hub round trips run the client in a subprocess against the loopback fake Hub of `hub_server.py`
(see its docstring for why).
"""

# ruff: noqa: F811  (pytest fixtures imported from hub_server are re-bound as test parameters)

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hub_server import FakeHub, fake_hub, run_with_hub  # noqa: F401  (fake_hub is a fixture)

from meerkat_hf.hub import artifacts as hub
from meerkat_hf.hub import render_card, resolve_folder, sha256_bytes, write_files_atomically


def _listing(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# write_files_atomically / sha256_bytes
# --------------------------------------------------------------------------------------------------


def test_sha256_bytes_matches_hashlib():
    assert sha256_bytes(b"meerkat") == hashlib.sha256(b"meerkat").hexdigest()
    assert sha256_bytes(memoryview(b"abc")) == hashlib.sha256(b"abc").hexdigest()


def test_write_files_atomically_replaces_in_dict_order(tmp_path, monkeypatch):
    target = tmp_path / "new" / "dir"  # created with parents
    moved: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    files = {"mask.safetensors": b"\x00data", "sub/extra.bin": b"x", "mask_config.json": b'{"k": 1}'}
    write_files_atomically(target, files)

    assert moved == ["mask.safetensors", "extra.bin", "mask_config.json"]
    assert _listing(target) == ["mask.safetensors", "mask_config.json", "sub/extra.bin"]  # no temp files
    for name, data in files.items():
        assert (target / name).read_bytes() == data


def test_write_files_atomically_overwrites_with_normal_permissions(tmp_path):
    write_files_atomically(tmp_path, {"a.json": b"old"})
    write_files_atomically(tmp_path, {"a.json": b"new"})
    assert (tmp_path / "a.json").read_bytes() == b"new"
    assert _listing(tmp_path) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_failure_while_writing_leaves_previous_save_intact(tmp_path):
    write_files_atomically(tmp_path, {"data.safetensors": b"old data", "config.json": b"old config"})
    with pytest.raises(TypeError):
        write_files_atomically(tmp_path, {"data.safetensors": b"new data", "config.json": object()})
    assert (tmp_path / "data.safetensors").read_bytes() == b"old data"
    assert (tmp_path / "config.json").read_bytes() == b"old config"
    assert _listing(tmp_path) == ["config.json", "data.safetensors"]


def test_failure_during_replace_rolls_back(tmp_path, monkeypatch):
    """The data file is already in place when moving the config fails: it must be restored."""
    write_files_atomically(tmp_path, {"data.safetensors": b"old data", "config.json": b"old config"})
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "config.json" and str(src).endswith(".tmp"):
            raise OSError("simulated crash while committing the config")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        write_files_atomically(
            tmp_path,
            {"data.safetensors": b"new data", "brand_new.bin": b"new", "config.json": b"new config"},
        )
    assert (tmp_path / "data.safetensors").read_bytes() == b"old data"
    assert (tmp_path / "config.json").read_bytes() == b"old config"
    assert _listing(tmp_path) == ["config.json", "data.safetensors"]  # new file removed, no temp/backup files


@pytest.mark.parametrize("bad_name", ["../escape.bin", "/abs/path.bin", "a/../../b"])
def test_write_files_atomically_rejects_names_outside_directory(tmp_path, bad_name):
    target = tmp_path / "t"
    with pytest.raises(ValueError, match="relative"):
        write_files_atomically(target, {"ok.bin": b"1", bad_name: b"2"})
    assert not target.exists()  # validated before anything was written


# --------------------------------------------------------------------------------------------------
# resolve_folder (no network)
# --------------------------------------------------------------------------------------------------


def test_resolve_folder_returns_existing_local_directory(tmp_path):
    assert resolve_folder(tmp_path) == tmp_path
    assert resolve_folder(str(tmp_path)) == tmp_path


def test_resolve_folder_rejects_a_file(tmp_path):
    f = tmp_path / "mask.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="mask.safetensors"):
        resolve_folder(f)


@pytest.mark.parametrize("missing", ["./no/such/mask", "/definitely/not/here", "a/b/c", Path("org/name")])
def test_resolve_folder_missing_local_path(missing):
    with pytest.raises(FileNotFoundError) as info:
        resolve_folder(missing)
    assert str(Path(missing)) in str(info.value)


def test_resolve_folder_repo_id_offline_is_a_clear_oserror(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        resolve_folder("some-org/some-mask", cache_dir=tmp_path)
    err = info.value
    assert not isinstance(err, FileNotFoundError)  # not confused with a mistyped local path
    message = str(err)
    assert "some-org/some-mask" in message
    assert "HF_HUB_OFFLINE" in message and "local directory" in message


# --------------------------------------------------------------------------------------------------
# render_card
# --------------------------------------------------------------------------------------------------


def _front_matter(card) -> dict:
    text = str(card)
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


MASK_CONTEXT = dict(
    repo_id="me/mask-llama-0.5pct",
    base_model="meta-llama/Llama-3.2-1B",
    density=0.005,
    method="sq-grad top-k",
    num_selected=6_000_000,
    num_selectable=1_200_000_000,
    calibration={"source": "allenai/c4", "num_sequences": 128, "seq_len": 512, "seed": 0},
    module_table=[("q_proj", 1_500_000, 0.25), ("down_proj", 4_500_000, 0.75)],
    mass_share=0.42,
    concentration_ratio=12.5,
    scope="all linear layers",
)


def test_render_mask_card():
    card = render_card(
        "mask_card",
        {"base_model": "meta-llama/Llama-3.2-1B", "datasets": "allenai/c4", "tags": ["llama"]},
        **MASK_CONTEXT,
    )
    meta = _front_matter(card)
    assert meta["library_name"] == "meerkat-hf"
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert meta["datasets"] == ["allenai/c4"]
    assert {"meerkat", "zeroth-order", "federated-learning", "sparse", "llama"} <= set(meta["tags"])
    assert card.data.library_name == "meerkat-hf"  # huggingface_hub parses it back too
    text = card.text
    assert 'SparseMask.from_pretrained("me/mask-llama-0.5pct")' in text
    assert "get_meerkat_model(model, mask)" in text
    assert "6,000,000 of 1,200,000,000" in text
    assert "| `down_proj` | 4,500,000 | 75.0% |" in text
    assert "0.5%" in text and "42.0%" in text and "12.5" in text and "allenai/c4" in text


def test_render_mask_card_with_missing_optionals():
    nones = {key: None for key in MASK_CONTEXT}
    for context in (nones, {}):
        card = render_card("mask_card", {}, **context)
        meta = _front_matter(card)
        assert meta["library_name"] == "meerkat-hf" and "meerkat" in meta["tags"]
        assert "n/a" in card.text and "None" not in card.text


def test_render_mask_card_nan_statistics():
    """Statistics are NaN when the gradient mass is zero: show n/a rather than 'nan%'."""
    nan = float("nan")
    card = render_card("mask_card", {}, mass_share=nan, concentration_ratio=nan, module_table=[("q_proj", 3, nan)])
    assert not re.search(r"\bnan\b", card.text, re.IGNORECASE)


def test_render_delta_card():
    training = {
        "rounds": 50,
        "clients": 10,
        "local_steps": 4,
        "task": "sst2",
        "accuracy_before": 0.512,
        "accuracy_after": 0.91234,
        "bytes_per_round": 48_000,
        "full_fedavg_bytes_per_round": 4_400_000_000,
        "notes": None,
    }
    card = render_card(
        "delta_card.md",
        {"base_model": "Qwen/Qwen2.5-0.5B", "datasets": ["stanfordnlp/sst2"]},
        repo_id="me/delta",
        base_model="Qwen/Qwen2.5-0.5B",
        mask_repo="me/mask",
        num_selected=1234,
        density=0.001,
        training=training,
    )
    meta = _front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["library_name"] == "meerkat-hf"
    assert meta["datasets"] == ["stanfordnlp/sst2"]
    text = card.text
    assert 'MeerkatModel.from_pretrained("me/delta")' in text  # one line: the base is recorded in the delta
    assert 'load_model_and_tokenizer("Qwen/Qwen2.5-0.5B")' in text
    assert 'MeerkatModel.from_pretrained(base, "me/delta")' in text
    assert "merge_and_unload()" in text
    for row in ("| Rounds | 50 |", "| Accuracy after | 0.9123 |", "| Full FedAvg bytes per round | 4,400,000,000 |"):
        assert row in text
    assert "`me/mask`" in text


def test_render_delta_card_with_missing_optionals_and_local_base_model(tmp_path):
    card = render_card("delta_card", {"base_model": str(tmp_path)}, repo_id=None, training=None, mask_repo=None)
    meta = _front_matter(card)
    assert "base_model" not in meta  # a local path is not valid Hub metadata...
    assert str(tmp_path) in card.text  # ...but the card body still names it
    assert "No training summary" in card.text and "None" not in card.text


def test_render_card_missing_template():
    with pytest.raises(FileNotFoundError, match="no_such_card.md"):
        render_card("no_such_card", {})


# --------------------------------------------------------------------------------------------------
# Hub round trips (client in a subprocess, fake Hub in-process)
# --------------------------------------------------------------------------------------------------


def _make_artifact(folder: Path, version: int) -> dict[str, bytes]:
    """A mask-like folder: safetensors data, a JSON config recording its hash, and a rendered card."""
    import torch
    from safetensors.torch import save

    data = save({"model.layers.0.mlp.down_proj.weight": torch.arange(10, dtype=torch.int64) * version})
    config = json.dumps({"format": "meerkat-mask", "version": version, "data_sha256": sha256_bytes(data)}).encode()
    card = str(render_card("mask_card", {"base_model": "meta-llama/Llama-3.2-1B"}, repo_id="me/mask", num_selected=10))
    files = {"mask.safetensors": data, "README.md": card.encode(), "mask_config.json": config}
    write_files_atomically(folder, files)
    return files


def test_hub_round_trip_push_download_and_old_revision(fake_hub: FakeHub, tmp_path):
    v1 = _make_artifact(tmp_path / "v1", 1)
    v2 = _make_artifact(tmp_path / "v2", 2)
    cache = tmp_path / "fresh-cache"
    result = run_with_hub(
        fake_hub,
        f"""
        import json
        from meerkat_hf.hub import push_folder, resolve_folder

        url1 = push_folder({str(tmp_path / "v1")!r}, "me/mask", commit_message="mask v1", private=True)
        url2 = push_folder({str(tmp_path / "v2")!r}, "me/mask", commit_message="mask v2")
        sha1 = url1.rsplit("/commit/", 1)[1]
        latest = resolve_folder("me/mask", cache_dir={str(cache)!r})
        old = resolve_folder("me/mask", revision=sha1, cache_dir={str(cache)!r})
        only_cfg = resolve_folder(
            "me/mask", revision=sha1, allow_patterns=["*.json"], cache_dir={str(tmp_path / "c2")!r}
        )
        paths = dict(latest=str(latest), old=str(old), only_cfg=str(only_cfg))
        print(json.dumps(dict(url1=url1, url2=url2, sha1=sha1, **paths)))
        """,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["url1"].startswith(fake_hub.endpoint + "/me/mask/commit/")
    assert out["url1"] != out["url2"]

    # server side: two commits on top of the initial one, exact bytes, card metadata valid
    history = fake_hub.history("me/mask")
    assert len(history) == 3 and history[1] == out["sha1"]
    assert fake_hub.repos[("model", "me/mask")].private
    for name, data in v2.items():
        assert fake_hub.files("me/mask")[name] == data

    # client side: fresh-cache downloads are byte-identical, the old sha gives the old content
    latest, old, only_cfg = Path(out["latest"]), Path(out["old"]), Path(out["only_cfg"])
    assert latest.is_relative_to(cache) and old.is_relative_to(cache)
    for name in v1:
        assert (latest / name).read_bytes() == v2[name]
        assert (old / name).read_bytes() == v1[name]
    assert _listing(only_cfg) == ["mask_config.json"]
    assert not fake_hub.unknown_requests and not fake_hub.errors

    # offline afterwards: served from the cache, no request reaches the Hub
    n_requests = len(fake_hub.requests)
    offline = run_with_hub(
        fake_hub,
        f"""
        from meerkat_hf.hub import resolve_folder
        print(resolve_folder("me/mask", cache_dir={str(cache)!r}))
        """,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert Path(offline.stdout.strip().splitlines()[-1]) == latest
    assert len(fake_hub.requests) == n_requests


def test_hub_push_branch_pr_and_unchanged(fake_hub: FakeHub, tmp_path):
    _make_artifact(tmp_path / "v1", 1)
    v2 = _make_artifact(tmp_path / "v2", 2)
    v3 = _make_artifact(tmp_path / "v3", 3)
    result = run_with_hub(
        fake_hub,
        f"""
        import json
        from meerkat_hf.hub import push_folder

        main = push_folder({str(tmp_path / "v1")!r}, "me/delta", commit_message="v1")
        same = push_folder({str(tmp_path / "v1")!r}, "me/delta", commit_message="no-op")  # unchanged: no commit
        branch = push_folder({str(tmp_path / "v2")!r}, "me/delta", commit_message="on v2", revision="v2")
        pr = push_folder({str(tmp_path / "v3")!r}, "me/delta", commit_message="as PR", create_pr=True)
        print(json.dumps(dict(main=main, same=same, branch=branch, pr=pr)))
        """,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["same"] == out["main"]
    assert len(fake_hub.history("me/delta")) == 2  # initial commit + v1; branch and PR left main alone
    repo = fake_hub.repos[("model", "me/delta")]
    assert set(repo.refs) == {"main", "v2", "refs/pr/1"}
    assert out["branch"].endswith(repo.refs["v2"]) and out["pr"].endswith(repo.refs["refs/pr/1"])
    assert fake_hub.files("me/delta", "v2")["mask.safetensors"] == v2["mask.safetensors"]
    assert fake_hub.files("me/delta", "refs/pr/1")["mask.safetensors"] == v3["mask.safetensors"]
    assert not fake_hub.unknown_requests and not fake_hub.errors


def test_hub_missing_repo_and_revision_errors(fake_hub: FakeHub):
    fake_hub.commit("me/exists", {"a.json": b"{}"})
    result = run_with_hub(
        fake_hub,
        """
        import json
        from meerkat_hf.hub import resolve_folder

        errors = {}
        for repo, rev in [("me/missing", None), ("me/exists", "no-such-branch")]:
            try:
                resolve_folder(repo, revision=rev)
            except Exception as exc:
                errors[f"{repo}@{rev}"] = [type(exc).__name__, str(exc)]
        print(json.dumps(errors))
        """,
    )
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    kind, message = errors["me/missing@None"]
    assert kind == "OSError" and "me/missing" in message and "main" in message
    kind, message = errors["me/exists@no-such-branch"]
    assert kind == "OSError" and "no-such-branch" in message and "me/exists" in message


def test_template_lookup_prefers_installed_location(tmp_path, monkeypatch):
    """Wheel layout (meerkat_hf/model_cards/) wins over the source checkout's top-level model_cards/."""
    pkg = tmp_path / "site" / "meerkat_hf"
    (pkg / "model_cards").mkdir(parents=True)
    (pkg / "model_cards" / "mask_card.md").write_text("---\n{{ card_data }}\n---\ninstalled copy\n")
    monkeypatch.setattr(hub, "__file__", str(pkg / "hub" / "artifacts.py"))
    assert "installed copy" in render_card("mask_card", {}).text


def test_trainer_push_to_hub_keeps_the_meerkat_card_with_its_evaluation(fake_hub: FakeHub, tmp_path):
    from federated_support import make_model_dir

    model_dir = make_model_dir(tmp_path)
    run_with_hub(fake_hub, f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from meerkat_hf import MeerkatZOArguments, MeerkatZOTrainer, SparseMaskConfig, compute_mask, get_meerkat_model

        model = AutoModelForCausalLM.from_pretrained({model_dir!r})
        tok = AutoTokenizer.from_pretrained({model_dir!r})
        mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(method="random", density=0.05), progress=False))
        rows = [{{"input_ids": [1, 5, 6, 7], "labels": [1, 5, 6, 7]}}] * 8
        args = MeerkatZOArguments(output_dir={str(tmp_path / "out")!r}, max_steps=2, per_device_train_batch_size=4,
                                  report_to="none", use_cpu=True, hub_model_id="me/zo-delta", save_strategy="no",
                                  learning_rate=1e-3)
        trainer = MeerkatZOTrainer(model=mm, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tok)
        trainer.train()
        trainer.evaluate()
        trainer.push_to_hub(license="mit", dataset="me/toy-data")
        """)
    card = fake_hub.files("me/zo-delta")["README.md"].decode()
    assert "library_name: meerkat-hf" in card and "generated_from_trainer" not in card
    assert "Rendered by meerkat-hf" in card and "license: mit" in card and "pipeline_tag: text-generation" in card
    assert "me/toy-data" in card and "| Eval loss |" in card  # Trainer's evaluation, in the Meerkat card
    assert "sparse_delta.safetensors" in fake_hub.files("me/zo-delta")
