"""Checks on a finished evaluation: the configured targets (pass/fail) and loud warnings.

Both read the JSON metrics dict only, so they can be re-run on a ``metrics.json`` read back from disk.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from medvae.config import Target

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


def _resolve(
    node: Any, tokens: list[str], keys: list[str], done: list[str]
) -> Iterator[tuple[list[str], str, Any]]:
    """Yield ``(keys matched by *, concrete path, value or None)`` for a dotted path.

    Keys may themselves contain dots (label fractions such as ``"0.1"``): the longest run of tokens that
    names a key wins.
    """
    if not tokens:
        yield keys, ".".join(done), node
        return
    if not isinstance(node, dict):
        yield keys, ".".join(done + tokens), None
        return
    if tokens[0] == "*":
        for k, v in node.items():
            yield from _resolve(v, tokens[1:], [*keys, str(k)], [*done, str(k)])
        return
    for j in range(len(tokens), 0, -1):
        k = ".".join(tokens[:j])
        if k in node:
            yield from _resolve(node[k], tokens[j:], keys, [*done, k])
            return
    yield keys, ".".join(done + tokens), None


def _one(metrics: dict[str, Any], path: str) -> Any:
    return next(_resolve(metrics, path.split("."), [], []))[2]


def _fill_stars(path: str, keys: Sequence[str]) -> str:
    for k in keys:
        path = path.replace("*", k, 1)
    return path


def _as_fraction(key: str) -> str:
    try:
        return f"{float(key):.0%}"
    except ValueError:
        return key


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def check_targets(targets: Sequence[Target], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluate each target against the metrics (see :class:`medvae.config.Target`).

    Returns:
        One row per (expanded) target: ``target`` (its name), ``metric`` (the concrete path), ``observed``,
        ``op``, ``required`` (the value, times the reference figure for relative targets) and ``met``
        (True, False, or None when a figure is missing). Targets of a study that did not run are left out.
    """
    fractions = list(metrics.get("utility", {}).get("summary", {}))
    subs = {
        "{primary_score}": metrics["anomaly"]["summary"]["primary_score"],
        "{min_fraction}": min(fractions, key=float) if fractions else None,
    }
    rows: list[dict[str, Any]] = []
    for t in targets:
        if t.metric.split(".")[0] not in metrics or ("{min_fraction}" in t.metric and not fractions):
            continue
        path, rel = t.metric, t.relative_to
        for ph, val in subs.items():
            path = path.replace(ph, str(val))
            rel = None if rel is None else rel.replace(ph, str(val))
        for keys, concrete, value in _resolve(metrics, path.split("."), [], []):
            observed = _number(value)
            rel_path = None if rel is None else _fill_stars(rel, keys)
            ref = 1.0 if rel_path is None else _number(_one(metrics, rel_path))
            required = None if ref is None else t.value * ref
            met = None if observed is None or required is None else bool(_OPS[t.op](observed, required))
            key = keys[-1] if keys else (subs["{min_fraction}"] or "")
            name = (
                t.name.format(primary_score=subs["{primary_score}"], key=key, fraction=_as_fraction(key))
                if t.name
                else f"{concrete} {t.op} {t.value:g}" + (f" x {rel_path}" if rel_path else "")
            )
            rows.append(
                {
                    "target": name,
                    "metric": concrete,
                    "observed": observed,
                    "op": t.op,
                    "required": required,
                    "met": met,
                }
            )
    return rows


def backwards_warnings(metrics: dict[str, Any]) -> list[str]:
    """A warning for every AUROC below 0.5 in any seed: a score (or classifier) that ranks backwards.

    An AUROC below chance means normals score *higher* than abnormals: the score runs the wrong way on
    this data (or the labels are swapped), and its threshold would flag the wrong images.
    """
    out: list[str] = []
    runs = metrics["anomaly"]["per_seed"]
    for name, summary in metrics["anomaly"]["summary"]["scores"].items():
        low = [r["seed"] for r in runs if r["scores"][name]["auroc"] < 0.5]
        if low:
            out.append(
                f"anomaly score {name} has AUROC below 0.5 (mean {summary['auroc']['mean']:.3f}, seeds "
                f"{low}): it ranks normals above abnormals, i.e. it runs backwards on this data"
            )
    for run in metrics.get("utility", {}).get("per_seed", []):
        for frac, fr in run["fractions"].items():
            for kind, auc in fr["auroc"].items():
                if auc is not None and auc < 0.5:
                    out.append(
                        f"classifier trained on {kind} at {_as_fraction(frac)} labels has test AUROC "
                        f"{auc:.3f} < 0.5 (seed {run['seed']}): it predicts backwards"
                    )
    return out
