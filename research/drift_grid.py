"""Hostile-client drift grid (issue 29): how far can well-formed malicious uplinks move the model?

    python research/drift_grid.py [--clients 10] [--rounds 20] [--local-steps 2] [--seeds 0 1 2] [--out FILE]

A tiny Llama federation (the test suite's model and toy task, IID partition, every client in every round)
runs once honestly and once per attack, with the server's robust bound on (the default,
`validation.max_update_median_ratio`) and off (null). Drift = ||w_attacked - w_honest|| / ||w_honest - w_0||:
how many honest federations' worth of movement the attack adds (issue 29's target: <= 2 with one attacker
of ten). Attacks (client 0 attacks, or clients 0-2 together), each a well-formed uplink within every fixed bound:

* sign-flip: every scalar -sign(g) x max_abs_grad (the largest magnitude the server accepts);
* boost: the client's own scalars x 1,000, clipped to max_abs_grad;
* targeted: scalars that push w_S along one fixed direction u (g_t = -c (u . z_t), z_t the step's seeded
  direction, c the largest the magnitude bound allows): the attacker knows the seeds, as every client does;
* collude-3: clients 0, 1 and 2 all send sign-flip;
* replay: from round 1 on, client 0 re-sends its previous round's scalars re-stamped with the new round.

Each row prints the mean over seeds and the largest seed's value; `rejected` counts refused uplinks, `clipped`
the rounds in which an uplink was scaled down. Uses the suite's tiny model (tests/federated_support.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

ATTACKS = ("sign-flip", "boost", "targeted", "collude-3", "replay")


def _attack(name: str, params_seed: int, grad_bound: float, k_box: dict):
    """tamper_uplink for one attack (None for the honest run)."""
    from meerkat_hf.federated import decode_uplink
    from meerkat_hf.federated.protocol.codec import Uplink
    from meerkat_hf.federated.protocol.virtual_path import step_seed
    from meerkat_hf.zo import gaussian_direction

    attackers = {0, 1, 2} if name == "collude-3" else {0}
    previous: dict[int, tuple[float, ...]] = {}

    def tamper(r: int, cid: int, data: bytes) -> list[bytes]:
        if cid not in attackers:
            return [data]
        up = decode_uplink(data)
        grads = up.grads
        if name in ("sign-flip", "collude-3"):
            grads = tuple(-grad_bound if g >= 0 else grad_bound for g in up.grads)
        elif name == "boost":
            grads = tuple(max(-grad_bound, min(grad_bound, 1000.0 * g)) for g in up.grads)
        elif name == "targeted":
            k = k_box["k"]
            u = gaussian_direction(987_654_321, k)
            u /= u.norm()
            dots = [float(u @ gaussian_direction(step_seed(params_seed, r, cid, t // up.q, t % up.q), k))
                    for t in range(len(up.grads))]
            c = grad_bound / max(max(abs(d) for d in dots), 1e-30)
            grads = tuple(-c * d for d in dots)
        elif name == "replay":
            grads = previous.get(cid, up.grads)
            previous[cid] = up.grads
        return [Uplink(**{**up.__dict__, "grads": tuple(grads)}).encode()]

    return tamper


def _run(root: Path, model_dir: str, files: dict, seed: int, attack: str | None, robust: bool, args) -> dict:
    from meerkat_hf.testing.toy_federation import base_config

    from meerkat_hf.federated import FederationConfig, FederationHooks, run_federation
    from meerkat_hf.federated.protocol import server as server_mod

    sub = root / f"s{seed}-{attack or 'honest'}-{'on' if robust else 'off'}"
    validation = {} if robust else {"max_update_median_ratio": None}
    cfg = FederationConfig.from_dict(base_config(
        sub, model_dir, files, num_clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
        partition={"scheme": "iid"}, client_fraction=1.0, eval_every=args.rounds, seed=seed, lr=args.lr,
        validation=validation))
    k_box: dict = {}
    counts = {"rejected": 0, "clipped": 0}
    real_begin, real_finish = server_mod.FederatedServer.begin_round, server_mod.FederatedServer.finish_round

    def begin_round(self, round_id, budgets):
        k_box["k"] = self.k
        return real_begin(self, round_id, budgets)

    def finish_round(self):
        summary = real_finish(self)
        counts["rejected"] += len(summary.rejected)
        counts["clipped"] += len(summary.clipped)
        return summary

    hooks = None
    if attack is not None:
        hooks = FederationHooks(tamper_uplink=_attack(attack, seed, cfg.validation.max_abs_grad, k_box))
    server_mod.FederatedServer.begin_round, server_mod.FederatedServer.finish_round = begin_round, finish_round
    try:
        result = run_federation(cfg, hooks=hooks)
    finally:
        server_mod.FederatedServer.begin_round, server_mod.FederatedServer.finish_round = real_begin, real_finish
    return {"final": result.final_values.double(), "initial": result.initial_values.double(),
            "bal_acc": result.final_eval.get("balanced_accuracy"), **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from meerkat_hf.testing.toy_federation import make_model_dir, make_task_files

    rows: dict[tuple[str, str], list[dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(open("/dev/null", "w")):
        root = Path(tmp)
        model_dir, files = make_model_dir(root), make_task_files(root, n_train=40 * args.clients)
        for robust in (False, True):
            for seed in args.seeds:
                honest = _run(root, model_dir, files, seed, None, robust, args)
                own = float((honest["final"] - honest["initial"]).norm())
                rows.setdefault(("honest", "on" if robust else "off"), []).append(
                    {"seed": seed, "drift": 0.0, "own_movement": own, "bal_acc": honest["bal_acc"],
                     "rejected": honest["rejected"], "clipped": honest["clipped"]})
                for attack in args.attacks:
                    res = _run(root, model_dir, files, seed, attack, robust, args)
                    drift = float((res["final"] - honest["final"]).norm()) / own
                    rows.setdefault((attack, "on" if robust else "off"), []).append(
                        {"seed": seed, "drift": drift, "own_movement": own, "bal_acc": res["bal_acc"],
                         "rejected": res["rejected"], "clipped": res["clipped"]})
    print(f"{args.clients} IID clients, {args.rounds} rounds, T={args.local_steps}, lr {args.lr:g}, seeds {args.seeds}; "
          f"drift = ||w_attacked - w_honest|| / ||w_honest - w_0|| ({time.perf_counter() - started:.0f} s)\n")
    print("| attack | robust bound | drift (mean / max over seeds) | rejected uplinks | clipped updates | final bal. acc. |")
    print("|---|---|---|---|---|---|")
    for (attack, mode), rs in rows.items():
        drifts = [r["drift"] for r in rs]
        accs = [r["bal_acc"] for r in rs if r["bal_acc"] is not None]
        acc = f"{sum(accs) / len(accs):.3f}" if accs else "-"
        print(f"| {attack} | {mode} | {sum(drifts) / len(drifts):.3g} / {max(drifts):.3g} | "
              f"{sum(r['rejected'] for r in rs)} | {sum(r['clipped'] for r in rs)} | {acc} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({f"{a}|{m}": rs for (a, m), rs in rows.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
