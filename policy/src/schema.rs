//! The JSON Schema for editors, generated from the same `*Spec` types that parse
//! policies, so the schema cannot describe a format the parser does not accept.

use crate::spec::TrafficPolicySpec;

/// The schema as pretty JSON, as committed at `policies/schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(TrafficPolicySpec);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
