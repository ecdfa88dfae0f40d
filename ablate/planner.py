"""Expanding a grid into points and checking every one before anything runs.

A **point** is one training run: a resolved spec and its seed (and learning rate when
the grid lists several). Its id is a hash of the resolved ``model`` and ``train``
sections (``train.seed`` included), not of its position in the grid, so adding an axis
value keeps the ids of the points already finished. A **cell** is what a report row
describes: a variant at one combination of axis values; it holds one point per seed
and learning rate.

Each point gets its size from a meta-device build (nothing allocated): parameters,
decode-state bytes and forward FLOPs per token at the task's sequence length. The
budget turns into ``train.max_steps`` (tokens per step = batch size · gradient
accumulation · task ``seq_len``; training FLOPs = 3 · forward FLOPs/token · tokens), and
the sizing solver (:func:`solve_knob`) sets ``match.knob`` so that ``match.quantity``
comes within ``match.tolerance`` of the target.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixstack.ablate.grid import Grid, Match, Setting, Variant, load_grid
from mixstack.dsl.errors import MixstackError, SpecError, SpecIssue, format_path
from mixstack.dsl.spec import Spec

STATE_DTYPE = "bfloat16"  # decode state is reported as `mixstack info` does by default


@dataclass(frozen=True)
class Size:
    params: int
    flops_per_token: float
    state_bytes: int

    def quantity(self, name: str) -> float:
        return {
            "params": self.params,
            "flops": self.flops_per_token,
            "state_bytes": self.state_bytes,
        }[name]


@dataclass
class Point:
    """One training run of the grid."""

    id: str
    index: int  # position in the expanded grid (display only; the id is the identity)
    cell: str  # "variant | key=value, ..." (what a report row groups by)
    variant: str
    axes: dict[str, Any]  # axis key -> value
    seed: int
    lr: float | None  # a value from the grid's lr list, else None
    overrides: list[str]  # `key=value` applied to the base, in order
    spec: Spec = field(repr=False)
    size: Size
    steps: int
    tokens: int
    train_flops: float
    knob: Any = None  # value the sizing solver chose
    residual: float | None = None  # relative mismatch the solver left (signed)
    hub: str | None = None  # run.hub: hf://ORG/NAME@BRANCH this point pushes to

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "cell": self.cell,
            "variant": self.variant,
            "axes": self.axes,
            "seed": self.seed,
            "lr": self.lr,
            "overrides": self.overrides,
            "params": self.size.params,
            "flops_per_token": self.size.flops_per_token,
            "state_bytes": self.size.state_bytes,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_flops": self.train_flops,
            "knob": self.knob,
            "residual": self.residual,
            "hub": self.hub,
        }


@dataclass
class Plan:
    grid: Grid
    points: list[Point]

    @property
    def cells(self) -> list[str]:
        return list(dict.fromkeys(p.cell for p in self.points))


def point_id(spec: Spec) -> str:
    """sha256 (first 12 hex digits) of the resolved model and train sections; the seed is
    ``train.seed``."""
    data = spec.to_dict()
    payload = {"model": data["model"], "train": data.get("train")}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def size_of(spec: Spec) -> Size:
    """Parameters, forward FLOPs/token and decode-state bytes from a meta-device build,
    at the task's sequence length (the model's ``max_seq_len`` without a task)."""
    import torch

    from mixstack.archs.builder import build

    seq_len = spec.train.task.seq_len if spec.train is not None else spec.model.max_seq_len
    report = build(spec, device="meta").report(seq_len, dtype=getattr(torch, STATE_DTYPE))
    return Size(report.total_params, report.total_flops_per_token, report.total_state_bytes)


def cell_label(variant: Variant, settings: tuple[Setting, ...]) -> str:
    parts = [f"{s.key}={_show(s.value)}" for s in settings]
    head = variant.name
    return " | ".join(x for x in (head, ", ".join(parts)) if x) or "base"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class _Resolver:
    """load_spec + size with caches (the solver and the seeds ask for the same specs)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.specs: dict[tuple[str, ...], Spec | SpecError] = {}
        self.sizes: dict[str, Size] = {}

    def spec(self, overrides: list[str], base: str | None = None) -> Spec:
        from mixstack.dsl.loader import load_spec

        source = base or self.base
        key = (source, *overrides)
        if key not in self.specs:
            try:
                self.specs[key] = load_spec(source, overrides)
            except SpecError as exc:
                self.specs[key] = exc
        found = self.specs[key]
        if isinstance(found, SpecError):
            raise found
        return found

    def size(self, spec: Spec) -> Size:
        key = spec.spec_hash + str(spec.train.task.seq_len if spec.train else "")
        if key not in self.sizes:
            try:
                self.sizes[key] = size_of(spec)
            except SpecError:
                raise
            except (MixstackError, ValueError, RuntimeError) as exc:
                raise SpecError(SpecIssue(f"the model cannot be built: {exc}")) from None
        return self.sizes[key]


