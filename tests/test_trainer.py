"""MeerkatZOTrainer: a Trainer script with forward passes only, on tiny models built from configs."""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, build_tiny_tokenizer, tiny_model
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from meerkat_hf import MeerkatModel, SparseMaskConfig, compute_mask, get_meerkat_model, zo
from meerkat_hf.masks.baselines import full_mask, lora_mask
from meerkat_hf.modeling.model import DELTA_WEIGHTS_NAME
from meerkat_hf.trainer import CandidateAccuracy, MeerkatZOArguments, MeerkatZOTrainer

TESTS_DIR = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ------------------------------------------------------------------------------- helpers
def cyclic_dataset(n: int = 64, length: int = 24, seed: int = 0) -> Dataset:
    """A learnable toy LM task: a 4-token cycle with a random phase (plus a column the model ignores)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        phase = int(torch.randint(0, 4, (1,), generator=g))
        ids = [10 + (phase + t) % 4 for t in range(length)]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids, "text": "unused"})
    return Dataset.from_list(rows)


def meerkat(dtype=torch.float32, density=0.05, exclude=(), seed=0) -> MeerkatModel:
    model = tiny_model("llama", dtype=dtype)
    cfg = SparseMaskConfig(method="random", density=density, seed=seed)
    if exclude is not None:
        cfg.exclude_patterns = list(exclude)
    return get_meerkat_model(model, compute_mask(model, cfg, progress=False))


def zo_args(output_dir, cls=MeerkatZOArguments, **overrides):
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=10,
        learning_rate=1e-2, logging_steps=5, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=True, dataloader_pin_memory=False, seed=0,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def dense_clone(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Recorder(TrainerCallback):
    """Checks that no .grad ever exists and records logs and the lr the optimizer saw."""

    def __init__(self, model: MeerkatModel):
        self.model, self.logs, self.lrs, self.checks = model, [], [], 0

    def _no_grads(self):
        assert self.model.values.grad is None
        assert all(p.grad is None for p in self.model.parameters())
        self.checks += 1

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._no_grads()

    def on_substep_end(self, args, state, control, **kwargs):
        self._no_grads()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._no_grads()
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# ------------------------------------------------------------------------ the main script
def test_drop_in_trainer_script_trains_only_the_mask(tmp_path):
    """A normal HF script (plain TrainingArguments, Trainer API) with Trainer swapped for MeerkatZOTrainer."""
    data = cyclic_dataset()
    m = meerkat()
    before = dense_clone(m)
    recorder = Recorder(m)
    args = zo_args(tmp_path, cls=TrainingArguments, max_steps=200, learning_rate=2e-2, logging_steps=50,
                   lr_scheduler_type="linear")
    trainer = MeerkatZOTrainer(model=m, args=args, train_dataset=data, eval_dataset=data.select(range(16)),
                               callbacks=[recorder])
    start = trainer.evaluate()
    assert "eval_loss" in start  # labels are found through the MeerkatModel wrapper

    result = trainer.train()
    end = trainer.evaluate()
    assert end["eval_loss"] < start["eval_loss"] - 1.0, (start["eval_loss"], end["eval_loss"])
    assert result.global_step == 200

    # forward passes only: no gradient anywhere, ever
    assert recorder.checks >= 2 * 200  # step begin + end (substeps only exist with accumulation)
    assert m.values.grad is None and all(p.grad is None for p in m.parameters())

    # exactly the masked coordinates moved; everything else is bit-identical
    moved = 0
    for name, p in m.named_parameters():
        key = name.removeprefix("base_model.")
        flat, ref = p.detach().view(-1), before[name].view(-1)
        inside = torch.zeros_like(flat, dtype=torch.bool)
        idx = m.mask.indices.get(key, False)
        if idx is not False:
            inside[slice(None) if idx is None else idx] = True
        assert torch.equal(flat[~inside], ref[~inside]), name
        moved += int((flat[inside] != ref[inside]).sum())
    assert moved > 0.9 * m.num_selected

    # the optimizer's record is the run's virtual path, and the weights hold the master
    opt = trainer.zo_optimizer
    assert len(opt.history) == 200
    assert torch.equal(zo.replay(m.base_values, opt.history), m.values)
    assert torch.equal(m.sparse.gather(), m.values)

    # the LR scheduler drives the lr the ZO steps used (linear decay, no warmup)
    expected = [2e-2 * (200 - t) / 200 for t in range(200)]
    assert [s.lr for s in opt.history] == pytest.approx(expected, rel=1e-6)
    assert recorder.lrs[0] < 2e-2 and recorder.lrs == sorted(recorder.lrs, reverse=True)

    # logging_steps logs carry the loss and the ZO statistics
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 4
    assert all(math.isfinite(log["loss"]) and "zo_abs_projected_grad" in log for log in train_logs)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    assert all("grad_norm" not in log for log in train_logs)  # no fake gradient norm

    # predict works on the trained weights
    out = trainer.predict(data.select(range(4)))
    assert out.predictions.shape == (4, 24, 320) and "test_loss" in out.metrics


def test_checkpoints_hold_the_sparse_delta_and_resume_bit_exactly(tmp_path):
    data = cyclic_dataset()

    def run(output_dir, resume=None):
        m = meerkat()
        args = zo_args(output_dir, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = MeerkatZOTrainer(model=m, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return m, trainer

    full, trainer = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {DELTA_WEIGHTS_NAME, "meerkat_config.json", "mask.safetensors", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "adapter_model.safetensors"}
    dense_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    assert (ckpt / DELTA_WEIGHTS_NAME).stat().st_size < dense_bytes / 5

    resumed, trainer2 = run(tmp_path / "b", resume=str(ckpt))
    assert torch.equal(resumed.values, full.values)
    assert trainer2.zo_optimizer.history == trainer.zo_optimizer.history
    assert not torch.equal(full.values, full.base_values)

    # a checkpoint is also a loadable Meerkat delta
    loaded = MeerkatModel.from_pretrained(tiny_model(), tmp_path / "a" / "checkpoint-6")
    assert torch.equal(loaded.values, full.values)


def test_load_best_model_at_end_restores_the_best_delta(tmp_path):
    data = cyclic_dataset()
    m = meerkat()
    # "best" = highest eval loss, i.e. the first checkpoint, so loading it visibly changes the values
    args = zo_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                   load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = MeerkatZOTrainer(model=m, args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = MeerkatModel.from_pretrained(tiny_model(), trainer.state.best_model_checkpoint)
    assert torch.equal(m.values, best.values)
    assert torch.equal(m.sparse.gather(), m.values)
    assert len(trainer.zo_optimizer.history) == 6  # trained on, then rolled back to the best delta


# ---------------------------------------------------------------------------- bad inputs
def test_clear_errors_for_bad_inputs(tmp_path):
    data = cyclic_dataset(8)
    with pytest.raises(TypeError, match="get_meerkat_model"):
        MeerkatZOTrainer(model=tiny_model(), args=zo_args(tmp_path), train_dataset=data)
    for eps in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            zo_args(tmp_path, zo_eps=eps)
    with pytest.raises(ValueError, match="zo_num_perturbations"):
        zo_args(tmp_path, zo_num_perturbations=0)
    with pytest.raises(ValueError, match="zo_loss"):
        zo_args(tmp_path, zo_loss="mse")
    with pytest.raises(ValueError, match="checkpointing"):
        zo_args(tmp_path, gradient_checkpointing=True)
    m = meerkat()
    # plain TrainingArguments reach the same checks in the trainer
    with pytest.raises(ValueError, match="checkpointing"):
        MeerkatZOTrainer(model=m, args=zo_args(tmp_path, cls=TrainingArguments, gradient_checkpointing=True))
    with pytest.raises(ValueError, match="neftune"):
        MeerkatZOTrainer(model=m, args=zo_args(tmp_path, cls=TrainingArguments, neftune_noise_alpha=5.0))
    with pytest.raises(ValueError, match="candidate_ids"):
        MeerkatZOTrainer(model=m, args=zo_args(tmp_path, zo_loss="candidates"), train_dataset=data)
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(TypeError, match="ZOSGD"):
        MeerkatZOTrainer(model=m, args=zo_args(tmp_path), train_dataset=data, optimizers=(adam, None))
    two_gpus = zo_args(tmp_path)
    _ = two_gpus.device  # Trainer reads n_gpu after the device set-up; a 2-GPU node would report 2
    two_gpus._n_gpu = 2
    with pytest.raises(ValueError, match="nn.DataParallel.*accelerate launch. or .torchrun"):
        MeerkatZOTrainer(model=m, args=two_gpus, train_dataset=data)


def test_arguments_parse_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(MeerkatZOArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_eps", "1e-4", "--zo_num_perturbations", "2", "--zo_loss", "candidates",
         "--report_to", "none"])
    assert (args.zo_eps, args.zo_num_perturbations, args.zo_loss, args.zo_seed) == (1e-4, 2, "candidates", None)
    assert all(f.metadata.get("help") for f in MeerkatZOArguments.__dataclass_fields__.values() if f.name.startswith("zo_"))


def test_models_loaded_through_a_quantizer_train_their_float_coordinates(tmp_path):
    """GGUF checkpoints are dequantized on load but keep an `hf_quantizer`, which makes plain Trainer refuse them."""
    from types import SimpleNamespace

    from transformers import Trainer

    model = tiny_model()
    model.is_quantized = True  # what GGUF loading leaves behind, even with float32 weights
    model.hf_quantizer = SimpleNamespace(is_trainable=False, is_qat_trainable=False)
    with pytest.raises(ValueError, match="quantized"):
        Trainer(model=model, args=zo_args(tmp_path, cls=TrainingArguments))
    m = get_meerkat_model(model, compute_mask(model, SparseMaskConfig(method="random", density=0.05), progress=False))
    trainer = MeerkatZOTrainer(model=m, args=zo_args(tmp_path, max_steps=2), train_dataset=cyclic_dataset(16))
    trainer.train()
    assert len(trainer.zo_optimizer.history) == 2

    # a mask on weights that really are stored quantized is refused when wrapping
    int_model = tiny_model()
    norm = int_model.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.detach().to(torch.int8), requires_grad=False)
    mask = compute_mask(int_model, SparseMaskConfig(method="full", include_patterns=[r"model\.norm"]), progress=False)
    with pytest.raises(TypeError, match="floating-point"):
        get_meerkat_model(int_model, mask)


# ------------------------------------------------------------------ NaN, q, accumulation
def test_nan_loss_skips_the_step_and_leaves_weights_untouched(tmp_path, caplog):
    data = cyclic_dataset(32)
    m = meerkat()
    poison = {"on": False}
    m.base_model.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan") if poison["on"] else None)

    class Poison(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, args, state, control, **kwargs):
            poison["on"] = state.global_step == 2
            self.before = m.values.clone()

        def on_step_end(self, args, state, control, **kwargs):
            poison["on"] = False
            self.steps.append(torch.equal(self.before, m.values))

    cb = Poison()
    trainer = MeerkatZOTrainer(model=m, args=zo_args(tmp_path, max_steps=4, logging_steps=1), train_dataset=data,
                               callbacks=[cb])
    with caplog.at_level("WARNING", logger="meerkat_hf"):
        trainer.train()
    assert cb.steps == [False, False, True, False]  # only the poisoned step left the master alone
    assert "ZO step skipped" in caplog.text
    opt = trainer.zo_optimizer
    assert opt.num_skipped == 1 and len(opt.history) == 3
    assert torch.equal(m.sparse.gather(), m.values)  # perturbations were undone
    assert torch.equal(zo.replay(m.base_values, opt.history), m.values)
    assert trainer.state.log_history[-2]["zo_skipped_steps"] == 1


def test_q_perturbations_use_derived_seeds(tmp_path):
    data = cyclic_dataset(32)
    m = meerkat()
    forwards = []
    m.base_model.register_forward_pre_hook(lambda mod, inp: forwards.append(1))
    args = zo_args(tmp_path, max_steps=3, zo_num_perturbations=3, zo_seed=123)
    trainer = MeerkatZOTrainer(model=m, args=args, train_dataset=data)
    trainer.train()
    history = trainer.zo_optimizer.history
    assert [s.seeds for s in history] == [tuple(zo.derive_seed(123, t, j) for j in range(3)) for t in range(3)]
    assert len(forwards) == 3 * 3 * 2  # 2 forward passes per perturbation, nothing else
    assert torch.equal(zo.replay(m.base_values, history), m.values)


def _token_weighted_data(n: int = 16) -> Dataset:
    """Equal-length rows whose label counts differ, so token-mean and mean-of-means disagree."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(4, 320, (12,), generator=g).tolist()
        cut = 1 + (5 * i) % 9
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return Dataset.from_list(rows)


