"""CI gates: rules over the canonical JSON report, in the spirit of MLflow's metric thresholds.

A gate is an absolute limit (``worst_group_accuracy>=0.7``, ``equalized_odds_difference<=0.1``) or a "no worse than a baseline"
limit (``worst_group_accuracy>=baseline-0.02``, the baseline being a previous JSON report),
on a metric's estimate or on a bound of its bootstrap interval
(``worst_group_accuracy.ci_low>=0.7``). A ``warn:`` rule is checked and reported like any
other but never fails the gate. Everything here is a pure function of report dicts, so gates
are testable without a server. The grammar is :data:`GRAMMAR`; a rule that does not follow
it raises :class:`GateError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Report = Mapping[str, Any]

# Audit metrics: one check per audited attribute value (and layer).
# name -> the subspace score whose maximum over the table is compared.
AUDIT_METRICS = {
    "max_ap_attribute": "ap_attribute",
    "max_ap_attribute_pos": "ap_attribute_pos",
    "max_ap_attribute_neg": "ap_attribute_neg",
}
FLAGGED = "flagged"
# Evaluation metrics, read from `after` when the report has it, else from `before`.
METRIC_FIELDS = ("balanced_accuracy", "worst_group_accuracy")  # Metric messages
SCALAR_FIELDS = ("parameters", "flops", "latency_ms")  # plain numbers
EVALUATION_METRICS = METRIC_FIELDS + SCALAR_FIELDS
# Fairness metrics: one check per fairness breakdown (each audited attribute, then their
# intersection) of the `after` evaluation when the report has it, else of `before`.
FAIRNESS_METRICS = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equalized_odds_ratio",
    "accuracy_difference",
)
# Metrics of an evaluated model: they take before./after. and the `before` reference.
MODEL_METRICS = EVALUATION_METRICS + FAIRNESS_METRICS
SCOPES = ("before", "after")
# Which number of a Metric message a rule reads: the estimate or a bound of its 95 %
# bootstrap interval (both equal the estimate when the audit ran without bootstrap).
BOUNDS = ("value", "ci_low", "ci_high")
# "gate": a violated rule fails the gate; "warn": it is reported and never fails it.
GATE, WARN = "gate", "warn"
WARN_PREFIX = "warn:"

GRAMMAR = """\
gate rule grammar (spaces are ignored):
  RULE      := ["warn:"] [SCOPE "."] METRIC ["." BOUND] OP REFERENCE
  warn:                     report the rule, never fail on it (the same as --warn RULE)
  SCOPE     := before | after       (metrics of the evaluated model only; default: after
                                      when the audit pruned, else before)
  BOUND     := value | ci_low | ci_high   (AP, accuracy and fairness metrics; default value,
                                      the estimate; ci_low/ci_high: its 95 % bootstrap interval)
  OP        := <= | >= | < | >      (flagged takes == or != with none)
  REFERENCE := NUMBER
             | baseline [(+|-|*) NUMBER]   the same metric and bound in --baseline-report
             | before [(+|-|*) NUMBER]     the same metric and bound before pruning
                                           (after.* rules)
metrics checked once per audited attribute value:
  max_ap_attribute, max_ap_attribute_pos, max_ap_attribute_neg   (highest AP, or highest
                                      bound, over the subspaces)
  flagged                                                        (flagged==none, flagged!=none)
metrics of the evaluated model:
  balanced_accuracy, worst_group_accuracy, parameters, flops, latency_ms
fairness metrics of the evaluated model, checked once per breakdown (each audited
attribute, then their intersection); Fairlearn's, over the groups not too small:
  demographic_parity_difference, demographic_parity_ratio   (selection rates)
  equalized_odds_difference, equalized_odds_ratio   (worse of true/false positive rates)
  accuracy_difference          (differences: max - min; ratios: min / max)