def _point_problem(
    index: int, total: int, label: str, settings: list[Setting], exc: SpecError
) -> list[SpecIssue]:
    """The issues of an invalid point, located in the grid file: a summary naming the
    point and its grid values (with their YAML paths), then the spec's own issues."""
    culprits = [s for s in settings if any(s.text in (i.origin or "") for i in exc.issues)]
    # Without a culprit named by the spec's own issues, axis values first: they are what
    # differs between this point and its valid neighbours.
    shown = culprits or sorted(settings, key=lambda s: s.path[0] != "axes")
    lead = shown[0] if shown else None
    values = "; ".join(f"{s.key}={_show(s.value)} ({s.where})" for s in shown)
    first = exc.issues[0] if exc.issues else None
    reason = f"{format_path(first.path)}: {first.message}" if first is not None else "invalid spec"
    summary = SpecIssue(
        f"point {index + 1}/{total} ({label}) is invalid: {reason}"
        + (f"; set by {values}" if values else ""),
        path=lead.path if lead else (),
        origin=lead.origin if lead else None,
    )
    return [summary, *exc.issues]


def plan(grid: Grid | str | Any) -> Plan:
    """Expand ``grid`` (a :class:`Grid`, a path or a mapping) and check every point.

    Raises :class:`SpecError` listing every invalid point (naming the point, its grid
    values and their YAML paths) before anything runs.
    """
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    resolver = _Resolver(grid.base)
    cells = grid.cells()
    per_cell = len(grid.seeds) * max(1, len(grid.lrs))
    total = len(cells) * per_cell
    issues: list[SpecIssue] = []
    points: list[Point] = []
    targets: dict[tuple[Any, ...], float] = {}
    for c, (variant, settings) in enumerate(cells):
        label = cell_label(variant, settings)
        shared = [*grid.common, *variant.settings, *settings]
        overrides = [s.text for s in shared]
        try:
            base_spec = resolver.spec(overrides, variant.base)
            knob, residual = None, None
            if grid.match is not None and not (grid.match.to == variant.name and variant.name):
                target = _target(grid, grid.match, settings, resolver, targets)
                knob, residual = solve_knob(
                    grid.match,
                    target,
                    lambda v, o=overrides, b=variant.base: resolver.spec(
                        [*o, f"{grid.match.knob}={json.dumps(v)}"], b
                    ),  # type: ignore[union-attr]
                    resolver.size,
                    start=_lookup(base_spec, grid.match.knob),
                )
                overrides = [*overrides, f"{grid.match.knob}={json.dumps(knob)}"]
                label += f" | {grid.match.knob}={knob}"
        except SpecError as exc:
            issues.extend(_point_problem(c * per_cell, total, label, shared, exc))
            continue
        for k, (lr, seed) in enumerate(itertools.product(grid.lrs or (None,), grid.seeds)):
            index = c * per_cell + k
            extra = [*([lr.text] if lr else []), f"train.seed={seed}"]
            try:
                spec = resolver.spec([*overrides, *extra], variant.base)
                spec, steps, tokens, flops = _apply_budget(grid, spec, resolver)
            except SpecError as exc:
                issues.extend(_point_problem(c * per_cell, total, label, shared, exc))
                break
            points.append(
                Point(
                    id=point_id(spec),
                    index=index,
                    cell=label,
                    variant=variant.name,
                    axes={s.key: s.value for s in settings},
                    seed=seed,
                    lr=lr.value if lr else None,
                    overrides=[*overrides, *extra, *_budget_overrides(spec, grid)],
                    spec=spec,
                    size=resolver.size(spec),
                    steps=steps,
                    tokens=tokens,
                    train_flops=flops,
                    knob=knob,
                    residual=residual,
                )
            )
    if issues:
        raise SpecError(issues)
    _check_metric(grid, points)
    _check_unique(points)
    _hub_branches(grid, points)
    return Plan(grid, points)


