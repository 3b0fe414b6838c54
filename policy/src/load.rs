//! Reading policy sources: a file or a directory of `*.yaml`/`*.yml`, each holding one
//! or more documents. Every error found in any file is returned, placed at
//! `file:line:column` with its YAML path; a source with any error yields no policy.
//!
//! The `check_*` functions also return the [`lint`](crate::lint) warnings of a valid
//! source, placed the same way; the `load_*`/`parse_*` functions are the same reads
//! for callers that only want the policies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{did_you_mean, PolicyError, PolicyErrors, Problem, Violation};
use crate::lint::{self, PolicyWarning};
use crate::model::{PolicyId, PolicySet, TrafficPolicy};
use crate::node::{self, PathIndex, Position};
use crate::spec::TrafficPolicySpec;

/// Largest policy file accepted. Policies are small; a bigger file is a mistake or
/// an attack, and refusing it bounds parse time and memory.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Most files read from one policy directory.
pub const MAX_FILES: usize = 1024;

/// One validated document and where it came from (for cross-document errors).
struct Loaded {
    policy: TrafficPolicy,
    file: PathBuf,
    index: PathIndex,
}

/// A valid policy set, and what in it is valid but probably not meant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checked {
    pub set: PolicySet,
    /// In reading order. A warning never refuses a policy: the set serves as written.
    pub warnings: Vec<PolicyWarning>,
}

/// Loads a policy file or directory.
pub fn load_path(path: &Path) -> Result<PolicySet, PolicyErrors> {
    check_path(path).map(|c| c.set)
}

/// [`load_path`], with the warnings.
pub fn check_path(path: &Path) -> Result<Checked, PolicyErrors> {
    check_paths(&[path.to_owned()])
}

/// Loads several files or directories as one set: names and hosts must be unique
/// across all of them, as they are when served together.
pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
    check_paths(paths).map(|c| c.set)
}

/// [`load_paths`], with the warnings.
pub fn check_paths(paths: &[PathBuf]) -> Result<Checked, PolicyErrors> {
    let (sources, mut errors) = read_paths(paths);
    match check_sources(sources.iter().map(|(f, t)| (f.as_path(), t.as_str()))) {
        Ok(checked) if errors.is_empty() => Ok(checked),
        Ok(_) => Err(PolicyErrors(errors)),
        Err(PolicyErrors(more)) => {
            errors.extend(more);
            Err(PolicyErrors(errors))
        }
    }
}

/// The policy files of `paths` and their texts (bounded), and what could not be read.
pub fn read_paths(paths: &[PathBuf]) -> (Vec<(PathBuf, String)>, Vec<PolicyError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match policy_files(path) {
            Ok(found) => files.extend(found),
            Err(problem) => errors.push(PolicyError {
                file: path.to_owned(),
                line: 0,
                column: 0,
                path: String::new(),
                problem,
            }),
        }
    }
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        match read_bounded(&file) {
            Ok(text) => sources.push((file, text)),
            Err(problem) => errors.push(PolicyError {
                file,
                line: 0,
                column: 0,
                path: String::new(),
                problem,
            }),
        }
    }
    (sources, errors)
}

/// Parses policy text as if read from `file` (the name is only used in messages).
pub fn parse_str(file: &Path, text: &str) -> Result<PolicySet, PolicyErrors> {
    check_str(file, text).map(|c| c.set)
}

/// [`parse_str`], with the warnings.
pub fn check_str(file: &Path, text: &str) -> Result<Checked, PolicyErrors> {
    check_sources([(file, text)])
}

/// Parses several named texts as one policy set (the cross-policy rules apply across them).
pub fn parse_sources<'a>(
    sources: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<PolicySet, PolicyErrors> {
    check_sources(sources).map(|c| c.set)
}

