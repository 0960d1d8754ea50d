#!/bin/bash
# A Ray cluster inside one Slurm allocation, then one gigaseg command on it; the nodes stop
# when the command ends (or the allocation does). Usage (from a login node, shared $HOME/NFS):
#
#   export MLFLOW_TRACKING_URI=http://mlflow.your-site:5000   # your tracking server
#   sbatch cluster/slurm.sh python -m search --config /mnt/shared/gigaseg/configs/search-cluster.yaml
#   sbatch cluster/slurm.sh python -m pipelines.segment --model models:/sem@champion \
#       --input /mnt/shared/archive/sem --output /mnt/shared/segmented/sem
#
# Needs: gigaseg installed in the same Python environment on every node (e.g. a venv on the
# shared filesystem, `pip install -c cluster/requirements-cluster.txt -e .`), and data, configs
# and Tune's storage_path on the shared filesystem.
# Security: token auth on (a fresh token per job, in a 0600 file under $HOME); the dashboard /
# job API binds 127.0.0.1 on the head node (reach it with
# `ssh -L 8265:localhost:8265 <head-node>` through the login node); GCS and raylets listen on
# the node address inside the cluster network only.
#
#SBATCH --job-name=gigaseg-ray
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --cpus-per-task=32
#SBATCH --gpus-per-node=4
#SBATCH --time=24:00:00
#SBATCH --output=gigaseg-ray-%j.log

set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: sbatch cluster/slurm.sh COMMAND [ARGS...]  (e.g. python -m search --config CFG)" >&2
  exit 2
fi

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
port=$((20000 + SLURM_JOB_ID % 10000))          # per job, so jobs sharing a node do not clash
dashboard_port=$((port + 1))
cpus=${SLURM_CPUS_PER_TASK:-1}
gpus=${SLURM_GPUS_ON_NODE:-0}
temp_dir=/tmp/ray-$SLURM_JOB_ID                  # node-local; short (unix socket paths < 107 chars)

# One token per job, shared through $HOME (same path on every node), readable only by you.
mkdir -p "$HOME/.ray"
token_file="$HOME/.ray/gigaseg-$SLURM_JOB_ID.token"
(umask 077 && python -c "import secrets; print(secrets.token_hex(32), end='')" > "$token_file")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file" RAY_USAGE_STATS_ENABLED=0
unset RAY_AUTH_TOKEN RAY_ADDRESS

step_pids=()
cleanup() {
  # Ending the srun steps stops the `ray start --block` processes they run, on every node.
  for pid in "${step_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$token_file"
}
trap cleanup EXIT

echo "head: $head_node ($head_ip:$port), ${#nodes[@]} nodes, $cpus CPUs + $gpus GPUs each"
srun --nodes=1 --ntasks=1 -w "$head_node" \
  ray start --head --block --node-ip-address="$head_ip" --port="$port" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
    --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$temp_dir" --disable-usage-stats &
step_pids+=($!)

export RAY_ADDRESS="$head_ip:$port"
for _ in $(seq 60); do ray status >/dev/null 2>&1 && break; sleep 5; done

if [ "${#nodes[@]}" -gt 1 ]; then
  workers=$(( ${#nodes[@]} - 1 ))
  srun --nodes="$workers" --ntasks="$workers" --exclude="$head_node" \
    ray start --block --address="$RAY_ADDRESS" \
      --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$temp_dir" --disable-usage-stats &
  step_pids+=($!)
fi

# Wait until every node has joined, then run the command as the driver on the head node.
python - "${#nodes[@]}" <<'EOF'
import sys, time
import ray
ray.init()
want = int(sys.argv[1])
for _ in range(120):
    alive = sum(n["Alive"] for n in ray.nodes())
    if alive >= want:
        print(f"{alive} Ray nodes up: {ray.cluster_resources()}")
        break
    time.sleep(5)
else:
    sys.exit(f"only {alive} of {want} Ray nodes joined")
EOF

"$@"
