"""`MeerkatSFTTrainer` (issue 28.4): TRL's SFT data side, ZO's optimizer, no backward, metrics under the right prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federated_support import make_model_dir
from meerkat_hf import SparseMaskConfig, compute_mask, get_meerkat_model

pytest.importorskip("trl")

from meerkat_hf.trainer.sft_trainer import MeerkatSFTConfig, MeerkatSFTTrainer  # noqa: E402


def _setup(tmp_path, **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_model_dir(tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(method="random", density=0.2), progress=False))
    data = Dataset.from_list([{"prompt": f"say {w}", "completion": f" {w} {w}"} for w in ("good", "bad", "sun", "sea") * 8])
    args = MeerkatSFTConfig(output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=4,
                            learning_rate=0.1, lr_scheduler_type="constant", zo_num_perturbations=4, max_length=32,
                            logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, **config)
    return mm, MeerkatSFTTrainer(model=mm, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)


@pytest.mark.parametrize("bf16", [False, True])
def test_sft_loss_falls_with_forward_passes_only(tmp_path, bf16):
    mm, trainer = _setup(tmp_path, bf16=bf16)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before
    assert not any(p.grad is not None for p in mm.base_model.parameters())
    train_logs = [row for row in trainer.state.log_history if "loss" in row]
    assert train_logs and all("mean_token_accuracy" in row and "eval_mean_token_accuracy" not in row for row in train_logs)
    assert "eval_mean_token_accuracy" in after and "mean_token_accuracy" not in after
    if bf16:
        assert mm.forward_precision == "bf16-mixed"


def test_sft_trainer_refuses_other_arguments_and_losses(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="zo_loss must be 'lm'"):
        _setup(tmp_path / "a", zo_loss="candidates")
    mm, _ = _setup(tmp_path / "b")
    with pytest.raises(TypeError, match="MeerkatSFTConfig"):
        MeerkatSFTTrainer(model=mm, args=TrainingArguments(output_dir=str(tmp_path / "c")))
    assert torch.equal(mm.values, mm.base_values)


CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token if loop.first else '' }}<{{ m['role'] }}> {{ m['content'] }}"
                 "{% if not loop.last %} {% endif %}{% endfor %}{{ eos_token }}")


def _chat_setup(tmp_path):
    import json

    from transformers import AutoTokenizer

    model_dir = make_model_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    chat_dir = tmp_path / "chat-model"
    if not chat_dir.exists():
        import shutil

        shutil.copytree(model_dir, chat_dir)
        tok.save_pretrained(chat_dir)
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("good", "bad", "sun", "sea") * 6]
    files = {}
    for split, part in (("train", rows), ("test", rows[:8])):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        files[split] = str(path)
    return str(chat_dir), AutoTokenizer.from_pretrained(chat_dir), rows, files


def test_a_federation_on_chat_data_trains_on_trl_s_tokens(tmp_path):
    """`task.type: lm` over a chat dataset: the same tokens (and so the same per-token LM loss) as TRL's SFTTrainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from federated_support import base_config
    from meerkat_hf.federated import FederationConfig, run_federation
    from meerkat_hf.federated.task_data import build_federated_data

    chat_dir, tok, rows, files = _chat_setup(tmp_path)
    raw = base_config(tmp_path, chat_dir, files, rounds=2, local_steps=3, learning_rate=0.05, max_length=64,
                      task={"name": "chat", "type": "lm", "data_files": files, "prompt": None, "verbalizer": None},
                      mask={"calibration": "task"}, partition={"scheme": "iid"})
    config = FederationConfig.from_dict(raw)
    data = build_federated_data(config, tok)
    ours = sorted(tuple(r["input_ids"]) for client in data.client_examples for r in client)
    model = AutoModelForCausalLM.from_pretrained(chat_dir)
    mm = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(method="random", density=0.2), progress=False))
    args = MeerkatSFTConfig(output_dir=str(tmp_path / "sft"), max_length=64, report_to="none", use_cpu=True,
                            save_strategy="no")
    trl_rows = MeerkatSFTTrainer(model=mm, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok).train_dataset
    assert ours == sorted(tuple(x) for x in trl_rows["input_ids"])
    assert ours[0][0] == tok.bos_token_id and ours[0][-1] == tok.eos_token_id  # the template's, not doubled
    result = run_federation(config)
    assert "conversations (chat template)" in data.description
    assert np.isfinite(result.final_eval["eval_loss"]) and result.final_eval["eval_loss"] < result.initial_eval["eval_loss"]


def test_chat_data_with_a_tokenizer_without_template_is_refused_in_one_line(tmp_path):
    from federated_support import base_config
    from meerkat_hf.federated import FederationConfig
    from meerkat_hf.federated.task_data import build_federated_data
    from transformers import AutoTokenizer

    chat_dir, _, _, files = _chat_setup(tmp_path)
    config = FederationConfig.from_dict(base_config(tmp_path, chat_dir, files, task={
        "name": "chat", "type": "lm", "data_files": files, "prompt": None, "verbalizer": None}, partition={"scheme": "iid"}))
    plain = AutoTokenizer.from_pretrained(make_model_dir(tmp_path))
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_federated_data(config, plain)