/// [`parse_sources`], with the warnings.
pub fn check_sources<'a>(
    sources: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<Checked, PolicyErrors> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (file, text) in sources {
        parse_file(file, text, &mut loaded, &mut errors);
    }
    check_across(&loaded, &mut errors);
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let warnings = loaded.iter().flat_map(placed_warnings).collect();
    Ok(Checked {
        set: PolicySet {
            policies: loaded.into_iter().map(|l| l.policy).collect(),
        },
        warnings,
    })
}

/// The lint warnings of one policy, placed in its file like errors are.
fn placed_warnings(l: &Loaded) -> impl Iterator<Item = PolicyWarning> + '_ {
    lint::warnings(&l.policy)
        .into_iter()
        .map(|(path, warning)| {
            let p = l.index.value(&path);
            PolicyWarning {
                file: l.file.clone(),
                line: p.line,
                column: p.column,
                path,
                warning,
            }
        })
}

fn parse_file(file: &Path, text: &str, loaded: &mut Vec<Loaded>, errors: &mut Vec<PolicyError>) {
    for (_, document) in documents_of(file, text) {
        match document {
            Ok(l) => loaded.push(l),
            Err(found) => errors.extend(found),
        }
    }
}

/// A document's written identity (see [`written_id`]) and its check.
type Checked1 = (Option<PolicyId>, Result<Loaded, Vec<PolicyError>>);

/// Every document of one text, each checked on its own (its errors in reading
/// order); a text that is not YAML is one error.
fn documents_of(file: &Path, text: &str) -> Vec<Checked1> {
    let documents = match node::parse_documents(text) {
        Ok(docs) => docs,
        Err(e) => {
            return vec![(
                None,
                Err(vec![PolicyError {
                    file: file.to_owned(),
                    line: e.position.line,
                    column: e.position.column,
                    path: String::new(),
                    problem: Problem::Invalid(format!("invalid YAML: {}", e.message)),
                }]),
            )]
        }
    };
    documents
        .into_iter()
        // `---` at the end of a file or between comments yields an empty document.
        .filter(|document| !matches!(document.value, node::Node::Null))
        .map(|document| {
            let mut checked = check_document(file, &document);
            if let Err(errors) = &mut checked {
                // Report in reading order, whatever order the checks ran in.
                errors.sort_by_key(|e| (e.line, e.column));
            }
            (written_id(&document.value.to_json()), checked)
        })
        .collect()
}

/// What a document names itself (`metadata.namespace`, `metadata.name`), read from
/// the raw document so that an invalid policy can still be told apart from others.
fn written_id(json: &serde_json::Value) -> Option<PolicyId> {
    let metadata = json.get("metadata")?;
    Some(PolicyId {
        namespace: metadata
            .get("namespace")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        name: metadata.get("name")?.as_str()?.to_owned(),
    })
}

fn check_document(
    file: &Path,
    document: &serde_saphyr::Spanned<node::Node>,
) -> Result<Loaded, Vec<PolicyError>> {
    let index = PathIndex::build(document);
    let place = |v: Violation| {
        let Position { line, column } = if v.at_key {
            index.key(&v.path)
        } else {
            index.value(&v.path)
        };
        PolicyError {
            file: file.to_owned(),
            line,
            column,
            path: v.path,
            problem: v.problem,
        }
    };
    let (spec, shape_errors, explained) = deserialize_all(document.value.to_json());
    let mut errors: Vec<PolicyError> = shape_errors.into_iter().map(place).collect();
    let Some(spec) = spec else {
        return Err(errors);
    };
    match TrafficPolicy::try_from(&spec) {
        Ok(policy) if errors.is_empty() => Ok(Loaded {
            policy,
            file: file.to_owned(),
            index,
        }),
        Ok(_) => Err(errors),
        Err(violations) => {
            errors.extend(
                violations
                    .into_iter()
                    .filter(|v| !explained.contains(&v.path))
                    .map(place),
            );
            Err(errors)
        }
    }
}

