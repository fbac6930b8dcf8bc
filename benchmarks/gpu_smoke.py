"""GPU smoke test: the checks a first CUDA run must pass, as one table, non-zero exit on any failure.

    python benchmarks/gpu_smoke.py                  # on a CUDA machine: a ~50M config-built Llama, < 5 minutes
    python benchmarks/gpu_smoke.py --device cpu --tiny   # the same code on the CPU (the test suite runs this)

Without CUDA (and without --device cpu) it says so and exits 0: there is nothing to smoke-test. The model
is built from a config (no download); a byte-level tokenizer is trained on the fly. Checks, in order:

  mask          a sensitivity mask computed on the device: indices on the CPU (int64), the checksum computable,
                save/load round trip with the same checksum
  write/gather  writing w_S and reading it back is exact, and every unmasked weight is untouched
  same-seed g   the same seed and weights give the same projected gradient twice (bf16 forwards)
  fp32 g        the device's fp32 g is close to the CPU's fp32 g (relative 1e-3)
  trainer lm    MeerkatZOTrainer(bf16=True), LM loss, 20 steps: every base forward under bf16 autocast, no .grad,
                and the server's replay of the optimizer's steps equals the trained values bit for bit
  trainer cand  the same with the candidate loss (the classification path)
  fp16          one step with fp16=True (no GradScaler, no .grad)
  deterministic one step under torch.use_deterministic_algorithms(True)
  federation    a 1-round 2-client federation with device=<device>, replayed bit for bit by the server
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

CORPUS = [f"the {a} {b} was {c} today." for a in ("cat", "dog", "bird", "car", "city", "river", "movie", "song")
          for b in ("near", "by", "under", "over") for c in ("good", "bad", "great", "awful", "fine", "quiet")]


def build_model_and_tokenizer(device: str, tiny: bool):
    """A config-built Llama (~50M parameters, or a tiny one) and a byte-level BPE tokenizer trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) \
        if tiny else dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                          num_key_value_heads=4)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, tie_word_embeddings=True, **size)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device), tokenizer


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, float]] = []

    @contextlib.contextmanager
    def check(self, name: str):
        start = time.perf_counter()
        note = {"detail": "", "result": "ok"}
        try:
            yield note
            self.rows.append((name, note["result"], note["detail"], time.perf_counter() - start))
        except Exception as err:  # noqa: BLE001  (every failure becomes a row; the exit code reports it)
            self.rows.append((name, "FAIL", f"{type(err).__name__}: {err}"[:160], time.perf_counter() - start))
            traceback.print_exc(file=sys.stderr)

    def print(self, header: str) -> bool:
        print(header)
        print("| check | result | detail | seconds |\n|---|---|---|---|")
        for name, result, detail, seconds in self.rows:
            print(f"| {name} | {result} | {detail} | {seconds:.1f} |")
        return all(r[1] in ("ok", "skip") for r in self.rows)


def _lm_rows(tokenizer, n: int = 32, length: int = 24):
    rows = []
    for text in CORPUS[:n]:
        ids = tokenizer(text, truncation=True, max_length=length)["input_ids"]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def _autocast_hook(model, seen: list):
    def hook(module, args):
        seen.append(torch.is_autocast_enabled(model.device.type))
    return model.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(hook)


