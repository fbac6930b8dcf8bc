"""A real Flower deployment on the loopback interface, for tests/test_flower_deployment.py.

A TLS SuperLink (certificates made here with openssl) and one SuperNode per Meerkat client,
each a separate process in a process group of its own; killing one kills the SuperExec,
ServerApp and ClientApp processes it spawned too (Flower detaches a SuperLink's SuperExec into
a session of its own, so they are found as descendants). The `flwr` CLI talks to the SuperLink
over TLS. SuperNodes authenticate with a key pair of their own (registered with
`flwr supernode register`): the SuperLink then gives a node the same node id whenever it
(re)connects with its key, which is what lets a restarted site take its place in a run again.

Every wait polls with a deadline; `Deployment.logs()` gathers every process's log for
assertion messages; `Deployment.close()` kills whatever is still running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

BIN = Path(sys.executable).parent  # the flwr CLIs of the virtualenv running the tests
CONNECTION = "meerkat-test"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DeploymentError(AssertionError):
    """A process did not do what the test waited for (the message carries every log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float, logs: Callable[[], str],
             interval: float = 0.5) -> object:
    """Poll `check` until it returns something truthy; fail with every log after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")


def make_certificates(folder: Path) -> dict[str, Path]:
    """A private CA and a server certificate for localhost/127.0.0.1 (RSA 2048: fast to make)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                           "server.pem", "san.ext"))
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=meerkat-test-ca",
         "-keyout", ca_key, "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-extfile", ext, "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True, timeout=60)
    return {"ca": ca, "cert": cert, "key": key}


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub.write_bytes(private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH))
    return priv, pub


