"""`MeerkatSFTTrainer` (issue 28.4): TRL's SFT data side, ZO's optimizer, no backward, metrics under the right prefix."""

from __future__ import annotations

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
