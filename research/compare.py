"""The paper's comparison at a budget that separates the methods (issue 13, item 1).

Meerkat vs Full-FedZO vs LoRA-FedZO vs a weight-magnitude mask vs a random mask, plus first-order
FedAvg on Meerkat's mask as the reference: SmolLM2-135M-Instruct, `tweets_binary` (all train
tweets), 10 clients, Dirichlet alpha=0.5, T local steps, the recipe of RESULTS.md ("Does it
learn?": density 1e-5, class-balanced loss), the same rounds x clients x T ZO steps (two forward
passes each; fo-fedavg: one forward + one backward) for every method.

The search is the same for every method: three learning rates half a decade apart around the
method's published/pilot value, seed 0, judged by the last round's *validation* balanced
accuracy (512 examples); when the best one is at an edge of the grid, one more point beyond that
edge is run (once; when all three tie, above the grid). Then seeds 1 and 2 run at the chosen lr at the same budget, and the chosen
lr's three cells are scored on the whole *test* split (the selection code never reads it). Meerkat's
three chosen-lr cells were also continued to LONG_ROUNDS rounds and scored (`Method.long`): 700 more
steps did not raise its test score (see LONG_ROUNDS), so no other method spends them.

    python research/compare.py prepare                 # zero-shot test predictions, the masks (cached)
    nohup python research/compare.py run --worker 0/2 &   # one per core; resumable, cells claimed by file
    nohup python research/compare.py run --worker 1/2 &
    nohup python research/compare.py --study all run &    # the comparison, then the vp-effect and dp studies
    touch runs/compare/STOP                              # workers exit after their current task
    python research/compare.py status                  # what is done, claimed, waiting
    python research/compare.py table                   # markdown tables (validation search, test mean +- std)
    python research/compare.py plot                    # curves per method (validation, chosen lr, mean of seeds)

A killed cell resumes from its last round checkpoint (`resume=true`); a finished cell is one line
of `cells.jsonl`, so rerunning `run` only does what is missing. `--set key=value` changes the
shared settings (a different grid: use another `--out`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from render_results import t_interval  # research/: the docs' Student-t interval (standard library only, cheap)

TASK = "tweets_binary"

# Settings every method shares: the paper's T=10 Non-IID setting at the recipe of "Does it learn?".
COMMON = [
    "num_clients=10", "client_fraction=1.0", "partition.scheme=dirichlet", "partition.alpha=0.5",
    "partition.num_single_label_clients=0", "local_steps=10", "rounds=3", "batch_size=8", "max_length=64",
    "zo_eps=1e-3", "task.loss=balanced", "task.max_train_examples=null", "task.eval_split=validation",
    "eval_examples=512", "eval_every=1", "vp.calibration_local_steps=null", "mask.density=1e-5",
    "mask.calibration=python_docs", "mask.calibration_num_sequences=64", "mask.calibration_seq_len=256",
    # simulated clients take the server's state instead of replaying the records themselves: the
    # same bits (tests/test_federated_driver.py), the same downlink bytes counted, one replay less
    "simulate_downlink=false", "torch_threads=1", "progress=false", "plots=false", "save_final=false", "resume=true", "keep_checkpoints=1",
]


@dataclass(frozen=True)
class Method:
    name: str
    overrides: tuple[str, ...]
    lrs: tuple[float, ...]  # the search grid, half a decade apart, centred on the prior value
    why: str
    extend: bool = True  # a winner at the grid's edge gets one more point beyond it (False: a fixed lr)
    # also continue the chosen-lr cells to LONG_ROUNDS and score them (an extra row, not the comparison's)
    long: bool = False
    # the long cells continue the search-budget cells (False: they run from scratch in their own folder;
    # a target epsilon's noise is solved for the whole run's rounds, so a DP run cannot be extended)
    continues: bool = True


# Grids: every one is 3 points x sqrt(10) apart around a value from ../shared/ZO_REFERENCES.md or our study.
METHODS = {
    "meerkat": Method("meerkat", ("algorithm=meerkat",), (1e-4, 3e-4, 1e-3),
                      "sensitivity mask (calibration text) at density 1e-5; the study's 1e-4..3e-4", long=True),
    "magnitude": Method("magnitude", ("algorithm=magnitude",), (1e-4, 3e-4, 1e-3),
                        "largest-|w| mask, same density and grid as Meerkat"),
    "random": Method("random", ("algorithm=random",), (1e-4, 3e-4, 1e-3), "random mask, same density and grid"),
    "lora-fedzo": Method("lora-fedzo", ("algorithm=lora-fedzo",), (3e-5, 1e-4, 3e-4),
                         "ZO on a rank-8 LoRA adapter (q, v); MeZO+LoRA used 5e-5..1e-4"),
    "fo-fedavg": Method("fo-fedavg", ("algorithm=fo-fedavg",), (3e-3, 1e-2, 3e-2),
                        "first-order SGD on Meerkat's mask (reference); single-site FO learned at 1e-2"),
    "full-fedzo": Method("full-fedzo", ("algorithm=full-fedzo",), (1e-6, 3e-6, 1e-5),
                         "ZO on all parameters; DeComFL used 5e-6 on OPT-125m, MeZO 1e-6..1e-7"),
}
# Issue 13, item 3: Meerkat-VP vs Meerkat vs random early stopping, with single-label clients present.
# No lr search of their own: VP and its control are schedules on top of Meerkat, run at the lr
# Meerkat's search chose above (3e-4), so the only difference between the rows is who is limited.
# The detector's thresholds are the ones `vp_detector.py tune --tune 0-3` chose on its own tuning
# federations at this lr and T (research/results/vp_detector/detector.json), not the package's
# defaults (F1 0.26 there): VP at its best-informed setting. vp-random mirrors VP's count, so it runs them too.
VP_DETECTOR = ("vp.early_fraction=0.5", "vp.late_fraction=0.2", "vp.ratio_threshold=0.5", "vp.quiet_rel_tau=0.05",
               "vp.quiet_fraction=0.5", "vp.rule=any", "vp.min_steps=1")
VP_SHAPE = ("partition.num_single_label_clients=3", "vp.calibration_local_steps=null", "vp.calibration_participations=1",
            *VP_DETECTOR)
VP_LR = (3e-4,)
VP_METHODS = {
    "vp-none": Method("vp-none", ("algorithm=meerkat", *VP_SHAPE), VP_LR, "plain Meerkat: nobody limited", False),
    "vp-gradip": Method("vp-gradip", ("algorithm=meerkat-vp", *VP_SHAPE), VP_LR,
                        "Meerkat-VP: clients flagged by GradIP in round 1 take 1 local step per round", False),
    "vp-random": Method("vp-random", ("algorithm=random-early-stop", *VP_SHAPE), VP_LR,
                        "the control: as many clients as VP flags, chosen at random, limited", False),
}
# Issue 14, item 4: utility of example-level DP at epsilon 1, 3, 8 (delta 1e-5, over the whole run,
# per client), federated (the comparison's shape; its non-private row is `meerkat`) and single site
# (one client holding all train tweets, T = 100: the same 300 ZO steps). Each searches its lr like
# every other row. The clip is fixed beforehand: the median |g_i| of per-example projected gradients
# at the initial model (`compare.py dp-clip`: 256 train tweets in 32 batches, one direction each).
DP_CLIP = 4.4  # median |g_i| = 4.41 (25% 1.96, 75% 9.43), `compare.py dp-clip`, 2026-12-02
DP_EPSILONS = (8, 3, 1)
_DP = ("algorithm=meerkat", f"dp.clip={DP_CLIP:g}", "dp.delta=1e-5")
SITE_SHAPE = ("num_clients=1", "partition.scheme=iid", "local_steps=100")
DP_METHODS = {
    **{f"dp-eps{e}": Method(f"dp-eps{e}", (*_DP, f"dp.target_epsilon={e}"), (1e-4, 3e-4, 1e-3),
                            f"Meerkat, example-level DP at epsilon {e}, 10 clients", continues=False) for e in DP_EPSILONS},
    "site": Method("site", ("algorithm=meerkat", *SITE_SHAPE), (1e-4, 3e-4, 1e-3), "Meerkat, one site, no DP"),
    **{f"site-dp-eps{e}": Method(f"site-dp-eps{e}", (*_DP, f"dp.target_epsilon={e}", *SITE_SHAPE), (1e-4, 3e-4, 1e-3),
                                 f"Meerkat, one site, example-level DP at epsilon {e}", continues=False)
       for e in DP_EPSILONS},
}
STUDIES = {"compare": METHODS, "vp-effect": VP_METHODS, "dp": {"meerkat": METHODS["meerkat"], **DP_METHODS}}
ALL_METHODS = {**METHODS, **VP_METHODS, **DP_METHODS}
STUDIES["all"] = ALL_METHODS  # `run --study all`: the workers go on from one study to the next
SEEDS = (0, 1, 2)
# The longer budget, measured on Meerkat only. At 300 steps (the search's) Meerkat's chosen lr moved
# *test* balanced accuracy by +0.000 / +0.013 / +0.010 (seeds 0-2), too little to separate methods,
# so its chosen-lr cells were continued from their round-3 checkpoints to LONG_ROUNDS rounds (1,000
# local steps per client set; rounds 1-3 are the very bits of the search cell), validated every
# LONG_EVAL_EVERY rounds: test gains +0.002 and +0.015 (seeds 0, 1), i.e. what 300 steps gave, while
# seed 0's validation fell from 0.787 (round 3) to 0.759 (round 10). FedAvg of 10 clients' T-step
# paths moves the global model about as far as one client's T steps (with less noise), so 10 rounds
# are ~100 effective steps, not 1,000. The comparison is therefore made at the search budget, where
# every method's lr was chosen; LONG_ROUNDS stays for Meerkat's extra row (`Method.long`).
LONG_ROUNDS = 10
LONG_EVAL_EVERY = 2
PAPER = {  # Ran et al. (ICLR 2026), main table, T=10, Dirichlet 0.5, average accuracy
    "Llama-3.2-1B": {"meerkat": 0.759, "full-fedzo": 0.699, "lora-fedzo": 0.715, "magnitude": 0.717},
    "Qwen2-1.5B": {"meerkat": 0.805, "full-fedzo": 0.761},
}


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def show_lr(lr: float) -> str:
    """An lr as every table and plot shows it: 3 significant digits (an extended grid point is 1e-4 / 3)."""
    return f"{lr:.3g}"


def cell_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr_tag(lr)}-s{seed}"


def read_cells(out: Path) -> dict[str, dict]:
    path = out / "cells.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["cell"]: r for r in rows}


def val_score(row: dict) -> float:
    """The selection criterion: the last round's validation balanced accuracy."""
    return float(row["final_validation"]["balanced_accuracy"])