/// One policy document checked on its own, as the control plane serves them: an
/// invalid document refuses only itself.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: PathBuf,
    /// The identity the document gives itself, when it has a readable
    /// `metadata.name` (`None` for a file that is not YAML at all).
    pub id: Option<PolicyId>,
    /// Where its `metadata.name` is (line, column), for a duplicate's message.
    pub name_at: (u64, u64),
    /// The policy and its warnings, or its errors (placed at file:line:column).
    pub outcome: Result<(TrafficPolicy, Vec<PolicyWarning>), Vec<PolicyError>>,
}

/// Checks every document of `sources` on its own: no rule spans two documents
/// except identity (a second document with an identity already read is refused).
/// Hosts claimed twice are for the caller to settle, by its own rule.
pub fn check_each<'a>(sources: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Vec<Document> {
    let mut out: Vec<Document> = Vec::new();
    for (file, text) in sources {
        out.extend(check_file(file, text));
    }
    refuse_duplicates(&mut out);
    out
}

/// Every document of one file, each checked on its own (what [`check_each`] does
/// per file, for a caller that keeps the results of files that did not change).
pub fn check_file(file: &Path, text: &str) -> Vec<Document> {
    documents_of(file, text)
        .into_iter()
        .map(|(raw_id, checked)| match checked {
            Err(errors) => Document {
                file: file.to_owned(),
                id: raw_id,
                name_at: (0, 0),
                outcome: Err(errors),
            },
            Ok(l) => {
                let at = l.index.value("metadata.name");
                let warnings = placed_warnings(&l).collect();
                Document {
                    file: l.file,
                    id: Some(l.policy.id()),
                    name_at: (at.line, at.column),
                    outcome: Ok((l.policy, warnings)),
                }
            }
        })
        .collect()
}

/// Refuses every valid document whose identity an earlier one has already.
pub fn refuse_duplicates(documents: &mut [Document]) {
    let mut seen: HashMap<PolicyId, (PathBuf, (u64, u64))> = HashMap::new();
    for d in documents.iter_mut() {
        let (Some(id), Ok(_)) = (&d.id, &d.outcome) else {
            continue;
        };
        match seen.get(id) {
            Some((first_file, (line, column))) => {
                d.outcome = Err(vec![PolicyError {
                    file: d.file.clone(),
                    line: d.name_at.0,
                    column: d.name_at.1,
                    path: "metadata.name".into(),
                    problem: Problem::Duplicate {
                        what: "policy name",
                        name: id.to_string(),
                        first: format!("at {}:{line}:{column}", first_file.display()),
                    },
                }]);
            }
            None => {
                seen.insert(id.clone(), (d.file.clone(), d.name_at));
            }
        }
    }
}

/// Most shape errors reported for one document before giving up.
const MAX_SHAPE_ERRORS: usize = 64;

/// Deserializes the spec, collecting every shape error rather than the first: a
/// field serde rejects (unknown, or of the wrong type) is reported, removed, and
/// deserialization is tried again, so the value checks still run on the rest.
/// Stops when removing the field would only produce a "missing field" for it.
fn deserialize_all(
    mut json: serde_json::Value,
) -> (Option<TrafficPolicySpec>, Vec<Violation>, Vec<String>) {
    let mut violations: Vec<Violation> = Vec::new();
    // Fields already reported (removed, or suggested for a typo): a later "missing
    // field" or value error for one of them says nothing new.
    let mut explained: Vec<String> = Vec::new();
    for _ in 0..MAX_SHAPE_ERRORS {
        let error = match serde_path_to_error::deserialize::<_, TrafficPolicySpec>(&json) {
            Ok(spec) => return (Some(spec), violations, explained),
            Err(e) => e,
        };
        let violation = violation_from_serde(&error);
        match &violation.problem {
            Problem::MissingField { field } => {
                let full = join(&violation.path, field);
                if !explained.contains(&full) {
                    violations.push(violation);
                    break;
                }
                // A required field we removed: put back a placeholder of whatever
                // type lets deserialization go on; its value is never reported.
                if !fill_placeholder(&mut json, error.path(), field) {
                    break;
                }
                continue;
            }
            Problem::UnknownField { suggestion, .. } => {
                if let (Some(s), Some((parent, _))) = (suggestion, violation.path.rsplit_once('.'))
                {
                    explained.push(join(parent, s));
                }
            }
            Problem::WrongType(_) | Problem::UnknownVariant { .. } => {
                explained.push(violation.path.clone())
            }
            _ => {}
        }
        let removed = remove_at(&mut json, error.path(), &violation);
        violations.push(violation);
        if !removed {
            break;
        }
    }
    (None, violations, explained)
}

