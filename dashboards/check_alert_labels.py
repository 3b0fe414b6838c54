#!/usr/bin/env python3
"""Every shipped alert against what a real Prometheus scraped, as the shipped
scrape configuration labels it (scripts/observability-test runs this).

An alert whose selector names a job no scrape configuration produces, or groups by
a label no target carries, is never wrong and never right: it stays silent (or,
with absent(), fires forever). For each alert (and recording rule) of the rule files given:
  - every metric it selects exists in Prometheus, with every label name its
    matchers use; a `job` matcher's value matches a scraped job exactly;
  - every label it aggregates `by (...)` and every `$labels.X` of its annotations
    is carried by the series of the metrics it selects (or is one of the labels
    the expression's own rules add).
Values of other matchers (`outcome="error"`) are not required to exist: a counter
is born at its first increment, and the error may simply not have happened.

Usage: check_alert_labels.py PROMETHEUS_URL RULE_FILE...
Std library only. Prints one line per alert; exits 1 if any is wrong.
"""
import json
import re
import sys
import urllib.parse
import urllib.request

# PromQL words that look like metric names but are not.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "sum", "min", "max", "avg", "count", "stddev", "stdvar",
    "topk", "bottomk", "quantile", "count_values", "group", "rate", "irate", "increase",
    "delta", "idelta", "deriv", "absent", "absent_over_time", "histogram_quantile",
    "clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "vector", "scalar",
    "time", "label_replace", "label_join", "sort", "sort_desc", "changes", "resets",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "present_over_time", "inf", "nan", "le",
}


def query(url, expr):
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
        answer = json.load(r)
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def rules(path):
    """(alert or record name, expr, annotations text) of a Prometheus rule file: a small
    reader of the files this repository generates (`- alert:` items, `expr: |-`
    blocks, quoted annotation values), not a YAML parser."""
    out, cur, mode = [], None, None
    for line in open(path, encoding="utf-8"):
        stripped = line.strip()
        m = re.match(r'-\s*alert:\s*"?([A-Za-z0-9_]+)"?', stripped)
        if m:
            cur = {"name": m.group(1), "expr": "", "annotations": ""}
            out.append(cur)
            mode = None
            continue
        m = re.match(r'-\s*record:\s*"?([A-Za-z0-9_:]+)"?', stripped)
        if m:
            # Recording rules are checked too: the alerts built on them (the SLO
            # burn rates) see only the labels these keep.
            cur = {"name": m.group(1), "expr": "", "annotations": ""}
            out.append(cur)
            mode = None
            continue
        if cur is None:
            continue
        if stripped.startswith("expr:"):
            rest = stripped[len("expr:"):].strip()
            mode = "expr" if rest in ("|-", "|", ">-") else None
            if mode is None:
                cur["expr"] = rest.strip('"')
            continue
        if re.match(r"(for|labels|annotations):", stripped):
            mode = "annotations" if stripped.startswith("annotations") else None
            continue
        if mode == "expr":
            cur["expr"] += " " + stripped
        elif mode == "annotations":
            cur["annotations"] += " " + stripped
    return out


def selectors(expr):
    """(metric, {label: (op, value)}) of every vector selector in `expr`."""
    found = []
    braced = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}')
    for m in braced.finditer(expr):
        matchers = {}
        for mm in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(2)):
            matchers[mm.group(1)] = (mm.group(2), mm.group(3))
        found.append((m.group(1), matchers))
    # Bare names: what is left once selectors, strings, label lists, ranges,
    # offsets and function names are gone.
    rest = braced.sub(" ", expr)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)
    rest = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r"\boffset\s+\S+", " ", rest)
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", rest):
        if m.group(2) or m.group(1) in KEYWORDS:
            continue
        found.append((m.group(1), {}))
    return found


def grouped_labels(expr):
    labels = set()
    for m in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {l.strip() for l in m.group(1).split(",") if l.strip()}
    return labels


def main():
    url, files = sys.argv[1], sys.argv[2:]
    jobs = {s["metric"].get("job") for s in query(url, "up")}
    bad = 0
    for path in files:
        for alert in rules(path):
            problems, carried = [], set()
            for metric, matchers in selectors(alert["expr"]):
                if metric.startswith("slo:") or metric == "ALERTS":
                    continue  # recording rules: checked through their own selectors
                series = query(url, f"count by (__name__) ({{__name__=\"{metric}\"}})")
                if not series:
                    problems.append(f"{metric}: no such metric scraped")
                    continue
                labelsets = query(url, f'{{__name__="{metric}"}}')
                have = set().union(*(s["metric"].keys() for s in labelsets)) if labelsets else set()
                carried |= have
                for label, (op, value) in matchers.items():
                    if label not in have:
                        problems.append(f"{metric}: no series has label {label!r}")
                    elif label == "job" and op == "=" and value not in jobs:
                        problems.append(f"{metric}{{job={value!r}}}: no scraped job is {value!r} (jobs: {sorted(j for j in jobs if j)})")
            needed = grouped_labels(alert["expr"]) | set(re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", alert["annotations"]))
            missing = sorted(needed - carried - {"__name__"})
            if missing and carried:
                problems.append(f"labels {missing} are carried by none of its series")
            status = "ok  " if not problems else "FAIL"
            print(f"{status} {alert['name']} ({path.split('/')[-1]})" + "".join(f"\n     {p}" for p in problems))
            bad += bool(problems)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