def search_state(method: Method, done: dict[str, dict], extra: list[str]) -> tuple[list[float], float | None]:
    """(lrs still to run at seed 0, the chosen lr once the search is complete)."""
    grid = sorted(method.lrs)
    missing = [lr for lr in grid if cell_name(method.name, lr, 0) not in done]
    if missing:
        return missing, None
    scores = {lr: val_score(done[cell_name(method.name, lr, 0)]) for lr in grid}
    best = max(grid, key=lambda lr: (scores[lr], -lr))  # ties: the smaller lr
    if not method.extend or len(grid) < 2:
        return [], best
    step = grid[1] / grid[0]
    # every point scoring the same means no lr of the grid changed a prediction: a smaller one will
    # not either, so the extra point goes above the grid (the tie rule still picks the smaller lr)
    edge = grid[-1] if len(set(scores.values())) == 1 else best
    if edge in (grid[0], grid[-1]):  # at an edge: one more point beyond it, once
        beyond = edge / step if edge == grid[0] else edge * step
        name = cell_name(method.name, beyond, 0)
        if name not in done:
            return [beyond], None
        scores[beyond] = val_score(done[name])
        best = max(scores, key=lambda lr: (scores[lr], -lr))
    return [], best


def read_tests(out: Path) -> dict[str, dict]:
    path = out / "tests.jsonl"
    if not path.exists():
        return {}
    return {r["cell"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}


def long_name(method: str, lr: float, seed: int) -> str:
    """The row of a chosen-lr cell continued to LONG_ROUNDS (same folder as the search-budget cell)."""
    return f"{cell_name(method, lr, seed)}-r{LONG_ROUNDS}"


def plan(out: Path, methods: list[str], extra: list[str]) -> list[tuple[str, str, float, int]]:
    """Tasks runnable now, as (kind, method, lr, seed), method by method in the order given: its
    search cells (300 steps, seed 0), the chosen lr's seeds 1-2 at the same budget, test scoring of
    the three (`test`); for a `Method.long` method also each chosen-lr cell continued to LONG_ROUNDS
    (`long`) and its test (`test-long`). Finishing one method's row before the next one's search
    means every sitting of the (multi-session) grid ends with whole rows, not with every method
    half searched."""
    done, tested = read_cells(out), read_tests(out)
    tasks: list[tuple[str, str, float, int]] = []
    need_zero_shot = not (out / "zero_shot_test.npz").exists()
    for name in methods:
        todo, chosen = search_state(ALL_METHODS[name], done, extra)
        tasks += [("cell", name, lr, 0) for lr in todo]
        if chosen is None:
            continue
        method = ALL_METHODS[name]
        short = [s for s in SEEDS if cell_name(name, chosen, s) not in done]
        tasks += [("cell", name, chosen, s) for s in short]
        tests = [("test", name, chosen, s) for s in SEEDS
                 if cell_name(name, chosen, s) in done and cell_name(name, chosen, s) not in tested]
        longs, long_tests = [], []
        if method.long:  # continued from the search cell's checkpoint, or (continues=False) from scratch
            longs = [("long", name, chosen, s) for s in SEEDS
                     if (s not in short or not method.continues) and long_name(name, chosen, s) not in done]
            long_tests = [("test-long", name, chosen, s) for s in SEEDS
                          if long_name(name, chosen, s) in done and long_name(name, chosen, s) not in tested]
        if (tests or long_tests) and need_zero_shot:  # every test row is a paired gain over zero-shot: that first
            tests, long_tests, need_zero_shot = [("zero-shot", "", 0.0, 0)], [], False
        tasks += tests + longs + long_tests
    return tasks


def task_name(kind: str, method: str, lr: float, seed: int) -> str:
    if kind == "zero-shot":
        return kind
    if kind in ("long", "test-long"):
        return ("test-" if kind == "test-long" else "") + long_name(method, lr, seed)
    return ("test-" if kind == "test" else "") + cell_name(method, lr, seed)


def config_overrides(method: str, lr: float, seed: int, out: Path, extra: list[str], long: bool = False) -> list[str]:
    folder = long_name(method, lr, seed) if long and not ALL_METHODS[method].continues else cell_name(method, lr, seed)
    return [*COMMON, *ALL_METHODS[method].overrides, f"learning_rate={lr:g}", f"seed={seed}", *(long_overrides(extra) if long else extra),
            f"output_dir={out / 'cells' / folder}"]


def reproduce_command(overrides: list[str]) -> str:
    shown = [o for o in overrides if not o.startswith(("output_dir=", "progress=", "resume=", "keep_checkpoints="))]
    return "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 meerkat-hf federate" + "".join(f" --set {shlex.quote(o)}" for o in shown)


# ------------------------------------------------------------------------------------------ scoring
TEST_LIMIT = None  # --test-limit: a smoke run scores only this many test tweets


def _test_set(tokenizer, max_length: int = 64):
    from meerkat_hf.tasks import encode_classification, load_task_dataset

    data = load_task_dataset(TASK, "test")
    if TEST_LIMIT:
        data = data.select(range(TEST_LIMIT))
    return encode_classification(tokenizer, TASK, data, max_length, include_label_word=False)


def score_test(model, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    from meerkat_hf.modeling.model import forward_module
    from meerkat_hf.tasks import candidate_scores

    scores, labels = candidate_scores(forward_module(model), tokenizer, TASK, _test_set(tokenizer), batch_size=32,
                                      max_length=64)
    return scores.numpy(), labels.numpy()


def zero_shot(out: Path) -> dict:
    """Zero-shot test scores (computed once per output folder, by `prepare` or the first cell)."""
    path = out / "zero_shot_test.npz"
    if not path.exists():
        from meerkat_hf.hub import write_files_atomically
        from meerkat_hf.hub.loading import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer("smollm2")
        scores, labels = score_test(model, tok)
        buffer = io.BytesIO()
        np.savez(buffer, scores=scores, labels=labels)
        write_files_atomically(path.parent, {path.name: buffer.getvalue()})
    z = np.load(path)
    return {"scores": z["scores"], "labels": z["labels"]}


def test_report(scores: np.ndarray, labels: np.ndarray, zs: dict) -> dict:
    from meerkat_hf.classification_metrics import ClassifierScores, paired_gain

    if not np.array_equal(labels, zs["labels"]):
        raise RuntimeError("the test split differs from the cached zero-shot one; delete zero_shot_test.npz")
    trained, zero = ClassifierScores(scores, labels), ClassifierScores(zs["scores"], labels)
    rep = trained.report()
    keep = ("n", "accuracy", "balanced_accuracy", "balanced_accuracy_ci", "macro_f1", "macro_f1_ci", "auc",
            "predicted_rate")
    return {**{k: rep[k] for k in keep if k in rep},
            "gain_over_zero_shot": paired_gain(zero.predictions(), trained.predictions(), labels)}


# ------------------------------------------------------------------------------------------- a cell
def final_values_name(long: bool) -> str:
    return f"final_values_r{LONG_ROUNDS}.pt" if long else "final_values.pt"


def long_overrides(extra: list[str]) -> list[str]:
    return [*extra, f"rounds={LONG_ROUNDS}", f"eval_every={LONG_EVAL_EVERY}"]


def run_cell(method: str, lr: float, seed: int, out: Path, extra: list[str], long: bool = False) -> dict:
    """One cell at the search budget, or (`long`) the same cell continued from its checkpoint to LONG_ROUNDS."""
    from meerkat_hf.federated import FederationConfig, run_federation
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG

    overrides = config_overrides(method, lr, seed, out, extra, long=long)
    config = FederationConfig.from_yaml(DEFAULT_CONFIG, overrides)
    start = time.perf_counter()
    result = run_federation(config)
    train_seconds = time.perf_counter() - start
    rows = result.metrics
    passes_per_step = 2 * config.batch_size * config.zo_num_perturbations
    curve, passes = [{"round": 0, "forward_passes": 0, **_val(result.initial_eval)}], 0
    for r in rows:
        passes += passes_per_step * sum(int(r["budgets"][str(c)]) for c in r["accepted"])
        if r.get("balanced_accuracy") is not None:
            curve.append({"round": r["round"], "forward_passes": passes, **_val(r)})
    # The final state, for `test` (run only for the lrs the validation search chose).
    torch.save(result.final_values, Path(config.output_dir) / final_values_name(long))
    vp = {}
    if config.scheduler_mode != "none" or config.partition.num_single_label_clients:
        vp = {"limited_clients": sorted(result.limited_clients), "single_label_clients": single_label_clients(config)}
    if result.privacy.get("dp_epsilon") is not None:
        vp["privacy"] = {"epsilon": result.privacy["dp_epsilon"], "delta": result.privacy.get("dp_delta"),
                         "noise_multiplier": result.training_summary.get("dp_noise_multiplier"), "clip": config.dp.clip}
    return {**vp,
        "cell": long_name(method, lr, seed) if long else cell_name(method, lr, seed), "method": method, "lr": lr,
        "seed": seed, "long": long, "k": result.k,
        "num_params": result.num_params, "forward_passes": passes, "rounds": config.rounds,
        "local_steps": config.local_steps, "client_rounds": sum(len(r["accepted"]) for r in rows), "curve": curve, "final_validation": curve[-1],
        "uplink_bytes": result.total_uplink_bytes, "downlink_bytes": result.total_downlink_bytes,
        "train_seconds": round(train_seconds, 1), "state_digest": result.state_digest,
        "command": reproduce_command(overrides),
        "host": socket.gethostname(), "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def single_label_clients(config) -> list[int]:
    """The clients whose training data holds one label only (the partition redone from the seed, no model)."""
    from meerkat_hf.federated.task_data import config_partition
    from meerkat_hf.tasks import load_task_dataset

    labels = np.asarray(load_task_dataset(TASK, "train")["label"], dtype=np.int64)
    return [c for c, part in enumerate(config_partition(config, labels, len(labels))) if len(set(labels[part].tolist())) == 1]


def test_cell(method: str, lr: float, seed: int, out: Path, extra: list[str], long: bool = False) -> dict:
    """Score a finished chosen-lr cell's final state (`long`: its LONG_ROUNDS continuation) on the whole test split."""
    from meerkat_hf.federated import FederationConfig
    from meerkat_hf.federated.engine import RoundEngine
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG

    overrides = config_overrides(method, lr, seed, out, extra, long=long)
    config = FederationConfig.from_yaml(DEFAULT_CONFIG, overrides)
    start = time.perf_counter()
    engine = RoundEngine(config, evaluate=False)  # the same model/mask/adapter wrapping as the run
    engine.model.set_values(torch.load(Path(config.output_dir) / final_values_name(long=long)))
    scores, labels = score_test(engine.model, engine.tokenizer)
    return {"cell": (long_name if long else cell_name)(method, lr, seed), "test": test_report(scores, labels, zero_shot(out)),
            "test_seconds": round(time.perf_counter() - start, 1)}


def _tokenizer():
    """The embedded model's tokenizer (the run's model object does not carry one)."""
    from transformers import AutoTokenizer

    from meerkat_hf.hub.loading import resolve_model_source

    path, gguf = resolve_model_source("smollm2")
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf)


def _val(row: dict) -> dict:
    keys = ("accuracy", "balanced_accuracy", "balanced_accuracy_ci_low", "balanced_accuracy_ci_high", "macro_f1", "auc")
    return {k: row.get(k) for k in keys}


# ------------------------------------------------------------------------------------------ workers
def _claim(out: Path, name: str) -> bool:
    """Claim a cell by creating its lock file; a lock whose process is gone is taken over."""
    lock = out / "claims" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        host, _, pid = lock.read_text().partition(" ")
        if host == socket.gethostname() and pid.strip().isdigit() and _alive(int(pid)):
            return False
        lock.write_text(me)  # stale (its process died, or another machine's session ended)
        return True
    with os.fdopen(fd, "w") as f:
        f.write(me)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(args) -> None:
    out, methods = Path(args.out), args.methods
    out.mkdir(parents=True, exist_ok=True)
    while True:
        if (out / "STOP").exists():  # `touch OUT/STOP`: finish the current task, then exit
            _log("STOP file found; exiting between tasks")
            return
        todo = plan(out, methods, args.set)
        mine = next((t for t in todo if _claim(out, task_name(*t))), None)
        if mine is None:
            if not todo:
                _log("nothing left to run")
                return
            _log(f"{len(todo)} tasks claimed by other workers; waiting")
            time.sleep(60)
            continue
        kind, method, lr, seed = mine
        name = task_name(*mine)
        _log(f"{name}: start")
        start = time.perf_counter()
        if kind == "zero-shot":
            zero_shot(out)
        elif kind in ("test", "test-long"):
            row = test_cell(method, lr, seed, out, args.set, long=kind == "test-long")
            with (out / "tests.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            row = run_cell(method, lr, seed, out, args.set, long=kind == "long")
            with (out / "cells.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        (out / "claims" / f"{name}.lock").unlink(missing_ok=True)
        _log(f"{name}: done in {time.perf_counter() - start:.0f} s")


def prepare(args) -> None:
    """Zero-shot test scores, and every method's mask computed into the cache (so workers start fast)."""
    from meerkat_hf.federated import FederationConfig
    from meerkat_hf.federated.engine import RoundEngine
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zs = zero_shot(out)
    _log(f"zero-shot test scores: {len(zs['labels'])} examples")
    for name in args.methods:
        if name in ("full-fedzo", "lora-fedzo"):
            continue  # no calibrated mask to cache
        overrides = config_overrides(name, ALL_METHODS[name].lrs[0], 0, out / "prepare", args.set)
        RoundEngine(FederationConfig.from_yaml(DEFAULT_CONFIG, overrides), evaluate=False)
        _log(f"{name}: mask ready")


def dp_clip(args) -> None:
    """The DP study's clip: quantiles of |g_i| (per-example projected gradients) at the initial model."""
    from meerkat_hf.federated import FederationConfig
    from meerkat_hf.federated.engine import RoundEngine
    from meerkat_hf.federated.federation_config import DEFAULT_CONFIG
    from meerkat_hf.zo import derive_seed, gaussian_direction, projected_gradients_per_example

    config = FederationConfig.from_yaml(DEFAULT_CONFIG, config_overrides("meerkat", 3e-4, 0, Path(args.out) / "dp-clip", args.set))
    engine = RoundEngine(config, evaluate=False)
    data, model = engine.data, engine.model
    pool = [row for rows in data.client_examples for row in rows]
    rng = np.random.default_rng(0)
    pick = rng.choice(len(pool), size=256, replace=False)
    values = []
    for b in range(0, len(pick), config.batch_size):
        batch = data.collate([pool[i] for i in pick[b:b + config.batch_size]])
        for j in range(32 // (len(pick) // config.batch_size) or 1):
            z = gaussian_direction(derive_seed(0xD9C119, b, j), model.num_selected)
            per = projected_gradients_per_example(model, lambda: data.per_example_loss_fn(model, batch), z, config.zo_eps)
            values += per.abs().tolist()
    q = np.quantile(values, [0.25, 0.5, 0.75, 0.9, 0.99])
    _log(f"|g_i| over {len(values)} (example, direction) pairs: 25% {q[0]:.3g}, median {q[1]:.3g}, 75% {q[2]:.3g}, "
         f"90% {q[3]:.3g}, 99% {q[4]:.3g} (DP_CLIP = {DP_CLIP:g})")


def status(args) -> None:
    out = Path(args.out)
    done = read_cells(out)
    todo = plan(out, args.methods, args.set)
    claims = sorted(p.stem for p in (out / "claims").glob("*.lock")) if (out / "claims").exists() else []
    print(f"done {len(done)}: " + ", ".join(sorted(done)))
    print(f"claimed {len(claims)}: " + ", ".join(claims))
    print(f"runnable now {len(todo)}: " + ", ".join(task_name(*t) for t in todo))
    secs = [r["train_seconds"] for r in done.values()] + [r["test_seconds"] for r in read_tests(out).values()]
    if secs:
        print(f"cell wall time: mean {np.mean(secs) / 60:.1f} min, total {sum(secs) / 3600:.2f} h of one core")


# -------------------------------------------------------------------------------------------- table


# Differences a study asks about beyond "each row minus the first": VP against its control (issue 13
# item 3 asks whether GradIP chooses whom to limit better than chance, at the same forward passes), and
# each single-site DP row against single-site Meerkat without DP (the federated ones pair with the first row).
EXTRA_PAIRS = (("vp-gradip", "vp-random"), *((f"site-dp-eps{e}", "site") for e in DP_EPSILONS))
EXTRA_PAIR_WORDS = {("vp-gradip", "vp-random"): "vp-gradip against its control, vp-random"}


def _paired_lines(by_seed: dict[str, dict[int, float]]) -> list[str]:
    """Each row minus the first row (and each pair of EXTRA_PAIRS present), paired by seed (a seed fixes
    the partition, the data order and the test tweets for every method), with a t-interval over the
    seeds both have scored."""
    names = list(by_seed)
    if len(names) < 2:
        return []
    ref, out, used = names[0], [], []
    pairs = [(name, ref) for name in names[1:]] + [p for p in EXTRA_PAIRS if set(p) <= set(names) and ref not in p]
    for name, ref_ in pairs:
        seeds = sorted(set(by_seed[name]) & set(by_seed[ref_]))
        d = [by_seed[name][s] - by_seed[ref_][s] for s in seeds]
        if len(d) < 2:
            continue
        mean, lo, hi = t_interval(d)
        out.append(f"| {name} - {ref_} | {len(d)} | {', '.join(f'{x:+.3f}' for x in d)} | {mean:+.3f} "
                   f"[{lo:+.3f}, {hi:+.3f}] |")
        used.append((name, ref_))
    if not out:
        return []
    extra = [EXTRA_PAIR_WORDS.get(p, f"{p[0]} against {p[1]}") for p in EXTRA_PAIRS if p in used]
    also = f" (and {', '.join(extra)})" if extra else ""
    return ["", f"Test balanced accuracy against {ref}{also}, paired by seed (same partitions, data orders and test tweets; "
            "95% t-interval over seeds):", "", "| difference | seeds | per seed | mean [95% interval] |",
            "|---|---|---|---|", *out]


def _epsilon_lines(chosen: dict[str, tuple[float | None, list[dict]]], by_seed: dict[str, dict[int, float]]) -> list[str]:
    """Issue 14's epsilon-vs-accuracy table: test balanced accuracy per target epsilon, federated (against
    `meerkat`) and single site (against `site`), each minus its non-private row paired by seed."""
    shapes = (("meerkat", "dp-eps{}"), ("site", "site-dp-eps{}"))
    if not any(pattern.format(e) in chosen for _, pattern in shapes for e in DP_EPSILONS):
        return []

    def cell(name: str, ref: str | None) -> str:
        if name not in chosen:
            return "| |"
        lr, rows = chosen[name]
        if name not in by_seed:
            state = "searching" if lr is None else f"lr {show_lr(lr)}: {len(rows)} of {len(SEEDS)} seeds run, test pending"
            return f"| {state} | |"
        acc = _mean_std(list(by_seed[name].values())) + f" ({len(by_seed[name])} seeds, lr {show_lr(lr)})"
        if ref is None or ref not in by_seed:
            return f"| {acc} | |"
        seeds = sorted(set(by_seed[name]) & set(by_seed[ref]))
        d = [by_seed[name][s] - by_seed[ref][s] for s in seeds]
        if len(d) < 2:
            return f"| {acc} | |"
        mean, lo, hi = t_interval(d)
        return f"| {acc} | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] |"

    lines = ["", "Epsilon against accuracy (delta 1e-5, clip {:g}; test balanced accuracy, mean +- std over seeds; "
             "minus the same shape without DP, paired by seed, 95% t-interval):".format(DP_CLIP), "",
             "| epsilon | federated (10 clients) | minus no DP | single site | minus no DP |", "|---|---|---|---|---|",
             "| no DP " + cell("meerkat", None) + " " + cell("site", None)[2:]]
    for e in DP_EPSILONS:
        lines.append(f"| {e} " + cell(f"dp-eps{e}", "meerkat") + " " + cell(f"site-dp-eps{e}", "site")[2:])
    return lines


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")
    return f"{np.mean(xs):.3f} +- {sd:.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def chosen_rows(out: Path, methods: list[str], extra: list[str]) -> dict[str, tuple[float | None, list[dict]]]:
    done = read_cells(out)
    result = {}
    for name in methods:
        _, chosen = search_state(ALL_METHODS[name], done, extra)
        result[name] = (chosen, [done[cell_name(name, chosen, s)] for s in SEEDS
                                 if chosen is not None and cell_name(name, chosen, s) in done])
    return result


def table(args) -> str:
    from meerkat_hf.federated.reporting import format_bytes

    out = Path(args.out)
    done = read_cells(out)
    lines = ["Search (seed 0, last-round validation balanced accuracy on 512 examples; * = chosen):", "",
             "| method | lr | validation bal. acc: zero-shot -> last round | AUC | worker wall time |", "|---|---|---|---|---|"]
    chosen = chosen_rows(out, args.methods, args.set)
    for name in args.methods:
        cells = sorted((r for r in done.values() if r["method"] == name and r["seed"] == 0 and not r.get("long")),
                       key=lambda r: r["lr"])
        for r in cells:
            mark = "*" if chosen[name][0] == r["lr"] else ""
            v = r["final_validation"]
            v0 = r["curve"][0]["balanced_accuracy"]
            lines.append(f"| {name} | {show_lr(r['lr'])}{mark} | {v0:.3f} -> {v['balanced_accuracy']:.3f} | "
                         f"{v.get('auc') or float('nan'):.3f} | {r['train_seconds'] / 60:.0f} min |")
    if (out / "zero_shot_test.npz").exists():  # scored by the first `test` task; never computed here
        from meerkat_hf.classification_metrics import ClassifierScores

        zs = zero_shot(out)
        z = ClassifierScores(zs["scores"], zs["labels"]).report()
        head = (f"Test (all {z['n']} tweets; zero-shot balanced accuracy {z['balanced_accuracy']:.3f}, macro-F1 "
                f"{z['macro_f1']:.3f}, accuracy {z['accuracy']:.3f})")
    else:
        head = "Test (all 2,314 tweets; not scored yet: no method has finished its search)"
    lines += ["", head + "; after 3 rounds (300 steps per client set, the search budget), mean +- std over seeds at the chosen lr:", "",
              "| method | lr | seeds (tested) | balanced acc | macro-F1 | accuracy | gain over zero-shot [95% CI per seed] | "
              "k (trained) | bytes per client-round | paper (Llama-3.2-1B / Qwen2-1.5B) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, dict] = {}  # what README's three-line summary is rendered from
    by_seed: dict[str, dict[int, float]] = {}  # test balanced accuracy per seed, for the paired differences
    for name in args.methods:
        lr, rows = chosen[name]
        if not rows:
            lines.append(f"| {name} | {'searching' if lr is None else show_lr(lr)} | 0 | | | | | | | |")
            continue
        tested = read_tests(out)
        t = [tested[r["cell"]]["test"] for r in rows if r["cell"] in tested]
        if not t:
            lines.append(f"| {name} | {show_lr(lr)} | {len(rows)} run (test not scored yet) | | | | | | | |")
            continue
        gains = ", ".join(f"{g['gain_over_zero_shot']['gain']:+.3f} [{g['gain_over_zero_shot']['gain_ci'][0]:+.3f}, "
                          f"{g['gain_over_zero_shot']['gain_ci'][1]:+.3f}]" for g in t)
        per_client_round = np.mean([(r["uplink_bytes"] + r["downlink_bytes"]) / r.get("client_rounds", r["rounds"] * 10)
                                    for r in rows])
        paper = " / ".join(f"{PAPER[m].get(name, float('nan')):.3f}" if name in PAPER[m] else "-" for m in PAPER)
        by_seed[name] = {r["seed"]: tested[r["cell"]]["test"]["balanced_accuracy"] for r in rows if r["cell"] in tested}
        summary[name] = {"lr": lr, "seeds": len(t), "seed_ids": [r["seed"] for r in rows if r["cell"] in tested],
                         "balanced_accuracy": [x["balanced_accuracy"] for x in t],
                         "gain": [x["gain_over_zero_shot"]["gain"] for x in t],
                         "gain_ci": [x["gain_over_zero_shot"]["gain_ci"] for x in t]}
        if "privacy" in rows[0]:  # the DP rows: the largest epsilon any client spent, per tested seed
            summary[name]["epsilon"] = [r["privacy"]["epsilon"] for r in rows if r["cell"] in tested]
            summary[name]["delta"] = rows[0]["privacy"]["delta"]
        if "limited_clients" in rows[0]:  # the vp-effect rows: who was limited, per tested seed
            summary[name]["limited"] = [[len(r["limited_clients"]),
                                         len(set(r["limited_clients"]) & set(r["single_label_clients"])),
                                         len(r["single_label_clients"])] for r in rows if r["cell"] in tested]
        lines.append(f"| {name} | {show_lr(lr)} | {len(t)} | {_mean_std([x['balanced_accuracy'] for x in t])} | "
                     f"{_mean_std([x['macro_f1'] for x in t])} | {_mean_std([x['accuracy'] for x in t])} | {gains} | "
                     f"{rows[0]['k']:,} | {format_bytes(int(per_client_round))} | {paper} |")
    lines += _paired_lines(by_seed)
    # the extra rows: chosen-lr cells continued to LONG_ROUNDS (Meerkat only, `Method.long`)
    longer = [(c, r["test"]) for c, r in read_tests(out).items() if c.endswith(f"-r{LONG_ROUNDS}")
              and done.get(c, {}).get("method") in args.methods]
    if longer:
        lines += ["", f"Continued to {LONG_ROUNDS} rounds ({LONG_ROUNDS * 100} steps per client set) at the lr the "
                  "300-step search chose, scored on test: " + "; ".join(
                      f"{c}: {t['balanced_accuracy']:.3f}, gain {t['gain_over_zero_shot']['gain']:+.3f} "
                      f"[{t['gain_over_zero_shot']['gain_ci'][0]:+.3f}, {t['gain_over_zero_shot']['gain_ci'][1]:+.3f}]"
                      for c, t in sorted(longer))]
    vp_rows = [(name, rows) for name, (lr, rows) in chosen.items() if rows and "limited_clients" in rows[0]]
    if vp_rows:
        lines += ["", "Who was limited (per seed: limited clients / of them single-label / single-label clients in all; "
                  "forward passes of the whole run):", "", "| method | per seed | forward passes |", "|---|---|---|"]
        for name, rows in vp_rows:
            per_seed = "; ".join(f"s{r['seed']}: {len(r['limited_clients'])} / "
                                 f"{len(set(r['limited_clients']) & set(r['single_label_clients']))} / "
                                 f"{len(r['single_label_clients'])}" for r in rows)
            passes = ", ".join(f"{r['forward_passes']:,}" for r in rows)
            lines.append(f"| {name} | {per_seed} | {passes} |")
    dp_rows = [(name, rows) for name, (lr, rows) in chosen.items() if rows and "privacy" in rows[0]]
    if dp_rows:
        lines += ["", "Privacy spent (per seed, the largest epsilon of any client at the delta shown; noise multiplier(s) "
                  "solved for the target; clip):", "", "| method | epsilon (delta) | noise multiplier | clip |", "|---|---|---|---|"]
        for name, rows in dp_rows:
            p0 = rows[0]["privacy"]
            eps = ", ".join(f"{r['privacy']['epsilon']:.2f}" for r in rows)
            lines.append(f"| {name} | {eps} ({p0['delta']:g}) | {p0.get('noise_multiplier')} | {p0['clip']:g} |")
    lines += _epsilon_lines(chosen, by_seed)
    secs = sum(r["train_seconds"] for r in done.values()) + sum(r["test_seconds"] for r in read_tests(out).values())
    lines += ["", f"{len(done)} cells, {secs / 3600:.2f} h of worker wall time in all (one torch thread each). Commands: `cells.jsonl` (`command`)."]
    text = "\n".join(lines)
    print(text)
    (out / table_file(args.study)).write_text(text + "\n")
    zs_ba = None
    if (out / "zero_shot_test.npz").exists():
        from meerkat_hf.classification_metrics import ClassifierScores

        zs = zero_shot(out)
        zs_ba = float(ClassifierScores(zs["scores"], zs["labels"]).report()["balanced_accuracy"])
    (out / table_file(args.study).replace(".md", ".json").replace("table", "summary")).write_text(
        json.dumps({"zero_shot_balanced_accuracy": zs_ba, "methods": summary, "rounds": 3, "long_rounds": LONG_ROUNDS,
                    "paper": {model: {m: v for m, v in rows.items() if m in summary} for model, rows in PAPER.items()},
                    "long_tests": {c: {"gain": t["gain_over_zero_shot"]["gain"],
                                       "gain_ci": t["gain_over_zero_shot"]["gain_ci"]} for c, t in longer},
                    "searching": [n for n in args.methods if n not in summary]}, indent=1) + "\n")
    return text


def movement(args) -> None:
    """How far training moved the trained coordinates, per method at its chosen lr (all seeds' cells):
    a ZO step is lr * g * z with g the loss change along z, so a mask whose coordinates barely change
    the loss barely moves, whatever the lr. Masked methods only (their cell keeps its mask)."""
    import torch

    from meerkat_hf.hub.loading import load_model_and_tokenizer
    from meerkat_hf.masks.mask import SparseMask
    from meerkat_hf.modeling.sparse_view import SparseView

    out = Path(args.out)
    model, _ = load_model_and_tokenizer("smollm2")
    lines = ["Movement of the trained coordinates after 3 rounds at the chosen lr (all tested seeds' cells pooled; "
             "w = the pretrained value, dw = final - pretrained):", "",
             "| method | lr | cells | k | median abs(w) | median abs(dw) | max abs(dw) | median abs(dw) / abs(w) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (lr, rows) in chosen_rows(out, args.methods, args.set).items():
        cells = [out / "cells" / r["cell"] for r in rows if (out / "cells" / r["cell"] / "mask").is_dir()
                 and (out / "cells" / r["cell"] / "final_values.pt").is_file()]
        if not cells:
            continue
        w, dw = [], []
        for cell in cells:
            start = SparseView(model, SparseMask.from_pretrained(cell / "mask")).gather()
            w.append(start.abs())
            dw.append((torch.load(cell / "final_values.pt") - start).abs())
        w, dw = torch.cat(w), torch.cat(dw)
        lines.append(f"| {name} | {show_lr(lr)} | {len(cells)} | {rows[0]['k']:,} | {w.median():.3g} | {dw.median():.3g} | "
                     f"{dw.max():.3g} | {(dw / w.clamp_min(1e-12)).median():.3g} |")
    text = "\n".join(lines)
    print(text)
    (out / "movement.md").write_text(text + "\n")


def dp_noise(args) -> None:
    """How much of what clients sent is DP noise: the spread of the released scalars (each step's
    projected gradient, ZO noise and all) against the std of the DP noise in them, sigma * clip / B,
    per row at its chosen lr (the tested seeds' cells pooled). Read from each cell's last round
    checkpoint (the server's replay history), so it runs on the grid's own folder, where they are kept."""
    from meerkat_hf.federated.checkpoint import list_checkpoints, read_checkpoint

    out = Path(args.out)
    lines = ["Released scalars vs the DP noise in them, at each row's chosen lr (tested seeds' cells pooled; every "
             "scalar of the search budget's rounds still in the last checkpoint's replay history; noise std = noise multiplier x clip / batch, the "
             "root mean square over the distinct multipliers the run recorded):", "",
             "| method | lr | cells | scalars | std of the scalars | median abs | DP noise std | noise share of the variance |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (lr, rows) in chosen_rows(out, args.methods, args.set).items():
        scalars, noise_var = [], []
        for row in rows:
            checkpoints = list_checkpoints(out / "cells" / row["cell"])
            if not checkpoints:
                continue
            state = read_checkpoint(checkpoints[-1])
            for round_index, records in state["server"]["history"]:  # 0-based; a longer row's later rounds left out
                for record in records if round_index < int(row["rounds"]) else ():
                    scalars += [float(g) for g in record[3]]
            privacy = row.get("privacy") or {}
            if privacy.get("noise_multiplier") is not None:
                batch = int(state["config"]["batch_size"])
                sigmas = [float(s) for s in str(privacy["noise_multiplier"]).split(",")]
                noise_var += [(s * float(privacy["clip"]) / batch) ** 2 for s in sigmas]
        if not scalars:
            continue
        g = np.asarray(scalars)
        noise = f"{np.sqrt(np.mean(noise_var)):.3g}" if noise_var else "0 (no DP)"
        share = f"{np.mean(noise_var) / g.var():.1%}" if noise_var else "-"
        lines.append(f"| {name} | {show_lr(lr)} | {len(rows)} | {g.size:,} | {g.std():.3g} | {np.median(np.abs(g)):.3g} | "
                     f"{noise} | {share} |")
    text = "\n".join(lines)
    print(text)
    (out / "dp_noise.md").write_text(text + "\n")


SNAPSHOT_FILES = ("cells.jsonl", "tests.jsonl", "zero_shot_test.npz", "movement.md", "dp_noise.md", "worker0.log", "worker1.log")
SNAPSHOT_MAX_BYTES = 20 * 2**20  # a Full-FedZO state (538 MB) or checkpoint (1.2 GB) cannot go into git


def snapshot(args) -> None:
    """Copy the grid's state into `--to` (the committed research/results/compare) so that another
    machine resumes it: the records, tables and figures, and every cell but its mask (rebuilt from the
    cache). A finished cell keeps no round checkpoints unless a longer row continues them (`Method.long`);
    an unfinished cell whose checkpoint is too big to commit is left out whole, so that a copy restarts it
    from round 0 instead of appending to its metrics."""
    import shutil

    out, to = Path(args.out), Path(args.to)
    to.mkdir(parents=True, exist_ok=True)
    for f in [*(out / n for n in SNAPSHOT_FILES), *out.glob("table*.md"), *out.glob("summary*.json"), *out.glob("*.png")]:
        if f.is_file():
            shutil.copy2(f, to / f.name)
    done = read_cells(out)
    for cell in sorted(p for p in (out / "cells").iterdir() if p.is_dir()) if (out / "cells").is_dir() else []:
        finished = (cell / "final_values.pt").is_file()
        method = done.get(cell.name, {}).get("method") or cell.name.split("-lr")[0]
        keep_checkpoints = not finished or (method in ALL_METHODS and ALL_METHODS[method].long)
        if not finished and any(f.stat().st_size > SNAPSHOT_MAX_BYTES for f in cell.rglob("*.pt")):
            shutil.rmtree(to / "cells" / cell.name, ignore_errors=True)
            continue
        if not keep_checkpoints:
            shutil.rmtree(to / "cells" / cell.name / "checkpoints", ignore_errors=True)
        for f in cell.rglob("*"):
            rel = f.relative_to(cell)
            if (not f.is_file() or rel.parts[0] == "mask" or f.name.endswith(".tmp") or f.stat().st_size > SNAPSHOT_MAX_BYTES
                    or (rel.parts[0] == "checkpoints" and not keep_checkpoints)):
                continue
            dst = to / "cells" / cell.name / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
    _log(f"snapshot of {out} in {to}")


def table_file(study: str) -> str:
    """compare/table.md for the comparison, compare/table_<study>.md for the studies sharing its cells."""
    return "table.md" if study == "compare" else f"table_{study.replace('-', '_')}.md"


def plot(args) -> None:
    """Left: each method at its chosen lr, the gain over each seed's own zero-shot validation score
    (seeds draw different validation tweets, so their levels differ), mean +- std, at the seeds' mean
    forward passes. Right: the seed-0 search, one colour
    per method (a curve that leaves the axis diverged; its last value is written at the edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    colours = {name: f"C{i}" for i, name in enumerate(args.methods)}
    fig, (chosen_ax, search_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for name, (lr, rows) in chosen_rows(out, args.methods, args.set).items():
        if not rows:
            continue
        rows = [r for r in rows if len(r["curve"]) == len(rows[0]["curve"])]
        # a limited client spends fewer passes (vp rows), so seeds differ in x: the mean over seeds
        x = np.mean([[p["forward_passes"] for p in r["curve"]] for r in rows], axis=0)
        ys = np.array([[p["balanced_accuracy"] - r["curve"][0]["balanced_accuracy"] for p in r["curve"]] for r in rows])
        mean = ys.mean(0)
        chosen_ax.plot(x, mean, marker="o", color=colours[name], label=f"{name} (lr {show_lr(lr)}, {len(ys)} seed{'s' if len(ys) > 1 else ''})")
        if len(ys) > 1:
            sd = ys.std(0, ddof=1)
            chosen_ax.fill_between(x, mean - sd, mean + sd, color=colours[name], alpha=0.12)
    floor, labelled = 0.70, set()
    for r in sorted(read_cells(out).values(), key=lambda r: (r["method"], r["lr"])):
        if r["seed"] != 0 or r.get("long") or r["method"] not in colours:
            continue
        x = [p["forward_passes"] for p in r["curve"]]
        y = [p["balanced_accuracy"] for p in r["curve"]]
        search_ax.plot(x, np.maximum(y, floor), color=colours[r["method"]], lw=1, alpha=0.8, marker=".",
                       label=None if r["method"] in labelled else r["method"])
        labelled.add(r["method"])
        search_ax.annotate(show_lr(r["lr"]), (x[-1], max(y[-1], floor)), fontsize=6, color=colours[r["method"]],
                           xytext=(3, 0), textcoords="offset points", va="center")
        if min(y) < floor:
            search_ax.annotate(f"{r['method']} lr {show_lr(r['lr'])}: {y[-1]:.3f}", (x[-1], floor), fontsize=7,
                               xytext=(-4, 4), textcoords="offset points", ha="right", color=colours[r["method"]])
    chosen_ax.axhline(0, color="grey", lw=0.8)
    chosen_ax.set_ylabel("validation balanced accuracy - the seed's zero-shot")
    search_ax.set_ylabel("balanced accuracy, validation (512 tweets)")
    chosen_ax.set_title("each method at its validation-chosen lr (mean +- std over seeds)", fontsize=10)
    search_ax.set_title("the lr search, seed 0 (end labels: lr)", fontsize=10)
    search_ax.set_ylim(bottom=floor)
    for ax in (chosen_ax, search_ax):
        ax.set_xlabel("forward passes (examples x 2 per ZO step, all clients)")
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("10 clients, Dirichlet 0.5, T = 10, 3 rounds" if args.study == "compare" else
                 f"study {args.study}, 3 rounds (each row's settings: cells.jsonl)", fontsize=11)
    fig.tight_layout()
    # one figure per study, like the tables: `--study dp plot` must not overwrite the comparison's
    path = out / ("compare_curves.png" if args.study in ("compare", "all") else f"curves_{args.study.replace('-', '_')}.png")
    fig.savefig(path, dpi=120)
    _log(f"wrote {path}")


def _methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    return names


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--study", choices=list(STUDIES), default="compare",
                   help="compare: the methods (issue 13 item 1); vp-effect: Meerkat vs Meerkat-VP vs random early "
                        "stop (issue 13 item 3); dp: example-level DP at epsilon 1/3/8 (issue 14 item 4); all: "
                        "the three in that order (for `run`)")
    p.add_argument("--methods", type=_methods, default=None,
                   help=f"comma-separated, of {','.join(ALL_METHODS)} (default: the study's)")
    p.add_argument("--set", action="append", default=[], help="a shared FederationConfig override, key=value")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--worker", default="0/1", help="informational: i/n of the workers sharing --out")
    for name in ("prepare", "status", "table", "plot", "dp-clip", "dp-noise", "movement"):
        sub.add_parser(name)
    sn = sub.add_parser("snapshot", help="copy the grid's state into the committed records (resumable elsewhere)")
    sn.add_argument("--to", default="research/results/compare")
    p.add_argument("--test-limit", type=int, default=None, help="smoke runs only: score this many test tweets")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = list(STUDIES[args.study])
    global TEST_LIMIT
    TEST_LIMIT = args.test_limit
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"prepare": prepare, "run": run, "status": status, "table": table, "plot": plot, "dp-clip": dp_clip,
     "dp-noise": dp_noise, "movement": movement, "snapshot": snapshot}[args.cmd](args)


if __name__ == "__main__":
    main()
