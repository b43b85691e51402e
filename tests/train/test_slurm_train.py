"""launchers/slurm/train.sbatch on a stand-in 2-node allocation: ``sbatch``, ``srun`` and
``scontrol`` are scripts on PATH that log their argv and environment; ``srun`` runs the training
step once per "node" (both on this machine, the head's address 127.0.0.1) and the real
``accelerate launch`` trains tiny DP-VLPA on CPU with 2 processes per node. Checks the per-node
machine rank, the 4-process world, and preemption: USR1 to the batch shell, checkpoint, requeue,
resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_slurm import install_fakes, option, read_calls

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launchers" / "slurm" / "train.sbatch"
VENV_BIN = Path(sys.executable).parent  # .venvs/train/bin: its accelerate and python
LAUNCHER = "launchers/pretrain.py"
CONFIG = "tests/train/configs/tiny_pretrain.yaml"
JOB_ID = 4242

FAKES = {
    # sbatch: what SLURM sets for a 2-node allocation, then the script in the foreground (its
    # process is the batch shell, the one --signal=B:USR1 reaches)
    "sbatch": rf"""
FAKE_CMD=sbatch log "$@"
export SLURM_JOB_ID={JOB_ID} SLURM_JOB_NODELIST='node-[a-b]' SLURM_NNODES=2
export SLURM_GPUS_ON_NODE=4 SLURM_SUBMIT_DIR=$PWD
exec bash "$@"
""",
    "scontrol": r"""
FAKE_CMD=scontrol log "$@"
case "$*" in
    "show hostnames node-[a-b]") printf 'node-a\nnode-b\n' ;;
    "requeue "*) ;;
    *) exit 9 ;;
esac
""",
    # srun: `hostname --ip-address` on the head answers loopback; a multi-task step runs its
    # command once per node at the same time, with that node's SLURM variables
    "srun": r"""
FAKE_CMD=srun log "$@"
node="" ntasks=1
while [[ $1 == -* ]]; do
    case $1 in
        -w) node=$2; shift ;;
        --ntasks=*) ntasks=${1#*=} ;;
    esac
    shift
done
if [[ "$*" == "hostname --ip-address" ]]; then
    [[ $node == node-a ]] || exit 8
    echo 127.0.0.1
    exit 0
fi
nodes=(node-a node-b)
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=${nodes[i]} "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
    wait "$pid" || { status=$?; ((status > rc)) && rc=$status; }
done
exit $rc
""",
    # accelerate: the command line each node really ran, then the training environment's
    "accelerate": r"""
FAKE_CMD=accelerate log "$@"
exec "$REAL_ACCELERATE" "$@"
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    install_fakes(bin_dir, FAKES, ("SLURM", "LTDIST_", "ACCELERATE_"))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "ACCELERATE_", "LTDIST_"))
    }
    env.update(
        PATH=f"{bin_dir}:{VENV_BIN}:{env['PATH']}",
        FAKE_LOG=str(tmp_path / "calls.jsonl"),
        REAL_ACCELERATE=str(VENV_BIN / "accelerate"),
        SLURM_CONF="/nonexistent",
        ACCELERATE_USE_CPU="1",
        ACCELERATE_CONFIG="configs/accelerate/multi_node.yaml",
        LTDIST_ACCELERATE_ARGS="--multi_gpu --mixed_precision no --dynamo_backend no",
        LTDIST_PROCS_PER_NODE="2",
        LTDIST_RUN_DIR=str(tmp_path / "runs"),
        LTDIST_LOG_DIR=str(tmp_path / "logs"),
        OMP_NUM_THREADS="1",
    )
    return env, tmp_path


