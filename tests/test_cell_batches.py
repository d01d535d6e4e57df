"""core/generation/cell_batches.py: as few batches as max_batch allows, sizes within one, order kept."""

from __future__ import annotations

from hypothesis import given, strategies as st

from qwen_identity.core.generation.cell_batches import split_evenly


def test_a_three_by_three_grid_goes_three_by_three_not_four_four_one():
    assert [len(b) for b in split_evenly(list(range(9)), 4)] == [3, 3, 3]
    assert [len(b) for b in split_evenly(list(range(9)), 8)] == [5, 4]
    assert split_evenly(list(range(9)), 9) == [list(range(9))]
    assert split_evenly([], 4) == []


@given(n=st.integers(0, 200), max_batch=st.integers(1, 70))
def test_batches_are_few_even_and_in_order(n, max_batch):
    batches = split_evenly(list(range(n)), max_batch)
    assert [x for b in batches for x in b] == list(range(n))
    assert len(batches) == -(-n // max_batch)
    sizes = [len(b) for b in batches]
    assert all(1 <= s <= max_batch for s in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1