examples:
  max_ap_attribute<=0.8   flagged==none   worst_group_accuracy>=0.7
  max_ap_attribute.ci_high<=0.8   (no subspace reaches 0.8, even at its interval's top)
  max_ap_attribute.ci_low>=0.9    (a subspace reaches 0.9 even at its interval's bottom)
  after.balanced_accuracy>=before-0.02   worst_group_accuracy>=baseline-0.02
  after.parameters<=baseline*0.8   warn:worst_group_accuracy.ci_low>=0.7
  equalized_odds_difference<=0.1   after.demographic_parity_difference<=before
  warn:equalized_odds_ratio>=0.8   demographic_parity_difference.ci_high<=0.2"""

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RULE = re.compile(r"^(?P<left>[a-z_]+(?:\.[a-z_]+){0,2})(?P<op><=|>=|==|!=|<|>)(?P<ref>.*)$")
_RELATIVE = re.compile(rf"^(?P<base>baseline|before)(?:(?P<how>[-+*])(?P<amount>{_NUMBER}))?$")


class GateError(ValueError):
    """A malformed rule, or one that cannot be evaluated as configured (exit code 2)."""


@dataclass(frozen=True)
class Reference:
    """What a metric is compared with: a number, ``none``, or a baseline/before value."""

    kind: str  # "number" | "none" | "baseline" | "before"
    amount: float = 0.0  # the number, or the offset/factor applied to the baseline value
    how: str = ""  # "" | "+" | "-" | "*" (baseline/before only)

    def resolve(self, base: float) -> float:
        """The threshold: ``base + a``, ``base - a`` or ``base * a`` (``base`` alone)."""
        if self.how == "+":
            return base + self.amount
        if self.how == "-":
            return base - self.amount
        if self.how == "*":
            return base * self.amount
        return base

    def describe(self, base: float) -> str:
        suffix = f" {self.how} {self.amount:g}" if self.how else ""
        return f"{self.kind} {_fmt(base)}{suffix}"


@dataclass(frozen=True)
class Rule:
    """One parsed gate rule."""

    text: str
    metric: str
    op: str
    reference: Reference
    scope: str = ""  # "" (after when present, else before) | "before" | "after"
    bound: str = "value"  # which number of the metric: "value" | "ci_low" | "ci_high"
    level: str = GATE  # GATE: a violation fails the gate; WARN: it is only reported

    @property
    def is_audit_rule(self) -> bool:
        """Audit rules are checked once per attribute value; the others once per report."""
        return self.metric in AUDIT_METRICS or self.metric == FLAGGED

    @property
    def is_fairness_rule(self) -> bool:
        """Fairness rules are checked once per fairness breakdown."""
        return self.metric in FAIRNESS_METRICS

    @property
    def needs_baseline(self) -> bool:
        return self.reference.kind == "baseline"

    @property
    def needs_after(self) -> bool:
        """True when the rule only makes sense for an audit that pruned."""
        return self.scope == "after"


@dataclass(frozen=True)
class Check:
    """The outcome of one rule on one attribute value (or on the whole report)."""

    name: str
    passed: bool  # the rule held
    observed: float | str | None
    threshold: float | str | None
    message: str
    level: str = GATE  # the rule's level: a WARN check never fails the gate

    @property
    def failed(self) -> bool:
        """A gate rule that did not hold: the gate fails."""
        return not self.passed and self.level == GATE

    @property
    def warned(self) -> bool:
        """A warn rule that did not hold: reported, the gate still passes."""
        return not self.passed and self.level == WARN


_KNOWN = (*AUDIT_METRICS, FLAGGED, *MODEL_METRICS)
_WITH_INTERVALS = (*AUDIT_METRICS, *METRIC_FIELDS, *FAIRNESS_METRICS)  # Metric messages


def _split_target(left: str) -> tuple[str, str, str]:
    """``[scope.]metric[.bound]`` -> (scope, metric, bound); the parts are checked later."""
    parts = left.split(".")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        if parts[0] in SCOPES or parts[1] in _KNOWN:
            return parts[0], parts[1], ""
        return "", parts[0], parts[1]
    return "", parts[0], ""


def parse_rule(text: str, level: str = GATE) -> Rule:
    """Parse one rule of :data:`GRAMMAR`; raise :class:`GateError` saying what is accepted.

    ``level`` WARN (or a ``warn:`` prefix) makes the rule one that is reported only.
    """
    compact = "".join(text.split())
    if compact.startswith(WARN_PREFIX):
        compact, level = compact.removeprefix(WARN_PREFIX), WARN
    match = _RULE.match(compact)
    if not match:
        raise GateError(f"malformed gate rule {text!r}\n{GRAMMAR}")
    scope, metric, bound = _split_target(match["left"])
    op, ref = match["op"], match["ref"]
    name = f"{WARN_PREFIX}{compact}" if level == WARN else compact

    def fail(why: str) -> GateError:
        return GateError(f"gate rule {text!r}: {why}\n{GRAMMAR}")

    def rule(reference: Reference) -> Rule:
        return Rule(name, metric, op, reference, scope, bound or "value", level)

    if not ref:
        raise fail(f"nothing after {op!r}: give a number, none, baseline or before")
    if metric not in _KNOWN:
        close = difflib.get_close_matches(metric, _KNOWN, n=1)
        raise fail(f"unknown metric {metric!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    if scope and scope not in SCOPES:
        raise fail(f"unknown scope {scope!r}: use before. or after.")
    if scope and metric not in MODEL_METRICS:
        raise fail(f"{metric} is an audit metric; before./after. apply to evaluation metrics")
    if bound and metric not in _WITH_INTERVALS:
        raise fail(
            f"{metric} has no interval; .{bound} applies to AP, accuracy and fairness metrics"
        )
    if bound and bound not in BOUNDS:
        raise fail(f"unknown bound {bound!r}: use .value, .ci_low or .ci_high")
    if metric == FLAGGED:
        if op not in ("==", "!=") or ref != "none":
            raise fail("flagged takes ==none or !=none")
        return rule(Reference("none"))
    if op not in _OPS:
        raise fail(f"{metric} takes one of {' '.join(_OPS)}")
    if re.fullmatch(_NUMBER, ref):
        return rule(Reference("number", float(ref)))
    relative = _RELATIVE.match(ref)
    if not relative:
        raise fail(f"cannot read the reference {ref!r}")
    kind = relative["base"]
    if kind == "before" and (scope != "after" or metric not in MODEL_METRICS):
        raise fail("'before' is a reference only for after.<metric> rules")
    amount = float(relative["amount"]) if relative["amount"] else 0.0
    return rule(Reference(kind, amount, relative["how"] or ""))


def parse_rules(texts: Iterable[str]) -> list[Rule]:
    return [parse_rule(text) for text in texts]


def evaluate(
    rules: Iterable[Rule | str], report: Report, baseline: Report | None = None
) -> list[Check]:
    """Apply every rule to ``report``: one check per attribute value for audit rules.

    A value that was not measured (missing or NaN) fails its check: a gate fails closed.
    """
    checks: list[Check] = []
    for rule in rules:
        rule = parse_rule(rule) if isinstance(rule, str) else rule
        if rule.needs_baseline and baseline is None:
            raise GateError(
                f"gate rule {rule.text!r} compares with a baseline: give a baseline report"
            )
        if rule.is_audit_rule:
            outcomes = _audit_checks(rule, report, baseline)
        elif rule.is_fairness_rule:
            outcomes = _fairness_checks(rule, report, baseline)
        else:
            outcomes = [_evaluation_check(rule, report, baseline)]
        checks.extend(dataclasses.replace(check, level=rule.level) for check in outcomes)
    return checks


def all_passed(checks: Iterable[Check]) -> bool:
    """True when no gate rule failed; warn rules that did not hold do not count."""
    return not any(check.failed for check in checks)


# --- audit rules -------------------------------------------------------------------------


def _audit_key(audit: Report) -> tuple[str, str, str]:
    return (
        str(audit.get("attribute", "")),
        str(audit.get("value", "")),
        str(audit.get("layer", "")),
    )


def _audit_checks(rule: Rule, report: Report, baseline: Report | None) -> list[Check]:
    audits = list(report.get("attributes") or [])
    if not audits:
        return [
            Check(rule.text, False, None, _threshold_label(rule), "the report has no audit table")
        ]
    several_layers = len({_audit_key(a)[2] for a in audits}) > 1
    baseline_audits = {_audit_key(a): a for a in (baseline or {}).get("attributes") or []}
    checks = []
    for audit in audits:
        attribute, value, layer = _audit_key(audit)
        where = f"{attribute}={value}" + (f", {layer}" if several_layers else "")
        name = f"{rule.text} [{where}]"
        if rule.metric == FLAGGED:
            checks.append(_flagged_check(rule, name, where, audit))
            continue
        observed = _max_ap(audit, AUDIT_METRICS[rule.metric], rule.bound)
        base = None
        if rule.needs_baseline:
            counterpart = baseline_audits.get(_audit_key(audit))
            if counterpart is None:
                checks.append(
                    Check(
                        name,
                        False,
                        observed,
                        None,
                        f"{where}: the baseline report has no audit of it",
                    )
                )
                continue
            base = _max_ap(counterpart, AUDIT_METRICS[rule.metric], rule.bound)
        checks.append(_compare(rule, name, f"{where}: {_target(rule)}", observed, base))
    return checks


def _max_ap(audit: Report, score: str, bound: str = "value") -> float | None:
    """The highest value (or bound) of ``score`` over the subspaces: for ci_high, whether
    any subspace could plausibly reach a limit; for ci_low, whether one surely does."""
    values = [metric_value(s.get(score), bound) for s in audit.get("subspaces") or []]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def _flagged_check(rule: Rule, name: str, where: str, audit: Report) -> Check:
    # proto3 JSON omits a zero int32: a missing flagged_subspace is subspace 0.
    index = int(as_number(audit.get("flagged_subspace", 0)) or 0)
    observed = "none" if index < 0 else f"S{index + 1}"
    is_none = index < 0
    passed = is_none if rule.op == "==" else not is_none
    if is_none:
        message = f"{where}: no subspace flagged"
    else:
        ap = metric_value(_subspace(audit, index).get("ap_attribute"))
        message = f"{where}: subspace S{index + 1} flagged (AP_attribute {_fmt(ap)})"
    return Check(name, passed, observed, f"{rule.op}none", message)


def _subspace(audit: Report, index: int) -> Report:
    for position, subspace in enumerate(audit.get("subspaces") or []):
        if int(as_number(subspace.get("index", position)) or 0) == index:
            return subspace
    return {}


# --- evaluation rules --------------------------------------------------------------------


def _evaluation(report: Report, scope: str) -> tuple[str, Report | None]:
    if not scope:
        scope = "after" if report.get("after") else "before"
    return scope, report.get(scope) or None


def _evaluation_value(evaluation: Report, metric: str, bound: str = "value") -> float | None:
    if metric in METRIC_FIELDS:
        return metric_value(evaluation.get(metric), bound)
    # proto3 JSON omits zero scalars (and writes int64 as strings).
    return as_number(evaluation.get(metric, 0))


def _not_evaluated(rule: Rule, scope: str) -> Check:
    """The failed check of a rule on an evaluation the report does not have."""
    why = "the audit did not prune" if scope == "after" else "the model was not evaluated"
    return Check(rule.text, False, None, _threshold_label(rule), f"no '{scope}' evaluation: {why}")


def _evaluation_check(rule: Rule, report: Report, baseline: Report | None) -> Check:
    scope, evaluation = _evaluation(report, rule.scope)
    if evaluation is None:
        return _not_evaluated(rule, scope)
    observed = _evaluation_value(evaluation, rule.metric, rule.bound)
    base = None
    if rule.reference.kind == "before":
        before = report.get("before") or {}
        base = _evaluation_value(before, rule.metric, rule.bound) if before else None
    elif rule.needs_baseline:
        base_scope, base_evaluation = _evaluation(baseline or {}, rule.scope)
        if base_evaluation is None:
            message = f"the baseline report has no '{base_scope}' evaluation"
            return Check(rule.text, False, observed, None, message)
        base = _evaluation_value(base_evaluation, rule.metric, rule.bound)
    return _compare(rule, rule.text, f"{scope}.{_target(rule)}", observed, base)


# --- fairness rules ----------------------------------------------------------------------


def _breakdown_key(breakdown: Report) -> tuple[str, ...]:
    return tuple(str(name) for name in breakdown.get("attributes") or [])


def _breakdown_name(key: tuple[str, ...]) -> str:
    """``sex``, or ``sex x race`` for an intersection."""
    return " x ".join(key) or "?"


def _breakdowns(rule: Rule, evaluation: Report, scope: str, which: str = "report") -> list:
    """The fairness breakdowns of an evaluation; a report without any cannot be gated on
    fairness (made before cnp measured it, or an audit of no attribute)."""
    if "fairness" not in evaluation:
        raise GateError(
            f"gate rule {rule.text!r}: the {which}'s '{scope}' evaluation has no fairness "
            "metrics (it was made by a cnp version before fairness reviews): audit again "
            "with this version, or drop the rule"
        )
    breakdowns = list(evaluation.get("fairness") or [])
    if not breakdowns:
        raise GateError(
            f"gate rule {rule.text!r}: the {which}'s '{scope}' evaluation has no fairness "
            "breakdown (no attribute was audited)"
        )
    return breakdowns


def _fairness_checks(rule: Rule, report: Report, baseline: Report | None) -> list[Check]:
    scope, evaluation = _evaluation(report, rule.scope)
    if evaluation is None:
        return [_not_evaluated(rule, scope)]
    counterparts: dict[tuple[str, ...], Report] = {}
    if rule.reference.kind == "before":
        before = report.get("before") or {}
        if before:
            counterparts = {_breakdown_key(b): b for b in _breakdowns(rule, before, "before")}
    elif rule.needs_baseline:
        base_scope, base_evaluation = _evaluation(baseline or {}, rule.scope)
        if base_evaluation is None:
            message = f"the baseline report has no '{base_scope}' evaluation"
            return [Check(rule.text, False, None, None, message)]
        found = _breakdowns(rule, base_evaluation, base_scope, "baseline report")
        counterparts = {_breakdown_key(b): b for b in found}
    checks = []
    for breakdown in _breakdowns(rule, evaluation, scope):
        key = _breakdown_key(breakdown)
        where = _breakdown_name(key)
        name = f"{rule.text} [{where}]"
        observed = metric_value(breakdown.get(rule.metric), rule.bound)
        base = None
        if rule.reference.kind != "number":
            counterpart = counterparts.get(key)
            if counterpart is None:
                source = "before pruning" if rule.reference.kind == "before" else "baseline"
                message = f"{where}: no breakdown of it {source}"
                checks.append(Check(name, False, observed, None, message))
                continue
            base = metric_value(counterpart.get(rule.metric), rule.bound)
        checks.append(_compare(rule, name, f"{where}: {scope}.{_target(rule)}", observed, base))
    return checks


def _target(rule: Rule) -> str:
    """The metric as messages name it: ``worst_group_accuracy.ci_low``."""
    return rule.metric if rule.bound == "value" else f"{rule.metric}.{rule.bound}"


# --- shared ------------------------------------------------------------------------------


def _compare(
    rule: Rule, name: str, label: str, observed: float | None, base: float | None
) -> Check:
    ref = rule.reference
    if ref.kind == "number":
        threshold, source = ref.amount, ""
    elif base is None or not math.isfinite(base):
        return Check(name, False, observed, None, f"{label}: the {ref.kind} value was not measured")
    else:
        threshold, source = ref.resolve(base), f" ({ref.describe(base)})"
    if observed is None or not math.isfinite(observed):
        return Check(name, False, observed, threshold, f"{label} was not measured")
    passed = _OPS[rule.op](observed, threshold)
    verdict = "" if passed else "needs "
    message = f"{label} = {_fmt(observed)}, {verdict}{rule.op} {_fmt(threshold)}{source}"
    return Check(name, passed, observed, threshold, message)


def _threshold_label(rule: Rule) -> float | str:
    ref = rule.reference
    if ref.kind == "number":
        return ref.amount
    return rule.text[rule.text.index(rule.op) :]


def as_number(value: Any) -> float | None:
    """A JSON number, or the string the proto JSON mapping uses (int64, "NaN", "Infinity")."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def metric_value(metric: Mapping[str, Any] | None, bound: str = "value") -> float | None:
    """The value (or ``bound``: ci_low, ci_high) of a Metric message; None when the message
    is absent (not measured).

    proto3 JSON omits zero fields, so a present message without "value" holds 0.0.
    """
    if metric is None:
        return None
    return as_number(metric.get(bound, 0))


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isfinite(value) and value == int(value) and abs(value) >= 1000:
        return f"{int(value):d}"
    return f"{value:.4g}" if abs(value) >= 1 else f"{value:.3f}"
