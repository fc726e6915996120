"""crckd_losses.sampling: the CRP ablation's rows (the class-guided and instance draws are
tested through the bank, in test_memory.py)."""

import torch

from crckd_losses.sampling import ClassLayout, class_anchor_indices


def test_crp_ablation_rows_padded_or_as_many_as_a_class_has() -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1])  # classes of 4, 3 and 1 rows
    layout = ClassLayout.from_labels(labels, 3)
    gen = torch.Generator().manual_seed(0)
    padded = class_anchor_indices(layout, 3, gen)
    assert labels[padded].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(padded[:3].tolist())) == 3 and set(padded[6:].tolist()) == {3}
    released = class_anchor_indices(layout, 3, gen, pad=False)
    assert labels[released].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert len(set(released.tolist())) == 7


def test_crp_ablation_rows_draw_uniformly_within_a_class() -> None:
    """Every row of a class is drawn about equally often (the first per_class rows of a
    random order): counts over many draws within 5 standard deviations of uniform."""
    labels = torch.tensor([0] * 10 + [1] * 6)
    layout = ClassLayout.from_labels(labels, 2)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(16)
    draws = 4000
    for _ in range(draws):
        counts.index_add_(0, class_anchor_indices(layout, 3, gen, pad=False), torch.ones(6))
    expected = torch.tensor([draws * 3 / 10] * 10 + [draws * 3 / 6] * 6)
    p = torch.tensor([0.3] * 10 + [0.5] * 6)
    assert ((counts - expected).abs() <= 5 * (draws * p * (1 - p)).sqrt()).all()
