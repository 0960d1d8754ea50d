"""Fault tolerance: on a ``ray.cluster_utils.Cluster`` (head with 0 CPUs, two 1-CPU worker
nodes) a worker node hosting a segmenter actor is removed mid-run. Ray Data restarts the
actor and retries its units; writes are idempotent, so the output is byte-identical to an
undisturbed run. The cluster runs in a subprocess (it cannot share the session's Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pipelines_helpers import HALO, TILE, make_model, tree_digest, write_tiled_tiff8

from pipelines.runner import RunConfig, segment_archive

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = r'''
import json, sys, threading, time
from pathlib import Path

import ray
from ray._private.state import actors  # the state API needs a dashboard; the GCS view does not
from ray.cluster_utils import Cluster

model, image, out, tile, halo = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
from pipelines.runner import RunConfig, segment_archive

state = out / ".gigaseg" / "big" / "image"
event = {}

def n_done():
    return sum(len(p.read_text().splitlines()) for p in state.glob("done.*.jsonl"))

def segmenters():
    return [a for a in actors().values() if "TileSegmenter" in a["ActorClassName"]]

def remove_a_worker_node():
    while n_done() < 3:
        time.sleep(0.05)
    alive = [a for a in segmenters() if a["State"] == "ALIVE"]
    event["actor_nodes"] = sorted({a["Address"]["NodeID"] for a in alive})
    victim = next(n for n in workers if n.node_id in event["actor_nodes"])
    event["units_before"] = n_done()
    cluster.remove_node(victim, allow_graceful=False)
    event["removed"] = victim.node_id

def guarded():
    try:
        remove_a_worker_node()
    except Exception as err:
        event["error"] = repr(err)

threading.Thread(target=guarded, daemon=True).start()
report = segment_archive(model, [image], out, RunConfig(workers=2, worker_cpus=0.25, threads=1, progress_bars=False),
                         tile=tile, halo=halo, batch_size=2)
incarnations = sum(1 + a["NumRestarts"] for a in segmenters())  # restarted in place, or replaced by a new actor
print("RESULT " + json.dumps({**event, "done": report.done, "failed": report.failed, "incarnations": incarnations,
                              "nodes": sorted({w["node"] + ":" + str(w["pid"]) for w in report.workers})}))
ray.shutdown()
cluster.shutdown()
'''


def test_node_loss_mid_run_gives_identical_output(tmp_path: Path, ray_local: None) -> None:
    model, image = make_model(tmp_path / "model"), tmp_path / "big.tif"
    write_tiled_tiff8(image, (640, 704))
    script = tmp_path / "fault.py"
    script.write_text(SCRIPT)
    out = tmp_path / "fault"
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), str(model), str(image), str(out), str(TILE), str(HALO)],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["removed"] and 3 <= result["units_before"] < 60, result
    assert len(result["done"]) == 1 and not result["failed"]
    # two actors at the start plus at least one restart, counted in Ray's actor table: a restarted actor need not
    # report a unit (the survivor may finish them all first), so the workers that reported are not the measure
    assert result["incarnations"] >= 3, result

    clean = tmp_path / "clean"
    segment_archive(str(model), [str(image)], clean, RunConfig(progress_bars=False), tile=TILE, halo=HALO,
                    batch_size=2)
    assert tree_digest(out / "big.zarr") == tree_digest(clean / "big.zarr")
    assert (out / "big.png").read_bytes() == (clean / "big.png").read_bytes()
