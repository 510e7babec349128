"""A spread of device limits: a class's `cpus` / `memory` drawn per device from a distribution.

In the job file a class's `cpus` or `memory` is a number / size as always, or
one of

    {uniform: [low, high]}                                   every value in [low, high] equally likely
    {choice: [v1, v2, ...], weights: [w1, w2, ...]}          one of the values (weights optional, relative)
    {lognormal: {median: m, sigma: s, min: lo, max: hi}}     log(value) normal around log(m), kept in [lo, hi]

with sizes for memory ("512m", "1g"). Each device of the class gets its own
value; the draws are reproducible: they depend only on the seed (the job's
`fleet_seed`, or the class's `seed`), the class's name, the field and the
device's number, so the same job file always plans the same fleet (and
`flotilla resume` re-plans the one that ran). Raising a class's count keeps the
values its first devices had. The drawn values are the plan's
(plan.json devices[].cpus / memory, `flotilla validate`).

The draw uses Python's `random.Random` seeded with a string (SHA-512 based,
fixed across Python versions) and only its `random()` stream, which Python
guarantees not to change; the distributions are computed here from it
(inverse CDF for the truncated lognormal), not by a library whose streams
may change between versions.

Drawn CPU quotas are rounded to 0.001 CPUs, memory limits to whole MiB (both
kept inside the spread's bounds).
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

MiB = 1024**2
MIN_CPUS = 0.01  # the kernel's smallest CFS quota: 1 ms per 100 ms period
MAX_CPUS = 1024.0
MIN_MEMORY = 64 * MiB  # a Flower SuperNode alone needs more
KINDS = ("uniform", "choice", "lognormal")
# Examples, not placeholders: the CLI prints messages as rich markup, where "[low, high]" would vanish.
SYNTAX = {"cpus": "{uniform: [0.1, 1.0]}, {choice: [0.25, 0.5, 1.0], weights: [2, 1, 1]} or "
                  "{lognormal: {median: 0.5, sigma: 0.6, min: 0.1, max: 2.0}}",
          "memory": "{uniform: [512m, 2g]}, {choice: [512m, 1g], weights: [3, 1]} or "
                    "{lognormal: {median: 768m, sigma: 0.4, min: 256m, max: 4g}}"}
EXAMPLE = {"cpus": "[0.1, 1.0]", "memory": "[512m, 2g]"}


class Spread(BaseModel):
    """A validated spread (built by `parse_limit`, never from the job file directly)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["uniform", "choice", "lognormal"]
    unit: Literal["cpus", "memory"]
    values: tuple[float, ...] = ()  # uniform: (low, high); choice: the values
    weights: tuple[float, ...] | None = None  # choice
    median: float | None = None  # lognormal
    sigma: float | None = None
    low: float | None = None  # lognormal's min / max as given
    high: float | None = None

    @model_serializer
    def _as_written(self) -> dict:
        """The job-file form, so job.yaml / plan.json round-trip (memory as exact sizes, e.g. '512m')."""
        v = self._out
        if self.kind == "uniform":
            return {"uniform": [v(x) for x in self.values]}
        if self.kind == "choice":
            out: dict = {"choice": [v(x) for x in self.values]}
            if self.weights is not None:
                out["weights"] = list(self.weights)
            return out
        params: dict = {"median": v(self.median), "sigma": self.sigma}
        if self.low is not None:
            params["min"] = v(self.low)
        if self.high is not None:
            params["max"] = v(self.high)
        return {"lognormal": params}

    def _out(self, x):
        if self.unit == "memory":
            from flotilla.job import format_memory

            return format_memory(int(x))
        return x

    # -- bounds ----------------------------------------------------------------
    @property
    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value a device can get."""
        if self.kind in ("uniform", "choice"):
            return min(self.values), max(self.values)
        floor, cap = _limits(self.unit)
        return (self.low if self.low is not None else floor), (self.high if self.high is not None else cap)

    def draw(self, n: int, key: str) -> list[float] | list[int]:
        """n values, the i-th for device i+1; the same key draws the same values."""
        rng = random.Random(f"flotilla-spread/{key}")
        return [self._round(self._one(rng.random())) for _ in range(n)]

    def _one(self, u: float) -> float:
        if self.kind == "uniform":
            low, high = self.values
            return low + (high - low) * u
        if self.kind == "choice":
            weights = self.weights or (1.0,) * len(self.values)
            target, acc = u * sum(weights), 0.0
            for value, w in zip(self.values, weights, strict=True):
                acc += w
                if target < acc:
                    return value
            return next(v for v, w in zip(reversed(self.values), reversed(weights), strict=True) if w > 0)
        low, high = self.bounds
        if not self.sigma:
            return min(max(self.median, low), high)
        normal = NormalDist(math.log(self.median), self.sigma)
        fa = normal.cdf(math.log(low)) if low > 0 else 0.0
        fb = normal.cdf(math.log(high)) if math.isfinite(high) else 1.0
        if fb <= fa:  # [min, max] lies so far in a tail that a float cannot tell: the bound nearer the median
            return high if fb < 0.5 else low
        p = fa + (fb - fa) * u
        if not 0.0 < p < 1.0:
            return low if p <= 0.0 else high
        return min(max(math.exp(normal.inv_cdf(p)), low), high)

    def _round(self, x: float):
        low, high = self.bounds
        if self.kind == "choice":
            return int(x) if self.unit == "memory" else x
        if self.unit == "memory":
            return int(min(max(round(x / MiB) * MiB, low), high))
        return min(max(round(x, 3), low), high)


def _limits(unit: str) -> tuple[float, float]:
    return (MIN_CPUS, MAX_CPUS) if unit == "cpus" else (MIN_MEMORY, math.inf)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_limit(v, unit: Literal["cpus", "memory"], size: Callable[[object], int] | None = None):
    """A class's `cpus` / `memory` as written -> a number (bytes for memory), a Spread, or None.

    Raises ValueError with a one-line message (pydantic prefixes the field: `devices[1].cpus: ...`)."""
    if v is None or (isinstance(v, Spread) and v.unit == unit):  # None, or one already parsed (code, copies)
        return v
    if not isinstance(v, dict):
        return _plain(v, unit, size)
    kinds = [k for k in KINDS if k in v]
    extra = sorted(set(v) - set(KINDS) - {"weights"})
    if len(kinds) != 1 or extra:
        if extra:
            what = f"unknown key {extra[0]!r}"
        else:
            what = f"give one distribution, not {' and '.join(kinds)}" if kinds else "no distribution given"
        raise ValueError(f"{what}; a spread is one of {SYNTAX[unit]}")
    kind = kinds[0]
    if "weights" in v and kind != "choice":
        raise ValueError(f"weights go with choice, not {kind}")
    value = _value_parser(unit, size)
    if kind == "uniform":
        pair = v["uniform"]
        bad = (f"uniform needs two bounds, low and high with 0 < low <= high (e.g. {{uniform: {EXAMPLE[unit]}}}), "
               f"got {pair!r}")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(bad)
        low, high = (value(x, "uniform") for x in pair)
        if not 0 < low <= high:
            raise ValueError(bad)
        _in_range((low, high), unit, "uniform")
        return Spread(kind="uniform", unit=unit, values=(low, high))
    if kind == "choice":
        values = v["choice"]
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"choice needs a non-empty list of values, got {values!r}")
        parsed = tuple(value(x, "choice") for x in values)
        _in_range(parsed, unit, "choice")
        weights = v.get("weights")
        if weights is not None:
            if (not isinstance(weights, (list, tuple)) or len(weights) != len(parsed)
                    or not all(_number(w) and w >= 0 for w in weights) or not sum(weights) > 0):
                raise ValueError(f"choice weights: give one weight >= 0 per value ({len(parsed)} values), "
                                 f"not all zero; got {weights!r}")
            weights = tuple(float(w) for w in weights)
        return Spread(kind="choice", unit=unit, values=parsed, weights=weights)
    params = v["lognormal"]
    if not isinstance(params, dict) or not {"median", "sigma"} <= set(params) or set(params) - {
            "median", "sigma", "min", "max"}:
        raise ValueError(f"lognormal needs {{median: m, sigma: s}} (optionally min, max), got {params!r}")
    median = value(params["median"], "lognormal median")
    sigma = params["sigma"]
    if not median > 0 or not _number(sigma) or not 0 <= sigma <= 10:
        raise ValueError(f"lognormal needs median > 0 and 0 <= sigma <= 10, got median {params['median']!r}, "
                         f"sigma {sigma!r}")
    low = value(params["min"], "lognormal min") if params.get("min") is not None else None
    high = value(params["max"], "lognormal max") if params.get("max") is not None else None
    floor, cap = _limits(unit)
    lo, hi = (low if low is not None else floor), (high if high is not None else cap)
    if not 0 < lo <= hi:
        raise ValueError(f"lognormal min/max need 0 < min <= max, got min {params.get('min')!r}, "
                         f"max {params.get('max')!r}")
    _in_range([x for x in (low, high) if x is not None], unit, "lognormal")
    if not sigma and not lo <= median <= hi:
        raise ValueError("lognormal with sigma 0 is its median, which must lie in [min, max]")
    return Spread(kind="lognormal", unit=unit, median=median, sigma=float(sigma), low=low, high=high)


def _value_parser(unit: str, size) -> Callable[[object, str], float]:
    def value(x, where: str) -> float:
        if unit == "memory":
            if isinstance(x, bool) or not isinstance(x, (str, int, float)):
                raise ValueError(f"{where}: {x!r} is not a memory size; use e.g. 512m or 2g")
            return float(size(x if isinstance(x, str) else int(x)))
        if not _number(x):
            raise ValueError(f"{where}: {x!r} is not a number of CPUs")
        return float(x)

    return value


def _in_range(values, unit: str, where: str) -> None:
    floor, cap = _limits(unit)
    for x in values:
        if unit == "cpus" and not MIN_CPUS <= x <= MAX_CPUS:
            raise ValueError(f"{where}: {x:g} CPUs is outside [{MIN_CPUS}, {MAX_CPUS:g}] "
                             f"(the kernel's smallest CPU quota is {MIN_CPUS} of a CPU)")
        if unit == "memory" and x < floor:
            raise ValueError(f"{where}: at least 64m: a Flower SuperNode alone needs more")


def _plain(v, unit: str, size):
    if unit == "memory":
        n = size(v)
        if n < MIN_MEMORY:
            raise ValueError("at least 64m: a Flower SuperNode alone needs more")
        return n
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number of CPUs; give a number or a spread: {SYNTAX['cpus']}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{v!r} is not a number of CPUs; give a number or a spread: {SYNTAX['cpus']}") from None
    if not 0 < x <= MAX_CPUS:
        raise ValueError(f"must be > 0 and at most {MAX_CPUS:g} (a CPU quota; fractional allowed)")
    return x


def class_limits(job, cls) -> tuple[list, list]:
    """Each device's (cpus, memory) of a class, in device order: the class's value or its draws."""
    seed = cls.seed if cls.seed is not None else job.fleet_seed

    def values(field: str) -> list:
        v = getattr(cls, field)
        if isinstance(v, Spread):
            return v.draw(cls.count, f"{seed}/{cls.name}/{field}")
        return [v] * cls.count

    return values("cpus"), values("memory")


def spread_json_schema(unit: str) -> dict:
    """The job file's syntax for `flotilla schema` (the model's own fields are internal)."""
    value = {"type": "number", "exclusiveMinimum": 0} if unit == "cpus" else {
        "anyOf": [{"type": "string"}, {"type": "integer"}]}
    return {"oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["uniform"],
         "properties": {"uniform": {"type": "array", "items": value, "minItems": 2, "maxItems": 2}}},
        {"type": "object", "additionalProperties": False, "required": ["choice"],
         "properties": {"choice": {"type": "array", "items": value, "minItems": 1},
                        "weights": {"type": "array", "items": {"type": "number", "minimum": 0}}}},
        {"type": "object", "additionalProperties": False, "required": ["lognormal"],
         "properties": {"lognormal": {"type": "object", "additionalProperties": False,
                                      "required": ["median", "sigma"],
                                      "properties": {"median": value, "sigma": {"type": "number", "minimum": 0},
                                                     "min": value, "max": value}}}},
    ], "description": f"A spread drawn per device: {SYNTAX[unit]}."}
