"""Training data: held-out examples a device measures global adapters on; raw text as it comes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignfed.text import Batcher, hold_out, load_texts, split_indices, windows


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


# -- data as it comes: raw plain text -------------------------------------------------------------

RAW = (
    " \n = Valkyria Chronicles = \n \n"
    " The game began development in 2010 .\n"
    " It carried over a large portion of the work .\n"
    "\t \n"
    " = = Gameplay = = \n"
    "   \n\n \n"
    " As with previous games , the player controls a squad .\r\n \r\n"
    " The last paragraph has no break after it ."
)


def test_raw_text_loads_one_example_per_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "wiki.train.raw"
    path.write_text(RAW, encoding="utf-8")
    assert load_texts(path) == [
        "= Valkyria Chronicles =",
        "The game began development in 2010 .\n It carried over a large portion of the work .",
        "= = Gameplay = =",
        "As with previous games , the player controls a squad .",
        "The last paragraph has no break after it .",
    ]


def test_long_documents_become_windows_of_the_sequence_length(tmp_path: Path, tiny_model: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = tiny_model / "tokenizer.json"
    doc = " ".join(f"word{i} and more text" for i in range(200))  # one paragraph, hundreds of tokens
    ids = Tokenizer.from_file(str(tokenizer)).encode(doc, add_special_tokens=False).ids
    eos = 0
    batcher = Batcher([doc, "short one"], tokenizer, batch=2, seq_len=16, eos_id=eos, seed=0)
    full = [*ids, eos]
    n_doc = len(windows(full, 16))
    assert n_doc == -(-len(full) // 16) - (len(full) % 16 == 1) > 10
    assert np.concatenate(batcher.rows[:n_doc]).tolist() == full[: sum(r.size for r in batcher.rows[:n_doc])]
    assert all(r.size == 16 for r in batcher.rows[: n_doc - 1])
    assert batcher.samples == n_doc + 1  # the short example stays one row


def test_a_window_of_one_token_is_dropped() -> None:
    assert windows([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4]]
    assert windows([1, 2, 3, 4, 5, 6], 3) == [[1, 2, 3], [4, 5, 6]]
    assert windows([7], 4) == []


def test_a_device_and_a_simulated_domain_hold_out_by_the_same_draw() -> None:
    from simulator.domains import split

    texts = [f"example {i}" for i in range(30)]
    first, rest = split_indices(30, 5, seed=4)
    assert sorted([*first.tolist(), *rest.tolist()]) == list(range(30))
    _, held = hold_out(texts, 5, seed=4)  # 30 // 5 = 6 ≥ 5: all five drawn
    assert held == [texts[i] for i in sorted(first.tolist())]
    domain = split("d", texts, eval_examples=5, train_examples=0, seed=4)
    assert list(domain.eval) == [texts[i] for i in first.tolist()]
    assert list(domain.train) == [texts[i] for i in rest.tolist()]
