"""Split a labelled dataset over federated clients: IID, Dirichlet label skew, k-label shards, and
"extreme" single-label clients mixed into an otherwise Non-IID federation (Meerkat-VP's setting).

Every function takes the label of each row and returns ``list[list[int]]``: the sorted row indices
of each client. Guarantees shared by all schemes:

* reproducible: the same ``seed`` gives the same partition (a ``numpy.random.Generator``);
* disjoint: a row belongs to at most one client;
* no empty client: a partition that cannot give every client data raises ``ValueError``
  (for Dirichlet at many clients and small alpha, see :func:`dirichlet_partition`).

Coverage differs and is documented per scheme: ``iid`` and ``dirichlet`` assign every row;
``shard`` leaves out the rows of classes no client holds (only when ``num_clients * k`` is smaller
than the number of classes); turning clients single-label drops their rows of other classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "SCHEMES",
    "iid_partition",
    "dirichlet_partition",
    "shard_partition",
    "single_label_partition",
    "make_single_label_clients",
    "partition",
    "label_counts",
    "label_count_table",
]

SCHEMES = ("iid", "dirichlet", "shard", "single_label")


def _as_labels(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch tensor
        labels = labels.detach().cpu().numpy()
    elif hasattr(labels, "source") and hasattr(labels, "column_name"):
        # a datasets>=5 lazy Column: np.asarray would iterate it row by row (seconds for 30k rows)
        source = labels.source
        labels = source.with_format("arrow", columns=[labels.column_name])[:][labels.column_name].to_numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class id per row), got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.mod(array, 1) == 0):
            array = array.astype(np.int64)
        elif array.dtype.kind != "b":
            raise ValueError(f"labels must be integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_clients(n: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if n < num_clients * min_size:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} row(s) each from {n} rows"
        )


def _finish(parts: Sequence[Sequence[int] | np.ndarray]) -> list[list[int]]:
    out = [sorted(int(i) for i in p) for p in parts]
    empty = [c for c, p in enumerate(out) if not p]
    if empty:
        raise ValueError(f"clients {empty} would get no data")
    return out


def iid_partition(labels: Any, num_clients: int, seed: int = 0) -> list[list[int]]:
    """Uniformly random split into near-equal parts (sizes differ by at most one); every row assigned."""
    y = _as_labels(labels)
    _check_clients(len(y), num_clients)
    rng = np.random.default_rng(seed)
    return _finish(np.array_split(rng.permutation(len(y)), num_clients))


def dirichlet_partition(
    labels: Any,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_retries: int = 1000,
) -> list[list[int]]:
    """Label-skew split: each class's rows go to clients in proportions drawn from ``Dir(alpha)``.

    Small ``alpha`` -> each client dominated by few classes; large ``alpha`` -> close to IID. As in
    the usual implementation (FedMA / NIID-Bench), a client that already holds more than
    ``n / num_clients`` rows gets no share of the next classes, which keeps sizes from
    exploding at small alpha. Every row is assigned.

    Empty clients: a draw that leaves any client with fewer than ``min_size`` rows is discarded and
    the whole draw repeated; after ``max_retries`` failures a ``ValueError`` says how many clients
    the last draw left short and to raise alpha or lower the client count. It never hands out an
    empty client. With few rows per client this is the usual outcome at small alpha: 6,000 rows
    of 2 classes over 1,000 clients fail at alpha <= 1 (the last draw leaves 20-70 clients empty)
    and succeed from alpha = 2. A draw only counts sizes (the rows are split once, on success), so
    failing takes ~3 s there, not the ~50 s of splitting every draw.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    y = _as_labels(labels)
    n = len(y)
    _check_clients(n, num_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    short = num_clients
    for _ in range(max(1, max_retries)):
        splits: list[tuple[np.ndarray, np.ndarray]] = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for rows in by_class:
            rows = rng.permutation(rows)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = np.where(sizes < n / num_clients, p, 0.0)
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p)[:-1] * len(rows)).astype(np.int64)
            splits.append((rows, cuts))
            sizes += np.diff(np.concatenate(([0], np.minimum(cuts, len(rows)), [len(rows)])))
        short = int(np.count_nonzero(sizes < min_size))
        if short == 0:
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for rows, cuts in splits:
                for client, chunk in enumerate(np.split(rows, cuts)):
                    parts[client].extend(chunk.tolist())
            return _finish(parts)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} rows gave all {num_clients} clients >= {min_size} row(s) "
        f"in {max_retries} draws (the last left {short} short): use a larger alpha or fewer clients"
    )