@pytest.fixture
def submit(fake_slurm):
    """Starts the fake sbatch in a session of its own; stops what is left at the end."""
    env, _ = fake_slurm
    jobs = []

    def start(*args):
        proc = subprocess.Popen(
            ["sbatch", str(SCRIPT), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        jobs.append(proc)
        return proc

    yield start
    for proc in jobs:
        if proc.poll() is None:
            stop(proc)


def stop(proc):
    """TERM first: the torchrun agents then end their workers (each in a session of its own)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0]


def finish(proc, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not end within {timeout}s:\n{stop(proc)}")
    return proc.returncode, out


def overrides(tmp_path, demo, *more):
    # a dead peer fails the others' collectives within 2 minutes, not the default 30
    return [
        f"data.location={demo}",
        f"output_dir={tmp_path / 'run'}",
        "data.eval_split=",
        "threads=1",
        "collective_timeout_s=120",
        *more,
    ]


def calls(tmp_path, cmd):
    return read_calls(tmp_path / "calls.jsonl", cmd)


def test_two_nodes_make_one_world_of_four(fake_slurm, submit, demo):
    _, tmp_path = fake_slurm
    args = overrides(tmp_path, demo, "max_steps=3")
    rc, out = finish(submit(LAUNCHER, CONFIG, *args), timeout=180)
    assert rc == 0, out
    port = str(20000 + JOB_ID % 20000)  # no LTDIST_MASTER_PORT: derived from the job id

    # one step of one task per node, and in it each node's own machine rank
    (step,) = [c for c in calls(tmp_path, "srun") if "bash" in c["argv"]]
    assert "--nodes=2" in step["argv"] and "--ntasks=2" in step["argv"]
    launches = calls(tmp_path, "accelerate")
    assert sorted(c["env"]["SLURM_NODEID"] for c in launches) == ["0", "1"]
    for c in launches:
        argv, node = c["argv"], c["env"]["SLURM_NODEID"]
        assert argv[0] == "launch"
        assert option(argv, "--machine_rank") == node
        assert option(argv, "--rdzv_conf") == f"is_host={int(node == '0')}"
        assert option(argv, "--num_machines") == "2" and option(argv, "--num_processes") == "4"
        assert option(argv, "--main_process_ip") == "127.0.0.1"
        assert option(argv, "--main_process_port") == port
        assert option(argv, "--rdzv_backend") == "c10d"
        assert option(argv, "--config_file") == "configs/accelerate/multi_node.yaml"
        assert argv[argv.index(LAUNCHER) :] == [
            LAUNCHER,
            "--config",
            CONFIG,
            f"preempt_file={tmp_path / 'runs' / f'.preempt-{JOB_ID}'}",
            *args,
        ]

    ranks = [
        json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in range(4)
    ]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert {r["world_size"] for r in ranks} == {4}
    assert sorted(r["node_rank"] for r in ranks) == [0, 0, 1, 1]
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    # With c10d the process group's store is not the rendezvous port: node rank 0's agent
    # serves it on its own host name and a free port. Every rank must reach the same one.
    assert len({(r["master_addr"], r["master_port"]) for r in ranks}) == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["world_size"] == 4

    # a log per node, and torchrun's per-rank logs under each node's folder
    for node in (0, 1):
        assert (tmp_path / "logs" / f"{JOB_ID}-node{node}.log").stat().st_size > 0
        rank_logs = list((tmp_path / "logs" / f"{JOB_ID}-node{node}").rglob("stdout.log"))
        assert len(rank_logs) == 2
    assert not calls(tmp_path, "scontrol")[1:]  # `show hostnames` only: no requeue


def wait_for_steps(proc, batches, steps, timeout):
    """Until rank 0 has trained on `steps` batches (the batch audit has that many lines)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the job ended before training got going:\n{proc.communicate()[0]}")
        if batches.exists() and len(batches.read_text().splitlines()) >= steps:
            return
        time.sleep(0.5)
    pytest.fail(f"no {steps} training steps within {timeout}s:\n{stop(proc)}")


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(fake_slurm, submit, demo):
    env, tmp_path = fake_slurm
    env["LTDIST_MASTER_PORT"] = "24343"
    run = tmp_path / "run"
    preempt_file = tmp_path / "runs" / f".preempt-{JOB_ID}"
    args = overrides(tmp_path, demo, "checkpoint.every_steps=0", "audit_batches=true")
    proc = submit(LAUNCHER, CONFIG, *args, "max_steps=200")
    wait_for_steps(proc, run / "batches" / "rank0.jsonl", steps=2, timeout=180)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@180 sends the batch shell
    rc, out = finish(proc, timeout=120)
    assert rc == 0, out
    (checkpoint,) = (run / "checkpoints").glob("step-*")
    assert (checkpoint / "COMPLETE").exists()
    step = int(checkpoint.name.removeprefix("step-"))
    assert 2 <= step < 200 and f"stopped at step {step} on request" in out
    assert f"requeueing job {JOB_ID}" in out
    assert [c["argv"] for c in calls(tmp_path, "scontrol")[1:]] == [["requeue", str(JOB_ID)]]
    assert not preempt_file.exists()
    assert not (run / "metrics.json").exists()

    # The requeued job: same job id, same command. A preempt file left behind must not stop it.
    preempt_file.touch()
    rc, out = finish(submit(LAUNCHER, CONFIG, *args, f"max_steps={step + 2}"), timeout=180)
    assert rc == 0, out
    assert f"resumed from step {step}" in out
    assert json.loads((run / "metrics.json").read_text())["steps"] == step + 2
    assert len(calls(tmp_path, "scontrol")) == 3  # show hostnames twice, one requeue


def test_missing_config_is_a_clear_error(fake_slurm, submit):
    _, tmp_path = fake_slurm
    rc, out = finish(submit(LAUNCHER, "configs/pretrain/nope.yaml"), timeout=30)
    assert rc == 2 and "configs/pretrain/nope.yaml: no such file" in out
    assert not calls(tmp_path, "srun")