def run(device: str, tiny: bool) -> bool:
    from meerkat_hf import (MeerkatZOArguments, MeerkatZOTrainer, SparseMask, SparseMaskConfig, compute_mask,
                            get_meerkat_model, zo)

    table = Table()
    model, tokenizer = build_model_and_tokenizer(device, tiny)
    n_params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="meerkat-gpu-smoke-"))
    mask = mm = None
    density = 0.02 if tiny else 1e-4
    with table.check("mask") as note:
        mask = compute_mask(model, SparseMaskConfig(density=density, calibration_num_sequences=4, calibration_seq_len=32),
                            CORPUS, tokenizer, progress=False)
        assert all(i is None or (i.device.type == "cpu" and i.dtype == torch.long) for i in mask.indices.values())
        mask.save_pretrained(work / "mask")
        again = SparseMask.from_pretrained(work / "mask")
        assert again.checksum == mask.checksum
        note["detail"] = f"k={mask.num_selected:,} of {n_params:,}, checksum {mask.checksum[:12]}"
    with table.check("write/gather") as note:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        mm = get_meerkat_model(model, mask)
        target = mm.base_values + 0.25
        mm.set_values(target)
        assert torch.equal(mm.sparse.gather(), target)
        changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
        assert changed == mask.num_selected, f"{changed} weights changed for k={mask.num_selected}"
        mm.set_values(mm.base_values)
        note["detail"] = f"{changed:,} weights changed, all masked"
    batch = {k: torch.tensor(v[:8]).to(device) for k, v in {
        "input_ids": [r["input_ids"][:12] for r in _lm_rows(tokenizer)],
        "labels": [r["input_ids"][:12] for r in _lm_rows(tokenizer)]}.items()}
    loss_fn = lambda: mm(**batch).loss  # noqa: E731
    with table.check("same-seed g") as note:
        mm.set_forward_precision("bf16-mixed")
        z = zo.gaussian_direction(7, mm.num_selected)
        g1 = zo.projected_gradient(mm, loss_fn, z, 1e-2)
        g2 = zo.projected_gradient(mm, loss_fn, z, 1e-2)
        assert g1 == g2, f"{g1} != {g2}"
        mm.set_forward_precision("fp32")
        note["detail"] = f"g = {g1:.6g} twice (bf16-mixed)"
    with table.check("fp32 g") as note:
        z = zo.gaussian_direction(11, mm.num_selected)
        g_dev = zo.projected_gradient(mm, loss_fn, z, 1e-3)
        cpu_model, _ = build_model_and_tokenizer("cpu", tiny)
        cpu_mm = get_meerkat_model(cpu_model, mask)
        cpu_batch = {k: v.cpu() for k, v in batch.items()}
        g_cpu = zo.projected_gradient(cpu_mm, lambda: cpu_mm(**cpu_batch).loss, z, 1e-3)
        rel = abs(g_dev - g_cpu) / max(abs(g_cpu), 1e-12)
        assert rel < 1e-3, f"relative difference {rel:.3g}"
        note["detail"] = f"{device} {g_dev:.6g} vs cpu {g_cpu:.6g} (rel {rel:.1e})"

    def trainer_check(name: str, **extra):
        with table.check(name) as note:
            seen: list[bool] = []
            handle = _autocast_hook(mm.base_model, seen)
            start = mm.values.clone()
            args = MeerkatZOArguments(output_dir=str(work / name), max_steps=20, per_device_train_batch_size=4,
                                      learning_rate=1e-3, report_to="none", save_strategy="no", disable_tqdm=True,
                                      use_cpu=device == "cpu", dataloader_pin_memory=False, zo_eps=1e-2, **extra)
            kwargs = {}
            if args.zo_loss in ("candidates", "balanced"):
                from meerkat_hf.tasks import ClassificationCollator

                good, bad = tokenizer(" good")["input_ids"][-1], tokenizer(" bad")["input_ids"][-1]
                rows = []
                for t in CORPUS:
                    if "good" in t or "bad" in t:
                        y = 0 if "good" in t else 1
                        prompt = tokenizer(t.rsplit(" ", 1)[0] + " it was")["input_ids"]
                        rows.append({"input_ids": prompt + [(good, bad)[y]], "label": y,
                                     "labels": [-100] * len(prompt) + [(good, bad)[y]]})
                kwargs = {"candidate_ids": [good, bad], "data_collator": ClassificationCollator(tokenizer)}
            else:
                rows = _lm_rows(tokenizer)
                from transformers import DataCollatorForSeq2Seq

                kwargs = {"data_collator": DataCollatorForSeq2Seq(tokenizer, padding=True)}
            trainer = MeerkatZOTrainer(model=mm, args=args, train_dataset=rows, **kwargs)
            trainer.train()
            handle.remove()
            assert seen and all(seen), f"{seen.count(False)} of {len(seen)} forwards ran outside bf16"
            assert not any(p.grad is not None for p in mm.base_model.parameters()), "a .grad exists"
            replayed = zo.replay(start, trainer.zo_optimizer.history)
            assert torch.equal(replayed, mm.values), "the replayed virtual path differs from the trained values"
            note["detail"] = f"{len(seen)} forwards under bf16, replay bit-exact over {len(trainer.zo_optimizer.history)} steps"
            mm.set_forward_precision("fp32")

    trainer_check("trainer lm", bf16=True)
    trainer_check("trainer cand", bf16=True, zo_loss="candidates")
    with table.check("fp16") as note:
        if device == "cpu":
            note["result"], note["detail"] = "skip", "fp16 autocast needs CUDA"
        else:
            args = MeerkatZOArguments(output_dir=str(work / "fp16"), max_steps=1, per_device_train_batch_size=4,
                                      report_to="none", save_strategy="no", disable_tqdm=True, fp16=True, zo_eps=1e-2)
            from transformers import DataCollatorForSeq2Seq

            MeerkatZOTrainer(model=mm, args=args, train_dataset=_lm_rows(tokenizer),
                             data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)).train()
            assert not any(p.grad is not None for p in mm.base_model.parameters())
            note["detail"] = "one step, no GradScaler, no .grad"
            mm.set_forward_precision("fp32")
    with table.check("deterministic") as note:
        if device.startswith("cuda"):
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        try:
            z = zo.gaussian_direction(13, mm.num_selected)
            g = zo.projected_gradient(mm, loss_fn, z, 1e-3)
            assert g == zo.projected_gradient(mm, loss_fn, z, 1e-3)
        finally:
            torch.use_deterministic_algorithms(False)
        note["detail"] = f"g = {g:.6g} twice"
    with table.check("federation") as note:
        note["detail"] = _federation(device, work, tokenizer, tiny)
    ok = table.print(f"\ngpu_smoke on {_device_name(device)}, torch {torch.__version__}, "
                     f"{'tiny' if tiny else f'{n_params / 1e6:.0f}M'} Llama")
    return ok


