import types

import pytest
import torch

from llmtrain.runtime import cpu_threads, make_accelerator

# What `accelerate launch` puts in the environment of every process it starts (with or without LOCAL_RANK).
LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "no"}


def test_a_plain_run_takes_the_users_omp_num_threads():
    assert cpu_threads(None, {"OMP_NUM_THREADS": "3"}, cores=2, local_processes=1) == 3
    assert cpu_threads(None, {"OMP_NUM_THREADS": "1"}, cores=8, local_processes=1) == 1


def test_a_launched_process_takes_omp_num_threads_1_for_the_launchers_default_and_shares_the_cores():
    launched = {**LAUNCHED, "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    assert cpu_threads(None, launched, cores=2, local_processes=2) == 1
    assert cpu_threads(None, launched, cores=8, local_processes=2) == 4
    # one process launched without a process group: no LOCAL_RANK, the ACCELERATE_* variables alone
    assert cpu_threads(None, {**LAUNCHED, "OMP_NUM_THREADS": "1"}, cores=8, local_processes=1) == 8
    # torchrun sets LOCAL_RANK and OMP_NUM_THREADS=1 the same way
    assert cpu_threads(None, {"LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}, cores=8, local_processes=4) == 2


def test_a_launched_process_keeps_any_other_omp_num_threads():
    assert cpu_threads(None, {**LAUNCHED, "LOCAL_RANK": "0", "OMP_NUM_THREADS": "4"}, cores=2, local_processes=2) == 4


def test_the_threads_key_wins_over_the_environment():
    assert cpu_threads(2, {"OMP_NUM_THREADS": "3"}, cores=8, local_processes=1) == 2
    assert cpu_threads(1, {**LAUNCHED, "OMP_NUM_THREADS": "1"}, cores=8, local_processes=1) == 1  # forces one


@pytest.mark.parametrize(
    "cores, local_processes, threads",
    [(2, 1, 2), (8, 2, 4), (2, 4, 1), (7, 2, 3)],
)
def test_with_nothing_set_the_cores_are_shared_among_the_local_processes(cores, local_processes, threads):
    assert cpu_threads(None, {}, cores=cores, local_processes=local_processes) == threads


def test_an_unreadable_omp_num_threads_counts_as_unset():
    assert cpu_threads(None, {"OMP_NUM_THREADS": ""}, cores=4, local_processes=1) == 4
    assert cpu_threads(None, {"OMP_NUM_THREADS": "many"}, cores=4, local_processes=2) == 2
    assert cpu_threads(None, {"OMP_NUM_THREADS": "0"}, cores=4, local_processes=1) == 4
    assert cpu_threads(None, {"OMP_NUM_THREADS": "3,1"}, cores=4, local_processes=1) == 3  # nested: the outer level


def test_make_accelerator_applies_the_threads_key_on_a_cpu(tmp_path):
    before = torch.get_num_threads()
    cfg = types.SimpleNamespace(tracker=None, runs_dir=str(tmp_path), seed=0, mixed_precision="no", threads=1)
    try:
        accelerator = make_accelerator(cfg)
        if accelerator.device.type != "cpu":
            pytest.skip("threads apply to CPU runs only")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