# A large eps keeps the loss difference far above the fp32 resolution of the loss (transformers
# computes the cross-entropy in fp32 even for an fp64 model): |g| error <= ~ulp(6.0) / eps = 2.4e-6.
EPS = 0.2
G_ATOL = 2e-5


def accumulation_run(output_dir, per_device: int, accumulation: int, max_steps: int = 2):
    """The configuration shared by the accumulation test and the 2-process worker (fp64, sequential data)."""
    m = meerkat(dtype=torch.float64, exclude=None)
    args = zo_args(output_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                   max_steps=max_steps, train_sampling_strategy="sequential", zo_eps=EPS, logging_steps=1)
    trainer = MeerkatZOTrainer(model=m, args=args, train_dataset=_token_weighted_data())
    trainer.train()
    return m, trainer


def _expected_first_grad(batch_size: int, eps: float = EPS):
    """SPSA of the token-mean loss over the first `batch_size` rows, and of the mean of per-half means."""
    m = meerkat(dtype=torch.float64, exclude=None)
    rows = _token_weighted_data()[:batch_size]
    ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])

    def token_losses():
        logits = m(input_ids=ids).logits[:, :-1].double()
        target = labels[:, 1:]
        per_token = F.cross_entropy(logits.reshape(-1, 320), target.reshape(-1), reduction="none", ignore_index=-100)
        return per_token.view(target.shape), target != -100

    def losses():
        per_token, valid = token_losses()
        half = batch_size // 2
        token_mean = per_token.sum() / valid.sum()
        halves = [per_token[s].sum() / valid[s].sum() for s in (slice(0, half), slice(half, None))]
        return token_mean, sum(halves) / 2

    z = zo.gaussian_direction(zo.derive_seed(0, 0, 0), m.num_selected)
    w = m.values
    with torch.no_grad():
        m.write(w + eps * z)
        plus = losses()
        m.write(w - eps * z)
        minus = losses()
        m.write(w)
    return [(p - q).item() / (2 * eps) for p, q in zip(plus, minus)]


