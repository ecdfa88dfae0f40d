"""Grid specs: the YAML file of an ablation grid, read with positions and checked.

::

    base: zoo:mqar-tiny            # a spec path (relative to this file), zoo:NAME or hf://...
    set: {train.max_steps: 200}    # overrides every point shares (optional)
    axes:                          # dotted key -> values; the cartesian product of axes...
      model.d_model: [32, 64]
      zip:                         # ...and of zip groups (lists of equal length, paired)
        - {model.layers.symbols.M.headdim: [8, 16], model.layers.symbols.M.d_state: [8, 16]}
    variants:                      # named override sets (optional); `base:` in one
      attention: {model.layers.pattern: "*-*-"}   # starts that variant from another spec
      mamba2: {model.layers.pattern: "M-M-"}
    seeds: [0, 1, 2]
    metric: val/accuracy           # direction from the metric registry
    mode: max                      # optional; must agree with the registry
    budget: {tokens: 1.0e6}        # optional: steps | tokens | flops (3·FLOPs/token·tokens)
    lr: [1.0e-3, 3.0e-3]           # optional: sub-runs per point, best one by the metric
    match: {quantity: params, to: attention, knob: model.d_model, tolerance: 0.02}

Reading is :func:`load_grid`: every problem of the file is collected into one
:class:`~mixstack.dsl.errors.SpecError` whose issues name ``file:line:col`` and the YAML
path, like a model spec's.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixstack.dsl import registry
from mixstack.dsl.errors import IssueCollector, SpecError, SpecIssue, did_you_mean, format_path
from mixstack.dsl.provenance import Provenance, read_yaml_file

Path_ = tuple[str | int, ...]

TOP_KEYS = (
    "name",
    "base",
    "set",
    "axes",
    "variants",
    "seeds",
    "metric",
    "mode",
    "budget",
    "lr",
    "match",
)
BUDGET_KINDS = ("steps", "tokens", "flops")
QUANTITIES = ("params", "flops", "state_bytes")
ZIP_KEY = "zip"
_KEY = re.compile(r"[A-Za-z_][\w\-]*(\[-?\d+\])*(\.[\w\-*]+(\[-?\d+\])*)*")


@dataclass(frozen=True)
class Setting:
    """One override a point applies: dotted ``key`` = ``value``, and where the grid file
    says so (``path`` in the grid YAML, ``origin`` file:line:col)."""

    key: str
    value: Any
    path: Path_
    origin: str | None

    @property
    def text(self) -> str:
        """``key=value`` as :func:`mixstack.load_spec` overrides take it (JSON is YAML)."""
        import json

        return f"{self.key}={json.dumps(self.value)}"

    @property
    def where(self) -> str:
        return f"{format_path(self.path)} at {self.origin or '<unknown origin>'}"


@dataclass(frozen=True)
class AxisGroup:
    """One factor of the cartesian product: a single axis, or a zip group of axes whose
    values are taken together. ``options[i]`` is the list of settings of choice ``i``."""

    keys: tuple[str, ...]
    options: tuple[tuple[Setting, ...], ...]


@dataclass(frozen=True)
class Budget:
    kind: Literal["steps", "tokens", "flops"]
    amount: float
    origin: str | None


@dataclass(frozen=True)
class Match:
    quantity: Literal["params", "flops", "state_bytes"]
    to: str | float  # a variant name or a number
    knob: str
    tolerance: float
    origin: str | None


@dataclass(frozen=True)
class Variant:
    name: str
    settings: tuple[Setting, ...]
    base: str | None = None  # a variant may start from its own base spec


@dataclass
class Grid:
    """A checked grid spec (see the module docstring)."""

    name: str
    source: Path | None  # the grid file (None for a mapping)
    base: str
    base_origin: str | None
    common: tuple[Setting, ...]
    axes: tuple[AxisGroup, ...]
    variants: tuple[Variant, ...]  # at least one; a grid without variants has one named ""
    seeds: tuple[int, ...]
    metric: str
    mode: Literal["max", "min"]
    budget: Budget | None
    lrs: tuple[Setting, ...]  # empty: the base's learning rate
    match: Match | None
    prov: Provenance = field(repr=False, default_factory=Provenance)

    @property
    def axis_keys(self) -> list[str]:
        return [k for group in self.axes for k in group.keys]

    def cells(self) -> list[tuple[Variant, tuple[Setting, ...]]]:
        """Every (variant, axis settings) combination, variants outermost."""
        choices = [group.options for group in self.axes]
        out = []
        for variant in self.variants:
            for combo in itertools.product(*choices):
                out.append((variant, tuple(s for option in combo for s in option)))
        return out


def load_grid(source: str | os.PathLike[str] | dict[str, Any]) -> Grid:
    """Read and check a grid spec (a YAML path or a mapping). Raises
    :class:`~mixstack.dsl.errors.SpecError` listing every problem."""
    if isinstance(source, dict):
        import copy

        data: Any = copy.deepcopy(source)
        prov = Provenance.uniform("<dict>")
        path: Path | None = None
        name = "grid"
    else:
        path = Path(os.fspath(source))
        data, prov = read_yaml_file(path, os.fspath(source))
        name = path.stem
    if not isinstance(data, dict):
        raise SpecError(
            SpecIssue(
                "a grid file must be a mapping",
                origin=prov.origin(()),
                allowed="keys " + ", ".join(TOP_KEYS),
            )
        )
    return _Reader(data, prov, path, name).read()


class _Reader:
    def __init__(self, data: dict[str, Any], prov: Provenance, path: Path | None, name: str):
        self.data, self.prov, self.path, self.name = data, prov, path, name
        self.issues = IssueCollector()

    def add(self, path: Path_, message: str, value: Any = None, **kw: Any) -> None:
        if value is not None:
            kw["value"] = value
        self.issues.add(message, path=path, origin=self.prov.origin(path), **kw)

    def setting(self, key: str, value: Any, path: Path_) -> Setting:
        return Setting(key, value, path, self.prov.origin(path))

    def key_ok(self, key: Any, path: Path_) -> bool:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            self.add(
                path,
                f"{key!r} is not a dotted key path",
                allowed="keys like model.d_model or model.layers.symbols.M.headdim",
            )
            return False
        if key.split(".")[0] not in ("model", "train", "run"):
            self.add(
                path,
                f"key {key!r} does not start with a spec section",
                allowed="model.*, train.*, run.*",
            )
            return False
        return True

    def read(self) -> Grid:
        d = self.data
        for key in d:
            if key not in TOP_KEYS:
                hint = did_you_mean(str(key), TOP_KEYS)
                self.add(
                    (key,),
                    f"unknown grid key {key!r}",
                    allowed=", ".join(TOP_KEYS),
                    suggestion=hint,
                )
        name = d.get("name", self.name)
        if not isinstance(name, str) or not re.fullmatch(r"[\w.\-]+", name):
            self.add(("name",), "name must be a word (letters, digits, _ . -)", value=name)
            name = self.name
        base = d.get("base")
        if not isinstance(base, str) or not base.strip():
            self.add(
                ("base",),
                "base is required: the spec every point starts from",
                value=base,
                allowed="a YAML path (relative to the grid file), zoo:NAME or hf://user/repo",
            )
            base = ""
        common = self.mapping_settings(d.get("set"), ("set",))
        axes = self.axes(d.get("axes"))
        variants = self.variants(d.get("variants"))
        seeds = self.seeds(d.get("seeds", [0]))
        metric, mode = self.metric(d.get("metric"), d.get("mode"))
        budget = self.budget(d.get("budget"))
        lrs = self.lrs(d.get("lr"))
        match = self.match(d.get("match"), [v.name for v in variants])
        self.overlaps(common, axes, variants, lrs, match)
        if self.issues:
            raise SpecError(self.issues.issues)
        return Grid(
            name=name,
            source=self.path,
            base=self.resolve_base(base.strip()),
            base_origin=self.prov.origin(("base",)),
            common=common,
            axes=axes,
            variants=variants,
            seeds=seeds,
            metric=metric,
            mode=mode,
            budget=budget,
            lrs=lrs,
            match=match,
            prov=self.prov,
        )

    def resolve_base(self, base: str) -> str:
        """A relative path is relative to the grid file; zoo: and URLs pass through."""
        if base.startswith("zoo:") or "://" in base or self.path is None:
            return base
        path = Path(base).expanduser()
        return str(path if path.is_absolute() else self.path.parent / path)

    def mapping_settings(self, raw: Any, path: Path_) -> tuple[Setting, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            self.add(path, "must be a mapping of dotted keys to values", value=raw)
            return ()
        out = []
        for key, value in raw.items():
            if self.key_ok(key, (*path, key)):
                out.append(self.setting(key, value, (*path, key)))
        return tuple(out)

    def axis_values(self, raw: Any, path: Path_) -> list[Any] | None:
        if not isinstance(raw, list) or not raw:
            self.add(path, "an axis needs a non-empty list of values", value=raw)
            return None
        return raw

    def axes(self, raw: Any) -> tuple[AxisGroup, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            self.add(("axes",), "axes must be a mapping: dotted key -> list of values", value=raw)
            return ()
        groups: list[AxisGroup] = []
        for key, values in raw.items():
            path = ("axes", key)
            if key == ZIP_KEY:
                groups.extend(self.zip_groups(values))
                continue
            if not self.key_ok(key, path) or self.axis_values(values, path) is None:
                continue
            options = tuple((self.setting(key, v, (*path, i)),) for i, v in enumerate(values))
            groups.append(AxisGroup((key,), options))
        return tuple(groups)

    def zip_groups(self, raw: Any) -> list[AxisGroup]:
        base: Path_ = ("axes", ZIP_KEY)
        if isinstance(raw, dict):
            raw = [raw]
            one = True
        else:
            one = False
        if not isinstance(raw, list):
            self.add(base, "zip must be a list of groups (dotted key -> equal-length lists)")
            return []
        groups = []
        for g, group in enumerate(raw):
            gpath: Path_ = base if one else (*base, g)
            if not isinstance(group, dict) or not group:
                self.add(gpath, "a zip group is a mapping of dotted keys to lists", value=group)
                continue
            lengths = {}
            for key, values in group.items():
                if self.key_ok(key, (*gpath, key)) and self.axis_values(values, (*gpath, key)):
                    lengths[key] = len(values)
            if len(set(lengths.values())) > 1:
                self.add(
                    gpath,
                    "the lists of a zip group must have the same length",
                    value=lengths,
                    allowed="equal lengths (values are taken together, position by position)",
                )
                continue
            if not lengths:
                continue
            n = next(iter(lengths.values()))
            options = tuple(
                tuple(self.setting(k, group[k][i], (*gpath, k, i)) for k in lengths)
                for i in range(n)
            )
            groups.append(AxisGroup(tuple(lengths), options))
        return groups

    def variants(self, raw: Any) -> tuple[Variant, ...]:
        if raw is None:
            return (Variant("", ()),)
        if not isinstance(raw, dict) or not raw:
            self.add(
                ("variants",),
                "variants must be a non-empty mapping: name -> {dotted key: value}",
                value=raw,
            )
            return (Variant("", ()),)
        out = []
        for name, settings in raw.items():
            path = ("variants", name)
            if not isinstance(name, str) or not re.fullmatch(r"[\w.\-+]+", name):
                self.add(path, f"variant name {name!r} must be a word", allowed="[A-Za-z0-9_.+-]")
                continue
            base = None
            if isinstance(settings, dict) and "base" in settings:
                settings = dict(settings)
                base = settings.pop("base")
                if not isinstance(base, str) or not base.strip():
                    self.add(
                        (*path, "base"),
                        "a variant's base must be a spec reference",
                        value=base,
                        allowed="a YAML path, zoo:NAME or hf://user/repo",
                    )
                    base = None
                else:
                    base = self.resolve_base(base.strip())
            out.append(Variant(name, self.mapping_settings(settings, path), base))
        return tuple(out) or (Variant("", ()),)

    def seeds(self, raw: Any) -> tuple[int, ...]:
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = [raw]
        ok = (
            isinstance(raw, list)
            and raw
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw)
        )
        if not ok or len(set(raw)) != len(raw):
            self.add(("seeds",), "seeds must be a list of distinct non-negative ints", value=raw)
            return (0,)
        return tuple(raw)

    def metric(self, raw: Any, mode: Any) -> tuple[str, Literal["max", "min"]]:
        known = [f"val/{n}" for n in registry.metrics.names()]
        if not isinstance(raw, str) or not raw:
            self.add(("metric",), "metric is required", value=raw, allowed=", ".join(known))
            return "val/loss", "min"
        name = raw if raw.startswith("val/") else f"val/{raw}"
        if name not in known:
            self.add(
                ("metric",),
                f"unknown metric {raw!r}",
                value=raw,
                allowed=", ".join(known),
                suggestion=did_you_mean(name, known),
            )
            return name, "min"
        direction = registry.metric_direction(name)
        if mode is not None and mode != direction:
            if mode not in ("max", "min"):
                self.add(("mode",), "mode must be max or min", value=mode)
            else:
                self.add(
                    ("mode",),
                    f"mode {mode!r} contradicts metric {name}: the registry says "
                    f"{'higher' if direction == 'max' else 'lower'} is better",
                    value=mode,
                    allowed=f"{direction} (or leave mode out)",
                )
        return name, direction

    def budget(self, raw: Any) -> Budget | None:
        if raw is None:
            return None
        path: Path_ = ("budget",)
        if not isinstance(raw, dict) or len(raw) != 1:
            self.add(
                path,
                "budget must name exactly one of steps, tokens, flops",
                value=raw,
                allowed="{steps: N} | {tokens: N} | {flops: F}",
            )
            return None
        ((kind, amount),) = raw.items()
        if kind not in BUDGET_KINDS:
            self.add(
                (*path, kind),
                f"unknown budget kind {kind!r}",
                allowed=", ".join(BUDGET_KINDS),
                suggestion=did_you_mean(str(kind), BUDGET_KINDS),
            )
            return None
        number = amount if isinstance(amount, (int, float)) else _number(amount)
        if number is None or isinstance(amount, bool) or not number > 0 or math.isinf(number):
            self.add((*path, kind), "a budget must be a positive number", value=amount)
            return None
        if kind == "steps" and number != int(number):
            self.add((*path, kind), "a steps budget must be a whole number", value=amount)
            return None
        return Budget(kind, float(number), self.prov.origin((*path, kind)))

    def lrs(self, raw: Any) -> tuple[Setting, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list) or not raw:
            self.add(("lr",), "lr must be a non-empty list of learning rates", value=raw)
            return ()
        out = []
        for i, value in enumerate(raw):
            number = _number(value)
            if number is None or not number > 0:
                self.add(("lr", i), "a learning rate must be a positive number", value=value)
                continue
            out.append(self.setting("train.optimizer.lr", number, ("lr", i)))
        if len({s.value for s in out}) != len(out):
            self.add(("lr",), "learning rates must be distinct", value=raw)
        return tuple(out)

    def match(self, raw: Any, variants: list[str]) -> Match | None:
        if raw is None:
            return None
        path: Path_ = ("match",)
        if not isinstance(raw, dict):
            self.add(path, "match must be a mapping {quantity, to, knob, tolerance}", value=raw)
            return None
        for key in raw:
            if key not in ("quantity", "to", "knob", "tolerance"):
                self.add(
                    (*path, key),
                    f"unknown match key {key!r}",
                    allowed="quantity, to, knob, tolerance",
                )
        quantity = raw.get("quantity")
        if quantity not in QUANTITIES:
            self.add(
                (*path, "quantity"),
                "match.quantity must be one of " + ", ".join(QUANTITIES),
                value=quantity,
                suggestion=did_you_mean(str(quantity), QUANTITIES),
            )
        to = raw.get("to")
        named = [v for v in variants if v]
        if isinstance(to, str):
            if to not in named:
                self.add(
                    (*path, "to"),
                    f"match.to names no variant: {to!r}",
                    value=to,
                    allowed=", ".join(named) or "(no variants) a number",
                    suggestion=did_you_mean(to, named),
                )
        elif _number(to) is None or isinstance(to, bool) or not _number(to) > 0:
            self.add(
                (*path, "to"), "match.to must be a variant name or a positive number", value=to
            )
        knob = raw.get("knob")
        if not isinstance(knob, str) or not self.key_ok(knob, (*path, "knob")):
            if not isinstance(knob, str):
                self.add(
                    (*path, "knob"),
                    "match.knob must be a dotted key",
                    value=knob,
                    allowed="e.g. model.d_model or model.layers.symbols.-.hidden",
                )
            knob = None
        tolerance = _number(raw.get("tolerance", 0.02))
        if tolerance is None or not 0 < tolerance < 1:
            self.add(
                (*path, "tolerance"),
                "match.tolerance must be a fraction in (0, 1)",
                value=raw.get("tolerance"),
            )
            tolerance = None
        if quantity not in QUANTITIES or knob is None or tolerance is None:
            return None
        target: str | float = to if isinstance(to, str) else float(_number(to) or 0)
        return Match(quantity, target, knob, tolerance, self.prov.origin(path))

    def overlaps(
        self,
        common: tuple[Setting, ...],
        axes: tuple[AxisGroup, ...],
        variants: tuple[Variant, ...],
        lrs: tuple[Setting, ...],
        match: Match | None,
    ) -> None:
        """A key that two sources set for the same point would be ambiguous."""
        seen: dict[str, Path_] = {}
        for group in axes:
            for key in group.keys:
                path = group.options[0][group.keys.index(key)].path[:-1]
                if key in seen:
                    self.add(path, f"axis {key!r} is already an axis at {format_path(seen[key])}")
                seen[key] = path
        for variant in variants:
            for s in variant.settings:
                if s.key in seen:
                    self.add(
                        s.path,
                        f"variant {variant.name!r} sets {s.key}, which is an axis "
                        f"({format_path(seen[s.key])})",
                    )
        owners = dict(seen)
        if lrs:
            owners.setdefault("train.optimizer.lr", ("lr",))
        if match is not None and match.knob in owners:
            self.add(
                ("match", "knob"),
                f"match.knob {match.knob!r} is also set by "
                f"{format_path(owners[match.knob])}; the solver needs it free",
            )
        for s in common:
            if s.key in owners:
                self.add(s.path, f"set: {s.key} is also set by {format_path(owners[s.key])}")


def _number(value: Any) -> float | None:
    """A YAML number, or a string YAML 1.1 did not read as one (``1e-3`` without a dot)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
