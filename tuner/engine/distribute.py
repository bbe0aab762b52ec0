"""Several processes on one search: Keras Tuner's chief and workers, and the ``--gpus`` launcher.

Keras Tuner's distributed mode does the scheduling: a chief process serves the oracle over
gRPC and never trains; each worker asks it for a trial, trains it and reports back. It is
switched on by three variables, which ``--chief`` / ``--worker`` set for you:

    KERASTUNER_TUNER_ID     chief, or the worker's own name (unique, stable across restarts)
    KERASTUNER_ORACLE_IP    the chief's address
    KERASTUNER_ORACLE_PORT  the chief's port

What this package adds around it (all processes share one results folder):

* the budget: the chief owns ``budget.json`` and refuses new trials once the budget is
  spent or the next trial would not finish (:func:`budget_gate`); workers stop a running
  trial at the first epoch end past the deadline written there;
* ``trials.csv`` rows are written under a file lock, with the ``worker`` that ran them;
* the decoded-image and feature caches are built once, under a lock, by whichever worker
  needs them first;
* a worker killed mid-trial leaves that trial with the chief; restarted with the same
  ``--worker-id``, it gets the same trial back and runs it again (only its progress is lost).

``--gpus 0,1,2,3`` on one machine starts a chief and one worker per GPU
(``CUDA_VISIBLE_DEVICES``), prefixes their output and forwards Ctrl-C/SIGTERM to them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from data_tools.errors import InputError

ENV_ID, ENV_IP, ENV_PORT = "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"


@dataclass(frozen=True)
class Role:
    """What this process is in the search: ``single``, ``chief`` or ``worker``."""

    kind: str
    tuner_id: str = "tuner0"
    host: str = ""
    port: int = 0


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or one line naming the flag and the expected form."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{flag} {text!r} is not HOST:PORT: write e.g. {flag} 10.0.0.5:8000")
    return host, int(port)


def resolve_role(
    chief: str | None,
    worker: str | None,
    worker_id: str | None,
    environ: dict[str, str] | None = None,
) -> Role:
    """The role from ``--chief`` / ``--worker`` (which win), else from the KERASTUNER_*
    variables; sets those variables, which Keras Tuner reads, to match."""
    env = os.environ if environ is None else environ
    if chief and worker:
        raise InputError("--chief and --worker were both given: a process is one or the other")
    if chief or worker:
        host, port = parse_address(chief or worker, "--chief" if chief else "--worker")
        tuner_id = "chief" if chief else (worker_id or default_worker_id(env))
        if tuner_id != "chief" and "chief" in tuner_id:
            raise InputError(f"--worker-id {tuner_id!r}: a worker's id must not contain 'chief'")
        env.update({ENV_ID: tuner_id, ENV_IP: host, ENV_PORT: str(port)})
        return Role("chief" if chief else "worker", tuner_id, host, port)
    if ENV_IP not in env:
        return Role("single")
    missing = [name for name in (ENV_ID, ENV_PORT) if not env.get(name)]
    if missing:
        raise InputError(
            f"{ENV_IP} is set but {' and '.join(missing)} is not: set all three "
            f"KERASTUNER_* variables, or use --chief HOST:PORT / --worker HOST:PORT"
        )
    host, port = parse_address(f"{env[ENV_IP]}:{env[ENV_PORT]}", ENV_IP + ":" + ENV_PORT)
    kind = "chief" if "chief" in env[ENV_ID] else "worker"
    return Role(kind, env[ENV_ID], host, port)


def exposure_warning(host: str) -> str | None:
    """One line for a chief bound beyond this machine: Keras Tuner's gRPC port has no
    authentication and no encryption, so anyone who reaches it can take trials or report
    false results. None on a loopback address."""
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"warning: the chief's port on {host} has no authentication and no encryption: anyone "
        f"who can reach it can take trials or report false results; bind it to a private "
        f"address behind a firewall, or to 127.0.0.1 with the workers coming through an SSH "
        f"tunnel (ssh -N -L PORT:127.0.0.1:PORT chief-host)"
    )


def default_worker_id(env: dict[str, str]) -> str:
    """``KERASTUNER_TUNER_ID``, else ``<host>-gpu<N>`` when one GPU is assigned, else
    ``<host>-<pid>`` (unique, but a restarted worker then cannot reclaim its trial)."""
    if env.get(ENV_ID) and "chief" not in env[ENV_ID]:
        return env[ENV_ID]
    host = socket.gethostname().split(".")[0]
    gpus = env.get("CUDA_VISIBLE_DEVICES", "")
    return f"{host}-gpu{gpus}" if gpus and "," not in gpus else f"{host}-{os.getpid()}"


def budget_gate(oracle, refuse: Callable[[object], str | None], report: Callable[[str], None]):
    """Make the chief's ``oracle`` refuse new trials once ``refuse(trial)`` gives a reason.

    The refused trial goes back to the oracle's retry queue (where Keras Tuner puts
    interrupted trials when it reloads), so a resumed search runs it first; the worker gets
    a STOPPED trial and exits, and the chief exits when the last worker has.
    """
    import keras_tuner as kt

    from tuner.engine import adapter

    trial_module = kt.engine.trial
    create_trial = oracle.create_trial
    closed: list[str] = []

    def stopped(tuner_id: str):
        oracle.tuner_ids.discard(tuner_id)
        return trial_module.Trial(
            oracle.hyperparameters.copy(), trial_id="stopped", status="STOPPED"
        )

    def gated(tuner_id: str):
        if closed:
            return stopped(tuner_id)
        trial = create_trial(tuner_id)
        if trial.status != trial_module.TrialStatus.RUNNING:
            return trial
        reason = refuse(trial)
        if reason is None:
            report(f"trial {trial.trial_id} -> {tuner_id}")
            return trial
        closed.append(reason)
        report(f"budget reached: {reason}; no more trials")
        adapter.requeue(oracle, tuner_id, trial.trial_id)
        oracle.save()
        return stopped(tuner_id)

    oracle.create_trial = gated
    return closed


def launch(argv: Sequence[str], gpus: Sequence[str], port: int | None = None) -> int:
    """Run ``python -m tuner.search <argv>`` as a chief and one worker per GPU on loopback;
    returns the first non-zero exit code (the chief's when all are zero)."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "tuner.search", *argv]
    env = {k: v for k, v in os.environ.items() if k not in (ENV_ID, ENV_IP, ENV_PORT)}
    specs = [("chief", [*command, "--chief", address], env)]
    for gpu in gpus:
        worker_env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
        worker_cmd = [*command, "--worker", address, "--worker-id", f"gpu{gpu}"]
        specs.append((f"gpu{gpu}", worker_cmd, worker_env))
    processes = []
    printers = []
    for name, cmd, process_env in specs:
        process = subprocess.Popen(
            cmd,
            env=process_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        processes.append(process)
        printer = threading.Thread(target=_prefix, args=(name, process.stdout), daemon=True)
        printer.start()
        printers.append(printer)

    def forward(signum: int, frame) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [process.wait() for process in processes]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for printer in printers:
        printer.join(timeout=5)
    return next((code for code in codes[1:] if code), codes[0])


def _prefix(name: str, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--gpus`` and ``--overwrite`` (the launcher applies those itself)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus=") or arg == "--overwrite":
            continue
        out.append(arg)
    return out
