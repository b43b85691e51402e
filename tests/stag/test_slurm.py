"""launchers/slurm/stag_gen.sbatch with stand-in ``sbatch``, ``srun``, ``scontrol`` and ``ray``
commands on PATH: they log their argv and environment and run nothing heavy. Checks the Ray
head and worker start commands, the readiness wait, the ``ray job submit`` command line and the
teardown for a 2-node allocation."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.fake_slurm import install_fakes, option, read_calls

pytestmark = pytest.mark.both_envs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launchers" / "slurm" / "stag_gen.sbatch"
NODES = {"gpu-a": "10.0.0.11", "gpu-b": "10.0.0.12"}

FAKES = {
    # sbatch: set what SLURM would for a 2-node, 4-GPU-per-node allocation and run the
    # script in the foreground (like a local executor)
    "sbatch": r"""
FAKE_CMD=sbatch log "$@"
export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='gpu-[a-b]' SLURM_NNODES=2 SLURM_GPUS_ON_NODE=4
export SLURM_CPUS_ON_NODE=16 SLURM_SUBMIT_DIR=$PWD
exec bash "$@"
""",
    "scontrol": r"""
FAKE_CMD=scontrol log "$@"
[[ $1 == show && $2 == hostnames && $3 == 'gpu-[a-b]' ]] || exit 9
printf 'gpu-a\ngpu-b\n'
""",
    # srun: `hostname --ip-address` answers the node's address; `ray start --block` blocks
    # (a sleep) until the script's teardown signals it
    "srun": r"""
node=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ ${args[i]} == -w ]] && node=${args[i + 1]}
done
sleeper=""
# a blocking step notes when the script's teardown stops it (trap first: no window missed)
[[ " $* " == *" --block "* ]] &&
    trap '[[ -n $sleeper ]] && kill $sleeper; FAKE_CMD=srun-stopped log "$node"; exit 0' TERM
FAKE_CMD=srun log "$@"
case " $* " in
    *" hostname --ip-address "*)
        case $node in gpu-a) echo 10.0.0.11 ;; gpu-b) echo 10.0.0.12 ;; *) exit 8 ;; esac ;;
    *" --block "*)
        sleep 120 &
        sleeper=$!
        wait ;;
esac
""",
    # ray: `status` reports one node until it has been asked twice, then both nodes' GPUs
    "ray": r"""
FAKE_CMD=ray log "$@"
case $1 in
    status)
        n=$(grep -c '"cmd": "ray", "argv": \["status"' "$FAKE_LOG")
        nodes=" 1 node_aaa" gpus=4
        ((n < 3)) || nodes=$' 1 node_aaa\n 1 node_bbb' gpus=8
        printf 'Node status\nActive:\n%s\nPending:\n (no pending nodes)\n' "$nodes"
        printf 'Resources\nTotal Usage:\n 0.0/32.0 CPU\n 0.0/%s.0 GPU\n' "$gpus" ;;
    job)
        [[ $2 == submit ]] && exit "${FAKE_JOB_RC:-0}" ;;
esac
exit 0
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    install_fakes(bin_dir, FAKES, ("SLURM_", "RAY_", "LTDIST_"))
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_LOG=str(log),
        SLURM_CONF="/nonexistent",
        LTDIST_PYTHON="/opt/genenv/bin/python",
        RAY_START_TIMEOUT="60",
        HOME=str(tmp_path / "home"),  # the job's token goes to $HOME/.ray
    )
    return env, log


