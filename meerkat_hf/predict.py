"""Use a trained delta from Python or the command line (`meerkat-hf predict RUN_OR_DELTA "text"`).

A delta trained on a classification task is used the way it was trained: the task's prompt is
filled with the text and the task's label words are scored at the position that predicts them.
Any other delta (a language-modelling run, a Trainer output, or `--generate`) continues the text.

Where the task comes from, first match wins: `task=` / `--task`; the run's `run_info.json` (the
run folder, or the parent of its `final/`), which holds the whole federation config, custom
prompts and verbalizers included; the task name at the start of the delta's training summary.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_INFO_NAME = "run_info.json"


@dataclass
class DeltaLocation:
    """Where a delta lives: a local folder or a Hub id, and the run folder around it (if any)."""

    delta: str | Path
    run_dir: Path | None = None


@dataclass
class Prediction:
    text: str
    label: str | None = None  # classification
    scores: dict[str, float] = field(default_factory=dict)  # label -> probability over the label words
    generated: str | None = None  # generation

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.label is not None:
            out.update(label=self.label, scores=self.scores)
        if self.generated is not None:
            out["generated"] = self.generated
        return out


def locate_delta(run_or_delta: str | os.PathLike) -> DeltaLocation:
    """A run folder (`runs/x`, its delta in `final/`), a delta folder, or a Hub repo id."""
    from .hub.artifacts import _looks_like_local_path
    from .modeling.model import DELTA_CONFIG_NAME

    path = Path(os.path.expanduser(os.fspath(run_or_delta)))
    if path.is_dir():
        if (path / "final" / DELTA_CONFIG_NAME).is_file():
            return DeltaLocation(path / "final", path)
        if (path / DELTA_CONFIG_NAME).is_file():
            return DeltaLocation(path, path.parent if (path.parent / RUN_INFO_NAME).is_file() else None)
        if (path / RUN_INFO_NAME).is_file():
            raise FileNotFoundError(f"{path} is a run folder without final/: the run has not finished "
                                    "(continue it with `meerkat-hf federate --resume`)")
        raise FileNotFoundError(f"{path} is neither a run folder (with final/) nor a saved Meerkat delta "
                                f"(no {DELTA_CONFIG_NAME})")
    if path.exists():
        raise NotADirectoryError(f"{path} is a file: pass a run folder or a delta folder")
    if _looks_like_local_path(run_or_delta):
        from .hub.artifacts import find_interrupted_save

        if find_interrupted_save(path) is not None:
            return DeltaLocation(path)  # `MeerkatModel.from_pretrained` loads the previous version
        raise FileNotFoundError(f"{run_or_delta} does not exist (expected a run folder, a delta folder or a Hub id)")
    return DeltaLocation(os.fspath(run_or_delta))


def _task_from_config(task: dict):
    from .tasks import custom_task, get_task

    if task.get("type", "classification") != "classification":
        return None
    if task.get("prompt"):
        return custom_task(task["prompt"], task["verbalizer"], task.get("text_columns"), task.get("label_column", "label"),
                           name=task.get("name") or "custom")
    return get_task(task["name"]) if task.get("name") else None


def find_task(location: DeltaLocation, delta_config: dict | None = None):
    """(TaskTemplate or None, max_length) for a delta; None means "generate"."""
    from .tasks import get_task

    if location.run_dir is not None:
        info_path = location.run_dir / RUN_INFO_NAME
        try:
            config = json.loads(info_path.read_text()).get("config") or {}
        except (OSError, ValueError) as err:
            raise ValueError(f"{info_path} is unreadable: {err}") from err
        return _task_from_config(config.get("task") or {}), int(config.get("max_length") or 128)
    described = str(((delta_config or {}).get("training") or {}).get("task") or "")
    name = described.split(":", 1)[0].strip()
    if name and not name.startswith("lm"):
        try:
            return get_task(name), 128
        except KeyError:
            logger.info("training summary names task %r, which is not a known task: generating", name)
    return None, 128


def _example(template, text: str) -> dict:
    columns = list(template.text_columns)
    if len(columns) == 1:
        return {columns[0]: text}
    try:
        example = json.loads(text)
    except ValueError:
        example = None
    if not isinstance(example, dict) or any(c not in example for c in columns):
        raise ValueError(f"task {template.name!r} reads the columns {', '.join(columns)}: pass each input as a JSON "
                         "object, e.g. '" + json.dumps({c: "..." for c in columns}) + "'")
    return example


def classify(model, tokenizer, template, texts: list[str], max_length: int = 128) -> list[Prediction]:
    """Score the task's label words after its prompt; probabilities are a softmax over the label words."""
    import torch

    from .tasks import ClassificationCollator, candidate_logits, candidate_token_ids, encode_prompt_ids

    prompts = [template.format_prompt(_example(template, t)) for t in texts]
    ids, _ = encode_prompt_ids(tokenizer, prompts, max_length)
    batch = ClassificationCollator(tokenizer)([{"input_ids": i, "attention_mask": [1] * len(i)} for i in ids])
    with torch.no_grad():
        probs = candidate_logits(model, batch, candidate_token_ids(tokenizer, template)).float().softmax(-1)
    names = list(template.label_names)
    return [Prediction(text=t, label=names[int(p.argmax())], scores={n: round(float(v), 4) for n, v in zip(names, p)})
            for t, p in zip(texts, probs)]


def generate(model, tokenizer, texts: list[str], max_new_tokens: int = 32) -> list[Prediction]:
    """Greedy continuation of each text."""
    import torch

    out = []
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        out.append(Prediction(text=text, generated=tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:],
                                                                     skip_special_tokens=True)))
    return out


def predict_texts(run_or_delta: str | os.PathLike, texts: list[str], *, task: str | None = None,
                  force_generate: bool = False, base_model: str | None = None, max_new_tokens: int = 32,
                  max_length: int | None = None) -> tuple[list[Prediction], Any]:
    """Load the delta (and its recorded base) and classify or continue `texts`; returns (predictions, task)."""
    from .modeling.model import MeerkatModel, _delta_folder, read_delta_config
    from .tasks import get_task

    if not texts:
        raise ValueError("no text to predict")
    location = locate_delta(run_or_delta)
    delta_config = read_delta_config(_delta_folder(location.delta, None, {}))
    template, default_length = (None, 128) if force_generate else (
        (get_task(task), 128) if task else find_task(location, delta_config))
    model = MeerkatModel.from_pretrained(location.delta, base_model=base_model)
    model.eval()
    tokenizer = model.tokenizer
    if template is None:
        return generate(model, tokenizer, texts, max_new_tokens), None
    return classify(model, tokenizer, template, texts, max_length or default_length), template
