import numpy as np

from llmtrain.data.schedule import batch_indices


def test_each_epoch_visits_every_example_once_in_a_new_order():
    n, gb = 10, 4
    stream = np.concatenate([batch_indices(n, gb, seed=0, j=j) for j in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert list(stream[:10]) != list(stream[10:])


def test_batches_are_a_pure_function_of_seed_and_number():
    assert np.array_equal(batch_indices(100, 8, 3, 7), batch_indices(100, 8, 3, 7))
    assert not np.array_equal(batch_indices(100, 8, 3, 7), batch_indices(100, 8, 4, 7))
