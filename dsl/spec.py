"""The validated spec: immutable Pydantic models (DESIGN §3).

A :class:`Spec` has a ``model`` section (the architecture: hashed, saved, pushed)
and ``train`` / ``run`` sections (what a run does and how; never part of the
model's identity). Instances come from :func:`mixstack.dsl.load_spec`, which does
the staged validation with positions; constructing these models directly from a
canonical dict also works (``ModelSpec.model_validate(d)``), with plain Pydantic
errors.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from mixstack.dsl import registry
from mixstack.dsl.base import MAX_D_MODEL, MAX_SEQ_LEN, MAX_VOCAB, LayerConfig
from mixstack.dsl.context import Arch, LayerContext
from mixstack.dsl.errors import did_you_mean
from mixstack.dsl.migrations import SCHEMA_VERSION, spec_hash_of

# Where stage boundaries (`|`) sit in a realized pattern is recorded but changes nothing.
STAGE_MARK = "|"
SPECIAL_TOKENS = ("pad", "bos", "eos", "mask")


def _registered_config(
    value: Any, noun: str, base: type[BaseModel], kinds: registry.Registry[Any]
) -> Any:
    """A dict with a registered ``type`` -> that type's config instance, validated with
    the class registered in ``kinds`` (the layer or the task registry); an instance of
    ``base`` passes through. Validation with the registry's class is what lets plugin
    layers and tasks, registered after this module loaded, appear in a spec."""
    if isinstance(value, base):
        return value
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return kinds.get(value["type"]).config_cls.model_validate(value)
    raise ValueError(f"a {noun} must be a mapping with a registered `type`, got {value!r}")


def _dispatch_layer(value: Any) -> Any:
    return _registered_config(value, "layer", LayerConfig, registry.layers)


AnyLayer = Annotated[SerializeAsAny[LayerConfig], BeforeValidator(_dispatch_layer)]


class StrictModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )


class NormConfig(StrictModel):
    """Normalisation used in every pre-norm block and as the final norm."""

    type: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="rmsnorm | layernorm")
    eps: float = Field(1e-5, gt=0, description="added to the variance")
    bias: bool = Field(False, description="layernorm only: learn a bias")


class EmbeddingConfig(StrictModel):
    """Token (and optional position) embedding."""

    positional: Literal["none", "learned", "sinusoidal"] = Field(
        "none", description="absolute position embedding added to tokens (RoPE lives in attention)"
    )
    scale: bool = Field(False, description="multiply token embeddings by sqrt(d_model) (Gemma/T5)")


class InitConfig(StrictModel):
    """Initialisation shared by all layers (per mixer: docs/math.md#initialisation)."""

    std: float = Field(
        0.02, gt=0, description="std of Normal init for linear and embedding weights"
    )
    residual_scaling: bool = Field(
        True,
        description="divide residual output projections by sqrt(n_layers) (GPT-2 / mamba_ssm)",
    )
    scheme: Literal["mixstack", "normal_linear"] = Field(
        "mixstack",
        description="mixstack: each mixer's own init (docs/math.md); normal_linear: then every "
        "Linear (Δ projections and filter MLPs included) redrawn from N(0, std) with zero "
        "bias, as the safari / zoology LM code does (residual_scaling still applies)",
    )


class ClassifierConfig(StrictModel):
    """Sequence classification head (arch: classifier)."""

    n_classes: int = Field(..., ge=2, le=MAX_VOCAB, description="number of classes")
    pooling: Literal["mean", "first", "last"] = Field(
        "mean", description="how token states become one vector (padding excluded)"
    )


class OverrideSpec(StrictModel):
    """Per-layer change on the realized pattern: deep-merged into the layer's binding."""

    at: list[int | str] = Field(..., min_length=1, description="layer indices or 'a:b:c' slices")
    set: dict[str, Any] = Field(..., description="fields to change (changing `type` is an error)")


class LayersRequest(StrictModel):
    """How the pattern was asked for (provenance; not part of the hash)."""

    pattern: str | None = None
    layer_types: list[str] | None = None
    n_layers: int | None = None
    ratios: dict[str, float] | None = None
    fill: str | None = None
    allow_missing: bool | None = Field(
        None,
        description="ratio form: accept a ratio that rounds to zero layers (a warning in "
        "`info` instead of an error)",
    )


class LayersSpec(StrictModel):
    """The realized stack: a literal pattern, its symbol bindings and per-layer overrides."""

    pattern: str = Field(..., description="realized literal pattern, one symbol per sub-layer")
    symbols: dict[str, AnyLayer] = Field(..., description="symbol -> layer config")
    overrides: list[OverrideSpec] = Field(default_factory=list)
    requested: LayersRequest | None = Field(None, description="provenance of the pattern")

    @property
    def symbols_in_order(self) -> list[str]:
        return [c for c in self.pattern if c != STAGE_MARK]

    @property
    def n_layers(self) -> int:
        return len(self.symbols_in_order)

    @property
    def stage_boundaries(self) -> list[int]:
        """Layer indices that start a new pipeline stage."""
        out, count = [], 0
        for c in self.pattern:
            if c == STAGE_MARK:
                out.append(count)
            else:
                count += 1
        return out


class ModelSpec(StrictModel):
    """The architecture."""

    arch: Arch = Field("causal_lm", description="causal_lm | encoder | classifier")
    vocab_size: int = Field(
        256, ge=1, le=MAX_VOCAB, description="ordinary token ids 0..vocab_size-1"
    )
    special_tokens: list[Literal["pad", "bos", "eos", "mask"]] = Field(
        default_factory=lambda: list(SPECIAL_TOKENS),
        description="extra ids appended after vocab_size, in this order",
    )
    pad_vocab_multiple: int = Field(
        8, ge=1, le=MAX_D_MODEL, description="embedding rows rounded up to this"
    )
    max_seq_len: int = Field(
        2048, ge=1, le=MAX_SEQ_LEN, description="longest sequence; sizes caches and RoPE"
    )
    d_model: int = Field(256, ge=1, le=MAX_D_MODEL, description="residual stream width")
    norm: NormConfig = Field(default_factory=NormConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on every residual branch")
    tie_embeddings: bool = Field(True, description="share embedding and LM head weights")
    classifier: ClassifierConfig | None = Field(None, description="required for arch classifier")
    layers: LayersSpec

    _layer_configs: tuple[LayerConfig, ...] | None = PrivateAttr(default=None)

    @field_validator("special_tokens")
    @classmethod
    def _unique_specials(cls, value: list[str]) -> list[str]:
        repeated = sorted({t for t in value if value.count(t) > 1})
        if repeated:
            raise ValueError(
                f"special_tokens repeats {', '.join(repeated)}: each may appear once, got {value}"
            )
        return value

    # -- derived sizes --------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.layers.n_layers

    @property
    def special_ids(self) -> dict[str, int]:
        return {name: self.vocab_size + i for i, name in enumerate(self.special_tokens)}

    @property
    def total_vocab(self) -> int:
        """Ids the model reads and predicts: ordinary tokens plus specials."""
        return self.vocab_size + len(self.special_tokens)

    @property
    def padded_vocab(self) -> int:
        """Embedding rows: ``total_vocab`` rounded up to ``pad_vocab_multiple``."""
        m = self.pad_vocab_multiple
        return -(-self.total_vocab // m) * m

    def context(self, layer_idx: int = 0) -> LayerContext:
        return LayerContext(
            d_model=self.d_model,
            layer_idx=layer_idx,
            n_layers=self.n_layers,
            max_seq_len=self.max_seq_len,
            arch=self.arch,
            vocab_size=self.total_vocab,
            init_std=self.init.std,
        )

    def layer_configs(self) -> tuple[LayerConfig, ...]:
        """One resolved config per realized layer (bindings with overrides applied)."""
        if self._layer_configs is None:
            from mixstack.dsl.layers import realize_layer_configs

            object.__setattr__(self, "_layer_configs", tuple(realize_layer_configs(self)))
        assert self._layer_configs is not None
        return self._layer_configs

    # -- identity -------------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """Fully resolved plain data (JSON types only)."""
        return self.model_dump(mode="json")

    @property
    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the architecture plus ``schema_version``
        (:func:`mixstack.dsl.migrations.spec_hash_of`; ``layers.requested`` left out)."""
        return spec_hash_of(self.canonical())


# -- the train section: what a run does ----------------------------------------------------

# A problem a train/run config finds against the model: (path relative to the config,
# message, what is allowed or None).
Problem = tuple[tuple[str | int, ...], str, str | None]


class TaskConfig(StrictModel):
    """Base of the ``train.task`` configs (one per ``type``; each task of
    :mod:`mixstack.tasks` defines its own and registers it with
    :func:`mixstack.dsl.registry.register_task`).

    ``archs``: the model archs the task trains. ``resolve`` fills model-dependent
    defaults (``vocab_size: null`` -> the model's), ``check`` compares with the model.
    """

    archs: ClassVar[tuple[str, ...]] = ("causal_lm",)
    type: str
    seq_len: int = Field(64, ge=3, description="tokens per sample (<= model.max_seq_len)")

    @classmethod
    def examples(cls) -> list[TaskConfig]:
        """Small configurations covering the task's modes, used by the contract tests
        (each must fit a model with ``vocab_size`` 256 and ``max_seq_len`` 512)."""
        return []

    def resolve(self, model: ModelSpec) -> TaskConfig:
        if getattr(self, "vocab_size", 0) is None:
            return self.model_copy(update={"vocab_size": model.vocab_size})
        return self

    def check(self, model: ModelSpec) -> list[Problem]:
        out: list[Problem] = []
        if self.seq_len > model.max_seq_len:
            out.append(
                (
                    ("seq_len",),
                    f"seq_len {self.seq_len} exceeds the model's max_seq_len {model.max_seq_len}",
                    f"<= {model.max_seq_len}, or raise model.max_seq_len",
                )
            )
        vocab = getattr(self, "vocab_size", None)
        if vocab is not None and vocab > model.vocab_size:
            out.append(
                (
                    ("vocab_size",),
                    f"the task uses ids 0..{vocab - 1} but the model's vocab_size is "
                    f"{model.vocab_size}",
                    f"<= {model.vocab_size}, or raise model.vocab_size",
                )
            )
        return out


def _dispatch_task(value: Any) -> Any:
    return _registered_config(value, "task", TaskConfig, registry.tasks)


# The task configs live with their generators in mixstack/tasks/ (one file per task) and
# register themselves; the train section only knows this base.
AnyTask = Annotated[SerializeAsAny[TaskConfig], BeforeValidator(_dispatch_task)]


class AdamWConfig(StrictModel):
    """AdamW (Loshchilov & Hutter 2019): decoupled weight decay."""

    type: Literal["adamw", "adam"] = Field(
        "adamw", description="adamw, or adam (weight decay added to the gradient)"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="moment decay rates")
    eps: float = Field(1e-8, gt=0, description="added to the denominator")
    weight_decay: float = Field(0.1, ge=0, description="not applied to norms, biases, SSM scalars")


class SGDConfig(StrictModel):
    """SGD with optional (Nesterov) momentum."""

    type: Literal["sgd"] = "sgd"
    lr: float = Field(1e-2, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum factor")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0, description="not applied to norms, biases, SSM scalars")


AnyOptimizer = Annotated[AdamWConfig | SGDConfig, Field(discriminator="type")]
OPTIMIZER_TYPES: dict[str, type[StrictModel]] = {
    "adamw": AdamWConfig,
    "adam": AdamWConfig,
    "sgd": SGDConfig,
}


class ScheduleConfig(StrictModel):
    """Learning rate: linear warmup, then cosine / linear decay or constant (per step)."""

    type: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay shape")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from lr/warmup")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="cosine/linear: final lr as a fraction of the peak"
    )


class MLMConfig(StrictModel):
    """Masked-LM objective (arch encoder)."""

    mask_rate: float = Field(0.15, gt=0, lt=1, description="fraction of positions masked")
    mask_id: int | None = Field(
        None, ge=0, description="id written at masked positions; null: the 'mask' special token"
    )


class EarlyStopConfig(StrictModel):
    """Finish as soon as a validation metric reaches a target (checked at each validation)."""

    metric: str = Field(
        "val/accuracy",
        description="validation metric to watch: val/<name> of a metric of the run's task "
        "(loss, accuracy, ppl, or one the task defines)",
    )
    threshold: float = Field(
        ...,
        description="stop once the metric is >= this (higher is better, e.g. accuracy) or "
        "<= this (lower is better, e.g. loss, ppl)",
    )

    @property
    def mode(self) -> Literal["max", "min"]:
        """The metric's direction, from the metric registry."""
        return registry.metric_direction(self.metric)

    def check(self, task: str, arch: str) -> list[Problem]:
        """The metric must be one that a run of ``task`` on ``arch`` logs."""
        known = [f"val/{m.name}" for m in registry.task_metrics(task, arch)]
        if self.metric in known:
            return []
        hint = did_you_mean(self.metric, known)
        return [
            (
                ("early_stop", "metric"),
                f"task {task!r} on arch {arch} logs no metric {self.metric!r}"
                + (f" (did you mean {hint!r}?)" if hint else ""),
                "one of " + ", ".join(known),
            )
        ]


class TrainSpec(StrictModel):
    """What a run does: task, optimisation, length, evaluation. Not part of the model."""

    task: AnyTask
    optimizer: AnyOptimizer = Field(default_factory=AdamWConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    max_steps: int | None = Field(
        None, ge=1, description="optimizer steps; the schedule spans them"
    )
    max_epochs: int | None = Field(None, ge=1, description="epochs (task.epoch_size samples each)")
    batch_size: int = Field(
        32, ge=1, description="samples per optimizer step over all devices and accumulation"
    )
    accumulate_grad_batches: int = Field(1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float | None = Field(1.0, gt=0, description="gradient clipping threshold; null: off")
    grad_clip_algorithm: Literal["norm", "value"] = Field(
        "norm", description="clip the gradient norm, or each value"
    )
    seed: int = Field(0, ge=0, lt=2**63, description="weights, data and dropout derive from it")
    val_every: int = Field(100, ge=1, description="validate every this many optimizer steps")
    val_batch_size: int | None = Field(None, ge=1, description="null: batch_size")
    checkpoint_every: int | None = Field(
        None, ge=1, description="checkpoint every this many steps; null: val_every"
    )
    log_every: int = Field(10, ge=1, description="log training metrics every this many steps")
    mlm: MLMConfig = Field(default_factory=MLMConfig)
    init_from: str | None = Field(
        None,
        min_length=1,
        description="start from the weights of a model directory, or of a run directory's "
        "model (relative to the spec file that sets it): tensors matched by key and shape, "
        "the head (lm_head / classifier) new, any other mismatch refused; not applied when "
        "resuming",
    )
    early_stop: EarlyStopConfig | None = Field(
        None, description="finish early once a validation metric reaches a threshold"
    )
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop",
        description="a NaN/inf training loss: stop (an error naming the step; the last "
        "checkpoint is kept) or skip_step (that optimizer step applies no update)",
    )

    @model_validator(mode="after")
    def _has_length(self) -> TrainSpec:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set max_steps or max_epochs (how long to train)")
        return self

    def resolve(self, model: ModelSpec) -> TrainSpec:
        """Model-dependent defaults filled in (the task's vocabulary, the mask id)."""
        update: dict[str, Any] = {"task": self.task.resolve(model)}
        if model.arch == "encoder" and self.mlm.mask_id is None and "mask" in model.special_ids:
            update["mlm"] = self.mlm.model_copy(update={"mask_id": model.special_ids["mask"]})
        return self.model_copy(update=update)

    def check(self, model: ModelSpec) -> list[Problem]:
        """Problems of this (resolved) train section against ``model``."""
        task = self.task
        if model.arch not in task.archs:
            return [
                (
                    ("task", "type"),
                    f"task {task.type!r} does not train arch {model.arch}",
                    "tasks for "
                    + model.arch
                    + ": "
                    + ", ".join(
                        n for n, c in registry.task_configs().items() if model.arch in c.archs
                    ),
                )
            ]
        out = [(("task", *rel), msg, allowed) for rel, msg, allowed in task.check(model)]
        if getattr(task, "epoch_size", 0) is None and self.max_steps is None:
            out.append(
                (
                    ("max_epochs",),
                    f"task {task.type!r} is an endless stream: epochs need task.epoch_size",
                    "max_steps, or set task.epoch_size",
                )
            )
        out.extend(self._check_mlm(model))
        out.extend(self.check_batch_split(1))
        if self.early_stop is not None:
            out.extend(self.early_stop.check(task.type, model.arch))
        return out

    def check_batch_split(self, world_size: int, where: str = "") -> list[Problem]:
        """``batch_size`` must split evenly into accumulate_grad_batches × processes
        micro-batches (checked at load, not when training starts)."""
        parts = self.accumulate_grad_batches * world_size
        if self.batch_size % parts == 0:
            return []
        across = f" × {world_size} processes{where}" if world_size > 1 else ""
        return [
            (
                ("batch_size",),
                f"batch_size {self.batch_size} does not split into accumulate_grad_batches "
                f"{self.accumulate_grad_batches}{across} equal micro-batches",
                f"a multiple of {parts}",
            )
        ]

    def _check_mlm(self, model: ModelSpec) -> list[Problem]:
        if model.arch != "encoder":
            return []
        if self.mlm.mask_id is None:
            return [
                (
                    ("mlm", "mask_id"),
                    "arch encoder trains masked-LM and needs a mask id; the model has no "
                    "'mask' special token",
                    "add 'mask' to model.special_tokens, or set train.mlm.mask_id",
                )
            ]
        if self.mlm.mask_id >= model.total_vocab:
            return [
                (
                    ("mlm", "mask_id"),
                    f"mask_id {self.mlm.mask_id} is not an id of the model "
                    f"(0..{model.total_vocab - 1})",
                    f"0..{model.total_vocab - 1}",
                )
            ]
        return []


# -- the run section: how a run executes ----------------------------------------------------

PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


class TrainerConfig(StrictModel):
    """Passed to Lightning's Trainer: many GPUs or nodes are configuration, not code."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = Field(
        "auto", description="Lightning accelerator"
    )
    devices: (
        Annotated[int, Field(ge=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Literal["auto"]
    ) = Field(1, description="devices per node: a count >= 1, a list of indices, or auto (all)")
    strategy: Literal[
        "auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed"
    ] = Field("auto", description="Lightning strategy (DDP / FSDP across devices and nodes)")
    num_nodes: int = Field(1, ge=1, description="machines")


class CSVLoggerConfig(StrictModel):
    type: Literal["csv"] = "csv"


class TensorBoardLoggerConfig(StrictModel):
    type: Literal["tensorboard"] = "tensorboard"


class WandbLoggerConfig(StrictModel):
    type: Literal["wandb"] = "wandb"
    project: str = Field("mixstack", description="W&B project")
    entity: str | None = Field(None, description="W&B team or user")
    mode: Literal["online", "offline"] = Field("offline", description="offline needs no network")


AnyLogger = Annotated[
    CSVLoggerConfig | TensorBoardLoggerConfig | WandbLoggerConfig, Field(discriminator="type")
]
LOGGER_TYPES: dict[str, type[StrictModel]] = {
    "csv": CSVLoggerConfig,
    "tensorboard": TensorBoardLoggerConfig,
    "wandb": WandbLoggerConfig,
}


class HubPushConfig(StrictModel):
    """``run.hub``: push the model directory to a Hub model repository when the run
    finishes (endpoint and token come from the environment / ``--hub-endpoint``, never
    from the spec)."""

    repo_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="ORG/NAME of the model repository (created if missing)",
    )
    private: bool = Field(False, description="create the repository private")
    revision: str | None = Field(None, description="branch to push to (null: main)")


class RunSpec(StrictModel):
    """How a run executes (not the model's identity; a resumed run may change it)."""

    backend: str | dict[str, str] = Field(
        "auto", description="auto, a provider name, or {kernel: provider}"
    )
    compile: bool = Field(False, description="torch.compile the model")
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        "32-true", description="Lightning precision; bf16-true keeps keep_fp32 params fp32"
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logger: AnyLogger = Field(
        default_factory=CSVLoggerConfig,
        description="metrics.csv is always written; tensorboard / wandb log as well",
    )
    activation_checkpointing: bool | list[int | str] = Field(
        False,
        description="recompute blocks in backward: all (true), or layer indices / 'a:b' slices",
    )
    stop_after: int | None = Field(
        None,
        ge=1,
        description="stop this invocation at this global step (checkpointed; continue with "
        "--resume); the schedule still follows train.max_steps",
    )
    num_workers: int = Field(0, ge=0, description="data loader worker processes")
    deterministic: bool = Field(False, description="torch deterministic algorithms")
    hub: HubPushConfig | None = Field(
        None, description="push the trained model to the Hugging Face Hub at the end"
    )


class Spec(StrictModel):
    """A whole spec file: ``model`` plus optional ``train`` and ``run``."""

    model: ModelSpec
    train: TrainSpec | None = None
    run: RunSpec = Field(default_factory=RunSpec)

    @property
    def spec_hash(self) -> str:
        return self.model.spec_hash

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model.canonical(),
        }
        if self.train is not None:
            data["train"] = self.train.model_dump(mode="json")
        data["run"] = self.run.model_dump(mode="json")
        return data

    def dump(self) -> str:
        """Canonical YAML; ``load_spec(yaml.safe_load(s.dump())) == s``."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
