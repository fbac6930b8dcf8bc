"""A real Flower deployment of examples/flower: a TLS SuperLink and 3 SuperNodes as separate
processes on 127.0.0.1 (certificates and SuperNode keys made at test time), `flwr run` of the
example app on a tiny model, and the faults a deployment meets.

One federation of `ROUNDS` = 3 rounds, resumed once:

1. round 0 is clean: every client is accepted;
2. SuperNode 2 is SIGKILLed (with its ClientApp) once it holds round 1's downlink: the round
   completes with the other two clients and metrics.jsonl records client 2 as `missing` and
   `dropped` (the SuperLink answers for a node whose heartbeats stopped, within a minute;
   `flower.round-timeout` is only a safety net here). It is restarted at once, with its key,
   hence its node id (SuperNode authentication);
3. the SuperLink is SIGKILLed (its ServerApp with it) once round 2 is under way and restarted
   on the same database. Flower does not restart a ServerApp: the run it served fails once its
   task's heartbeats are missed (`flwr ls`: finished:failed) and is never started again. What
   continues the federation is a new `flwr run` with ``resume=true``: its ServerApp loads the
   newest checkpoint in output-dir and says hello to every node (new run, new and empty Flower
   Contexts on the SuperNodes); the restarted SuperNode is accepted as client 2 again, catches
   up (records from the base model) and continues its data where the checkpoint says, like the
   two others; its uplinks are accepted again;
4. the federation ends on the same bits, round by round, as an uninterrupted in-process
   `run_federation` of the same config whose client 2 drops out of round 1
   (`FederationHooks.before_client`).

(A SuperNode that comes back while the same ServerApp runs on is said hello again and catches
up the same way; tests/test_flower.py checks that bookkeeping. Here it would cost two more
rounds of ClientApp processes.)

Every wait has a deadline; every process runs in a process group of its own and is killed in
the fixture's teardown whatever happens; a failure carries every process's log. Slow (every
Flower message to a SuperNode is a new ClientApp process that imports torch and transformers:
about 18 of them), so it runs on its own marker (``-m deployment``), in CI in the flower
virtualenv with a time budget, never skipped there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

if os.environ.get("MEERKAT_REQUIRE_FLWR") == "1":
    import flwr  # noqa: F401  (hard import: the flower CI step must never skip)
else:
    pytest.importorskip("flwr")

from deployment_support import Deployment, DeploymentError, app_run_config, wait_for
from federated_support import base_config, make_model_dir, make_task_files
from meerkat_hf.federated import FederationConfig, run_federation
from meerkat_hf.federated.checkpoint import load_latest_checkpoint
from meerkat_hf.federated.driver import FederationHooks

pytestmark = [pytest.mark.deployment, pytest.mark.timeout(1200)]

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"
CLIENTS = 3
ROUNDS = 3
KILLED = 2  # the Meerkat client whose SuperNode is killed
KILL_ROUND = 1  # ... while it holds this round's downlink (0-based); the SuperLink dies in the next one
ROUND_TIMEOUT = 300  # flower.round-timeout: a safety net, Flower reports the dead node sooner
WAIT = 360  # the longest any single step may take on a busy 2-core machine


@pytest.fixture
def deployment(tmp_path):
    """SuperLink + one SuperNode per client, up and connected; killed at teardown, whatever happened."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    dep = Deployment(tmp_path / "deployment", [f"client-id={c}" for c in range(CLIENTS)], env)
    try:
        dep.start(timeout=WAIT)
        yield dep
    finally:
        dep.close()


@contextlib.contextmanager
def logs_on_failure(dep: Deployment):
    """Any failure inside carries the log of every process of the deployment."""
    try:
        yield
    except DeploymentError:
        raise
    except Exception as err:  # noqa: BLE001  (an assertion, or an error reading the run's files)
        raise AssertionError(f"{type(err).__name__}: {err}\n{dep.logs()}") from err


def federation(root: Path) -> dict:
    model_dir, files = make_model_dir(root), make_task_files(root)
    # Meerkat-VP with a 2-step window: round 1's budgets come from the detector, so the
    # scheduler's state is part of what the resumed run must get back.
    return base_config(root, model_dir, files, algorithm="meerkat-vp", num_clients=CLIENTS, rounds=ROUNDS,
                       local_steps=3, partition={"scheme": "iid"}, vp={"min_steps": 2},
                       output_dir=str(root / "run"))


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def wait_rows(dep: Deployment, out: Path, n: int, what: str) -> list[dict]:
    return wait_for(f"{n} rounds in metrics.jsonl ({what})", lambda: (r := rows(out)) and len(r) >= n and r,
                    WAIT, dep.logs, interval=1.0)


def received(dep: Deployment, node: int, run_id: int, round_id: int) -> bool:
    """SuperNode `node` has pulled the train message of `round_id` (0-based) of run `run_id`."""
    text = dep.supernodes[node].text()
    at = text.find(f"[RUN {run_id}, ROUND {round_id}]")
    return at >= 0 and "Receiving: train message" in text[at:at + 300]


