"""A local multi-node Ray cluster on one machine: one head plus N worker nodes.

``python -m cluster.local start --workers 2`` runs ``ray start`` once per node, each node with
its own ``--temp-dir`` under one short private folder and its own free ports, token
authentication on (``RAY_AUTH_MODE=token``, a fresh token file per cluster) and every listener
on the loopback interface. ``stop`` ends exactly the processes this cluster started and checks
that they are gone; ``status`` lists the nodes; ``env`` prints the client environment.

Loopback only: Ray's servers bind ``127.0.0.1`` only when the node address is exactly
``127.0.0.1``, which stock ``ray start`` rewrites to the machine's routable IP; nodes are
therefore started through :mod:`cluster._raystart` (``ray start`` keeping the address), and
clients get ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` so their ``ray.init()`` keeps it too. The
fixed metric ports of the autoscaler and dashboard are moved to free ports.

Python API (for tests and scripts)::

    info = start_cluster(workers=2, cpus_per_node=1, gpus_per_node=0, state_dir=tmp)
    subprocess.run(["ray", "job", "submit", "--address", info.dashboard_url, "--", ...],
                   env={**os.environ, **info.env})
    stop_cluster(tmp)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.mlflow_server import (
    BACKENDS,
    TrackingStack,
    backup_store,
    check_backend,
    is_healthy,
    plan_stack,
    restart_server,
    start_stack,
    stop_stack,
    store_uri,
    wait_stack,
)
from segcore.cli import setup_logging

log = logging.getLogger(__name__)

NODE_IP = "127.0.0.1"  # every node, the GCS and the dashboard listen here only
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
MARKER_ENV = "GIGASEG_CLUSTER_ID"  # set on every process the cluster starts; how stop finds them
NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
ENV_PORTS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")  # fixed 44217/44227 unless set
_SESSION_NAMES = (b"ray", b"postgres")  # what a process in one of our sessions is called
_MAX_TEMP_ROOT = 40  # unix socket paths (temp/nX/session_.../sockets/plasma_store) must stay < 107


@dataclass
class ClusterInfo:
    """Where a running local cluster is and how clients reach it.

    ``env`` holds what a client process needs: ``RAY_ADDRESS`` (GCS, for ``ray.init()``),
    ``RAY_API_SERVER_ADDRESS`` (dashboard, for ``ray job submit``), ``RAY_AUTH_MODE``,
    ``RAY_AUTH_TOKEN_PATH`` and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (so the client keeps
    ``127.0.0.1`` instead of swapping in the public IP). Use it as
    ``subprocess.run(..., env={**os.environ, **info.env})``.
    """

    address: str
    dashboard_url: str
    env: dict[str, str]
    state_dir: str
    temp_dir: str
    cluster_id: str
    workers: int
    cpus_per_node: float
    gpus_per_node: float
    ports: list[dict[str, int]] = field(default_factory=list)  # `ray start` port flags, head first
    env_ports: dict[str, int] = field(default_factory=dict)  # fixed-by-default ports moved by env
    sessions: list[int] = field(default_factory=list)  # PIDs of the `ray start`s = their session ids
    pids: list[int] = field(default_factory=list)  # processes seen right after start
    mlflow: TrackingStack | None = None  # the MLflow server (and its PostgreSQL), if started with one

    @property
    def token_path(self) -> Path:
        return Path(self.state_dir) / TOKEN_FILE

    def save(self) -> None:
        """Write the state file (``<state_dir>/cluster.json``)."""
        path = Path(self.state_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: str | Path) -> ClusterInfo:
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no local cluster recorded here. Start one with "
                f"`python -m cluster.local start --state-dir {state_dir}`."
            )
        data = json.loads(path.read_text())
        if data.get("mlflow"):
            data["mlflow"] = TrackingStack(**data["mlflow"])
        return cls(**data)


def default_state_dir() -> Path:
    """``$GIGASEG_HOME/cluster``, else ``./gigaseg-runs/cluster`` (git-ignored)."""
    return Path(os.environ.get("GIGASEG_HOME", "gigaseg-runs")) / "cluster"


def load_cluster(state_dir: str | Path | None = None) -> ClusterInfo:
    """The :class:`ClusterInfo` recorded by :func:`start_cluster` in ``state_dir``."""
    return ClusterInfo.load(state_dir or default_state_dir())


def parse_size(text: str | int) -> int:
    """``"100MB"``, ``"2GiB"``, ``"500000000"`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"object store size {text!r}: not a size. Use e.g. 100MB, 2GiB or bytes.")
    number, unit = float(m.group(1)), m.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = "kmgt".find(unit[:1]) + 1 if unit else 0
    return int(number * base**power)


# ---------------------------------------------------------------- processes


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _is_zombie(pid: int) -> bool:
    stat = _read_proc(pid, "stat")
    return b") Z " in stat or not stat


def _stat_ids(pid: int) -> tuple[int, int]:
    """Fields 4 and 6 of /proc/PID/stat (parent PID, session id); -1s when unreadable."""
    stat = _read_proc(pid, "stat")
    try:
        fields = stat[stat.rindex(b")") + 2 :].split()
        return int(fields[1]), int(fields[3])
    except ValueError:
        return -1, -1


def _belongs(pid: int, info: ClusterInfo) -> bool:
    """One of three marks: our marker in the environment (job drivers inherit it), our temp dir
    in the command line, or a Ray or PostgreSQL process in the session of one of our ``ray start``
    runs or of our postmaster, or a child of one (PostgreSQL's children start sessions of their
    own). The session is needed because Ray renames some processes (``ray::DashboardAgent``) and
    setproctitle then blanks their /proc environ, as PostgreSQL's titles do; "ray" / "postgres"
    in the command line guards PID reuse."""
    cmdline = _read_proc(pid, "cmdline")
    if f"{info.temp_dir}/".encode() in cmdline:
        return True
    if any(name in cmdline for name in _SESSION_NAMES) and set(_stat_ids(pid)) & set(info.sessions):
        return True
    return f"{MARKER_ENV}={info.cluster_id}".encode() in _read_proc(pid, "environ").split(b"\0")


def find_cluster_pids(info: ClusterInfo) -> list[int]:
    """Live (non-zombie) processes of this cluster, never the calling process or its parent."""
    me = {os.getpid(), os.getppid()}
    pids = (int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) not in me)
    return sorted(pid for pid in pids if _belongs(pid, info) and not _is_zombie(pid))


def _hex_ip(text: str) -> str:
    """Address field of /proc/net/tcp{,6} -> dotted IPv4 (v4-mapped v6 too) or v6 text."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, words[12:])
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_sockets(pids: list[int]) -> set[tuple[str, int]]:
    """``(ip, port)`` of every TCP socket in LISTEN state owned by one of ``pids``."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ip, port = cols[1].split(":")
                    found.add((_hex_ip(ip), int(port, 16)))
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(list_pids: Callable[[], list[int]], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list_pids()
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = list_pids()
    return left


def terminate(list_pids: Callable[[], list[int]], grace: float = 5.0) -> int:
    """SIGTERM what ``list_pids`` finds, SIGKILL what is left after ``grace`` seconds;
    returns how many processes were signalled. Raises if any survives SIGKILL."""
    first = list_pids()
    _signal_all(first, signal.SIGTERM)
    left = _wait_gone(list_pids, grace)
    if left:
        log.info("%d processes ignored SIGTERM for %.0f s, sending SIGKILL: %s", len(left), grace, left)
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(list_pids, 10.0)
    if left:
        raise RuntimeError(f"processes still alive after SIGKILL: {left}")
    return len(first)


# ---------------------------------------------------------------- starting


def _ray_start_argv() -> list[str]:
    """``ray start`` through :mod:`cluster._raystart` with this interpreter (same Ray as the caller)."""
    return [sys.executable, str(Path(__file__).with_name("_raystart.py")), "start"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on every interface right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _allocate_ports(workers: int, extra: int = 0) -> tuple[list[dict[str, int]], dict[str, int], list[int]]:
    """Port flags per node (head first), the env-configured ports and ``extra`` more, all distinct."""
    names = [list(HEAD_PORTS + NODE_PORTS)] + [list(NODE_PORTS)] * workers
    ports = iter(free_ports(sum(len(n) for n in names) + len(ENV_PORTS) + extra))
    flags = [{name: next(ports) for name in node} for node in names]
    return flags, {k: next(ports) for k in ENV_PORTS}, list(ports)


def _write_token(state_dir: Path) -> Path:
    """A fresh 256-bit token (what ``ray get-auth-token --generate`` makes), mode 0600."""
    path = state_dir / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _node_env(info: ClusterInfo) -> dict[str, str]:
    """Environment of every ``ray start``: client env (token auth, loopback), our marker, the
    moved metric ports, and no inherited address or token that could win over ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(info.env)
    env.pop("RAY_ADDRESS")
    env.update({k: str(v) for k, v in info.env_ports.items()})
    env.update(RAY_USAGE_STATS_ENABLED="0", **{MARKER_ENV: info.cluster_id})
    return env


def _start_command(index: int, info: ClusterInfo, object_store_memory: int) -> list[str]:
    """``ray start`` arguments for node ``index`` (0 is the head)."""
    cmd = _ray_start_argv() + [f"--node-ip-address={NODE_IP}"]
    if index == 0:
        cmd += ["--head", "--include-dashboard=true", f"--dashboard-host={NODE_IP}"]
    else:
        cmd += [f"--address={info.address}"]
    cmd += [f"--{name}={port}" for name, port in info.ports[index].items()]
    cmd += [
        f"--temp-dir={info.temp_dir}/n{index}",
        f"--num-cpus={info.cpus_per_node:g}",
        f"--num-gpus={info.gpus_per_node:g}",
        f"--object-store-memory={object_store_memory}",
        "--min-worker-port=0",  # workers bind OS-chosen ports, not the shared 10002-19999 range
        "--max-worker-port=0",
        "--disable-usage-stats",
        "--log-style=record",
        "--log-color=false",
    ]
    return cmd


def _run_ray_start(cmds: list[list[str]], env: dict[str, str], info: ClusterInfo, timeout: float) -> None:
    """Run several ``ray start`` at once, each in a new session whose id is recorded in
    ``info.sessions`` (and saved) before waiting; raise with the log tail on failure."""
    procs = []
    for cmd in cmds:
        node = next(a for a in cmd if a.startswith("--temp-dir=")).rsplit("/", 1)[-1]
        log_path = Path(info.state_dir) / f"ray-start-{node}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        info.sessions.append(proc.pid)
        procs.append((log_path, proc))
    info.save()
    failed = []
    for log_path, proc in procs:
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "a timeout"
        if rc != 0:
            failed.append(f"{log_path.name}: `ray start` ended with {rc}:\n{log_path.read_text()[-2000:]}")
    if failed:
        raise RuntimeError("\n".join(failed))


# ---------------------------------------------------------------- inspecting


def list_nodes(info: ClusterInfo, timeout: float = 10.0) -> list[dict]:
    """Nodes known to the cluster (Ray state API over HTTP, token in the header): dicts with
    ``node_id``, ``state`` (ALIVE/DEAD), ``node_ip``, ``is_head_node``, ``resources_total``."""
    token = info.token_path.read_text().strip()
    req = urllib.request.Request(
        f"{info.dashboard_url}/api/v0/nodes?limit=10000&detail=1",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = json.load(resp)
    if not body.get("result"):
        raise RuntimeError(f"dashboard {info.dashboard_url}: {body.get('msg', body)}")
    return body["data"]["result"]["result"]


def alive_nodes(info: ClusterInfo) -> list[dict]:
    """The ALIVE nodes, or ``[]`` while the dashboard does not answer yet."""
    try:
        return [n for n in list_nodes(info) if n.get("state") == "ALIVE"]
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        log.debug("dashboard not ready: %s", err)
        return []


def wait_for_nodes(info: ClusterInfo, count: int, timeout: float = 120.0) -> list[dict]:
    """Poll until ``count`` nodes are ALIVE; raise ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout
    nodes = alive_nodes(info)
    while len(nodes) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} nodes alive after {timeout:.0f} s")
        time.sleep(1.0)
        nodes = alive_nodes(info)
    return nodes


def cluster_status(state_dir: str | Path | None = None) -> dict:
    """``{"info": ClusterInfo, "nodes": [alive nodes], "pids": [...], "listening": {(ip, port)},
    "mlflow": whether its MLflow server answers (None without one)}``."""
    info = load_cluster(state_dir)
    pids = find_cluster_pids(info)
    healthy = is_healthy(info.mlflow.url) if info.mlflow else None
    return {
        "info": info,
        "nodes": alive_nodes(info),
        "pids": pids,
        "listening": listening_sockets(pids),
        "mlflow": healthy,
    }


# ---------------------------------------------------------------- API


def _prepare(
    state_dir: Path, workers: int, cpus: float, gpus: float, mlflow: str | None = None, mlflow_port: int = 0
) -> ClusterInfo:
    """Fresh temp dir, ports, token and state file for a new cluster in ``state_dir``; with
    ``mlflow``, the tracking stack's ports and ``MLFLOW_TRACKING_URI`` in the client env."""
    if mlflow:
        check_backend(mlflow)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / STATE_FILE).exists():
        if find_cluster_pids(ClusterInfo.load(state_dir)):
            raise RuntimeError(
                f"{state_dir}: a cluster is already running here; stop it first "
                f"(`python -m cluster.local stop --state-dir {state_dir}`)."
            )
        (state_dir / STATE_FILE).unlink()
    temp_dir = tempfile.mkdtemp(prefix="gsc-", dir="/tmp")
    if len(temp_dir) > _MAX_TEMP_ROOT:
        raise RuntimeError(f"{temp_dir}: too long for Ray's unix socket paths (< 107 characters)")
    token_path = _write_token(state_dir)
    ports, env_ports, extra = _allocate_ports(workers, extra=2 if mlflow else 0)
    address = f"{NODE_IP}:{ports[0]['port']}"
    dashboard_url = f"http://{NODE_IP}:{ports[0]['dashboard-port']}"
    env = {
        "RAY_ADDRESS": address,
        "RAY_API_SERVER_ADDRESS": dashboard_url,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 (see cluster/_raystart.py)
    }
    stack = None
    if mlflow:
        stack = plan_stack(mlflow, state_dir / "mlflow", mlflow_port or extra[0], extra[1])
        env["MLFLOW_TRACKING_URI"] = stack.url  # every node, job and trial logs there
    info = ClusterInfo(
        address,
        dashboard_url,
        env,
        str(state_dir),
        temp_dir,
        secrets.token_hex(8),
        workers,
        cpus,
        gpus,
        ports=ports,
        env_ports=env_ports,
        mlflow=stack,
    )
    info.save()  # before the first process, so `stop` can always clean up
    return info


def _service_env(info: ClusterInfo) -> dict[str, str]:
    """Environment of the MLflow server and PostgreSQL: ours without ``MLFLOW_*``, plus the marker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, MARKER_ENV: info.cluster_id}


def _start_tracking(info: ClusterInfo) -> subprocess.Popen | None:
    """Start the tracking stack, if asked for (PostgreSQL ready, server launched, not waited for)."""
    if info.mlflow is None:
        return None
    proc = start_stack(info.mlflow, _service_env(info))
    if info.mlflow.postgres_pid:
        info.sessions.append(info.mlflow.postgres_pid)  # postgres renames its processes: found by session
    info.save()
    return proc


def start_cluster(
    workers: int = 2,
    cpus_per_node: float = 1,
    gpus_per_node: float = 0,
    state_dir: str | Path | None = None,
    *,
    object_store_memory: int | str = "300MB",
    timeout: float = 180.0,
    mlflow: str | None = None,
    mlflow_port: int = 0,
) -> ClusterInfo:
    """Start a head plus ``workers`` worker nodes on this machine and wait until all are
    ALIVE. GPUs are logical (no CUDA needed): enough to try Tune's resource packing.
    ``mlflow="postgres"`` (or ``"sqlite"``) also starts an MLflow server on that store, with
    proxied artifacts, under ``<state_dir>/mlflow``, and sets ``MLFLOW_TRACKING_URI`` on every
    node. On any failure the processes started so far are stopped before the error is raised."""
    info = _prepare(
        Path(state_dir or default_state_dir()), workers, cpus_per_node, gpus_per_node, mlflow, mlflow_port
    )
    env = _node_env(info)
    store = parse_size(object_store_memory)
    cmds = [_start_command(i, info, store) for i in range(workers + 1)]
    try:
        server = _start_tracking(info)  # the server starts up while the nodes do
        _run_ray_start(cmds[:1], env, info, timeout)
        if workers:
            _run_ray_start(cmds[1:], env, info, timeout)
        wait_for_nodes(info, workers + 1, timeout)
        if info.mlflow:
            wait_stack(info.mlflow, server, max(timeout, 300))
    except BaseException:
        log.error("starting the local cluster failed; stopping what was started")
        _stop_after_failed_start(info)
        raise
    info.pids = find_cluster_pids(info)
    info.save()
    log.info(
        "local Ray cluster up: %d nodes, GCS %s, dashboard %s", workers + 1, info.address, info.dashboard_url
    )
    return info


def _stop_after_failed_start(info: ClusterInfo) -> None:
    """Stop what a failed start left (the in-memory stack may know PIDs not yet saved)."""
    try:
        if info.mlflow:
            stop_stack(info.mlflow)
        stop_cluster(info.state_dir)
    except Exception:  # keep the original error; this one is only logged
        log.exception("cleaning up the failed start failed too")


def stop_cluster(state_dir: str | Path | None = None, grace: float = 5.0) -> int:
    """Stop every process of the cluster recorded in ``state_dir``: the MLflow server and
    PostgreSQL first (a clean database shutdown), then the rest (SIGTERM, then SIGKILL after
    ``grace`` s); verify none is left, remove its temp dir, state file and token. The tracking
    data under ``<state_dir>/mlflow`` stays. Returns the number of processes stopped. Never
    touches other Ray clusters."""
    info = load_cluster(state_dir)
    count = len(find_cluster_pids(info))
    if info.mlflow:
        try:
            stop_stack(info.mlflow)
        except RuntimeError as err:  # what survived is killed below
            log.warning("%s", err)
    terminate(lambda: find_cluster_pids(info), grace)
    shutil.rmtree(info.temp_dir, ignore_errors=True)
    (Path(info.state_dir) / STATE_FILE).unlink(missing_ok=True)
    info.token_path.unlink(missing_ok=True)
    log.info("local Ray cluster stopped: %d processes ended", count)
    return count


def restart_mlflow(state_dir: str | Path | None = None, timeout: float = 300) -> ClusterInfo:
    """Start the cluster's MLflow server again, on the same port and store, after it died."""
    info = load_cluster(state_dir)
    restart_server(_tracking(info), _service_env(info), timeout)
    info.save()
    return info


@contextlib.contextmanager
def local_cluster(
    workers: int = 2,
    cpus_per_node: float = 1,
    gpus_per_node: float = 0,
    state_dir: str | Path | None = None,
    **kwargs,
) -> Iterator[ClusterInfo]:
    """``with local_cluster(2, state_dir=tmp) as info:`` -- start, yield, always stop."""
    info = start_cluster(workers, cpus_per_node, gpus_per_node, state_dir, **kwargs)
    try:
        yield info
    finally:
        stop_cluster(info.state_dir)


def _tracking(info: ClusterInfo) -> TrackingStack:
    """The cluster's MLflow stack; a clear error when it was started without one."""
    if info.mlflow is None:
        raise RuntimeError(
            f"{info.state_dir}: this cluster has no MLflow server; start one with "
            "`python -m cluster.local start --mlflow postgres`."
        )
    return info.mlflow


# ---------------------------------------------------------------- CLI


def _client_lines(info: ClusterInfo) -> list[str]:
    return [f"export {k}={v}" for k, v in info.env.items()]


def _tracking_lines(stack: TrackingStack | None) -> list[str]:
    """What the CLI says about the MLflow server: its URI, the UI and where the data is."""
    if stack is None:
        return []
    where = f"SQLite {stack.folder}/mlflow.db"
    if stack.backend == "postgres":
        where = f"PostgreSQL on 127.0.0.1:{stack.postgres_port} (database mlflow, data {stack.postgres().data_dir})"
    return [
        f"MLFLOW_TRACKING_URI={stack.url}",
        f"MLFLOW_UI={stack.url}/#/experiments",
        f"# MLflow server (PID {stack.server_pid}) on {where}; artifacts served from {stack.artifacts}",
    ]


def _print_started(info: ClusterInfo) -> None:
    print(f"RAY_ADDRESS={info.address}")
    print(f"DASHBOARD_URL={info.dashboard_url}")
    print("\n".join(_tracking_lines(info.mlflow)))
    print(f"# {info.workers + 1} nodes, temp dir {info.temp_dir}, state {info.state_dir}")
    print('# Token auth is on. Clients need this environment (or: eval "$(python -m cluster.local env)"):')
    print("\n".join(_client_lines(info)))
    print("# then, for example:")
    print(
        f"ray job submit --address {info.dashboard_url} -- "
        'python -c "import ray; ray.init(); print(ray.cluster_resources())"'
    )
    print(f"# stop it with: python -m cluster.local stop --state-dir {info.state_dir}")


def _print_status(state_dir: Path) -> int:
    status = cluster_status(state_dir)
    info, nodes = status["info"], status["nodes"]
    print(f"RAY_ADDRESS={info.address}")
    print(f"DASHBOARD_URL={info.dashboard_url}")
    print(f"processes: {len(status['pids'])}  nodes alive: {len(nodes)} of {info.workers + 1}")
    if info.mlflow:
        print(f"MLFLOW_TRACKING_URI={info.mlflow.url} ({'healthy' if status['mlflow'] else 'NOT answering'})")
    hosts = sorted({ip for ip, _ in status["listening"]})
    print(f"listening on: {', '.join(hosts) or '-'} ({len(status['listening'])} TCP ports)")
    for n in sorted(nodes, key=lambda n: not n.get("is_head_node")):
        res = n.get("resources_total", {})
        role = "head  " if n.get("is_head_node") else "worker"
        print(
            f"  {role} {n['node_id'][:12]} {n.get('node_ip')} CPU={res.get('CPU', 0):g} "
            f"GPU={res.get('GPU', 0):g}"
        )
    return 0 if len(nodes) == info.workers + 1 and status["mlflow"] is not False else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a head plus N worker nodes")
    start.add_argument("--workers", type=int, default=2, help="worker nodes besides the head (default 2)")
    start.add_argument("--cpus-per-node", type=float, default=1, help="logical CPUs per node (default 1)")
    start.add_argument(
        "--gpus-per-node",
        type=float,
        default=0,
        help="logical (fake) GPUs per node, for trying resource packing (default 0)",
    )
    start.add_argument("--object-store-memory", default="300MB", help="per node, e.g. 100MB, 2GiB")
    start.add_argument("--timeout", type=float, default=180, help="seconds to wait for the nodes")
    start.add_argument(
        "--mlflow",
        choices=BACKENDS,
        default=None,
        help="also start an MLflow server (proxied artifacts) on PostgreSQL or SQLite, data under the state dir",
    )
    start.add_argument(
        "--mlflow-port", type=int, default=0, help="the MLflow server's port (default: a free one)"
    )
    backup = sub.add_parser("backup", help="copy the MLflow store (pg_dump -Fc, or SQLite's backup) to --out")
    backup.add_argument("--out", type=Path, required=True, help="the dump file to write")
    helps = {"db-uri": "print the MLflow store's URI (for `mlflow db upgrade`)"}
    for name in ("start", "stop", "status", "env", "backup", "db-uri"):
        p = {"start": start, "backup": backup}.get(name) or sub.add_parser(
            name, help=helps.get(name, f"{name} the cluster")
        )
        p.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="where PIDs/ports/token are kept (default $GIGASEG_HOME/cluster or ./gigaseg-runs/cluster)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    state = args.state_dir or default_state_dir()
    try:
        if args.action == "start":
            _print_started(
                start_cluster(
                    args.workers,
                    args.cpus_per_node,
                    args.gpus_per_node,
                    state,
                    object_store_memory=args.object_store_memory,
                    timeout=args.timeout,
                    mlflow=args.mlflow,
                    mlflow_port=args.mlflow_port,
                )
            )
        elif args.action == "stop":
            print(f"stopped: {stop_cluster(state)} processes")
        elif args.action == "env":
            print("\n".join(_client_lines(load_cluster(state))))
        elif args.action == "backup":
            stack = _tracking(load_cluster(state))
            backup_store(stack, args.out)
            print(f"MLflow store written to {args.out}; copy {stack.artifacts} beside it")
        elif args.action == "db-uri":
            print(store_uri(_tracking(load_cluster(state))))
        else:
            return _print_status(state)
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
