//! A YAML document as a tree of positioned nodes.
//!
//! Policies are parsed twice over the same text: once into this generic tree, which
//! remembers where every key and value sits, and then from that tree into the typed
//! `*Spec` structs. The tree is what lets every error carry `file:line:column` *and*
//! the YAML path: serde tells us the path, the tree tells us where that path is.

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// One YAML value with the positions of its children.
#[derive(Debug, Clone)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl Position {
    fn of<T>(spanned: &Spanned<T>) -> Self {
        Position {
            line: spanned.referenced.line(),
            column: spanned.referenced.column(),
        }
    }
}

/// A syntax error in the YAML text itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub position: Position,
    pub message: String,
}

/// Parses every `---`-separated document of `text`.
pub fn parse_documents(text: &str) -> Result<Vec<Spanned<Node>>, SyntaxError> {
    serde_saphyr::from_str_multiple::<Spanned<Node>, Vec<_>>(text).map_err(|error| {
        let position = error
            .location()
            .map(|l| Position {
                line: l.line(),
                column: l.column(),
            })
            .unwrap_or(Position { line: 1, column: 1 });
        // The rendered message ends with " at line L, column C", which our own
        // prefix already says, and may carry a hint meant for Rust programmers.
        let rendered = error.without_snippet().to_string();
        let first = rendered.lines().next().unwrap_or_default();
        let message = first
            .rsplit_once(" at line ")
            .map_or(first, |(m, _)| m)
            .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
        SyntaxError { position, message }
    })
}

impl Node {
    /// The same value as JSON, for the typed second pass.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::UInt(u) => Value::from(*u),
            Node::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(f.to_string())),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(|i| i.value.to_json()).collect()),
            Node::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.value.clone(), v.value.to_json()))
                    .collect(),
            ),
        }
    }
}

/// Where each YAML path of one document sits.
#[derive(Debug, Default)]
pub struct PathIndex {
    values: HashMap<String, Position>,
    keys: HashMap<String, Position>,
}

impl PathIndex {
    pub fn build(root: &Spanned<Node>) -> Self {
        let mut index = PathIndex::default();
        index.visit(String::new(), root);
        index
    }

    fn visit(&mut self, path: String, node: &Spanned<Node>) {
        match &node.value {
            Node::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.visit(format!("{path}[{i}]"), item);
                }
            }
            Node::Map(entries) => {
                for (key, value) in entries {
                    let child = if path.is_empty() {
                        key.value.clone()
                    } else {
                        format!("{path}.{}", key.value)
                    };
                    self.keys.insert(child.clone(), Position::of(key));
                    self.visit(child, value);
                }
            }
            _ => {}
        }
        self.values.insert(path, Position::of(node));
    }

    /// The value at `path`, or the nearest ancestor that exists (a missing field is
    /// reported where its parent mapping is).
    pub fn value(&self, path: &str) -> Position {
        let mut path = path;
        loop {
            if let Some(p) = self.values.get(path) {
                return *p;
            }
            match parent(path) {
                Some(up) => path = up,
                None => return Position { line: 1, column: 1 },
            }
        }
    }

    /// The key naming `path` (for unknown fields, the offending key itself).
    pub fn key(&self, path: &str) -> Position {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value(path))
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::UInt(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = access.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = access.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_keys_and_values_by_yaml_path() {
        let docs = parse_documents("a: 1\nb:\n  - x: 2\n    y: [3]\n").unwrap();
        let index = PathIndex::build(&docs[0]);
        assert_eq!(index.value("b[0].x"), Position { line: 3, column: 8 });
        assert_eq!(index.key("b[0].y"), Position { line: 4, column: 5 });
        assert_eq!(index.value("b[0].y[0]"), Position { line: 4, column: 9 });
        // A missing path falls back to its nearest ancestor.
        assert_eq!(index.value("b[0].z.w"), Position { line: 3, column: 5 });
    }

    #[test]
    fn reports_syntax_errors_with_position() {
        let error = parse_documents("a: [1\n").unwrap_err();
        assert_eq!(error.position, Position { line: 1, column: 4 });
        assert_eq!(error.message, "unclosed bracket '['");
    }
}