def test_gradient_accumulation_is_one_step_on_the_larger_batch(tmp_path):
    """G=2 with batch 2 == G=1 with batch 4: token-weighted over the whole step, same seeds in both micro-batches."""
    acc_model, acc = accumulation_run(tmp_path / "g2", per_device=2, accumulation=2)
    big_model, big = accumulation_run(tmp_path / "g1", per_device=4, accumulation=1)
    g_acc = [s.grads[0] for s in acc.zo_optimizer.history]
    g_big = [s.grads[0] for s in big.zo_optimizer.history]
    assert [s.seeds for s in acc.zo_optimizer.history] == [s.seeds for s in big.zo_optimizer.history]
    assert g_acc == pytest.approx(g_big, abs=G_ATOL)
    torch.testing.assert_close(acc_model.values, big_model.values, rtol=0, atol=1e-6)

    token_mean, mean_of_means = _expected_first_grad(4)
    assert g_acc[0] == pytest.approx(token_mean, abs=G_ATOL)
    assert abs(mean_of_means - token_mean) > 20 * G_ATOL  # the test can tell the definitions apart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = """
import os, sys, torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_trainer import accumulation_run
out = sys.argv[1]
m, trainer = accumulation_run(out, per_device=2, accumulation=1)
torch.save({{"values": m.values, "grads": [s.grads for s in trainer.zo_optimizer.history],
            "synced": torch.equal(m.sparse.gather(), m.values)}},
           os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
# Leave together and tear gloo down before the interpreter exits: a rank that exits while
# gloo's threads are still joinable aborts with "terminate called without an active exception".
assert dist.is_initialized(), "the Trainer should have joined the torchrun process group"
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_stay_identical_and_match_the_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo): projected gradients are all-reduced, replicas end bit-identical."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(TESTS_DIR)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["values"], r1["values"]) and r0["grads"] == r1["grads"]
    assert r0["synced"] and r1["synced"]

    # data sharding is the only difference from one process with the 2x batch
    single, trainer = accumulation_run(tmp_path / "single", per_device=4, accumulation=1)
    assert [g[0] for g in r0["grads"]] == pytest.approx([s.grads[0] for s in trainer.zo_optimizer.history], abs=G_ATOL)
    torch.testing.assert_close(r0["values"], single.values, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ baselines
def test_full_parameter_zo_baseline_trains(tmp_path):
    data = cyclic_dataset()
    model = tiny_model()
    m = get_meerkat_model(model, full_mask(model))
    assert m.num_selected == sum(p.numel() for p in model.parameters())
    trainer = MeerkatZOTrainer(model=m, args=zo_args(tmp_path, max_steps=60, learning_rate=3e-3),
                               train_dataset=data, eval_dataset=data.select(range(16)))
    start = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < start - 0.5


def test_lora_zo_baseline_trains_only_the_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    data = cyclic_dataset()
    peft_model = get_peft_model(tiny_model(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    mask = lora_mask(peft_model)
    assert mask.indices and all("lora_" in name for name in mask.indices)
    m = get_meerkat_model(peft_model, mask)
    assert m.num_selected == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="before get_meerkat_model"):
        lora_mask(peft_model)  # everything is frozen now
    before = dense_clone(m)
    trainer = MeerkatZOTrainer(model=m, args=zo_args(tmp_path, max_steps=60), train_dataset=data,
                               eval_dataset=data.select(range(16)))
    start = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < start - 0.1
    for name, p in m.named_parameters():  # ZO moves every adapter tensor, and nothing else
        assert torch.equal(p, before[name]) != ("lora_" in name), name


# ------------------------------------------------------------------------ classification
def test_candidate_loss_classification_with_offline_accuracy(tmp_path):
    """zo_loss='candidates' (MeZO's label-word cross-entropy) on a prompt task, accuracy at eval time."""
    from meerkat_hf.tasks import ClassificationCollator, candidate_token_ids, custom_task, encode_classification

    tokenizer = build_tiny_tokenizer()
    task = custom_task("{text} It was", {0: " bad", 1: " good"}, ["text"], name="toy")
    rng = random.Random(0)

    def split(n):
        texts, labels = [], []
        for _ in range(n):
            y = rng.randint(0, 1)
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            texts.append(words + (" happy" if y else " sad"))
            labels.append(y)
        return encode_classification(tokenizer, task, Dataset.from_dict({"text": texts, "label": labels}), 32)

    train, evaluation = split(128), split(64)
    candidates = candidate_token_ids(tokenizer, task)
    accuracy = CandidateAccuracy(candidates)
    m = meerkat()
    args = zo_args(tmp_path, max_steps=200, per_device_train_batch_size=16, per_device_eval_batch_size=32,
                   zo_loss="candidates", logging_steps=50)
    trainer = MeerkatZOTrainer(
        model=m, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=ClassificationCollator(tokenizer),
        candidate_ids=candidates, compute_metrics=accuracy,
        preprocess_logits_for_metrics=accuracy.preprocess_logits_for_metrics,
    )
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_balanced_accuracy", "eval_macro_f1"} <= set(end)
    assert end["eval_accuracy"] >= start["eval_accuracy"] + 0.15 and end["eval_accuracy"] >= 0.7, (start, end)
    assert end["eval_balanced_accuracy"] >= 0.7, end  # learned the keyword, not the label prior
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]  # the candidate cross-entropy (what is logged as loss) falls


def test_balanced_candidate_loss_weights_classes_by_the_training_prior(tmp_path):
    """zo_loss='balanced': the class weights come from the train_dataset's labels (or class_weights=)."""
    from meerkat_hf.tasks import ClassificationCollator, candidate_token_ids, custom_task, encode_classification

    tokenizer = build_tiny_tokenizer()
    task = custom_task("{text} It was", {0: " bad", 1: " good"}, ["text"], name="toy")
    data = encode_classification(tokenizer, task, Dataset.from_dict(
        {"text": [f"{w} sad" for w in WORDS[:9]] + [f"{w} happy" for w in WORDS[:3]], "label": [0] * 9 + [1] * 3}), 32)
    candidates = candidate_token_ids(tokenizer, task)
    kw = dict(train_dataset=data, data_collator=ClassificationCollator(tokenizer), candidate_ids=candidates)
    trainer = MeerkatZOTrainer(model=meerkat(), args=zo_args(tmp_path, max_steps=2, zo_loss="balanced",
                                                                  per_device_train_batch_size=4), **kw)
    torch.testing.assert_close(trainer.class_weights, torch.tensor([12 / 18, 12 / 6]))
    trainer.train()
    assert len(trainer.zo_optimizer.history) == 2
    explicit = MeerkatZOTrainer(model=meerkat(), args=zo_args(tmp_path, zo_loss="balanced"), class_weights=[1, 3], **kw)
    assert explicit.class_weights.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="class_weights must be 2 finite"):
        MeerkatZOTrainer(model=meerkat(), args=zo_args(tmp_path, zo_loss="balanced"), class_weights=[1, -1], **kw)
    with pytest.raises(ValueError, match="zo_loss='balanced' only"):
        MeerkatZOTrainer(model=meerkat(), args=zo_args(tmp_path, zo_loss="candidates"), class_weights=[1, 1], **kw)
    with pytest.raises(ValueError, match="`label` column"):
        MeerkatZOTrainer(model=meerkat(), args=zo_args(tmp_path, zo_loss="balanced"),
                         train_dataset=data.remove_columns("label"), candidate_ids=candidates)


# Trainer has no public seam for these (checkpoint I/O of a sparse delta, no gradient tensors to clip or
# measure, the wrapped model's columns): MeerkatZOTrainer overrides private methods. This fails loudly the
# day a transformers release renames one or changes its parameters, instead of silently calling the base.
PRIVATE_OVERRIDES = ("_save", "_load_from_checkpoint", "_load_best_model", "_clip_grad_norm", "_get_grad_norm",
                     "_set_signature_columns_if_needed")


@pytest.mark.parametrize("name", PRIVATE_OVERRIDES)
def test_private_trainer_overrides_still_match_transformers(name):
    import inspect

    from transformers import Trainer

    assert hasattr(Trainer, name), f"transformers.Trainer no longer has {name}: MeerkatZOTrainer's override is dead"
    ours = inspect.signature(getattr(MeerkatZOTrainer, name))
    theirs = inspect.signature(getattr(Trainer, name))
    assert list(ours.parameters) == list(theirs.parameters), (name, ours, theirs)
    assert name in MeerkatZOTrainer.__dict__  # the override is ours, not inherited
