"""Trust-boundary probe (issue 11): re-run the issue's attack classes and count the outcomes.

    python research/trust_probe.py [--cases 20000] [--rounds 30] [--flips 400] [--resumes 2] [--out FILE]

Per class it prints tried / rejected cleanly / accepted within bounds / crashed / wrongly accepted:

(a) messages: random mutations (bit flips, overwrites, truncation, insertion, deletion, huge counts;
    half of them with the CRC recomputed, as a buggy or hostile sender would) of genuine uplinks (ZO
    and first-order) fed to a `FederatedServer` round, and of genuine downlinks (records and dense)
    fed to a `FederatedClient`. Rejected cleanly = a `Rejection` / `MessageError`; crashed = any other
    exception; wrongly accepted = an accepted uplink that breaks a bound (another sender's id, another
    lr, more examples than the server knows, a non-finite state, a global move beyond the norm bound)
    or any accepted mutant whose CRC was not recomputed; a downlink giving another state than the
    server's. "Within bounds": a CRC-fixed mutant that is a well-formed, in-bounds message.
(b) malicious but well-formed uplinks in a real tiny federation (`run_federation`, 4 clients, one
    attacker per round, every attack in turn): wrongly accepted = the global state moved more than
    `max_update_ratio` allows in that round or went non-finite, or a forged message was accepted.
(c) single-bit flips in the newest checkpoint of a real run: `load_latest_checkpoint` (what resume
    uses) must refuse it and fall back to the previous one with a warning; a load of the newest
    with other content = wrongly accepted. `--resumes` of them also resume the run end to end and
    must reach the uninterrupted run's final digest.
(d) bad CLI inputs: the tables of tests/test_cli_bad_input.py through `meerkat_hf.cli.main`:
    rejected cleanly = exit 2 with one `meerkat-hf: error:` line naming the problem, nothing written.

Uses the tiny model/task of the test suite (tests/federated_support.py), CPU only, fixed seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEED = 20261211
COLUMNS = ("tried", "rejected cleanly", "accepted within bounds", "crashed", "wrongly accepted")


class Tally:
    def __init__(self):
        self.rows: dict[str, dict[str, int]] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, klass: str, outcome: str, note: str = "") -> None:
        row = self.rows.setdefault(klass, dict.fromkeys(COLUMNS, 0))
        row["tried"] += 1
        row[outcome] += 1
        if outcome in ("crashed", "wrongly accepted") and len(self.examples.setdefault(klass, [])) < 5:
            self.examples[klass].append(note)

    def table(self) -> str:
        head = "| class | " + " | ".join(COLUMNS) + " |"
        lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
        for klass, row in self.rows.items():
            lines.append(f"| {klass} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
        for klass, notes in self.examples.items():
            for note in notes:
                lines.append(f"  ! {klass}: {note}")
        return "\n".join(lines)


# -- (a) mutated messages ---------------------------------------------------------------------------
def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # overwrites, biased towards the header (lengths, counts, modes)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(buf), 64)) if rng.random() < 0.7 else rng.randrange(len(buf))
            buf[pos] = rng.choice([0, 1, 2, 3, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 2:
        del buf[rng.randrange(len(buf)):]
    elif kind == 3:
        buf += bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, 64])))
    elif kind == 4:
        pos = rng.randrange(len(buf) + 1)
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 6, 8, 12])))
    elif kind == 5:
        pos = rng.randrange(len(buf))
        del buf[pos:pos + rng.choice([1, 4, 6, 8, 12])]
    elif len(buf) >= 8:  # a 32-bit field set to something large / a float to inf or NaN
        pos = rng.randrange(0, len(buf) - 4)
        value = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 20, 0x7F800000, 0x7FC00000, 0x7F7FFFFF])
        struct.pack_into("<I", buf, pos, value)
    return bytes(buf)


def fix_crc(data: bytes) -> bytes:
    return data if len(data) < 4 else data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def probe_messages(tally: Tally, cases: int) -> None:
    from meerkat_hf.federated import FederatedClient, FederatedServer, LRSchedule, MessageError, ProtocolParams
    from meerkat_hf.federated.protocol.codec import (
        KIND_DENSE,
        KIND_RECORDS,
        DenseUplink,
        Uplink,
        decode_any_uplink,
        state_digest,
    )

    rng = random.Random(SEED)
    gen = torch.Generator().manual_seed(SEED)
    k, clients, steps, cap = 256, 4, 5, 50
    w0 = torch.randn(k, generator=gen) * 0.05
    checksum, fingerprint = bytes(range(16)), bytes(range(8))
    params = ProtocolParams(7, LRSchedule(1e-3), q=1, weight_decay=0.01)
    lr = params.schedule(0)

    def server(mode="zo"):
        s = FederatedServer(w0, checksum, fingerprint, params, num_clients=clients, mode=mode)
        s.example_caps = dict.fromkeys(range(clients), cap)
        return s

    def grads(n):
        return tuple(float(np.float32(x)) for x in torch.randn(n, generator=gen).tolist())

    ref = server()
    ups = [Uplink(0, c, cap - c, checksum, ref.digest, 1, grads(steps), (lr,) if c % 2 else ()).encode()
           for c in range(clients)]
    dense_ups = [DenseUplink(0, c, cap, checksum, ref.digest, steps, torch.randn(k, generator=gen) * 1e-3).encode()
                 for c in range(clients)]
    # genuine downlinks: a client at round 0 catching up two rounds by records, or dense
    for r in range(2):
        ref.begin_round(r, dict.fromkeys(range(clients), steps))
        for c in range(clients):
            ref.receive(Uplink(r, c, cap, checksum, ref.digest, 1, grads(steps)).encode(), sender=c)
        ref.finish_round()
    ref.begin_round(2, dict.fromkeys(range(clients), steps))
    downs = [ref.downlink(KIND_RECORDS, 0), ref.downlink(KIND_DENSE)]
    truth = ref.digest

    def judge_uplink(mutant: bytes, sender: int, mode: str, crc_fixed: bool, original: bytes) -> tuple[str, str]:
        s = server(mode)
        s.begin_round(0, dict.fromkeys(range(clients), steps))
        rej = s.receive(mutant, sender=sender)
        if rej is not None:
            return "rejected cleanly", ""
        msg = decode_any_uplink(mutant)
        before = s.values.clone()
        summary = s.finish_round()
        if summary.refused:
            return "rejected cleanly", ""
        problems = []
        if not crc_fixed and mutant != original:
            problems.append("accepted with a CRC that did not match")
        if msg.client_id != sender:
            problems.append(f"client id {msg.client_id} from client {sender}'s channel")
        if msg.num_examples > cap:
            problems.append(f"{msg.num_examples} examples > {cap}")
        if isinstance(msg, Uplink) and any(x != lr for x in msg.lrs):
            problems.append(f"lr {msg.lrs[:2]}")
        if not bool(torch.isfinite(s.values).all()):
            problems.append("non-finite state")
        elif float((s.values.double() - before.double()).norm()) > s.max_update_norm * (1 + 1e-6):
            problems.append("moved beyond the norm bound")
        return ("wrongly accepted", "; ".join(problems)) if problems else ("accepted within bounds", "")

    def judge_downlink(mutant: bytes, crc_fixed: bool, original: bytes) -> tuple[str, str]:
        client = FederatedClient(0, [[1]], None, batch_size=1, data_seed=0)
        try:
            values, _, _ = client.receive(mutant, mask_checksum=checksum, fingerprint=fingerprint, params=params,
                                          cache=w0, k=k)
        except MessageError:
            return "rejected cleanly", ""
        if state_digest(values) != truth or not bool(torch.isfinite(values).all()):
            return "wrongly accepted", "a downlink rebuilt another state"
        if not crc_fixed and mutant != original:
            return "wrongly accepted", "accepted with a CRC that did not match"
        return "accepted within bounds", ""

    sources = [("uplink", u, c, "zo") for c, u in enumerate(ups)] + \
              [("uplink", u, c, "dense") for c, u in enumerate(dense_ups)] + [("downlink", d, None, None) for d in downs]
    done = 0
    while done < cases:
        klass, original, sender, mode = sources[done % len(sources)]
        mutant = mutate(rng, original)
        if mutant == original:
            continue
        crc_fixed = rng.random() < 0.5
        if crc_fixed:
            mutant = fix_crc(mutant)
        name = f"(a) mutated {klass}s"
        try:
            with warnings_off(), quiet_logs():
                if klass == "uplink":
                    outcome, note = judge_uplink(mutant, sender, mode, crc_fixed, original)
                else:
                    outcome, note = judge_downlink(mutant, crc_fixed, original)
        except Exception as err:  # noqa: BLE001  (that is what is being counted)
            outcome, note = "crashed", f"{type(err).__name__}: {err} (mutant {mutant[:64].hex()}...)"
        tally.add(name, outcome, note)
        done += 1


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN payloads cast to float
        yield


# -- (b) malicious well-formed uplinks in a real federation -----------------------------------------
ATTACKS = ("huge scalars (|g| = max_abs_grad)", "absurd scalars (|g| = 1e6)", "NaN scalars", "client-chosen lr 10",
           "client-chosen lr per step", "inflated examples (2^31-1)", "examples one above the partition",
           "forged sender id (ahead of the genuine)", "replay of last round's uplink", "wrong start state",
           # issue 29: last round's scalars re-stamped with this round (and its start state), a counter beyond T*q
           "re-stamped replay of last round's scalars", "nan_steps beyond the zero scalars")
MUST_REFUSE = ("forged", "re-stamped", "nan_steps")  # accepting one of these is wrong whatever it moves


def probe_federation(tally: Tally, root: Path, rounds: int) -> None:
    from meerkat_hf.testing.toy_federation import base_config, make_model_dir, make_task_files
    from meerkat_hf.federated import FederationConfig, FederationHooks, decode_uplink, run_federation
    from meerkat_hf.federated.protocol import server as server_mod
    from meerkat_hf.federated.protocol.codec import Uplink

    model_dir, files = make_model_dir(root), make_task_files(root)
    cfg = FederationConfig.from_dict(base_config(root / "b", model_dir, files, rounds=rounds, local_steps=4,
                                                 eval_every=rounds, client_fraction=1.0))
    sent: dict[bytes, tuple[int, int, str]] = {}  # malicious message -> (round, attacker, attack)
    last: dict[int, bytes] = {}
    results: list[tuple[int, int, str, str]] = []  # (round, attacker, attack, what the server did)

    def tamper(r, cid, data):
        attacker, attack = r % 4, ATTACKS[r % len(ATTACKS)]
        prev = last.get(cid)
        last[cid] = data
        if cid != attacker:
            return [data]
        up = decode_uplink(data)
        mod = lambda **kw: Uplink(**{**up.__dict__, **kw}).encode()  # noqa: E731
        out = [data]
        if attack.startswith("huge"):
            out = [mod(grads=tuple(1e4 if g >= 0 else -1e4 for g in up.grads))]
        elif attack.startswith("absurd"):
            out = [mod(grads=tuple(1e6 for _ in up.grads))]
        elif attack.startswith("NaN"):
            out = [mod(grads=(float("nan"),) + up.grads[1:])]
        elif attack == "client-chosen lr 10":
            out = [mod(lrs=(10.0,))]
        elif attack.startswith("client-chosen lr per"):
            out = [mod(lrs=tuple(float(np.float32(1e-3 * (t + 2))) for t in range(up.num_steps)))]
        elif attack.startswith("inflated"):
            out = [mod(num_examples=2**31 - 1)]
        elif attack.startswith("examples one above"):
            out = [mod(num_examples=up.num_examples + 1)]
        elif attack.startswith("forged"):
            out = [mod(client_id=(cid + 1) % 4, grads=tuple(-1e4 for _ in up.grads)), data]
        elif attack.startswith("replay") and prev is not None:
            out = [prev, data]
        elif attack.startswith("wrong start"):
            out = [mod(state_digest=bytes(8))]
        elif attack.startswith("re-stamped") and prev is not None:
            out = [mod(grads=decode_uplink(prev).grads)]
        elif attack.startswith("nan_steps"):
            out = [mod(nan_steps=65535)]
        for m in out:
            if m != data:
                sent[m] = (r, cid, attack)
        return out

    real_receive, real_finish = server_mod.FederatedServer.receive, server_mod.FederatedServer.finish_round
    round_moves: dict[int, tuple[float, bool, float]] = {}

    def receive(self, data, sender=None):
        rej = real_receive(self, data, sender=sender)
        if data in sent:
            results.append((*sent[data], "rejected" if rej is not None else "accepted"))
        return rej

    def finish_round(self):
        before = self.values.clone()
        summary = real_finish(self)
        move = float((self.values.double() - before.double()).norm())
        round_moves[summary.round] = (move, bool(torch.isfinite(self.values).all()), self.max_update_norm)
        for i, (r, cid, attack, what) in enumerate(results):
            if r == summary.round and what == "accepted" and (cid not in summary.accepted or summary.refused):
                results[i] = (r, cid, attack, "rejected")  # dropped at replay (non-finite path) or refused round
        return summary

    server_mod.FederatedServer.receive, server_mod.FederatedServer.finish_round = receive, finish_round
    try:
        with quiet_logs():
            run_federation(cfg, hooks=FederationHooks(tamper_uplink=tamper))
    finally:
        server_mod.FederatedServer.receive, server_mod.FederatedServer.finish_round = real_receive, real_finish
    for r, cid, attack, what in results:
        move, finite, bound = round_moves[r]
        name = f"(b) {attack}"
        if what == "rejected":
            tally.add(name, "rejected cleanly")
        elif attack.startswith(MUST_REFUSE) or not finite or move > bound * (1 + 1e-6):
            tally.add(name, "wrongly accepted", f"round {r}: moved {move:.3g} (bound {bound:.3g}), finite={finite}")
        else:
            tally.add(name, "accepted within bounds")


@contextlib.contextmanager
def quiet_logs():
    old = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(old)


# -- (c) bit flips in a checkpoint ------------------------------------------------------------------
class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def probe_checkpoints(tally: Tally, root: Path, flips: int, resumes: int) -> None:
    from meerkat_hf.testing.toy_federation import base_config, make_model_dir, make_task_files
    from meerkat_hf.federated import FederationConfig, FederationHooks, run_federation
    from meerkat_hf.federated.engine import SimulatedCrash
    from meerkat_hf.federated.checkpoint import list_checkpoints, load_latest_checkpoint, read_checkpoint

    model_dir, files = make_model_dir(root), make_task_files(root)
    kw = dict(rounds=4, client_fraction=0.5, eval_every=4)

    def config(sub, **extra):
        return FederationConfig.from_dict(base_config(root / sub, model_dir, files, **kw, **extra))

    def crash(r, row):
        if r == 2:
            raise SimulatedCrash("power cut after round 2")

    with quiet_logs():
        full = run_federation(config("full"))
        with contextlib.suppress(SimulatedCrash):
            run_federation(config("crashed"), hooks=FederationHooks(after_round=crash))
    out = root / "crashed" / "run"
    paths = list_checkpoints(out)
    newest, previous = paths[-1], paths[-2]
    pristine = newest.read_bytes()
    newest_state = read_checkpoint(newest)
    rng = random.Random(SEED)
    capture = _Capture()
    logger = logging.getLogger("meerkat_hf.federated.checkpoint")
    logger.addHandler(capture)
    try:
        for i in range(flips):
            data = bytearray(pristine)
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
            newest.write_bytes(bytes(data))
            capture.records.clear()
            name = "(c) checkpoint bit flips (load)"
            try:
                ck = load_latest_checkpoint(out)
            except Exception as err:  # noqa: BLE001
                tally.add(name, "crashed", f"byte {pos}: {type(err).__name__}: {err}")
                continue
            if ck is not None and ck["path"] == str(newest):
                same = torch.equal(ck["server"]["values"], newest_state["server"]["values"]) and \
                    ck["round"] == newest_state["round"]
                tally.add(name, "accepted within bounds" if same else "wrongly accepted", f"byte {pos} loaded")
            elif ck is not None and ck["path"] == str(previous) and any("falling back" in m for m in capture.records):
                tally.add(name, "rejected cleanly")
            else:
                tally.add(name, "wrongly accepted", f"byte {pos}: fell back without a warning or to nothing")
            if i < resumes:  # the whole resume: must end on the uninterrupted run's digest
                work = root / f"resume{i}"
                shutil.copytree(root / "crashed", work)
                name = "(c) checkpoint bit flips (full resume)"
                try:
                    with quiet_logs():
                        res = run_federation(config(f"resume{i}", resume=True))
                    ok = res.state_digest == full.state_digest
                    tally.add(name, "rejected cleanly" if ok else "wrongly accepted", f"byte {pos}: digest differs")
                except Exception as err:  # noqa: BLE001
                    tally.add(name, "crashed", f"byte {pos}: {type(err).__name__}: {err}")
    finally:
        logger.removeHandler(capture)
        newest.write_bytes(pristine)


# -- (d) bad CLI inputs -----------------------------------------------------------------------------
def probe_cli(tally: Tally, root: Path) -> None:
    from meerkat_hf.testing import cli_inputs as table
    from meerkat_hf.testing.toy_federation import base_config, make_model_dir, make_task_files
    from meerkat_hf.cli import main

    model_dir, files = make_model_dir(root), make_task_files(root)
    cli = root / "cli"
    cli.mkdir()
    path = table.write_bad_inputs(cli, base_config(cli, model_dir, files))

    def run(argv, message, written):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), quiet_logs():
                code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        except Exception as e:  # noqa: BLE001
            return "crashed", f"{' '.join(argv[-2:])}: {type(e).__name__}: {e}"
        lines = [x for x in err.getvalue().splitlines() if x.strip()]
        if code == 0 or written.exists():
            return "wrongly accepted", f"{' '.join(argv[-2:])}: exit {code}, wrote {written.exists()}"
        if code != 2 or "Traceback" in err.getvalue() or not lines or not lines[-1].startswith("meerkat-hf"):
            return "crashed", f"{' '.join(argv[-2:])}: exit {code}: {err.getvalue()[-200:]!r}"
        if message and (len(lines) != 1 or message not in lines[0]):
            return "crashed", f"{' '.join(argv[-2:])}: unexpected message {lines!r}"
        return "rejected cleanly", ""

    for extra, message in table.FEDERATE:
        extra = [a.replace("{root}", str(cli)) for a in extra]
        argv = ["federate"] + ([] if "--config" in extra else ["--config", str(path)]) + extra
        tally.add("(d) bad CLI input: federate", *run(argv, message, cli / "run"))
    for extra, message in table.MASK:
        args = {"--model": model_dir, "--calibration": str(cli / "calib.txt"), "--out": str(cli / "mask-out")}
        pairs = list(zip(extra[::2], extra[1::2]))
        args.update({f: v for f, v in pairs if f in args})
        argv = ["mask", "compute"] + [x for kv in args.items() for x in kv] + \
            [x for f, v in pairs if f not in args for x in (f, v)]
        tally.add("(d) bad CLI input: mask compute", *run(argv, message, cli / "mask-out"))
    for argv in (["federate", "--set"], ["mask", "compute", "--density", "abc"], ["bogus"]):
        tally.add("(d) bad CLI input: argparse", *run(argv, "", cli / "never"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20000, help="mutated messages in (a)")
    ap.add_argument("--rounds", type=int, default=3 * len(ATTACKS), help="federation rounds in (b), one attack each")
    ap.add_argument("--flips", type=int, default=400, help="single-bit flips of the newest checkpoint in (c)")
    ap.add_argument("--resumes", type=int, default=2, help="of those, full resumes through run_federation")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tally = Tally()
    times = {}
    with tempfile.TemporaryDirectory(prefix="trust-probe-") as tmp:
        root = Path(tmp)
        for label, fn in (("a", lambda: probe_messages(tally, args.cases)),
                          ("b", lambda: probe_federation(tally, root, args.rounds)),
                          ("c", lambda: probe_checkpoints(tally, root, args.flips, args.resumes)),
                          ("d", lambda: probe_cli(tally, root))):
            t0 = time.perf_counter()
            fn()
            times[label] = time.perf_counter() - t0
    text = (f"trust probe: --cases {args.cases} --rounds {args.rounds} --flips {args.flips} --resumes {args.resumes}"
            f" (seed {SEED})\n\n{tally.table()}\n\nseconds: "
            + ", ".join(f"({k}) {v:.0f}" for k, v in times.items()) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    bad = sum(row["crashed"] + row["wrongly accepted"] for row in tally.rows.values())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
