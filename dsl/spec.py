"""The validated spec: immutable Pydantic models (DESIGN §3).

A :class:`Spec` has a ``model`` section (the architecture: hashed, saved, pushed)
and ``train`` / ``run`` sections (what a run does and how; never part of the
model's identity). Instances come from :func:`mixstack.dsl.load_spec`, which does
the staged validation with positions; constructing these models directly from a
canonical dict also works (``ModelSpec.model_validate(d)``), with plain Pydantic
errors.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    model_validator,
)

from mixstack.dsl.base import LayerConfig
from mixstack.dsl.context import Arch, LayerContext

SCHEMA_VERSION = 1

# Where stage boundaries (`|`) sit in a realized pattern is recorded but changes nothing.
STAGE_MARK = "|"
SPECIAL_TOKENS = ("pad", "bos", "eos", "mask")


def _dispatch_layer(value: Any) -> Any:
    """dict with a registered ``type`` -> that type's config instance."""
    if isinstance(value, LayerConfig):
        return value
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        from mixstack.dsl import registry

        return registry.get(value["type"]).config_cls.model_validate(value)
    raise ValueError(f"a layer must be a mapping with a registered `type`, got {value!r}")


AnyLayer = Annotated[SerializeAsAny[LayerConfig], BeforeValidator(_dispatch_layer)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    """Initialisation shared by all layers (mixers may apply their own, MATH.md)."""

    std: float = Field(
        0.02, gt=0, description="std of Normal init for linear and embedding weights"
    )
    residual_scaling: bool = Field(
        True,
        description="divide residual output projections by sqrt(n_layers) (GPT-2 / mamba_ssm)",
    )


class ClassifierConfig(StrictModel):
    """Sequence classification head (arch: classifier)."""

    n_classes: int = Field(..., ge=2, description="number of classes")
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
    vocab_size: int = Field(256, ge=1, description="ordinary token ids 0..vocab_size-1")
    special_tokens: list[Literal["pad", "bos", "eos", "mask"]] = Field(
        default_factory=lambda: list(SPECIAL_TOKENS),
        description="extra ids appended after vocab_size, in this order",
    )
    pad_vocab_multiple: int = Field(8, ge=1, description="embedding rows rounded up to this")
    max_seq_len: int = Field(2048, ge=1, description="longest sequence; sizes caches and RoPE")
    d_model: int = Field(256, ge=1, description="residual stream width")
    norm: NormConfig = Field(default_factory=NormConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on every residual branch")
    activation_checkpointing: bool = Field(False, description="recompute blocks in backward")
    tie_embeddings: bool = Field(True, description="share embedding and LM head weights")
    classifier: ClassifierConfig | None = Field(None, description="required for arch classifier")
    layers: LayersSpec

    _layer_configs: tuple[LayerConfig, ...] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _unique_specials(self) -> ModelSpec:
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special_tokens repeats an entry: {self.special_tokens}")
        return self

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
        """sha256 of the canonical JSON of the architecture plus ``schema_version``.

        The ``layers.requested`` provenance is left out: the same realized architecture
        reached by a pattern or by ratios has one hash.
        """
        data = self.canonical()
        data["layers"].pop("requested", None)
        payload = json.dumps(
            {"schema_version": SCHEMA_VERSION, "model": data},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()


class RunSpec(StrictModel):
    """How a run executes (not the model's identity)."""

    backend: str | dict[str, str] = Field(
        "auto", description="auto, a provider name, or {kernel: provider}"
    )
    compile: bool = Field(False, description="torch.compile the model")
    precision: str = Field("32-true", description="Lightning precision, e.g. bf16-mixed")


class Spec(StrictModel):
    """A whole spec file: ``model`` plus optional ``train`` and ``run``."""

    model: ModelSpec
    # Full schema arrives with the training issue; until then any mapping is kept as is.
    train: dict[str, Any] | None = None
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
            data["train"] = self.train
        data["run"] = self.run.model_dump(mode="json")
        return data

    def dump(self) -> str:
        """Canonical YAML; ``load_spec(yaml.safe_load(s.dump())) == s``."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