/// Inserts `field` into the map at `path` with the first placeholder value that
/// deserializes there; false if none does.
fn fill_placeholder(
    json: &mut serde_json::Value,
    path: &serde_path_to_error::Path,
    field: &str,
) -> bool {
    use serde_json::json;
    for candidate in [json!(1), json!("1s"), json!(true), json!([]), json!({})] {
        let mut attempt = json.clone();
        let Some(serde_json::Value::Object(map)) = value_at(&mut attempt, path.iter()) else {
            return false;
        };
        map.insert(field.to_owned(), candidate);
        let same_field_fails = match serde_path_to_error::deserialize::<_, TrafficPolicySpec>(
            &attempt,
        ) {
            Ok(_) => false,
            Err(e) => {
                e.path().to_string() == join(&path.to_string(), field)
                    || matches!(violation_from_serde(&e).problem, Problem::MissingField { field: ref f } if f == field)
            }
        };
        if !same_field_fails {
            *json = attempt;
            return true;
        }
    }
    false
}

fn value_at<'a, 'p>(
    json: &'a mut serde_json::Value,
    segments: impl Iterator<Item = &'p serde_path_to_error::Segment>,
) -> Option<&'a mut serde_json::Value> {
    use serde_path_to_error::Segment;
    let mut at = json;
    for segment in segments {
        at = match (segment, at) {
            (Segment::Map { key }, serde_json::Value::Object(m)) => m.get_mut(key)?,
            (Segment::Seq { index }, serde_json::Value::Array(a)) => a.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Removes the map entry named by `path` (or, for an unknown field, by the field in
/// the error); false when the path does not end in a map key.
fn remove_at(
    json: &mut serde_json::Value,
    path: &serde_path_to_error::Path,
    violation: &Violation,
) -> bool {
    use serde_path_to_error::Segment;
    let mut segments: Vec<Segment> = path.iter().cloned().collect();
    if let Problem::UnknownField { field, .. } = &violation.problem {
        if !matches!(segments.last(), Some(Segment::Map { key }) if key == field) {
            segments.push(Segment::Map { key: field.clone() });
        }
    }
    let Some((Segment::Map { key }, parents)) = segments.split_last() else {
        return false;
    };
    match value_at(json, parents.iter()) {
        Some(serde_json::Value::Object(m)) => m.remove(key).is_some(),
        _ => false,
    }
}

/// Turns serde's error (a path and a sentence) into a violation a person can act on.
fn violation_from_serde(e: &serde_path_to_error::Error<serde_json::Error>) -> Violation {
    let path = match e.path().to_string() {
        p if p == "." => String::new(),
        p => p,
    };
    let message = e.inner().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = split_expected(rest);
        let suggestion = did_you_mean(&field, expected.iter().map(String::as_str));
        let path = join(&path, &field);
        return Violation {
            path,
            problem: Problem::UnknownField {
                field,
                suggestion,
                expected,
            },
            at_key: true,
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (got, expected) = split_expected(rest);
        let suggestion = did_you_mean(&got, expected.iter().map(String::as_str));
        return Violation::new(
            path,
            Problem::UnknownVariant {
                got,
                suggestion,
                expected,
            },
        );
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`').to_owned();
        return Violation::new(path, Problem::MissingField { field });
    }
    // serde names Rust types ("i64", "struct RouteSpec"); say what YAML was expected.
    let message = message
        .replace(" i64", " an integer")
        .replace(" f64", " a number");
    let message = match message.split_once("expected struct ") {
        Some((head, _)) if path.is_empty() => {
            format!("{head}expected a TrafficPolicy document (apiVersion, kind, metadata, spec)")
        }
        Some((head, _)) => format!("{head}expected a mapping"),
        None => message,
    };
    Violation::new(path, Problem::WrongType(message))
}

/// "`name`, expected one of `a`, `b`" -> ("name", ["a", "b"]).
fn split_expected(rest: &str) -> (String, Vec<String>) {
    let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
    let expected = tail
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    (name.to_owned(), expected)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() || path.ends_with(field) {
        if path.is_empty() {
            field.to_owned()
        } else {
            path.to_owned()
        }
    } else {
        format!("{path}.{field}")
    }
}

/// Rules spanning policies: names unique, each host governed by one policy.
fn check_across(loaded: &[Loaded], errors: &mut Vec<PolicyError>) {
    let mut names: HashMap<PolicyId, &Loaded> = HashMap::new();
    let mut hosts: HashMap<&str, &Loaded> = HashMap::new();
    for l in loaded {
        let at = |path: String, problem: Problem| {
            let p = l.index.value(&path);
            PolicyError {
                file: l.file.clone(),
                line: p.line,
                column: p.column,
                path,
                problem,
            }
        };
        if let Some(first) = names.insert(l.policy.id(), l) {
            let where_first = first.index.value("metadata.name");
            errors.push(at(
                "metadata.name".into(),
                Problem::Duplicate {
                    what: "policy name",
                    name: l.policy.id().to_string(),
                    first: format!(
                        "at {}:{}:{}",
                        first.file.display(),
                        where_first.line,
                        where_first.column
                    ),
                },
            ));
            names.insert(first.policy.id(), first);
        }
        for (i, host) in l.policy.hosts.iter().enumerate() {
            match hosts.get(host.as_str()) {
                Some(owner) if owner.policy.id() != l.policy.id() => errors.push(at(
                    format!("spec.hosts[{i}]"),
                    Problem::HostClaimed {
                        host: host.clone(),
                        policy: owner.policy.id().to_string(),
                    },
                )),
                _ => {
                    hosts.insert(host, l);
                }
            }
        }
    }
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, Problem> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Problem::Invalid(format!("cannot read policy path: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| Problem::Invalid(format!("cannot list policy directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| Problem::Invalid(format!("cannot list policy directory: {e}")))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Kubernetes ConfigMap mounts hold `..data` and `..2024_...` entries next to the
        // user-visible symlinks; only the visible names are policies.
        if name.starts_with('.') {
            continue;
        }
        let p = entry.path();
        if (name.ends_with(".yaml") || name.ends_with(".yml")) && p.is_file() {
            files.push(p);
        }
    }
    if files.len() > MAX_FILES {
        return Err(Problem::TooLarge {
            max: format!("{MAX_FILES} policy files"),
            got: files.len().to_string(),
        });
    }
    files.sort();
    Ok(files)
}

fn read_bounded(file: &Path) -> Result<String, Problem> {
    let meta =
        std::fs::metadata(file).map_err(|e| Problem::Invalid(format!("cannot read file: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(Problem::TooLarge {
            max: format!("{MAX_FILE_BYTES} bytes"),
            got: format!("{} bytes", meta.len()),
        });
    }
    let bytes =
        std::fs::read(file).map_err(|e| Problem::Invalid(format!("cannot read file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        Problem::Invalid(format!(
            "not UTF-8 text (invalid byte at offset {}): is this a policy file?",
            e.utf8_error().valid_up_to()
        ))
    })
}
