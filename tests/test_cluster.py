"""Cluster tooling: the local multi-node Ray cluster (real `ray start` processes), the AWS
launcher YAML against Ray's own schema, the KubeRay / MLflow manifests, the cluster search
config and the Slurm script."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.local import (
    ClusterInfo,
    cluster_status,
    find_cluster_pids,
    list_nodes,
    load_cluster,
    local_cluster,
    parse_size,
    start_cluster,
    stop_cluster,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml")) + sorted((CLUSTER / "mlflow").glob("*.yaml"))
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
SHARED = "/mnt/shared"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects(kind: str | None = None) -> list[dict]:
    objs = [d for p in MANIFESTS for d in _docs(p)]
    return [o for o in objs if kind is None or o["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    found = [o for o in _objects(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _containers(obj: dict) -> list[dict]:
    """Every container spec in a workload, a RayCluster or a RayJob (submitter), any depth."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(obj)
    return found


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------- manifests


def test_manifests_parse_with_kinds_and_namespace():
    kinds = {}
    for path in MANIFESTS:
        for doc in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "gigaseg", f"{path}: {doc['metadata']}"
            kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert kinds["RayCluster"] == ["gigaseg"]
    assert sorted(kinds["RayJob"]) == ["gigaseg-search", "gigaseg-segment"]
    assert {"mlflow", "mlflow-postgres", "minio"} <= set(kinds["Service"])
    assert {"mlflow", "minio"} <= set(kinds["Deployment"]) and kinds["StatefulSet"] == ["mlflow-postgres"]
    assert "gigaseg-shared" in kinds["PersistentVolumeClaim"] and "NetworkPolicy" in kinds