def _federation(device: str, work: Path, tokenizer, tiny: bool) -> str:
    import csv

    from meerkat_hf.federated import FederationConfig, run_federation

    model, _ = build_model_and_tokenizer("cpu", tiny)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rows = [{"text": t.rsplit(" ", 1)[0], "label": int("good" in t)} for t in CORPUS if "good" in t or "bad" in t]
    path = work / "toy.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows * 2)
    cfg = FederationConfig.from_dict({
        "model": {"model_name_or_path": str(work / "model")},
        "mask": {"method": "sensitivity", "density": 0.02 if tiny else 1e-4, "calibration": "task",
                 "calibration_num_sequences": 4, "calibration_seq_len": 32},
        "task": {"name": "toy", "prompt": "{text}\nSentiment:", "verbalizer": [" bad", " good"],
                 "data_files": {"train": str(path), "test": str(path)}},
        "partition": {"scheme": "iid"}, "num_clients": 2, "rounds": 1, "local_steps": 3, "batch_size": 4,
        "max_length": 32, "eval_examples": 8, "learning_rate": 1e-3, "zo_eps": 1e-3, "device": device,
        "output_dir": str(work / "fed"), "progress": False, "plots": False, "save_final": False,
    })
    result = run_federation(cfg)
    row = result.metrics[-1]
    assert row["accepted"] == [0, 1] and not row.get("replay_mismatches"), row.get("replay_mismatches")
    return f"2 clients, 1 round on {device}: both accepted, replay mismatches {row.get('replay_mismatches') or 0}"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the ~50M one")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; nothing to smoke-test (run it on a GPU, or --device cpu --tiny)")
        return 0
    return 0 if run(args.device, args.tiny) else 1


if __name__ == "__main__":
    sys.exit(main())
