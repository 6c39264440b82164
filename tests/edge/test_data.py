"""Held-out examples a device measures global adapters on."""

from __future__ import annotations

from alignfed.text import hold_out


def test_hold_out_is_seeded_disjoint_and_at_most_a_fifth() -> None:
    texts = [f"example {i}" for i in range(23)]
    train, held = hold_out(texts, 4, seed=1)
    assert len(held) == 4 and len(train) == 19 and set(train) | set(held) == set(texts)
    assert hold_out(texts, 4, seed=1) == (train, held)
    assert len(hold_out(texts, 10, seed=1)[1]) == 4  # 23 // 5
    assert hold_out(texts[:4], 4, seed=1) == (texts[:4], [])
    assert hold_out(texts, 0, seed=1) == (texts, [])


def test_duplicates_of_a_held_out_example_leave_the_training_set() -> None:
    texts = [f"example {i % 10}" for i in range(30)]  # every example three times
    train, held = hold_out(texts, 2, seed=3)
    assert len(held) == 2 and not set(held) & set(train) and len(train) == 24