class Process:
    """One command in a process group of its own, its stdout+stderr in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str], cwd: Path):
        self.name, self.args, self.log, self.env, self.cwd = name, args, log, env, cwd
        self.popen: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Process":
        self.starts += 1
        with open(self.log, "a") as fh:
            fh.write(f"\n===== start {self.starts}: {' '.join(self.args)}\n")
            fh.flush()
            self.popen = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                          cwd=self.cwd, start_new_session=True, preexec_fn=die_with_parent)
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def text(self) -> str:
        """The log so far, without the colour codes Flower writes even into files."""
        return ANSI.sub("", self.log.read_text(errors="replace")) if self.log.is_file() else ""

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20) -> None:
        """Signal the process group and every descendant (Flower starts a SuperLink's SuperExec in
        a session of its own); wait, bounded, for the leader; then make sure nothing is left."""
        if self.popen is None:
            return
        family = descendants(self.popen.pid)
        signal_all(self.popen.pid, family, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        signal_all(self.popen.pid, family, signal.SIGKILL)
        self.popen.wait(timeout=timeout)


# prctl, looked up here: the child between fork and exec must not take the dynamic loader's locks
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if the test process dies without cleaning up (e.g.
    killed by a CI time budget), so no SuperLink outlives the test (Linux; elsewhere a no-op)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_all(group: int, processes: list[psutil.Process], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


class Deployment:
    """A TLS SuperLink and `len(node_configs)` SuperNodes under `root`, driven by the flwr CLI."""

    def __init__(self, root: Path, node_configs: list[str], env: dict[str, str] | None = None):
        self.root = root
        self.logs_dir = root / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # the flwr CLIs start further flwr commands (flower-superexec, flwr-serverapp, flwr-clientapp) by name
        self.env = {**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()
        self.certs = make_certificates(root / "certs")
        self.processes: dict[str, Process] = {}
        self.superlink = self._process("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca"]),
            "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
            "--host", "127.0.0.1", "--port", str(self.port), "--database", str(root / "superlink.db"),
            "--disable-runtime-dependency-installation", "--enable-supernode-auth"])
        self.cli_home = root / "home" / "cli"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca"]}"\n')
        self.node_keys = [make_node_key(root / "keys", f"node{i}") for i in range(len(node_configs))]
        self.supernodes = [
            self._process(f"supernode-{i}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.certs["ca"]), "--auth-supernode-private-key", str(key),
                "--port", str(free_port()), "--node-config", node_config, "--max-wait-time", "300"])
            for i, ((key, _), node_config) in enumerate(zip(self.node_keys, node_configs))]
        self.node_ids: list[int] = []

    def _process(self, name: str, args: list[str]) -> Process:
        home = self.root / "home" / name  # each component installs the app (FAB) into its own FLWR_HOME
        home.mkdir(parents=True, exist_ok=True)
        proc = Process(name, args, self.logs_dir / f"{name}.log", {**self.env, "FLWR_HOME": str(home)}, self.root)
        self.processes[name] = proc
        return proc

    # -- diagnostics ---------------------------------------------------------------------------
    def logs(self, tail: int = 6000) -> str:
        """The end of every process's log (attached to every assertion about the deployment)."""
        parts = []
        for log in sorted(self.logs_dir.glob("*.log")):
            text = ANSI.sub("", log.read_text(errors="replace"))
            parts.append(f"----- {log.name} (last {min(tail, len(text))} of {len(text)} chars)\n{text[-tail:]}")
        return "\n".join(parts)

    # -- the flwr CLI ----------------------------------------------------------------------------
    def cli_json(self, *argsets: list[str], timeout: float = 120) -> list[dict]:
        """`flwr ARGS --format json` for each of `argsets`, as concurrent processes (each pays a few
        seconds of imports on a busy machine); their JSON answers, in order."""
        env = {**self.env, "FLWR_HOME": str(self.cli_home)}
        procs = [subprocess.Popen([str(BIN / "flwr"), *args, "--format", "json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env, cwd=self.root, start_new_session=True)
                 for args in argsets]
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                outputs.append(proc.communicate()[0] + f"\n[killed after {timeout:.0f} s]")
        answers = []
        with open(self.logs_dir / "flwr-cli.log", "a") as fh:
            for args, proc, output in zip(argsets, procs, outputs):
                fh.write(f"\n$ flwr {' '.join(args)} --format json\n[exit {proc.returncode}]\n{output}")
        for args, proc, output in zip(argsets, procs, outputs):
            try:
                answer = json.loads(output[output.index("{"):])
            except ValueError:
                answer = {}
            if proc.returncode != 0 or not answer.get("success"):
                raise DeploymentError(f"flwr {' '.join(args)} failed\n{self.logs()}")
            answers.append(answer)
        return answers

    def run_statuses(self) -> dict[int, str]:
        """Every run's status as the SuperLink reports it (`flwr ls`), e.g. finished:completed."""
        return {int(r["run-id"]): str(r["status"]) for r in self.cli_json(["ls"])[0]["runs"]}

    # -- starting and stopping -------------------------------------------------------------------
    def start_superlink(self, timeout: float = 90) -> None:
        """Start the SuperLink; ready once its HTTPS server (Fleet, Control, Runtime APIs) listens."""
        started = self.superlink.starts
        self.superlink.start()

        def ready() -> bool:
            if not self.superlink.alive:
                raise DeploymentError(f"the SuperLink exited\n{self.logs()}")
            return self.superlink.text().count("Uvicorn running on https://") > started

        wait_for("the SuperLink to listen", ready, timeout, self.logs)

    def register_nodes(self) -> list[int]:
        """`flwr supernode register` every site's public key; the node ids the SuperLink gave them."""
        answers = self.cli_json(*[["supernode", "register", str(pub)] for _, pub in self.node_keys])
        self.node_ids = [int(a["node-id"]) for a in answers]
        return self.node_ids

    def start_supernode(self, i: int, timeout: float = 90, wait: bool = True) -> None:
        """Start SuperNode `i`; ready once connected (the SuperLink gave it its registered node id)."""
        proc = self.supernodes[i]
        proc.start()
        if wait:
            self.wait_connected(i, timeout)

    def wait_connected(self, i: int, timeout: float = 90) -> None:
        proc, starts = self.supernodes[i], self.supernodes[i].starts

        def connected() -> bool:
            if not proc.alive:
                raise DeploymentError(f"{proc.name} exited\n{self.logs()}")
            ids = re.findall(r"SuperNode ID: (\d+)", proc.text())
            return len(ids) >= starts and int(ids[-1]) == self.node_ids[i]

        wait_for(f"{proc.name} to connect as node {self.node_ids[i]}", connected, timeout, self.logs)

    def start(self, timeout: float = 120) -> None:
        self.start_superlink(timeout)
        self.register_nodes()
        for i in range(len(self.supernodes)):
            self.start_supernode(i, wait=False)
        for i in range(len(self.supernodes)):
            self.wait_connected(i, timeout)

    def close(self) -> None:
        """Kill every process started here (the `flwr run`s first, the SuperLink last)."""
        for proc in reversed(list(self.processes.values())):
            proc.kill()

    # -- runs ------------------------------------------------------------------------------------
    def submit(self, app: Path, run_config: Path, name: str) -> "FlowerRun":
        """`flwr run APP --stream --run-config FILE` in the background (it follows the run's log)."""
        env = {**self.env, "FLWR_HOME": str(self.cli_home)}
        proc = Process(f"flwr-run-{name}", [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream",
                                            "--run-config", str(run_config)],
                       self.logs_dir / f"flwr-run-{name}.log", env, self.root)
        self.processes[proc.name] = proc
        return FlowerRun(self, proc.start())


class FlowerRun:
    """One `flwr run --stream` in the background."""

    def __init__(self, deployment: Deployment, proc: Process):
        self.deployment, self.proc = deployment, proc
        self.run_id: int | None = None

    def wait_started(self, timeout: float = 120) -> int:
        def started():
            m = re.search(r"started run (\d+)", self.proc.text())
            if m is None and not self.proc.alive:
                raise DeploymentError(f"`flwr run` exited before starting a run\n{self.deployment.logs()}")
            return int(m.group(1)) if m else None

        self.run_id = wait_for("`flwr run` to start a run", started, timeout, self.deployment.logs)
        return self.run_id

    def wait_finished(self, timeout: float) -> None:
        """Wait for `flwr run --stream` to return (it does when the run ends)."""
        wait_for(f"run {self.run_id} to finish", lambda: not self.proc.alive, timeout, self.deployment.logs, 1.0)


def app_run_config(app: Path, config: dict, options: dict[str, object], folder: Path, name: str) -> Path:
    """A ``--run-config`` TOML file that makes the example app run exactly `config`.

    The app applies every key its pyproject declares over its ``config-file``, so the file sets
    every declared key from `config` (the rest of `config` travels in the YAML ``config-file``)
    and every declared ``flower.*`` option from `options` (or the app's default)."""
    import tomli
    import tomli_w
    import yaml
    from flwr.common.config import flatten_dict

    from meerkat_hf.federated import FederationConfig

    full = FederationConfig.from_dict(config).to_dict()
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump(full, sort_keys=True))
    declared = flatten_dict(tomli.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    nested: dict = {}
    for key, default in declared.items():
        if key == "config-file":
            value = str(yaml_path)
        elif key.startswith("flower."):
            value = options.get(key[len("flower."):], default)
        else:
            value = full
            for part in key.replace("-", "_").split("."):
                value = value[part]
            value = "" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else value
        target = nested
        *sections, leaf = key.split(".")
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    path = folder / f"{name}.toml"
    path.write_bytes(tomli_w.dumps(nested).encode())
    return path
