//! A Prometheus rule file as data, and its YAML text.
//!
//! The text is written by hand rather than through a serializer so the output is
//! byte-for-byte deterministic, reads well in review (expressions as literal blocks),
//! and producing it cannot fail. Every string that is not an expression is emitted
//! double-quoted with YAML escapes, so no value can change the document's shape.

use std::fmt::Write;

/// One `groups[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// A recording or an alerting rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    Record {
        record: String,
        expr: String,
        labels: Vec<(String, String)>,
    },
    Alert {
        alert: String,
        expr: String,
        /// Prometheus duration (`5m`); `None` fires on the first evaluation.
        for_: Option<String>,
        labels: Vec<(String, String)>,
        annotations: Vec<(String, String)>,
    },
}

/// The rule file: `groups:` at the top level.
pub fn render(groups: &[Group]) -> String {
    let mut out = String::from("groups:\n");
    render_groups(&mut out, groups, "");
    out
}

/// The groups as a list, each line prefixed with `indent` (for embedding in a
/// `PrometheusRule`'s `spec.groups`).
pub fn render_groups(out: &mut String, groups: &[Group], indent: &str) {
    for group in groups {
        let _ = writeln!(out, "{indent}- name: {}", quote(&group.name));
        let _ = writeln!(out, "{indent}  rules:");
        for rule in &group.rules {
            render_rule(out, rule, &format!("{indent}    "));
        }
    }
}

fn render_rule(out: &mut String, rule: &Rule, indent: &str) {
    match rule {
        Rule::Record {
            record,
            expr,
            labels,
        } => {
            let _ = writeln!(out, "{indent}- record: {}", quote(record));
            render_expr(out, expr, indent);
            render_map(out, "labels", labels, indent);
        }
        Rule::Alert {
            alert,
            expr,
            for_,
            labels,
            annotations,
        } => {
            let _ = writeln!(out, "{indent}- alert: {}", quote(alert));
            render_expr(out, expr, indent);
            if let Some(d) = for_ {
                let _ = writeln!(out, "{indent}  for: {}", quote(d));
            }
            render_map(out, "labels", labels, indent);
            render_map(out, "annotations", annotations, indent);
        }
    }
}

/// Expressions are literal blocks (`|-`): PromQL's quotes and backslashes need no
/// escaping there, and multi-line expressions keep their layout.
fn render_expr(out: &mut String, expr: &str, indent: &str) {
    let _ = writeln!(out, "{indent}  expr: |-");
    for line in expr.trim_end().lines() {
        let line = line.trim_end();
        if line.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "{indent}    {line}");
        }
    }
}

fn render_map(out: &mut String, key: &str, entries: &[(String, String)], indent: &str) {
    if entries.is_empty() {
        return;
    }
    let _ = writeln!(out, "{indent}  {key}:");
    for (k, v) in entries {
        let _ = writeln!(out, "{indent}    {}: {}", quote(k), quote(v));
    }
}

/// A YAML double-quoted scalar. Escapes everything YAML treats specially inside one.
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04x}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_escape_yaml_specials() {
        assert_eq!(quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        assert_eq!(quote("x: y # z"), r#""x: y # z""#);
        assert_eq!(quote("\u{1}"), r#""\u0001""#);
    }

    #[test]
    fn renders_records_and_alerts_with_literal_expressions() {
        let groups = vec![Group {
            name: "g".into(),
            rules: vec![
                Rule::Record {
                    record: "r".into(),
                    expr: "sum(x{a=\"b\"})\n".into(),
                    labels: vec![("slo".into(), "availability".into())],
                },
                Rule::Alert {
                    alert: "A".into(),
                    expr: "x > 1\nand\ny > 1".into(),
                    for_: Some("5m".into()),
                    labels: vec![],
                    annotations: vec![("summary".into(), "it's \"bad\"".into())],
                },
            ],
        }];
        let expected = r#"groups:
- name: "g"
  rules:
    - record: "r"
      expr: |-
        sum(x{a="b"})
      labels:
        "slo": "availability"
    - alert: "A"
      expr: |-
        x > 1
        and
        y > 1
      for: "5m"
      annotations:
        "summary": "it's \"bad\""
"#;
        assert_eq!(render(&groups), expected);
    }
}