def _check_metric(grid: Grid, points: list[Point]) -> None:
    """The metric must be one the points' task computes."""
    from mixstack.dsl import registry

    for p in points:
        assert p.spec.train is not None
        names = [
            f"val/{m.name}"
            for m in registry.task_metrics(p.spec.train.task.type, p.spec.model.arch)
        ]
        if grid.metric not in names:
            raise SpecError(
                SpecIssue(
                    f"metric {grid.metric} is not computed for point {p.index + 1} "
                    f"({p.cell}): task {p.spec.train.task.type!r}, arch {p.spec.model.arch!r}",
                    path=("metric",),
                    origin=grid.prov.origin(("metric",)),
                    allowed=", ".join(names),
                )
            )


def _check_unique(points: list[Point]) -> None:
    seen: dict[str, Point] = {}
    for p in points:
        if p.id in seen:
            other = seen[p.id]
            raise SpecError(
                SpecIssue(
                    f"points {other.index + 1} ({other.cell}, seed {other.seed}) and "
                    f"{p.index + 1} ({p.cell}, seed {p.seed}) resolve to the same spec "
                    f"({p.id}): an axis or variant value changes nothing",
                    path=("axes",),
                )
            )
        seen[p.id] = p


# -- run.hub: one repository per grid, one branch per point ------------------------------

HUB_FIELDS = ("point", "variant", "seed", "lr", "grid")
# A git branch name the Hub accepts: no spaces, '..', '~^:?*[\\', no leading '-' or '/',
# no trailing '/' or '.lock'.
_BRANCH = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/+=-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def _hub_where(grid: Grid, variant: str) -> tuple[tuple[str | int, ...], str | None]:
    """The grid setting that sets run.hub for ``variant`` (else the base)."""
    for v in grid.variants:
        if v.name == variant:
            for s in v.settings:
                if s.key.startswith("run.hub"):
                    return s.path, s.origin
    for s in grid.common:
        if s.key.startswith("run.hub"):
            return s.path, s.origin
    return ("base",), grid.base_origin


def hub_branch(template: str | None, fields: dict[str, Any]) -> str:
    """The branch a point pushes to: ``template`` (``run.hub.revision``) with its
    ``{point}``, ``{variant}``, ``{seed}``, ``{lr}``, ``{grid}`` filled in; no
    template: the point id. Raises ValueError for an unknown placeholder or a
    result that is no branch name."""
    if template is None:
        return str(fields["point"])
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    unknown = [n for n in names if n not in HUB_FIELDS]
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{unknown[0]}}} in run.hub.revision {template!r}; "
            f"allowed: {', '.join('{' + f + '}' for f in HUB_FIELDS)}"
        )
    # Values with characters a branch cannot hold (a variant named "mamba2 + ngram")
    # become '-'.
    safe = {k: _UNSAFE.sub("-", "" if v is None else str(v)).strip("-") for k, v in fields.items()}
    branch = template.format(**safe)
    if (
        not _BRANCH.fullmatch(branch)
        or ".." in branch
        or "//" in branch
        or branch.endswith(("/", ".", ".lock"))
    ):
        raise ValueError(f"run.hub.revision {template!r} gives {branch!r}, not a branch name")
    return branch


