"""Non-IID client partitions: reproducible, disjoint, no empty client, and skewed as advertised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meerkat_hf.federated.partition import (
    dirichlet_partition,
    iid_partition,
    label_count_table,
    label_counts,
    make_single_label_clients,
    partition,
    shard_partition,
    single_label_partition,
)


@pytest.fixture(scope="module")
def labels():
    # imbalanced 4 classes, like a real task (tweets are 42/39/18 %)
    rng = np.random.default_rng(123)
    return rng.choice(4, size=2000, p=[0.4, 0.3, 0.2, 0.1])


def _check(parts, n, num_clients, cover_all):
    assert len(parts) == num_clients
    assert all(len(p) > 0 for p in parts)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "a row is assigned twice"
    assert all(0 <= i < n for i in flat)
    assert all(p == sorted(p) for p in parts)
    if cover_all:
        assert sorted(flat) == list(range(n))


def _skew(labels, parts):
    """Mean total-variation distance between each client's label distribution and the global one."""
    counts = label_counts(labels, parts).astype(float)
    local = counts / counts.sum(1, keepdims=True)
    global_ = np.bincount(labels) / len(labels)
    return float(0.5 * np.abs(local - global_).sum(1).mean())


SCHEMES = [
    ("iid", lambda y, s: iid_partition(y, 10, s)),
    ("dirichlet", lambda y, s: dirichlet_partition(y, 10, 0.3, s)),
    ("shard", lambda y, s: shard_partition(y, 10, 2, s)),
    ("single_label", lambda y, s: single_label_partition(y, 10, s)),
    ("mixed", lambda y, s: partition(y, 10, "dirichlet", s, alpha=0.3, num_single_label_clients=3)),
]


@pytest.mark.parametrize("name, build", SCHEMES, ids=[s[0] for s in SCHEMES])
def test_reproducible_and_disjoint(labels, name, build):
    a, b, c = build(labels, 7), build(labels, 7), build(labels, 8)
    assert a == b
    assert a != c
    _check(a, len(labels), 10, cover_all=name in ("iid", "dirichlet", "shard", "single_label"))


