"""Metric names in PromQL expressions, and the names the pipeline exports.

Used by the alert-rule and dashboard tests. Not a PromQL parser: a tokenizer that is exact for
the metric names of well-formed expressions and rejects unbalanced brackets.

    metric_names('sum by (sink) (rate(pipeline_events_out_total{sink="s3"}[5m]))')
    == {"pipeline_events_out_total"}
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from dataflows.metrics import PrometheusMetrics

# Series Prometheus itself records for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Words that can stand where a metric name could and are not one. Function and aggregation
# names are recognised by the `(` after them (or by the label list and `(` after an aggregation),
# so they need no list; these are the operators, modifiers and literals.
KEYWORDS = frozenset(
    {
        "and", "or", "unless", "atan2",
        "by", "without", "on", "ignoring", "group_left", "group_right",
        "bool", "offset", "inf", "nan",
    }
)  # fmt: skip

# Things to blank out before looking for names, in one pass so that a quote inside a comment or
# a `#` inside a string is read correctly.
_SKIP = re.compile(
    r"""
      "(?:[^"\\]|\\.)*"          # double-quoted string
    | '(?:[^'\\]|\\.)*'          # single-quoted string
    | `[^`]*`                    # raw string
    | \#[^\n]*                   # comment
    """,
    re.VERBOSE | re.DOTALL,
)
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')""")
_TEMPLATE_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_AT_MODIFIER = re.compile(
    r"@\s*(?:start\s*\(\s*\)|end\s*\(\s*\)|[-+]?[\d.]+(?:e[-+]?\d+)?)", re.IGNORECASE
)
# A name must not continue a number, a duration or another word: `5m`, `1e3`, `0x1f`.
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


class PromQLError(ValueError):
    pass


def _check_balanced(expr: str, original: str) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in expr:
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            raise PromQLError(f"unbalanced {char!r} in {original!r}")
    if stack:
        raise PromQLError(f"unclosed {stack[-1]!r} in {original!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (histogram suffixes kept)."""
    if not expr.strip():
        raise PromQLError("empty expression")
    names: set[str] = set()
    # `{__name__="x"}` selects x; collect those before the strings are blanked.
    for match in _NAME_MATCHER.finditer(expr):
        names.add(match.group(1) if match.group(1) is not None else match.group(2))
    text = _SKIP.sub(lambda m: '""' if m.group(0)[0] in "\"'`" else " ", expr)
    text = _TEMPLATE_VAR.sub(" ", text)
    _check_balanced(text, expr)
    text = _MATCHERS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    # Subqueries nest: `[5m:1m]` inside `[...]` is not valid, so one pass removes every range.
    text = _RANGE.sub(" ", text)
    text = _AT_MODIFIER.sub(" ", text)
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def base_name(name: str, histograms: set[str] | frozenset[str]) -> str:
    """`x_bucket`, `x_sum`, `x_count` of a histogram x → x; any other name unchanged."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return name[: -len(suffix)]
    return name


def exported_names() -> tuple[frozenset[str], frozenset[str]]:
    """(every series name `PrometheusMetrics` registers, the histograms among them).

    Read from a fresh registry, so a metric added to or renamed in dataflows/metrics.py is
    seen here without a list to keep in step.
    """
    registry = CollectorRegistry()
    PrometheusMetrics(registry)
    names: set[str] = set()
    histograms: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.add(family.name)
            histograms.add(family.name)
        else:
            names.add(family.name)
    return frozenset(names), frozenset(histograms)


def unknown_names(expr: str) -> set[str]:
    """Names in `expr` that are neither exported by the pipeline nor recorded by Prometheus."""
    exported, histograms = exported_names()
    return {
        name
        for name in metric_names(expr)
        if base_name(name, histograms) not in exported and name not in PROMETHEUS_SERIES
    }