def _hub_branches(grid: Grid, points: list[Point]) -> None:
    """``run.hub`` in a grid: every point pushes to the same repository, each to its own
    branch (``run.hub.revision`` as a template, default ``{point}``). Sets each point's
    ``spec.run.hub.revision`` and ``hub``; refuses a template that is invalid or gives two
    points the same branch (they would overwrite each other's pushes)."""
    from mixstack.dsl.loader import load_spec

    taken: dict[tuple[str, str], Point] = {}
    for p in points:
        hub = p.spec.run.hub
        if hub is None:
            continue
        path, origin = _hub_where(grid, p.variant)
        fields = {
            "point": p.id,
            "variant": p.variant,
            "seed": p.seed,
            "lr": p.lr,
            "grid": grid.name,
        }
        try:
            branch = hub_branch(hub.revision, fields)
        except ValueError as exc:
            raise SpecError(
                SpecIssue(
                    f"point {p.index + 1} ({p.cell}): {exc}",
                    path=path,
                    origin=origin,
                    allowed="a branch name; placeholders "
                    + ", ".join("{" + f + "}" for f in HUB_FIELDS),
                )
            ) from None
        other = taken.get((hub.repo_id, branch))
        if other is not None:
            raise SpecError(
                SpecIssue(
                    f"points {other.index + 1} ({other.cell}, seed {other.seed}) and "
                    f"{p.index + 1} ({p.cell}, seed {p.seed}) would both push to "
                    f"hf://{hub.repo_id}@{branch} (run.hub.revision {hub.revision!r}): "
                    "each point needs its own branch",
                    path=path,
                    origin=origin,
                    allowed="run.hub.revision unset (one branch per point, named by its id) "
                    "or a template with {point}",
                )
            )
        taken[(hub.repo_id, branch)] = p
        # The run section is not part of the point id, so the id stays the same.
        p.spec = load_spec(p.spec, [f"run.hub.revision={json.dumps(branch)}"])
        p.hub = f"hf://{hub.repo_id}@{branch}"


def _lookup(spec: Spec, key: str) -> Any:
    """The value at dotted ``key`` of the resolved spec (None if absent)."""
    node: Any = spec.to_dict()
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _target(
    grid: Grid,
    match: Match,
    settings: tuple[Setting, ...],
    resolver: _Resolver,
    cache: dict[tuple[Any, ...], float],
) -> float:
    """The number to match: ``match.to`` itself, or the quantity of the variant it names at
    the same axis values."""
    if not isinstance(match.to, str):
        return float(match.to)
    key = tuple(s.text for s in settings)
    if key not in cache:
        variant = next(v for v in grid.variants if v.name == match.to)
        spec = resolver.spec(
            [s.text for s in (*grid.common, *variant.settings, *settings)], variant.base
        )
        cache[key] = resolver.size(spec).quantity(match.quantity)
    return cache[key]