def run_sbatch(env, log, *args, rc_env=None):
    if rc_env:
        env = {**env, **rc_env}
    proc = subprocess.run(
        ["sbatch", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, read_calls(log)


def srun_ray_starts(calls):
    return [c for c in calls if c["cmd"] == "srun" and "start" in c["argv"]]


def test_two_node_cluster_job_submit_and_teardown(fake_slurm):
    env, log = fake_slurm
    proc, calls = run_sbatch(
        env, log, "configs/stag/coco_lt.yaml", "data.text_only=true", "data.out=shards/x y"
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # head address from the first node
    (ip_call,) = [c for c in calls if c["cmd"] == "srun" and "hostname" in c["argv"]]
    assert ip_call["argv"][ip_call["argv"].index("-w") + 1] == "gpu-a"

    starts = srun_ray_starts(calls)
    (head,) = [c for c in starts if "--head" in c["argv"]]
    (worker,) = [c for c in starts if "--head" not in c["argv"]]
    statuses = [c for c in calls if c["cmd"] == "ray" and c["argv"][0] == "status"]
    # the worker started once the head answered
    assert calls.index(worker) > calls.index(statuses[0])
    # the head on node 1, blocking, on the head address and the GCS port, all 4 GPUs
    h = head["argv"]
    assert h[h.index("-w") + 1] == "gpu-a" and "--head" in h and "--block" in h
    assert option(h, "node-ip-address") == "10.0.0.11" and option(h, "port") == "6379"
    assert option(h, "num-gpus") == "4" and option(h, "num-cpus") == "16"
    assert option(h, "dashboard-port") == "8265"
    # the worker on node 2 pointing at head address:port
    w = worker["argv"]
    assert w[w.index("-w") + 1] == "gpu-b" and "--head" not in w and "--block" in w
    assert option(w, "address") == "10.0.0.11:6379" and option(w, "num-gpus") == "4"
    # the script waited until the cluster reported both nodes' 8 GPUs
    assert len(statuses) == 3 and option(statuses[-1]["argv"], "address") == "10.0.0.11:6379"
    assert "cluster ready: 2 node(s), 8 GPU(s)" in proc.stdout
    # then the job, submitted to the head's job server, after both starts
    (submit,) = [c for c in calls if c["cmd"] == "ray" and c["argv"][:2] == ["job", "submit"]]
    assert calls.index(submit) > calls.index(worker)
    s = submit["argv"]
    assert option(s, "address") == "http://10.0.0.11:8265"
    assert s[s.index("--") + 1 : s.index("--") + 3] == ["bash", "-c"]
    entry = shlex.split(s[s.index("--") + 3])
    assert entry[:3] == ["cd", str(ROOT), "&&"]
    assert entry[3:] == [
        "exec",
        "/opt/genenv/bin/python",
        "-m",
        "ltdist.stag_gen",
        "--config",
        "configs/stag/coco_lt.yaml",
        "data.text_only=true",
        "data.out=shards/x y",
    ]
    # token auth: one job token file shared by every command, removed at the end
    token = submit["env"]["RAY_AUTH_TOKEN_PATH"]
    assert submit["env"]["RAY_AUTH_MODE"] == "token"
    assert head["env"]["RAY_AUTH_TOKEN_PATH"] == worker["env"]["RAY_AUTH_TOKEN_PATH"] == token
    assert token.endswith("auth_token_4242") and not os.path.exists(token)
    # teardown: both blocking srun steps were stopped after the job
    stopped = [c for c in calls if c["cmd"] == "srun-stopped"]
    assert sorted(c["argv"][0] for c in stopped) == ["gpu-a", "gpu-b"]
    assert min(calls.index(c) for c in stopped) > calls.index(submit)


def test_failed_job_fails_the_batch_job_and_still_tears_down(fake_slurm):
    env, log = fake_slurm
    proc, calls = run_sbatch(env, log, "configs/stag/voc_lt.yaml", rc_env={"FAKE_JOB_RC": "3"})
    assert proc.returncode == 3
    assert len([c for c in calls if c["cmd"] == "srun-stopped"]) == 2


def test_usage_error_without_config(fake_slurm):
    env, log = fake_slurm
    proc, calls = run_sbatch(env, log)
    assert proc.returncode != 0 and "usage: sbatch" in proc.stderr
    assert not srun_ray_starts(calls)
