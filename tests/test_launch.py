import os
import re
import subprocess

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from helpers import REPO, env_for

LAUNCH = REPO / "launch"

# file -> (distributed type, processes, settings the file must hold)
CONFIGS = {
    "cpu-2proc.yaml": (DistributedType.MULTI_GPU, 2, {"use_cpu": True, "mixed_precision": "no"}),
    "single-gpu.yaml": (DistributedType.NO, 1, {"use_cpu": False}),
    "ddp.yaml": (DistributedType.MULTI_GPU, 8, {"use_cpu": False}),
    "fsdp2.yaml": (DistributedType.FSDP, 8, {}),
    "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, 8, {}),
    "deepspeed-zero3.yaml": (DistributedType.DEEPSPEED, 8, {}),
}


def test_every_config_in_launch_is_tested():
    assert {p.name for p in LAUNCH.glob("*.yaml")} == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_launch_config_loads_with_accelerate(name):
    distributed_type, processes, settings = CONFIGS[name]
    config = load_config_from_file(str(LAUNCH / name))
    assert config.distributed_type == distributed_type and config.num_processes == processes
    assert config.num_machines == 1 and config.compute_environment.value == "LOCAL_MACHINE"
    for key, value in settings.items():
        assert getattr(config, key) == value, key


def test_fsdp2_shards_decoder_layers_and_saves_sharded_checkpoints():
    fsdp = load_config_from_file(str(LAUNCH / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    # No class named: Accelerate wraps each model's `_no_split_modules`, the decoder layer of either family.
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    assert set(LlamaForCausalLM._no_split_modules) == {"LlamaDecoderLayer"}
    assert set(GPT2LMHeadModel._no_split_modules) == {"GPT2Block"}


def test_deepspeed_configs_are_zero_2_and_zero_3_with_a_full_final_save():
    zero2 = load_config_from_file(str(LAUNCH / "deepspeed-zero2.yaml")).deepspeed_config
    zero3 = load_config_from_file(str(LAUNCH / "deepspeed-zero3.yaml")).deepspeed_config
    assert zero2["zero_stage"] == 2 and zero3["zero_stage"] == 3
    assert zero3["zero3_save_16bit_model"] is True  # get_state_dict gathers the weights for save_pretrained
    assert zero2["deepspeed_multinode_launcher"] == zero3["deepspeed_multinode_launcher"] == "standard"


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


def test_the_slurm_script_is_valid_bash_and_needs_a_recipe():
    script = LAUNCH / "slurm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: sbatch" in out.stderr
    text = script.read_text()
    for piece in ("scontrol show hostnames", "$SLURM_NODEID", "--num_machines", "--main_process_ip"):
        assert piece in text


FAKE_SRUN = """#!/bin/bash
# srun stand-in: start the command once per node of the job, all on this machine, with SLURM_NODEID set.
n=1
while [ $# -gt 0 ]; do case "$1" in --ntasks=*) n=${1#--ntasks=}; shift;; --*) shift;; *) break;; esac; done
for ((i=0; i<n; i++)); do SLURM_NODEID=$i "$@" & done
rc=0; for job in $(jobs -p); do wait "$job" || rc=$?; done; exit $rc
"""


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