def test_deployment_survives_a_killed_supernode_and_a_superlink_restart(deployment, tmp_path):
    dep = deployment
    cfg = federation(tmp_path)
    out = Path(cfg["output_dir"])
    options = {"round-timeout": ROUND_TIMEOUT, "node-wait-timeout": WAIT}
    with logs_on_failure(dep):
        first = dep.submit(APP, app_run_config(APP, cfg, options, tmp_path, "first"), "first")
        run_id = first.wait_started(WAIT)
        kill_supernode_mid_round(dep, out, run_id)
        dep.start_supernode(KILLED, timeout=WAIT)  # same key, so the same node id (checked)
        kill_superlink_mid_round(dep, out, run_id)
        resumed = dep.submit(APP, app_run_config(APP, {**cfg, "resume": True}, options, tmp_path, "resumed"), "resumed")
        resumed_id = resumed.wait_started(WAIT)
        resumed.wait_finished(WAIT * 2)
        assert f"resumed from {out / 'checkpoints'}" in resumed.proc.text()
        # Flower fails the run whose ServerApp stopped sending heartbeats (and never starts it
        # again), but only once its heartbeat patience (2 x 30 s) has run out: a fast machine
        # finishes the resumed run before that, so wait for the verdict instead of racing it.
        statuses = wait_for(f"run {run_id} to be failed for its lost heartbeats",
                            lambda: (s := dep.run_statuses())[run_id] != "running" and s, WAIT, dep.logs, interval=2.0)
        assert statuses == {run_id: "finished:failed", resumed_id: "finished:completed"}, statuses
        final = rows(out)
        report(final, statuses[run_id])
        check_rounds(final)
        check_same_bits_as_in_process(cfg, final)


def kill_supernode_mid_round(dep: Deployment, out: Path, run_id: int) -> None:
    """SIGKILL SuperNode `KILLED` (and its ClientApp) once it holds round `KILL_ROUND`'s downlink;
    the round must complete with the others."""
    wait_for(f"SuperNode {KILLED} to receive round {KILL_ROUND}", lambda: received(dep, KILLED, run_id, KILL_ROUND),
             WAIT, dep.logs)
    dep.supernodes[KILLED].kill(signal.SIGKILL)
    assert len(rows(out)) == KILL_ROUND, "the SuperNode was killed after its round had closed"
    row = wait_rows(dep, out, KILL_ROUND + 1, f"round {KILL_ROUND} closes without client {KILLED}")[KILL_ROUND]
    assert row["accepted"] == [c for c in range(CLIENTS) if c != KILLED], row
    assert row["missing"] == [KILLED] and "Node Unavailable" in row["dropped"][str(KILLED)], row


def kill_superlink_mid_round(dep: Deployment, out: Path, run_id: int) -> None:
    """SIGKILL the SuperLink (and the ServerApp it spawned) once the round after the SuperNode's
    reaches a SuperNode; restart it on the same database."""
    nxt = KILL_ROUND + 1
    wait_for(f"round {nxt} to reach a SuperNode", lambda: any(received(dep, i, run_id, nxt) for i in range(CLIENTS)),
             WAIT, dep.logs)
    dep.superlink.kill(signal.SIGKILL)
    assert len(rows(out)) == nxt and load_latest_checkpoint(out)["round"] == nxt, f"round {nxt} was already over"
    dep.start_superlink(WAIT)


def report(final: list[dict], lost: str) -> None:
    """What each fault left in metrics.jsonl (shown with -s)."""
    print(f"\nthe run the SuperLink served: {lost}; resumed from the checkpoint of round {KILL_ROUND + 1}")
    for r in final:
        print(f"  round {r['round']}: participants {r['participants']} accepted {r['accepted']} "
              f"missing {r['missing']} dropped {r['dropped']} downlink {r['downlink_kinds']} "
              f"fallbacks {r['downlink_fallbacks']} digest {r['state_digest'][:16]}")


def check_rounds(final: list[dict]) -> None:
    """Every round once; client 2 missing from the round it was killed in, accepted in all others."""
    assert [r["round"] for r in final] == list(range(1, ROUNDS + 1))
    assert all(not r["rejected"] and not r["replay_mismatches"] for r in final), final
    for r in final:
        assert r["accepted"] == [c for c in range(CLIENTS) if r["round"] != KILL_ROUND + 1 or c != KILLED], r
    assert not any(r["downlink_fallbacks"] for r in final), "a client needed a dense retry"


def check_same_bits_as_in_process(cfg: dict, final: list[dict]) -> None:
    """The deployment (killed node, lost run, resume) ends where an uninterrupted in-process run
    ends whose client 2 drops out of the same round: same participants, budgets, accepted
    clients and state digest after every round."""
    assert [r["dropped"].keys() for r in final] == [set(), {str(KILLED)}, set()]

    def drop(round_id: int, client_id: int) -> None:
        if (round_id, client_id) == (KILL_ROUND, KILLED):
            raise ConnectionError("the in-process twin of the deployment's dropout")

    ref = run_federation(FederationConfig.from_dict({**cfg, "output_dir": cfg["output_dir"] + "-in-process"}),
                         hooks=FederationHooks(before_client=drop))
    for key in ("participants", "budgets", "accepted", "missing", "limited_clients", "state_digest"):
        assert [r[key] for r in final] == [r[key] for r in ref.metrics], key
    assert final[-1]["state_digest"] == ref.state_digest
