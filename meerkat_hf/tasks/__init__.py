"""Classification tasks as MeZO/Meerkat train causal LMs: a prompt plus a verbalizer.

``get_task("sst2")`` gives a :class:`TaskTemplate`; :func:`load_task_dataset` returns its examples
(offline for ``tweets``/``tweets_binary``, from the Hub or local files otherwise);
:func:`encode_classification` tokenizes them so that a plain LM loss supervises only the first
token of the gold label word; :func:`candidate_logits`/:func:`candidate_loss`/:func:`evaluate_accuracy`
score the label words at the position that predicts them.
"""

from .data import (
    OFFLINE_TASKS,
    TWEETS_TEST_FRACTION,
    TWEETS_VALIDATION_FRACTION,
    hub_offline,
    load_task_dataset,
    tweets_csv_path,
)
from .templates import TASKS, TaskTemplate, custom_task, get_task, list_tasks
from .verbalizer import (
    IGNORE_INDEX,
    ClassificationCollator,
    balanced_class_weights,
    candidate_logits,
    candidate_loss,
    candidate_scores,
    candidate_token_ids,
    encode_classification,
    encode_prompt_ids,
    evaluate_accuracy,
    label_word_token_ids,
    prediction_positions,
    predict,
)

__all__ = [
    "TASKS",
    "TaskTemplate",
    "custom_task",
    "get_task",
    "list_tasks",
    "OFFLINE_TASKS",
    "TWEETS_TEST_FRACTION",
    "TWEETS_VALIDATION_FRACTION",
    "hub_offline",
    "load_task_dataset",
    "tweets_csv_path",
    "IGNORE_INDEX",
    "ClassificationCollator",
    "candidate_logits",
    "balanced_class_weights",
    "candidate_loss",
    "candidate_scores",
    "candidate_token_ids",
    "encode_classification",
    "encode_prompt_ids",
    "evaluate_accuracy",
    "label_word_token_ids",
    "prediction_positions",
    "predict",
]
