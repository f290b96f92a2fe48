import os
import re
import signal
import subprocess
import time

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from helpers import REPO, TINY_FLAGS, env_for

from llmtrain.registry import read_manifest

LAUNCH = REPO / "launch"


@pytest.mark.parametrize("name", sorted(p.name for p in LAUNCH.glob("*.yaml")))
def test_every_launch_config_is_accepted_by_accelerate(name):
    # Accelerate refuses unknown keys and values here, before any process starts.
    config = load_config_from_file(str(LAUNCH / name))
    assert config.num_processes >= 1 and config.num_machines == 1


@pytest.mark.slow
def test_the_cpu_config_really_starts_two_processes(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(
        "import types\nfrom llmtrain.runtime import make_accelerator\n"
        "acc = make_accelerator(types.SimpleNamespace(tracker=None, runs_dir='.', seed=0, mixed_precision='no'))\n"
        "print(f'rank {acc.process_index} world {acc.num_processes} {acc.distributed_type.value}', flush=True)\n"
    )
    out = subprocess.run(
        ["accelerate", "launch", "--config_file", str(LAUNCH / "cpu-2proc.yaml"), str(script)],
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # The two processes share stdout, so their lines may run together.
    found = sorted(re.findall(r"rank \d world \d [A-Z_]+", out.stdout))  # "MULTI_CPUrank 1 ..."
    assert found == ["rank 0 world 2 MULTI_CPU", "rank 1 world 2 MULTI_CPU"]


def test_the_slurm_script_without_a_recipe_prints_its_usage_and_exits_2():
    script = LAUNCH / "slurm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: sbatch" in out.stderr


FAKE_SRUN = """#!/bin/bash
# srun stand-in: start the command once per node of the job, all on this machine, with SLURM_NODEID set.
n=1
while [ $# -gt 0 ]; do case "$1" in --ntasks=*) n=${1#--ntasks=}; shift;; --*) shift;; *) break;; esac; done
for ((i=0; i<n; i++)); do SLURM_NODEID=$i "$@" & done
rc=0; for job in $(jobs -p); do wait "$job" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_the_slurm_script_joins_the_nodes_into_one_group(tmp_path):
    """Two simulated nodes with one process each (fake srun/scontrol on this machine) form one world of 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\necho localhost\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "world.py"
    script.write_text(
        "import types\nfrom llmtrain.runtime import make_accelerator\n"
        "acc = make_accelerator(types.SimpleNamespace(tracker=None, runs_dir='.', seed=0, mixed_precision='no'))\n"
        "print(f'rank {acc.process_index} world {acc.num_processes} local {acc.local_process_index}', flush=True)\n"
    )
    env = env_for(tmp_path) | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NNODES": "2",
        "GPUS_PER_NODE": "1",
        "ACCELERATE_CONFIG": str(LAUNCH / "cpu-2proc.yaml"),
        "MASTER_PORT": "29517",
    }
    out = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sh"), str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = sorted(re.findall(r"rank \d world \d local \d", out.stdout))
    assert found == ["rank 0 world 2 local 0", "rank 1 world 2 local 0"]  # one process on each node


@pytest.mark.slow
@pytest.mark.parametrize("launch", [["--num_processes", "1"], ["--config_file", str(LAUNCH / "cpu-2proc.yaml")]])
def test_sigterm_to_the_launcher_alone_checkpoints_the_run(tmp_path, launch):
    # What a container runtime or a scheduler that signals only the main process does: the one-process launcher
    # dies at once without forwarding it (the stage follows it by PR_SET_PDEATHSIG); torchrun forwards it.
    recipe = [str(REPO / "recipes" / "pretrain.py"), *TINY_FLAGS, "--max_steps", "100000", "--run_name", "cut"]
    launcher = subprocess.Popen(
        ["accelerate", "launch", *launch, *recipe],
        env=env_for(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the signal goes to the launcher only, not to a process group
    )
    run = tmp_path / "runs" / "cut"
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file() or "train_loss" not in (run / "metrics.jsonl").read_text():
            assert launcher.poll() is None and time.time() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        os.kill(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=60)
        while (tmp_path / "runs" / ".cut.lock").exists():  # released when the stage has saved and stopped
            assert time.time() < deadline + 60, "the training processes did not stop"
            time.sleep(0.2)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    assert read_manifest(run)["status"] == "interrupted"
    assert list((run / "checkpoints").glob("step-*"))