def test_raycluster_head_gpu_workers_token_auth_shared_storage():
    rc = _one("RayCluster", "gigaseg")["spec"]
    assert rc["rayVersion"] == RAY_PIN
    assert rc["authOptions"] == {"mode": "token", "secretName": "gigaseg-ray-auth"}
    head = rc["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not rc.get("enableIngress", False)
    assert head["rayStartParams"]["num-cpus"] == "0"  # no trials on the head
    gpu_groups = [
        g for g in rc["workerGroupSpecs"] if "nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]
    ]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        res = _containers(group)[0]["resources"]
        assert (
            int(res["limits"]["nvidia.com/gpu"]) >= 1
            and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        )
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
    pvc = _one("PersistentVolumeClaim", "gigaseg-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for container in _containers(_one("RayCluster", "gigaseg")):
        env = _env(container)
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.gigaseg.svc.cluster.local:5000"
        assert SHARED in {m["mountPath"] for m in container["volumeMounts"]}


def _python_module(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    return argv[2], argv[3:]


@pytest.mark.parametrize(
    ("job", "module", "flags"),
    [
        ("gigaseg-search", "search", ["--config"]),
        ("gigaseg-segment", "pipelines.segment", ["--model", "--input", "--output"]),
    ],
)
def test_rayjob_entrypoints_name_real_modules(job, module, flags):
    spec = _one("RayJob", job)["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "gigaseg"}
    name, args = _python_module(spec["entrypoint"])
    assert name == module
    assert [a for a in args if a.startswith("--")] == flags
    paths = [a for a in args if a.startswith("/")]
    assert paths and all(p.startswith(SHARED + "/") for p in paths), "job files must be on the shared volume"
    rel = Path(*module.split("."))
    assert (REPO / rel / "__main__.py").is_file() or (REPO / rel).with_suffix(".py").is_file(), (
        f"entrypoint module {module} not found in the repository"
    )
    if module == "pipelines.segment":
        assert "models:/sem@champion" in args  # the name the cluster search registers
        search_cfg = yaml.safe_load((CLUSTER / "search-cluster.yaml").read_text())
        assert search_cfg["mlflow"]["registered_model_name"] == "sem"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "flags"), [("search", ["--config"]), ("pipelines.segment", ["--model", "--input", "--output"])]
)
def test_rayjob_entrypoint_flags_exist(module, flags):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in flags:
        assert flag in out.stdout, f"`python -m {module}` has no {flag}"


def test_services_cluster_ip_only_nothing_exposed():
    for svc in _objects("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
        assert not any("nodePort" in p for p in svc["spec"]["ports"])
    assert not _objects("Ingress") and not _objects("Route") and not _objects("Gateway")
    for obj in _objects():
        text = json.dumps(obj)
        assert '"hostNetwork": true' not in text and '"hostPort"' not in text, obj["metadata"]["name"]
        assert "LoadBalancer" not in text and "NodePort" not in text, obj["metadata"]["name"]


def test_secrets_only_by_reference():
    assert not _objects("Secret"), "never commit Secret objects; create them with kubectl (docs/cluster.md)"
    refs = set()
    for obj in _objects():
        for container in _containers(obj):
            for name, env in _env(container).items():
                if any(w in name.upper() for w in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")):
                    assert "valueFrom" in env, f"{obj['metadata']['name']}: {name} must come from a Secret"
                    refs.add(env["valueFrom"]["secretKeyRef"]["name"])
    assert refs == {"gigaseg-mlflow-db", "gigaseg-minio"}


def test_mlflow_server_postgres_backend_s3_artifacts():
    server = _containers(_one("Deployment", "mlflow"))[0]
    args, env = server["args"], _env(server)
    assert args[:2] == ["mlflow", "server"] and "--serve-artifacts" in args
    assert "--artifacts-destination=s3://mlflow-artifacts" in args
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql://$(DB_USER):$(DB_PASSWORD)@mlflow-postgres:5432/")
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    names = [e["name"] for e in server["env"]]
    assert names.index("DB_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")  # $(VAR) needs order
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow.gigaseg.svc.cluster.local:5000" in allowed and "*" not in allowed
    pg = _containers(_one("StatefulSet", "mlflow-postgres"))[0]
    assert _env(pg)["POSTGRES_DB"]["value"] == "mlflow"
    assert _one("StatefulSet", "mlflow-postgres")["spec"]["volumeClaimTemplates"]
    for svc, port in (("mlflow", 5000), ("mlflow-postgres", 5432), ("minio", 9000)):
        assert [p["port"] for p in _one("Service", svc)["spec"]["ports"]] == [port]


def _image_refs() -> list[str]:
    images = [c["image"] for o in _objects() for c in _containers(o)]
    for dockerfile in (CLUSTER / "Dockerfile", CLUSTER / "mlflow" / "Dockerfile"):
        images += re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.M)
    launcher = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    return images + [launcher["docker"]["image"], launcher["docker"]["head_image"]]


def test_images_pinned_and_ray_versions_agree():
    images = _image_refs()
    assert images
    for image in images:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{image}: pin a version"
        if image.startswith("rayproject/ray:"):
            assert tag.startswith(f"{RAY_PIN}-py311"), image
    assert f"FROM rayproject/ray:{RAY_PIN}-py311-gpu" in (CLUSTER / "Dockerfile").read_text()
    reqs = (CLUSTER / "requirements-cluster.txt").read_text()
    assert f"ray[default,tune,data,train]=={RAY_PIN}" in reqs
    pins = [line for line in reqs.splitlines() if line and not line.startswith("#")]
    assert all("==" in line for line in pins), "every cluster dependency must be pinned"
    mlflow_pin = re.search(r"^mlflow==(\S+)", reqs, flags=re.M).group(1)
    assert f"ghcr.io/mlflow/mlflow:v{mlflow_pin}" in (CLUSTER / "mlflow" / "Dockerfile").read_text()


def test_no_public_binds_except_documented_in_pod_binds():
    for path in sorted(CLUSTER.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".sh", ".py", "") or path.name == "Dockerfile":
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "0.0.0.0" not in line or line.lstrip().startswith("#"):
                continue
            assert path.parent.name in ("kuberay", "mlflow"), f"{path}:{i + 1}: 0.0.0.0 outside a pod"
            context = "\n".join(lines[max(0, i - 5) : i])
            assert "In-pod bind" in context, f"{path}:{i + 1}: undocumented 0.0.0.0 bind"


def test_network_policies_default_deny_and_narrow_backends():
    pols = {p["metadata"]["name"]: p["spec"] for p in _objects("NetworkPolicy")}
    assert pols["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    pg_from = pols["mlflow-postgres"]["ingress"][0]["from"]
    assert pg_from == [{"podSelector": {"matchLabels": {"app": "mlflow"}}}]
    for name in pols:
        if name != "default-deny-ingress":
            assert pols[name]["podSelector"]["matchLabels"], name


# ---------------------------------------------------------------- launcher YAML


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())


def test_launcher_yaml_valid_against_ray_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _launcher()
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before launching
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu.a10g"]["resources"]["GPU"] = 0.5  # schema: integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_gpu_workers_autoscaling_security_env():
    cfg = _launcher()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) >= 1}
    assert {v["node_config"]["InstanceType"] for v in gpu_types.values()} >= {"g5.xlarge", "p4d.24xlarge"}
    for node in gpu_types.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert "RAY_AUTH_MODE=token" in start and "MLFLOW_TRACKING_URI=http" in start, key
        assert "GIGASEG_HOME=/mnt/shared/" in start, key
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in json.dumps(cfg)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-c ~/gigaseg/cluster/requirements-cluster.txt" in setup
    assert any(f"{SHARED}:{SHARED}" in opt for opt in cfg["docker"]["run_options"])


def test_cluster_search_config_valid_and_on_shared_storage():
    pytest.importorskip("search.spec", reason="search package not importable")
    from search.space import SearchSpace
    from search.spec import SearchSpec
    from segcore.config import parse_config

    data = yaml.safe_load((CLUSTER / "search-cluster.yaml").read_text())
    spec = parse_config(data, SearchSpec, source="cluster/search-cluster.yaml")
    SearchSpace.from_spec(spec, "cluster/search-cluster.yaml")
    for path in (spec.storage_path, spec.data.train, spec.data.val):
        assert str(path).startswith(SHARED + "/"), f"{path}: not on shared storage"
    assert spec.mlflow.tracking_uri is None  # comes from MLFLOW_TRACKING_URI on the nodes
    assert spec.resources.gpus_per_trial > 0


def test_slurm_script_syntax_and_security():
    script = CLUSTER / "slurm.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
    text = script.read_text()
    assert "RAY_AUTH_MODE=token" in text and "--dashboard-host=127.0.0.1" in text and "umask 077" in text
    assert not re.search(r"^\s*ray stop", text, flags=re.M), "never a machine-wide ray stop"
    starts = re.findall(r"^\s*ray start (.*)$", text, flags=re.M)
    assert len(starts) == 2 and all(s.startswith("--head --block") or s.startswith("--block") for s in starts)


# ---------------------------------------------------------------- local cluster


def test_parse_size():
    assert parse_size("100MB") == 100_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("123") == 123 and parse_size(7) == 7
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else "ray"


def _procs_with(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


JOB = """
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as PG
ray.init()
pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=180)
where = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id())
ids = ray.get([where.options(scheduling_strategy=PG(pg, placement_group_bundle_index=i)).remote() for i in range(3)])
print("RESOURCES", ray.cluster_resources())
print("DISTINCT_NODES", len(set(ids)))
"""


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.local", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def _check_running(state: Path, start_out: str) -> ClusterInfo:
    info = load_cluster(state)
    assert f"RAY_ADDRESS={info.address}" in start_out and f"DASHBOARD_URL={info.dashboard_url}" in start_out
    assert "export RAY_AUTH_MODE=token" in start_out and info.dashboard_url.startswith("http://127.0.0.1:")
    status = _cli("status", "--state-dir", str(state), timeout=60)
    assert status.returncode == 0 and "nodes alive: 3 of 3" in status.stdout, status.stdout + status.stderr
    listening = cluster_status(state)["listening"]
    assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}, f"non-loopback listeners: {listening}"
    with pytest.raises(urllib.error.HTTPError) as err:  # no token: refused
        urllib.request.urlopen(f"{info.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401
    return info


@pytest.mark.slow
@pytest.mark.ray
def test_local_cluster_cli_three_nodes_job_submit_clean_stop(tmp_path):
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start = _cli(
        "start",
        "--workers",
        "2",
        "--cpus-per-node",
        "1",
        "--gpus-per-node",
        "1",
        "--object-store-memory",
        "100MB",
        "--state-dir",
        str(state),
        env=env,
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        info = _check_running(state, start.stdout)
        job = [_ray_cli(), "job", "submit", "--address", info.dashboard_url, "--", sys.executable, "-c", JOB]
        denied = subprocess.run(job, capture_output=True, text=True, timeout=120, env=env)
        assert denied.returncode != 0 and "Authentication" in denied.stdout + denied.stderr
        done = subprocess.run(job, capture_output=True, text=True, timeout=400, env={**env, **info.env})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "DISTINCT_NODES 3" in done.stdout
        assert "'CPU': 3.0" in done.stdout and "'GPU': 3.0" in done.stdout
    finally:
        stop = _cli("stop", "--state-dir", str(state), env=env, timeout=120)
    assert stop.returncode == 0 and re.search(r"stopped: [1-9]\d* processes", stop.stdout), stop.stderr
    assert not _procs_with(info.temp_dir), "processes of the cluster survived stop"
    assert not find_cluster_pids(info) and not Path(info.temp_dir).exists()
    assert not (state / "cluster.json").exists() and not info.token_path.exists()


@pytest.mark.slow
@pytest.mark.ray
def test_local_cluster_python_api_fake_gpus_and_single_owner(tmp_path):
    with local_cluster(
        workers=1, cpus_per_node=1, gpus_per_node=2, state_dir=tmp_path, object_store_memory="100MB"
    ) as info:
        nodes = list_nodes(info)
        assert len(nodes) == 2 and sum(n["is_head_node"] for n in nodes) == 1
        assert sum(n["resources_total"].get("GPU", 0) for n in nodes) == 4
        assert (
            info.env["RAY_AUTH_MODE"] == "token"
            and Path(info.env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0
        )
        with pytest.raises(RuntimeError, match="already running"):
            start_cluster(1, state_dir=tmp_path)
        pids = find_cluster_pids(info)
        assert pids and set(info.pids) & set(pids)
    assert not find_cluster_pids(info) and not _procs_with(info.temp_dir)
    with pytest.raises(FileNotFoundError, match="no local cluster"):
        stop_cluster(tmp_path)