def solve_knob(
    match: Match,
    target: float,
    spec_for: Callable[[Any], Spec],
    size_of_spec: Callable[[Spec], Size],
    *,
    start: Any,
    max_tries: int = 400,
) -> tuple[int, float]:
    """Search the integer knob for the value whose ``match.quantity`` is closest to
    ``target`` among values that pass every check of the spec (divisibility of heads,
    ``expand·d_model % headdim``, MLP rounding: whatever ``load_spec`` refuses is skipped).

    The quantities are non-decreasing in the knobs that matter (widths, depths, state
    sizes), so: bracket the target by doubling, bisect on integers, and where a probe is
    invalid use the nearest valid value inside the bracket. Returns ``(value, residual)``
    with residual = quantity / target - 1; a residual beyond ``match.tolerance`` is an
    error naming the two closest values.
    """
    if not isinstance(start, int) or isinstance(start, bool) or start < 1:
        raise SpecError(
            SpecIssue(
                f"match.knob {match.knob} must be a positive integer setting of the spec, "
                f"got {start!r}",
                path=("match", "knob"),
                origin=match.origin,
            )
        )
    values: dict[int, float | None] = {}

    def q(v: int) -> float | None:
        if v not in values:
            if len(values) >= max_tries:
                raise SpecError(
                    SpecIssue(
                        f"match: no value of {match.knob} found within {max_tries} tries",
                        path=("match",),
                        origin=match.origin,
                    )
                )
            try:
                values[v] = size_of_spec(spec_for(v)).quantity(match.quantity)
            except SpecError:
                values[v] = None
        return values[v]

    def valid_near(v: int, lo: int, hi: int) -> int | None:
        """The valid value nearest ``v`` within [lo, hi] (v itself first)."""
        for d in range(0, hi - lo + 1):
            for c in (v - d, v + d) if d else (v,):
                if lo <= c <= hi and q(c) is not None:
                    return c
        return None

    # Bracket: lo with q <= target, hi with q >= target (valid values only).
    v0 = valid_near(start, max(1, start // 2), start * 2)
    if v0 is None:
        raise SpecError(
            SpecIssue(
                f"match: no valid value of {match.knob} near {start}",
                path=("match", "knob"),
                origin=match.origin,
            )
        )
    lo = hi = v0
    while (q(lo) or 0) > target and lo > 1:
        found = valid_near(max(1, lo // 2), 1, lo - 1)
        if found is None:
            break
        lo = found
    while (q(hi) or 0) < target:
        found = valid_near(hi * 2, hi + 1, hi * 4)
        if found is None:
            break
        hi = found
        if hi > 2**24:
            break
    # Bisect between valid values lo < hi.
    while hi - lo > 1:
        mid = valid_near((lo + hi) // 2, lo + 1, hi - 1)
        if mid is None:
            break
        if (q(mid) or 0) <= target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda v: abs((q(v) or 0) / target - 1))
    residual = (q(best) or 0) / target - 1
    if abs(residual) > match.tolerance:
        raise SpecError(
            SpecIssue(
                f"match: no valid {match.knob} brings {match.quantity} within "
                f"{match.tolerance:.1%} of {target:,.0f}; closest: {match.knob}={lo} "
                f"({q(lo):,.0f}) and {match.knob}={hi} ({q(hi):,.0f}), residual "
                f"{residual:+.2%}",
                path=("match", "tolerance"),
                origin=match.origin,
                allowed="a larger tolerance, or a finer knob",
            )
        )
    return best, residual


def _tokens_per_step(spec: Spec) -> int:
    t = spec.train
    assert t is not None
    return t.batch_size * t.accumulate_grad_batches * t.task.seq_len


def _apply_budget(grid: Grid, spec: Spec, resolver: _Resolver) -> tuple[Spec, int, int, float]:
    """``(spec, steps, tokens, training FLOPs)`` after the budget set ``train.max_steps``."""
    if spec.train is None:
        raise SpecError(
            SpecIssue(
                "the base spec has no train section: a grid point trains",
                path=("base",),
                origin=grid.base_origin,
            )
        )
    per_step = _tokens_per_step(spec)
    budget = grid.budget
    if budget is not None:
        if budget.kind == "steps":
            steps = int(budget.amount)
        elif budget.kind == "tokens":
            steps = max(1, round(budget.amount / per_step))
        else:
            flops_per_token = resolver.size(spec).flops_per_token
            steps = max(1, round(budget.amount / (3 * flops_per_token) / per_step))
        from mixstack.dsl.loader import load_spec

        spec = load_spec(spec, [f"train.max_steps={steps}", "train.max_epochs=null"])
    else:
        if spec.train.max_steps is None:
            raise SpecError(
                SpecIssue(
                    "grid points need a step count: set train.max_steps in the base or "
                    "give the grid a budget",
                    path=("base",),
                    origin=grid.base_origin,
                    allowed="train.max_steps (or budget: {steps|tokens|flops: N})",
                )
            )
        steps = spec.train.max_steps
    tokens = steps * per_step
    return spec, steps, tokens, 3 * resolver.size(spec).flops_per_token * tokens


def _budget_overrides(spec: Spec, grid: Grid) -> list[str]:
    if grid.budget is None:
        return []
    assert spec.train is not None
    return [f"train.max_steps={spec.train.max_steps}"]