def shard_partition(labels: Any, num_clients: int, labels_per_client: int, seed: int = 0) -> list[list[int]]:
    """Each client holds rows of exactly ``labels_per_client`` classes.

    Classes are dealt cyclically from a seeded permutation (client ``c`` gets positions
    ``c*k .. c*k+k-1`` mod the number of classes), so classes are spread evenly and all are used
    whenever ``num_clients * k >= num_classes``; each class's rows are then split evenly among the
    clients holding it. Rows of classes nobody holds stay unassigned. ``ValueError`` if ``k`` is
    not in ``1..num_classes`` or a class has fewer rows than clients holding it.
    """
    y = _as_labels(labels)
    _check_clients(len(y), num_clients)
    classes = np.unique(y)
    k = int(labels_per_client)
    if not 1 <= k <= len(classes):
        raise ValueError(f"labels_per_client must be in 1..{len(classes)} (the number of classes), got {labels_per_client}")
    rng = np.random.default_rng(seed)
    order = classes[rng.permutation(len(classes))]
    holders: dict[int, list[int]] = {}
    for client in range(num_clients):
        for j in range(k):
            holders.setdefault(int(order[(client * k + j) % len(classes)]), []).append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls, clients in sorted(holders.items()):
        rows = rng.permutation(np.flatnonzero(y == cls))
        if len(rows) < len(clients):
            raise ValueError(
                f"class {cls} has {len(rows)} rows but {len(clients)} clients should hold it; "
                "use fewer clients or fewer labels per client"
            )
        for client, chunk in zip(clients, np.array_split(rows, len(clients))):
            parts[client].extend(chunk.tolist())
    return _finish(parts)


def single_label_partition(labels: Any, num_clients: int, seed: int = 0) -> list[list[int]]:
    """Every client holds one class (``shard_partition`` with one label per client)."""
    return shard_partition(labels, num_clients, 1, seed)


def make_single_label_clients(
    labels: Any,
    parts: Sequence[Sequence[int]],
    clients: Sequence[int],
    seed: int = 0,
    classes: Sequence[int] | Literal["balanced", "majority"] = "balanced",
) -> list[list[int]]:
    """Turn ``clients`` of an existing partition into single-label ("extreme") clients.

    The other clients are left exactly as they are, so a federation with and without extreme
    clients differs only in those clients. Each extreme client gets a class: ``classes[j]`` for its
    j-th entry when a list is given; with ``"majority"`` the class it already holds most of; with
    ``"balanced"`` (default) the class fewest earlier extreme clients got, among the classes that
    can give the client at least half the rows its best class could (its own rows of the class
    plus rows of it no client holds, capped at its size), ties broken by that reach -- so extreme
    clients cover different classes where their data allow, without shrinking to a handful of rows. It keeps
    its own rows of that class; its other rows are released. It is then topped up towards its original
    size from the *pool*: rows no other client holds (released rows plus rows the base scheme left
    unassigned) of its class, shared fairly between extreme clients of the same class. It never
    takes rows from a regular client, so it can end up smaller than before; released rows nobody
    takes stay unassigned. ``ValueError`` if an extreme client would end up empty.
    """
    y = _as_labels(labels)
    n = len(y)
    num_clients = len(parts)
    extreme = [int(c) for c in clients]
    if len(set(extreme)) != len(extreme):
        raise ValueError(f"duplicate clients in {extreme}")
    if any(not 0 <= c < num_clients for c in extreme):
        raise ValueError(f"clients {extreme} out of range 0..{num_clients - 1}")
    if isinstance(classes, str):
        if classes not in ("balanced", "majority"):
            raise ValueError(f"classes must be 'balanced', 'majority' or a list of class ids, got {classes!r}")
    elif len(classes) != len(extreme):
        raise ValueError(f"{len(classes)} classes given for {len(extreme)} single-label clients")
    present = set(np.unique(y).tolist())
    owner = np.full(n, -1, dtype=np.int64)
    for client, rows in enumerate(parts):
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"client {client} holds row indices outside 0..{n - 1}")
        if np.any(owner[rows] >= 0) or len(np.unique(rows)) != len(rows):
            raise ValueError("parts overlap: a row belongs to two clients")
        owner[rows] = client
    is_extreme = np.zeros(num_clients, dtype=bool)
    is_extreme[extreme] = True
    held_by_extreme = (owner >= 0) & is_extreme[np.maximum(owner, 0)]
    free = (owner < 0) | held_by_extreme  # the pool: rows no regular client holds

    chosen: dict[int, int] = {}
    used: dict[int, int] = {c: 0 for c in present}
    unowned = {c: int(np.count_nonzero((owner < 0) & (y == c))) for c in present}
    for j, client in enumerate(extreme):
        own = y[np.asarray(parts[client], dtype=np.int64)]
        held = {int(v): int(k) for v, k in zip(*np.unique(own, return_counts=True))}
        if not isinstance(classes, str):
            cls = int(classes[j])
            if cls not in present:
                raise ValueError(f"class {cls} does not occur in labels (classes: {sorted(present)})")
        elif classes == "majority":
            if not held:
                raise ValueError(f"client {client} is empty: pass explicit classes to choose its label")
            cls = max(sorted(held), key=lambda c: held[c])  # smallest id on ties
        else:  # "balanced": see the docstring
            size = max(len(own), 1)
            reach = {c: min(size, held.get(c, 0) + int(unowned[c])) for c in present}
            best = max(reach.values())
            if best == 0:
                raise ValueError(f"client {client} has no data and the pool is empty: pass explicit classes")
            ok = [c for c in sorted(present) if 2 * reach[c] >= best]
            cls = min(ok, key=lambda c: (used[c], -reach[c]))
        chosen[client] = cls
        used[cls] += 1

    new_parts = [list(map(int, p)) for p in parts]
    deficit: dict[int, int] = {}
    for client in extreme:
        rows = np.asarray(parts[client], dtype=np.int64)
        keep = rows[y[rows] == chosen[client]]
        new_parts[client] = keep.tolist()
        free[keep] = False
        deficit[client] = max(len(rows), 1) - len(keep)

    rng = np.random.default_rng(seed)
    for cls in sorted(set(chosen.values())):
        members = [c for c in extreme if chosen[c] == cls and deficit[c] > 0]
        pool = rng.permutation(np.flatnonzero(free & (y == cls)))
        ptr = 0
        while members and ptr < len(pool):  # water-filling: equal shares until deficits or pool run out
            share = max(1, (len(pool) - ptr) // len(members))
            for client in list(members):
                take = min(deficit[client], share, len(pool) - ptr)
                new_parts[client].extend(pool[ptr : ptr + take].tolist())
                ptr += take
                deficit[client] -= take
                if deficit[client] == 0:
                    members.remove(client)
        free[pool[:ptr]] = False
    empty = [c for c in extreme if not new_parts[c]]
    if empty:
        raise ValueError(
            f"single-label clients {empty} would be empty: no free rows of classes "
            f"{sorted({chosen[c] for c in empty})}; choose other classes or fewer extreme clients"
        )
    return _finish(new_parts)


def partition(
    labels: Any,
    num_clients: int,
    scheme: str,
    seed: int = 0,
    *,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    num_single_label_clients: int = 0,
    single_label_position: Literal["first", "last"] = "last",
    single_label_classes: Sequence[int] | Literal["balanced", "majority"] = "balanced",
    min_size: int = 1,
) -> list[list[int]]:
    """Build ``scheme`` (``iid`` | ``dirichlet`` | ``shard`` | ``single_label``) over all clients,
    then make the first or last ``num_single_label_clients`` of them single-label.

    This is Meerkat-VP's setting: an otherwise Dirichlet (or IID / shard) federation with a few
    "extreme" clients that see a single class. See :func:`make_single_label_clients` for how their
    rows are chosen (the regular clients are untouched; rows are never reused). The base scheme
    uses ``seed``, the single-label step an independent stream derived from it.
    """
    name = scheme.strip().lower().replace("-", "_")
    if name == "iid":
        parts = iid_partition(labels, num_clients, seed)
    elif name == "dirichlet":
        parts = dirichlet_partition(labels, num_clients, alpha, seed, min_size=min_size)
    elif name in ("shard", "shards", "pathological"):
        parts = shard_partition(labels, num_clients, labels_per_client, seed)
    elif name in ("single_label", "single"):
        parts = single_label_partition(labels, num_clients, seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    s = int(num_single_label_clients)
    if s == 0:
        return parts
    if not 0 < s <= num_clients:
        raise ValueError(f"num_single_label_clients must be in 0..{num_clients}, got {num_single_label_clients}")
    if single_label_position not in ("first", "last"):
        raise ValueError(f"single_label_position must be 'first' or 'last', got {single_label_position!r}")
    clients = list(range(s)) if single_label_position == "first" else list(range(num_clients - s, num_clients))
    sub_seed = int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])  # independent of the base draw
    return make_single_label_clients(labels, parts, clients, seed=sub_seed, classes=single_label_classes)


