"""The recipe study: why large ZO steps collapse, and which single-site setting learns.

Two commands, both resumable (a finished run is skipped; an interrupted one continues from its
last checkpoint bit for bit):

    python research/zo_study.py prepare --out runs/study
        calibration gradient statistics once (python_docs, 64x256 and 32x128), sensitivity masks
        at densities 1e-5..1e-2 cut from them, and the zero-shot label logits of the validation
        and test splits (the zero-shot and prior-corrected zero-shot baselines).

    python research/zo_study.py run --out runs/study --name NAME --set lr=1e-4 --set steps=600 ...
        one single-site ZO run on the validation split: every `eval_every` steps the candidate
        loss, balanced accuracy, accuracy and AUC on a fixed held-out batch of validation
        examples are appended to runs/study/runs/NAME.jsonl; at the end the |delta w| spread per
        module and a forgetting probe (held-out generic text perplexity).

The loop is the library's own arithmetic (`zo.gaussian_direction`, `zo.projected_gradient`,
`zo.apply_step` on `MeerkatModel`), written out here so each switch under study (loss, scalar
clipping, step schedule, Fisher preconditioning) is one visible line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meerkat_hf import compute_mask, zo
from meerkat_hf.masks.calibration import calibration_blocks, gradient_statistics, python_docs_corpus
from meerkat_hf.classification_metrics import ClassifierScores, fit_prior_offsets
from meerkat_hf.masks.config import SparseMaskConfig
from meerkat_hf.hub.loading import load_model_and_tokenizer
from meerkat_hf.masks.mask import SparseMask, parameter_shapes
from meerkat_hf.modeling.model import MeerkatModel
from meerkat_hf.masks.selection import select_global, selectable_parameters, target_size
from meerkat_hf.tasks import (
    ClassificationCollator,
    candidate_loss,
    candidate_scores,
    candidate_token_ids,
    encode_classification,
    load_task_dataset,
)

TASK = "tweets_binary"
CALIBRATIONS = {"docs64x256": (64, 256), "docs32x128": (32, 128)}
DENSITIES = (1e-5, 1e-4, 1e-3, 1e-2)


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------- prepare
def prepare(out: Path, calibrations=tuple(CALIBRATIONS), densities=DENSITIES, top_layers=(), top_k=1062) -> None:
    """Masks (global top-k of the calibration's mean squared gradient) and the zero-shot scores.

    `top_layers` adds, for each L, the mask `{cal}-top{L}-k{top_k}`: the same scores' top `top_k`
    among the last L decoder layers and the final norm (`SparseMaskConfig(layers_to_transform=...)`),
    a mask whose ZO steps run the layers below it once (the frozen trunk).
    """
    model, tok = load_model_and_tokenizer("smollm2")
    torch.manual_seed(0)
    masks = out / "masks"
    num_layers = model.config.num_hidden_layers
    for cal in calibrations:
        n, length = CALIBRATIONS[cal]
        wanted = [f"{cal}-{d:g}" for d in densities] + [f"{cal}-top{L}-k{top_k}" for L in top_layers]
        if all((masks / w / "mask_config.json").is_file() for w in wanted):
            continue
        spec = SparseMaskConfig(calibration_num_sequences=n, calibration_seq_len=length)
        params = selectable_parameters(model, spec)
        t0 = time.perf_counter()
        blocks = calibration_blocks(model, python_docs_corpus(), tok, n, length, 0)
        stats = gradient_statistics(model, params, blocks, 1, False, True)
        _log(f"{cal}: gradient statistics in {time.perf_counter() - t0:.0f}s")
        total = sum(p.numel() for _, p in params)
        for d in densities:
            if (masks / f"{cal}-{d:g}" / "mask_config.json").is_file():
                continue
            k = target_size(total, d)
            indices = select_global(stats.sq_mean, k)
            g_p = torch.cat([stats.mean[nm].reshape(-1)[i] for nm, i in indices.items()])
            sq = torch.cat([stats.sq_mean[nm].reshape(-1)[i] for nm, i in indices.items()])
            cfg = SparseMaskConfig(density=d, calibration_num_sequences=n, calibration_seq_len=length,
                                   calibration_source="python_docs", base_model_name_or_path="smollm2")
            mask = SparseMask(config=cfg, indices=indices, shapes=parameter_shapes(model), pretrain_grad=g_p)
            target = masks / f"{cal}-{d:g}"
            mask.save_pretrained(target, model_card=False)
            torch.save(sq, target / "sq_grad.pt")
            _log(f"mask {target.name}: k={k}")
        for L in top_layers:
            cfg = SparseMaskConfig(density=1e-5, layers_to_transform=list(range(num_layers - L, num_layers)),
                                   calibration_num_sequences=n, calibration_seq_len=length,
                                   calibration_source="python_docs", base_model_name_or_path="smollm2")
            allowed = {nm for nm, _ in selectable_parameters(model, cfg)}
            cfg.density = top_k / sum(p.numel() for nm, p in params if nm in allowed)
            indices = select_global({nm: v for nm, v in stats.sq_mean.items() if nm in allowed}, top_k)
            g_p = torch.cat([stats.mean[nm].reshape(-1)[i] for nm, i in indices.items()])
            sq = torch.cat([stats.sq_mean[nm].reshape(-1)[i] for nm, i in indices.items()])
            mask = SparseMask(config=cfg, indices=indices, shapes=parameter_shapes(model), pretrain_grad=g_p)
            target = masks / f"{cal}-top{L}-k{top_k}"
            mask.save_pretrained(target, model_card=False)
            torch.save(sq, target / "sq_grad.pt")
            _log(f"mask {target.name}: k={top_k} in the last {L} layers and the final norm")
        del stats
    for split in ("validation", "test"):
        path = out / f"zeroshot_{split}.pt"
        if path.is_file():
            continue
        ds = load_task_dataset(TASK, split)
        t0 = time.perf_counter()
        scores, labels = candidate_scores(model, tok, TASK, ds, batch_size=32, max_length=64)
        torch.save({"scores": scores, "labels": labels}, path)
        _log(f"zero-shot {split}: {len(labels)} examples in {time.perf_counter() - t0:.0f}s")
    val = torch.load(out / "zeroshot_validation.pt")
    test = torch.load(out / "zeroshot_test.pt")
    offsets = fit_prior_offsets(val["scores"].numpy(), val["labels"].numpy())
    summary = {}
    for split, d in (("validation", val), ("test", test)):
        cs = ClassifierScores(d["scores"].numpy(), d["labels"].numpy())
        summary[split] = {"zero_shot": cs.report(), "prior_corrected": cs.report(offsets)}
    summary["offsets"] = offsets.tolist()
    (out / "baselines.json").write_text(json.dumps(summary, indent=1))
    for split in ("validation", "test"):
        z, p = summary[split]["zero_shot"], summary[split]["prior_corrected"]
        _log(f"{split}: zero-shot acc {z['accuracy']:.4f} bal {z['balanced_accuracy']:.4f} auc {z['auc']:.4f} | "
             f"prior-corrected acc {p['accuracy']:.4f} bal {p['balanced_accuracy']:.4f}")


# ----------------------------------------------------------------------------------------- run
@dataclass
class RunConfig:
    mask: str = "docs64x256-0.001"
    lr: float = 1e-4
    eps: float = 1e-3
    q: int = 1
    batch_size: int = 16
    max_length: int = 64
    loss: str = "candidates"  # candidates | lm | balanced (class-weighted candidate CE)
    steps: int = 600
    schedule: str = "constant"  # constant | linear | cosine
    warmup: int = 0
    clip: float = 0.0  # |g| clipped to this (0 = off)
    precond: str = "none"  # none | fisher: z scaled by (sq_grad + damp)^-1/2, unit mean square
    precond_damp: float = 0.0  # relative to the mean masked sq_grad
    seed: int = 0
    eval_every: int = 100
    eval_examples: int = 512
    train_examples: int = 0  # 0 = the whole train split
    optimizer: str = "zo"  # zo | fo (first-order SGD on the same masked coordinates, the reference)
    estimator: str = "spsa"  # spsa | fzoo (zo.step_scalars)
    precision: str = "fp32"  # the forwards' precision (meerkat_hf.modeling.precision): fp32 | bf16-mixed | bf16 | autocast
    task: str = TASK
    threads: int = 0  # torch threads (0: torch's default)


def _parse_sets(pairs: list[str]) -> RunConfig:
    kinds = {f.name: f.type for f in fields(RunConfig)}
    values = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in kinds:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(kinds)}")
        kind = kinds[key]
        values[key] = raw if kind in ("str", str) else (int(float(raw)) if kind in ("int", int) else float(raw))
    return RunConfig(**values)


def _lr_at(cfg: RunConfig, step: int) -> float:
    scale = 1.0
    if cfg.warmup and step < cfg.warmup:
        scale = (step + 1) / cfg.warmup
    elif cfg.schedule == "linear":
        scale = 1.0 - (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    elif cfg.schedule == "cosine":
        scale = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    return cfg.lr * scale


def _module_kind(name: str) -> str:
    return name.split(".")[-2] if name.endswith(".weight") else name


def run(out: Path, name: str, cfg: RunConfig) -> None:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    log_path, ckpt_path = runs / f"{name}.jsonl", runs / f"{name}.ckpt.pt"
    if log_path.is_file() and any(json.loads(line).get("final") for line in log_path.read_text().splitlines()):
        _log(f"{name}: finished already")
        return
    torch.manual_seed(0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model_and_tokenizer("smollm2")
    mask = build_mask(out, cfg.mask, model, tok)
    mm = MeerkatModel(model, mask)
    mm.set_forward_precision(cfg.precision)
    k = mm.num_selected
    task = cfg.task
    cand = candidate_token_ids(tok, task)
    collate = ClassificationCollator(tok)
    train = load_task_dataset(task, "train")
    if cfg.train_examples:
        train = train.select(range(min(cfg.train_examples, len(train))))
    train_enc = encode_classification(tok, task, train, cfg.max_length).with_format(None).to_dict()
    val = load_task_dataset(task, "validation")
    val = val.shuffle(seed=1234).select(range(min(cfg.eval_examples, len(val)))) if task != TASK else \
        val.select(range(cfg.eval_examples))  # tweets_binary keeps the study's first-512 yardstick
    val_enc = encode_classification(tok, task, val, cfg.max_length, include_label_word=False)
    n_train = len(train_enc["label"])
    prior = np.bincount(train_enc["label"], minlength=len(cand)) / n_train
    class_weight = torch.tensor(1.0 / (len(cand) * prior), dtype=torch.float32)
    scale = None
    if cfg.precond == "fisher":
        sq = torch.load(out / "masks" / cfg.mask / "sq_grad.pt").float()
        sq = sq + cfg.precond_damp * sq.mean()
        scale = sq.rsqrt()
        scale = scale / scale.pow(2).mean().sqrt()  # unit mean square: E|s*z|^2 = k, lr stays comparable
    base_model = mm.base_model

    def batch_loss(batch) -> torch.Tensor:
        if cfg.loss == "lm":
            return base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"], use_cache=False).loss
        # the library's own candidate loss (balanced: the batch mean of w_y * l since 68d9b60; runs recorded
        # before it used F.cross_entropy's weighted ratio, sum w_y l / sum w_y)
        return candidate_loss(base_model, batch, cand, class_weight if cfg.loss == "balanced" else None)

    def evaluate() -> dict:
        scores, labels = candidate_scores(base_model, tok, task, val_enc, batch_size=32)
        loss = float(F.cross_entropy(scores, labels))
        rep = ClassifierScores(scores.float().numpy(), labels.numpy()).report(resamples=200)
        return {"val_loss": loss, "bal_acc": rep["balanced_accuracy"], "acc": rep["accuracy"], "auc": rep.get("auc"),
                "pred_pos": rep["predicted_rate"][1]}

    start, train_s = 0, 0.0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path)
        mm.set_values(state["values"])
        start, train_s = state["step"], state.get("train_s", 0.0)
        _log(f"{name}: resumed at step {start}")
    else:
        log_path.write_text("")
        row = {"step": 0, "forward_passes": 0, "train_s": 0.0, **evaluate(), "config": asdict(cfg), "k": k}
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _log(f"{name} step 0: {row}")
    rng_seed = zo.derive_seed(cfg.seed, 7)
    t0 = time.perf_counter()
    abs_g: list[float] = []
    skipped = 0
    for step in range(start, cfg.steps):
        order = np.random.default_rng(zo.derive_seed(rng_seed, step)).choice(n_train, cfg.batch_size, replace=False)
        batch = collate([{c: train_enc[c][i] for c in ("input_ids", "attention_mask", "labels", "label")} for i in order])
        seeds = tuple(zo.derive_seed(cfg.seed, step, j) for j in range(cfg.q))
        dirs = [zo.gaussian_direction(s, k) for s in seeds]
        if scale is not None:
            dirs = [z * scale for z in dirs]
        if cfg.optimizer == "fo":  # first-order SGD on the same coordinates: the reference
            names = set(mask.indices)
            for nm, p in base_model.named_parameters():
                p.requires_grad_(nm in names)
            with torch.enable_grad():
                base_model.zero_grad(set_to_none=True)
                batch_loss(batch).backward()
            g_fo = _masked_grad(base_model, mask)
            base_model.zero_grad(set_to_none=True)
            for p in base_model.parameters():
                p.requires_grad_(False)
            abs_g.append(float(g_fo.norm()))
            mm.values.add_(g_fo, alpha=-_lr_at(cfg, step))
            mm.sync_weights()
            grads = None
        else:
            grads = zo.step_scalars(mm, lambda: batch_loss(batch), dirs, cfg.eps, cfg.estimator)
            if grads is None:  # fzoo: no spread among the perturbed losses
                skipped += 1
                continue
        if grads is None:
            pass
        elif not all(math.isfinite(g) for g in grads):
            skipped += 1
            continue
        else:
            abs_g.append(float(np.mean(np.abs(grads))))
            if cfg.clip > 0:
                grads = [max(-cfg.clip, min(cfg.clip, g)) for g in grads]
            zo.apply_step(mm.values, zo.ZOStep(seeds, tuple(grads), _lr_at(cfg, step)), directions=dirs)
            mm.sync_weights()
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - t0
            train_s += elapsed
            delta = mm.delta
            per_step = 3 if cfg.optimizer == "fo" else zo.forwards_per_step(cfg.estimator, cfg.q)  # backward ~ 2 fwd
            passes = per_step * cfg.batch_size * done
            row = {"step": done, "forward_passes": passes, "train_s": train_s, **evaluate(),
                   "mean_abs_g": float(np.mean(abs_g)) if abs_g else None, "skipped": skipped,
                   "delta_norm": float(delta.norm()), "delta_max": float(delta.abs().max()),
                   "sec_per_step": elapsed / max(1, len(abs_g))}
            abs_g = []
            if done == cfg.steps:
                row["final"] = True
                row["delta_by_module"] = _delta_by_module(mm)
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            torch.save({"values": mm.values.clone(), "step": done, "train_s": train_s}, ckpt_path)
            _log(f"{name} step {done}: " + " ".join(f"{k2}={v:.4g}" for k2, v in row.items() if isinstance(v, float)))
            t0 = time.perf_counter()


def _delta_by_module(mm: MeerkatModel) -> dict:
    """Share of the squared delta per module kind and the share held by the top 10 coordinates."""
    delta = mm.delta
    sq = delta.pow(2)
    total = float(sq.sum()) or 1.0
    out: dict[str, float] = {}
    for s in mm.sparse.slices:
        kind = _module_kind(s.name)
        out[kind] = out.get(kind, 0.0) + float(sq[s.start : s.stop].sum()) / total
    out["top10_share"] = float(torch.topk(sq, min(10, sq.numel())).values.sum()) / total
    return out


# -------------------------------------------------------------------------------------- diagnose
def _masked_grad(model, mask: SparseMask) -> torch.Tensor:
    """The gradient at the masked coordinates, canonical order (a k-vector)."""
    params = dict(model.named_parameters())
    parts = []
    for nm, idx in mask.indices.items():
        g = params[nm].grad.reshape(-1)
        parts.append((g if idx is None else g[idx]).float().clone())
    return torch.cat(parts)


def _random_mask(model, k: int, seed: int) -> SparseMask:
    spec = SparseMaskConfig(method="random", seed=seed)
    params = selectable_parameters(model, spec)
    gen = torch.Generator().manual_seed(seed)
    scores = {nm: torch.rand(p.numel(), generator=gen) for nm, p in params}
    indices = select_global(scores, k)
    return SparseMask(config=spec, indices=indices, shapes=parameter_shapes(model),
                      pretrain_grad=torch.zeros(sum(int(i.numel()) for i in indices.values())))


def _head_mask(model, tok) -> SparseMask:
    """The label words' rows of the (tied) embedding: a 2 x hidden "task head", study-only."""
    shapes = parameter_shapes(model)
    name = next(n for n, _ in model.named_parameters() if "embed_tokens" in n)
    hidden = shapes[name][1]
    rows = sorted(candidate_token_ids(tok, TASK))
    idx = torch.cat([torch.arange(r * hidden, (r + 1) * hidden) for r in rows])
    return SparseMask(config=SparseMaskConfig(method="random"), indices={name: idx}, shapes=shapes,
                      pretrain_grad=torch.zeros(idx.numel()))


def _union(a: SparseMask, b: SparseMask) -> SparseMask:
    indices = dict(a.indices)
    for nm, idx in b.indices.items():
        indices[nm] = idx if nm not in indices else torch.unique(torch.cat([indices[nm], idx]))
    return SparseMask(config=a.config, indices=indices, shapes=a.shapes)


def _top_subset(mask: SparseMask, sq: torch.Tensor, k: int) -> SparseMask:
    keep = torch.zeros(sq.numel(), dtype=torch.bool)
    keep[torch.topk(sq, k).indices] = True
    indices, start = {}, 0
    for nm, idx in mask.indices.items():
        part = keep[start:start + idx.numel()]
        if part.any():
            indices[nm] = idx[part]
        start += idx.numel()
    return SparseMask(config=mask.config, indices=indices, shapes=mask.shapes, pretrain_grad=mask.pretrain_grad[keep])


def build_mask(out: Path, spec: str, model, tok) -> SparseMask:
    """`NAME` (under out/masks), `random-NAME` (random, same k), `head`, `finalnorm`, or `A+B` (union)."""
    if "+" in spec:
        parts = [build_mask(out, s, model, tok) for s in spec.split("+")]
        mask = parts[0]
        for m in parts[1:]:
            mask = _union(mask, m)
        return mask
    if spec == "head":
        return _head_mask(model, tok)
    if spec == "finalnorm":  # every weight of the final norm: a mask above all decoder layers (the frozen trunk)
        return compute_mask(model, SparseMaskConfig(method="random", density=1.0, include_patterns=[r"^model\.norm\."]),
                            progress=False)
    if "@" in spec:  # NAME@K: the K most sensitive coordinates of a saved mask (= the global top K)
        name, _, kk = spec.partition("@")
        return _top_subset(SparseMask.from_pretrained(out / "masks" / name), torch.load(out / "masks" / name / "sq_grad.pt"), int(kk))
    if spec.startswith("random-"):
        ref = SparseMask.from_pretrained(out / "masks" / spec[len("random-"):])
        return _random_mask(model, ref.num_selected, 0)
    return SparseMask.from_pretrained(out / "masks" / spec)


def diagnose(out: Path, masks: list[str], n_batches: int, batch_size: int, curv_dirs: int, loss_kind: str) -> None:
    """Predict what ZO-SGD can gain per step on each mask, from first-order measurements.

    For SPSA with z ~ N(0, diag(s^2)) and a minibatch gradient g_b, one step of size lr changes the
    loss by  -lr |s*G|^2  +  lr^2/2 * E[(z.g_b)^2] * E[z^T H z]  (G: the full-data gradient).
    The best lr is  lr* = |s*G|^2 / (E|s*g_b|^2 * E[z^T H z])  and it buys
    delta* = |s*G|^4 / (2 E|s*g_b|^2 E[z^T H z])  per step. We measure |s*G|^2 (unbiased, from
    n_batches minibatch gradients), E|s*g_b|^2, and E[z^T H z] by second differences along
    curv_dirs random directions on a fixed 64-example batch. First-order SGD's descent at its own
    lr is the comparison.
    """
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("smollm2")
    cand = candidate_token_ids(tok, TASK)
    collate = ClassificationCollator(tok)
    train = load_task_dataset(TASK, "train")
    enc = encode_classification(tok, TASK, train, 64).with_format(None).to_dict()
    n_train = len(enc["label"])
    prior = np.bincount(enc["label"], minlength=len(cand)) / n_train
    weight = torch.tensor(1.0 / (len(cand) * prior), dtype=torch.float32) if loss_kind == "balanced" else None
    rng = np.random.default_rng(123)

    def make(idx):
        return collate([{c: enc[c][i] for c in ("input_ids", "attention_mask", "labels", "label")} for i in idx])

    batches = [make(rng.choice(n_train, batch_size, replace=False)) for _ in range(n_batches)]
    fixed = make(rng.choice(n_train, 64, replace=False))

    def loss_of(batch):
        return candidate_loss(model, batch, cand, weight)

    results = out / "diagnose.jsonl"
    for spec in masks:
        name, _, pre = spec.partition(":")
        mask = build_mask(out, name, model, tok)
        k = mask.num_selected
        scale = torch.ones(k)
        if pre.startswith("fisher"):
            damp = float(pre.split("=")[1]) if "=" in pre else 0.01
            sq = torch.load(out / "masks" / name / "sq_grad.pt").float()
            scale = (sq + damp * sq.mean()).rsqrt()
            scale = scale / scale.pow(2).mean().sqrt()
        names = set(mask.indices)
        for nm, p in model.named_parameters():
            p.requires_grad_(nm in names)
        t0 = time.perf_counter()
        grads = []
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss_of(b).backward()
            grads.append(_masked_grad(model, mask) * scale)
        G = torch.stack(grads)  # [n, k], already in the s-scaled coordinates
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
        mean = G.mean(0)
        noise = (G - mean).pow(2).sum(1).mean()  # E|g_b - G|^2 (per minibatch)
        full_sq = float(mean.pow(2).sum() - noise / n_batches)  # unbiased |s*G|^2
        mb_sq = float(G.pow(2).sum(1).mean())
        mm = MeerkatModel(model, mask)
        base = mm.values.clone()
        with torch.no_grad():
            l0 = float(loss_of(fixed))
            curv = []
            for j in range(curv_dirs):
                z = zo.gaussian_direction(zo.derive_seed(99, j), k) * scale
                for eps in (1e-3, 3e-3):
                    mm.set_values(base + eps * z); lp = float(loss_of(fixed))
                    mm.set_values(base - eps * z); lm = float(loss_of(fixed))
                    curv.append({"eps": eps, "zHz": (lp + lm - 2 * l0) / eps**2})
            mm.set_values(base)
        zhz = float(np.mean([c["zHz"] for c in curv if c["eps"] == 3e-3]))
        zhz_small = float(np.mean([c["zHz"] for c in curv if c["eps"] == 1e-3]))
        lr_star = full_sq / (mb_sq * zhz) if zhz > 0 and full_sq > 0 else float("nan")
        delta_star = full_sq**2 / (2 * mb_sq * zhz) if zhz > 0 and full_sq > 0 else float("nan")
        row = {"mask": spec, "k": k, "loss": loss_kind, "batch_size": batch_size, "full_grad_sq": full_sq,
               "minibatch_grad_sq": mb_sq, "zHz_eps3e-3": zhz, "zHz_eps1e-3": zhz_small, "zHz_per_coord": zhz / k,
               "lr_star": lr_star, "loss_drop_per_step_at_lr_star": delta_star,
               "steps_for_0.01_loss_drop": 0.01 / delta_star if delta_star > 0 else None,
               "top1pct_grad_share": float(torch.topk(mean.pow(2), max(1, k // 100)).values.sum() / mean.pow(2).sum()),
               "sec": time.perf_counter() - t0}
        del mm
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _log(" ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items()))


# ------------------------------------------------------------------------------------------- test
def test(out: Path, name: str) -> None:
    """The test split, once: a study run's last checkpoint against zero-shot and prior-corrected
    zero-shot (offsets fitted on validation), paired bootstrap intervals of the balanced-accuracy
    gain, and the forgetting probe (held-out generic perplexity, fixed greedy generations)."""
    from learning_curve import forgetting

    from meerkat_hf.classification_metrics import paired_auc_gain, paired_gain

    runs = out / "runs"
    cfg = RunConfig(**json.loads((runs / f"{name}.jsonl").read_text().splitlines()[0])["config"])
    state = torch.load(runs / f"{name}.ckpt.pt")
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("smollm2")
    mm = MeerkatModel(model, build_mask(out, cfg.mask, model, tok))
    task = cfg.task
    encoded = {split: encode_classification(tok, task, load_task_dataset(task, split), cfg.max_length,
                                            include_label_word=False) for split in ("test", "validation")}
    zero_shot = {}
    for split, enc in encoded.items():  # the zero-shot scores, computed once per task and split (fp32 forwards)
        path = out / (f"zeroshot_{split}.pt" if task == TASK else f"zeroshot_{task}_{split}.pt")
        if not path.is_file():
            scores, labels = candidate_scores(mm.base_model, tok, task, enc, batch_size=32)
            torch.save({"scores": scores, "labels": labels}, path)
        zero_shot[split] = torch.load(path)
    zs, val = zero_shot["test"], zero_shot["validation"]
    mm.set_values(state["values"])
    mm.set_forward_precision(cfg.precision)  # the trained model is scored under the numerics it trained with
    scores, labels = candidate_scores(mm.base_model, tok, task, encoded["test"], batch_size=32)
    assert torch.equal(labels, zs["labels"])
    offsets = fit_prior_offsets(val["scores"].numpy(), val["labels"].numpy())
    # the trained model gets the same post-processing as the baseline: offsets fitted on validation
    val_scores, val_labels = candidate_scores(mm.base_model, tok, task, encoded["validation"], batch_size=32)
    offsets_trained = fit_prior_offsets(val_scores.numpy(), val_labels.numpy())
    trained, zero = ClassifierScores(scores.numpy(), labels.numpy()), ClassifierScores(zs["scores"].numpy(), labels.numpy())
    y = labels.numpy()
    row = {"name": name, "step": state["step"], "config": asdict(cfg), "split": "test",
           "trained": trained.report(), "zero_shot": zero.report(), "prior_corrected": zero.report(offsets),
           "gain_over_zero_shot": paired_gain(zero.predictions(), trained.predictions(), y),
           "auc_gain_over_zero_shot": paired_auc_gain(zero.scores, trained.scores, y),
           "gain_over_prior_corrected": paired_gain(zero.predictions(offsets), trained.predictions(), y),
           "trained_prior_corrected": trained.report(offsets_trained),
           "corrected_gain_over_prior_corrected": paired_gain(zero.predictions(offsets), trained.predictions(offsets_trained), y),
           "forgetting": forgetting(mm, tok)}
    with (out / "test_results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    t, g, gp, fg = row["trained"], row["gain_over_zero_shot"], row["gain_over_prior_corrected"], row["forgetting"]
    _log(f"{name} TEST step {state['step']}: balanced acc {t['balanced_accuracy']:.4f} {t['balanced_accuracy_ci']} "
         f"(zero-shot {row['zero_shot']['balanced_accuracy']:.4f}, prior-corrected {row['prior_corrected']['balanced_accuracy']:.4f}) | "
         f"gain {g['gain']:+.4f} {g['gain_ci']} | AUC gain {row['auc_gain_over_zero_shot']['gain']:+.4f} "
         f"{row['auc_gain_over_zero_shot']['gain_ci']} | over prior-corrected {gp['gain']:+.4f} {gp['gain_ci']} | "
         f"both prior-corrected: {row['trained_prior_corrected']['balanced_accuracy']:.4f}, gain "
         f"{row['corrected_gain_over_prior_corrected']['gain']:+.4f} {row['corrected_gain_over_prior_corrected']['gain_ci']} | "
         f"perplexity {fg['perplexity_before']:.3f} -> {fg['perplexity_after']:.3f}, generations changed {fg['generations_changed']}")


# ------------------------------------------------------------------------------------------- plot
def plot(logs: Path, png: Path, names: list[str] | None = None) -> None:
    """Validation balanced accuracy and AUC against forward passes, one line per study run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in sorted(logs.glob("*.jsonl")):
        if path.stem in ("diagnose", "test_results") or (names and path.stem not in names):
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "bal_acc" in r]
        if len(rows) < 2:
            continue
        x = [r["forward_passes"] for r in rows]
        style = "--" if path.stem.startswith("fo_") else "-"
        label = f"{path.stem} ({rows[0].get('config', {}).get('eval_examples', '?')} ex.)"
        axes[0].plot(x, [r["bal_acc"] for r in rows], style, marker="o", ms=3, label=label)
        axes[1].plot(x, [r["auc"] for r in rows], style, marker="o", ms=3, label=label)
    first = json.loads(next(p for p in sorted(logs.glob("d1e-5*.jsonl"))).read_text().splitlines()[0])
    for ax, key, title in ((axes[0], "bal_acc", "balanced accuracy"), (axes[1], "auc", "ROC-AUC")):
        ax.axhline(first[key], color="grey", ls=":", lw=1, label="zero-shot (same 512 examples)")
        ax.set_xlabel("forward passes (a ZO step = 2 x batch; an FO step counted as 3 x batch)")
        ax.set_ylabel(f"validation {title} (fixed batch; 512 ex.: +-0.04)")
        ax.set_ylim(0.5 if key == "bal_acc" else 0.55, 0.9)
    axes[0].axhline(0.5, color="red", ls="-.", lw=1, label="majority class")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle("SmolLM2-135M-Instruct, tweets_binary, single site: ZO (solid) vs first-order SGD on the same mask (dashed)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    _log(f"wrote {png}")


def curves(logs: Path, png: Path, names: list[str], title: str = "") -> None:
    """Validation balanced accuracy and AUC against forward passes and against training minutes (2 x 2 panels).

    Minutes are each run's own `train_s` (training only: evaluation excluded), so runs that shared the
    machine compare fairly only when they ran side by side under the same load; the caption says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    zero = None
    for index, name in enumerate(names):
        path = logs / f"{name}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "bal_acc" in r]
        if len(rows) < 2:
            continue
        zero = zero or rows[0]
        cfg = rows[0].get("config", {})
        style = "--" if cfg.get("optimizer") == "fo" else "-"
        label = f"{name} (lr {cfg.get('lr', '?'):g})"
        for col, xkey, scale in ((0, "forward_passes", 1.0), (1, "train_s", 1 / 60)):
            if any(xkey not in r for r in rows):
                continue  # runs recorded before train_s existed have no minutes axis
            xs = [r[xkey] * scale for r in rows]
            color = f"C{index % 10}"  # one color per run in every panel
            axes[0, col].plot(xs, [r["bal_acc"] for r in rows], style, marker="o", ms=3, label=label, color=color)
            axes[1, col].plot(xs, [r["auc"] for r in rows], style, marker="o", ms=3, label=label, color=color)
    for row, key, what in ((0, "bal_acc", "balanced accuracy"), (1, "auc", "AUC (pairwise, prior-free)")):
        for col, xlabel in ((0, "example forward passes (batch x forwards; an FO step = 3 x batch)"),
                            (1, "training minutes (evaluation excluded; 1 torch thread per run)")):
            ax = axes[row, col]
            if zero is not None:
                ax.axhline(zero[key], color="grey", ls=":", lw=1, label="zero-shot")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"validation {what}")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "SmolLM2-135M-Instruct, single site: ZO estimators (solid) and first-order SGD (dashed)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    _log(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", default="runs/study")
    pp.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=list(CALIBRATIONS))
    pp.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    pp.add_argument("--top-layers", nargs="*", type=int, default=[], help="also masks of the top k in the last L layers")
    pp.add_argument("--top-k", type=int, default=1062)
    pr = sub.add_parser("run")
    pr.add_argument("--out", default="runs/study")
    pr.add_argument("--name", required=True)
    pr.add_argument("--set", action="append", default=[])
    pd = sub.add_parser("diagnose")
    pd.add_argument("--out", default="runs/study")
    pd.add_argument("--masks", nargs="+", default=["docs64x256-0.001", "docs64x256-0.001:fisher"])
    pd.add_argument("--batches", type=int, default=24)
    pd.add_argument("--batch-size", type=int, default=8)
    pd.add_argument("--dirs", type=int, default=6)
    pd.add_argument("--loss", default="balanced")
    pt = sub.add_parser("test")
    pt.add_argument("--out", default="runs/study")
    pt.add_argument("--name", required=True)
    pc = sub.add_parser("curves", help="balanced accuracy and AUC against forward passes and minutes")
    pc.add_argument("--out", default="runs/study")
    pc.add_argument("--names", nargs="+", required=True)
    pc.add_argument("--png", required=True)
    pc.add_argument("--title", default="")
    pp2 = sub.add_parser("plot")
    pp2.add_argument("--out", default="runs/study")
    pp2.add_argument("--logs", default="research/results/zo_study")
    pp2.add_argument("--png", default="research/results/zo_study/learning_curves.png")
    pp2.add_argument("--names", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "prepare":
        prepare(out, tuple(args.calibrations), tuple(args.densities), tuple(args.top_layers), args.top_k)
    elif args.cmd == "plot":
        plot(Path(args.logs), Path(args.png), args.names)
    elif args.cmd == "curves":
        curves(out / "runs", Path(args.png), args.names, args.title)
    elif args.cmd == "test":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        test(out, args.name)
    elif args.cmd == "diagnose":
        diagnose(out, args.masks, args.batches, args.batch_size, args.dirs, args.loss)
    else:
        run(out, args.name, _parse_sets(args.set))


if __name__ == "__main__":
    sys.exit(main())