def test_iid_sizes_and_mix(labels):
    parts = iid_partition(labels, 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _skew(labels, parts) < 0.1


def test_dirichlet_small_alpha_is_more_skewed(labels):
    small = np.mean([_skew(labels, dirichlet_partition(labels, 10, 0.05, s)) for s in range(3)])
    large = np.mean([_skew(labels, dirichlet_partition(labels, 10, 100.0, s)) for s in range(3)])
    assert small > 0.4 > 0.1 > large
    assert small > 3 * large


def test_dirichlet_min_size_and_impossible_cases(labels):
    parts = dirichlet_partition(labels, 10, 0.5, seed=0, min_size=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(ValueError, match="at least"):
        dirichlet_partition(labels[:15], 10, 0.5, seed=0, min_size=2)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels[:40], 10, 0.001, seed=0, min_size=4, max_retries=5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(labels, 4, 0.0, seed=0)


def test_dirichlet_draws_are_unchanged(labels):
    """Counting sizes before splitting the rows consumes the generator as before: same partitions."""
    parts = dirichlet_partition(labels, 10, 0.3, 7)
    assert [len(p) for p in parts] == [257, 257, 395, 24, 111, 29, 151, 304, 378, 94]
    assert [p[0] for p in parts] == [1, 5, 2, 98, 16, 39, 27, 0, 11, 8]


def test_dirichlet_at_1000_clients_never_hands_out_an_empty_client():
    """6 rows per client: alpha 2 works (every row assigned, no client empty); at alpha 0.5 every draw
    leaves some clients empty, and the error says how many and what to change."""
    y = np.arange(6000) % 2
    parts = dirichlet_partition(y, 1000, 2.0, seed=0)
    _check(parts, len(y), 1000, cover_all=True)
    assert [len(p) for p in parts[:8]] == [8, 7, 8, 6, 3, 12, 5, 9]
    with pytest.raises(ValueError, match=r"in 1000 draws \(the last left \d+ short\): use a larger alpha or fewer"):
        partition(y, 1000, "dirichlet", seed=0, alpha=0.5)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_shard_exactly_k_labels(labels, k):
    parts = shard_partition(labels, 9, k, seed=1)
    for p in parts:
        assert len(set(labels[p].tolist())) == k
    _check(parts, len(labels), 9, cover_all=True)  # 9 * k >= 4 classes: every class held


def test_shard_errors_and_partial_coverage(labels):
    with pytest.raises(ValueError, match="labels_per_client"):
        shard_partition(labels, 4, 5, seed=0)
    parts = shard_partition(labels, 2, 1, seed=0)  # 2 clients x 1 label < 4 classes
    held = {int(labels[p[0]]) for p in parts}
    assert len(held) == 2
    assert sum(map(len, parts)) == int(np.isin(labels, list(held)).sum())
    with pytest.raises(ValueError, match="rows"):
        shard_partition(np.array([0, 0, 0, 0, 0, 1]), 4, 1, seed=0)  # class 1: 1 row, 2 clients


def test_single_label_partition(labels):
    parts = single_label_partition(labels, 8, seed=0)
    assert all(len(set(labels[p].tolist())) == 1 for p in parts)
    assert {int(labels[p[0]]) for p in parts} == {0, 1, 2, 3}


@pytest.mark.parametrize("position", ["first", "last"])
def test_extreme_clients_in_dirichlet_federation(labels, position):
    base = partition(labels, 10, "dirichlet", seed=3, alpha=0.5)
    mixed = partition(labels, 10, "dirichlet", seed=3, alpha=0.5, num_single_label_clients=3, single_label_position=position)
    extreme = [0, 1, 2] if position == "first" else [7, 8, 9]
    for c in range(10):
        if c in extreme:
            assert len(set(labels[mixed[c]].tolist())) == 1
        else:
            assert mixed[c] == base[c]  # regular clients untouched
    _check(mixed, len(labels), 10, cover_all=False)
    # extreme clients only hold rows that were not given to a regular client
    regular_rows = {i for c in range(10) if c not in extreme for i in base[c]}
    assert not regular_rows & {i for c in extreme for i in mixed[c]}


def test_extreme_clients_in_iid_federation_cover_classes(labels):
    parts = partition(labels, 8, "iid", seed=0, num_single_label_clients=2)
    classes = [set(labels[parts[c]].tolist()) for c in (6, 7)]
    assert all(len(s) == 1 for s in classes) and classes[0] != classes[1]  # "balanced": distinct classes
    # each keeps its rows of its class and is topped up with the other's released rows of it
    base = iid_partition(labels, 8, 0)
    for c in (6, 7):
        (cls,) = classes[c - 6]
        own = [i for i in base[c] if labels[i] == cls]
        assert set(own) < set(parts[c]) and len(parts[c]) <= len(base[c])
    forced = partition(labels, 8, "iid", seed=0, num_single_label_clients=2, single_label_classes=[3, 3])
    assert {int(labels[i]) for c in (6, 7) for i in forced[c]} == {3}
    majority = partition(labels, 8, "iid", seed=0, num_single_label_clients=2, single_label_classes="majority")
    assert {int(labels[i]) for c in (6, 7) for i in majority[c]} == {0}


def test_extreme_client_errors(labels):
    with pytest.raises(ValueError, match="num_single_label_clients"):
        partition(labels, 4, "iid", seed=0, num_single_label_clients=5)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(labels, 4, "random", seed=0)
    y = np.array([0, 0, 1, 1])
    parts = [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="empty"):
        make_single_label_clients(y, parts, [0], classes=[1])  # class 1 rows all held by regular clients
    with pytest.raises(ValueError, match="overlap"):
        make_single_label_clients(y, [[0, 1], [1]], [0])


def test_accepts_torch_lists_and_dataset_columns(labels):
    import datasets

    expected = iid_partition(labels, 5, 2)
    assert iid_partition(torch.tensor(labels), 5, 2) == iid_partition(labels.tolist(), 5, 2) == expected
    ds = datasets.Dataset.from_dict({"label": labels.tolist()})
    assert iid_partition(ds["label"], 5, 2) == expected


def test_label_count_table(labels):
    parts = partition(labels, 4, "shard", seed=0, labels_per_client=2)
    table = label_count_table(labels, parts, label_names=["neg", "neu", "pos", "other"])
    lines = table.splitlines()
    assert lines[0].split() == ["client", "neg", "neu", "pos", "other", "total"]
    body = [line.split() for line in lines[2:6]]
    assert [row[0] for row in body] == ["0", "1", "2", "3"]
    for row, part in zip(body, parts):
        assert int(row[-1]) == len(part)
        assert sum(int(x) > 0 for x in row[1:-1]) == 2
    assert lines[-1].split() == ["total", *map(str, np.bincount(labels)), str(len(labels))]
    assert label_count_table([0, 1, 1], [[0], [1, 2]]).splitlines()[0].split() == ["client", "0", "1", "total"]