def label_counts(labels: Any, parts: Sequence[Sequence[int]]) -> np.ndarray:
    """``[num_clients, num_classes]`` counts; columns follow ``np.unique(labels)`` (sorted class ids)."""
    y = _as_labels(labels)
    classes = np.unique(y)
    col = np.searchsorted(classes, y)
    out = np.zeros((len(parts), len(classes)), dtype=np.int64)
    for client, rows in enumerate(parts):
        if len(rows):
            out[client] = np.bincount(col[np.asarray(rows, dtype=np.int64)], minlength=len(classes))
    return out


def label_count_table(
    labels: Any,
    parts: Sequence[Sequence[int]],
    label_names: Sequence[str] | Mapping[int, str] | None = None,
) -> str:
    """Plain-text table: one row per client, a column per label, a total column, a totals row.

    ``label_names`` maps class ids to column headers (a sequence is indexed by class id).
    """
    y = _as_labels(labels)
    classes = np.unique(y)
    counts = label_counts(y, parts)

    def name(cls: int) -> str:
        if label_names is None:
            return str(cls)
        if isinstance(label_names, Mapping):
            return str(label_names.get(cls, cls))
        return str(label_names[cls]) if 0 <= cls < len(label_names) else str(cls)

    header = ["client", *[name(int(c)) for c in classes], "total"]
    rows = [[str(i), *map(str, row), str(int(row.sum()))] for i, row in enumerate(counts)]
    totals = counts.sum(axis=0)
    rows.append(["total", *map(str, totals), str(int(totals.sum()))])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    return "\n".join(lines)
