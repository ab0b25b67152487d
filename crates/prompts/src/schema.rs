//! Variables schemas: JSON Schema for a prompt's variables. Validation
//! reports every error with its JSON path; defaults declared in the schema
//! are filled in first, nested objects included.

use serde::Serialize;
use serde_json::{Map, Value};

/// Largest variables document accepted, in bytes of JSON.
pub const MAX_VARIABLES_BYTES: usize = 256 * 1024;

/// One problem with the variables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VariableError {
    /// JSON pointer into the variables (`/topic`, `/items/2/name`; `` for the root).
    pub path: String,
    pub message: String,
}

impl VariableError {
    pub(crate) fn missing(name: &str) -> Self {
        Self {
            path: format!("/{name}"),
            message: format!("{name} is used by the template but was not given and has no default"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("variables_schema is not a valid JSON Schema: {0}")]
    Invalid(String),
    #[error("variables_schema must describe an object (\"type\": \"object\")")]
    NotAnObject,
}

/// A compiled variables schema.
#[derive(Clone)]
pub struct VariablesSchema {
    schema: Value,
    validator: std::sync::Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for VariablesSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VariablesSchema")
            .field("schema", &self.schema)
            .finish()
    }
}

impl VariablesSchema {
    pub fn new(schema: Value) -> Result<Self, SchemaError> {
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(SchemaError::NotAnObject);
        }
        let validator =
            jsonschema::validator_for(&schema).map_err(|e| SchemaError::Invalid(e.to_string()))?;
        Ok(Self {
            schema,
            validator: std::sync::Arc::new(validator),
        })
    }

    pub fn as_json(&self) -> &Value {
        &self.schema
    }

    /// Whether `name` is one of the root `properties`.
    pub fn declares(&self, name: &str) -> bool {
        self.schema
            .get("properties")
            .and_then(|p| p.get(name))
            .is_some()
    }

    /// The variables with defaults filled in, or every error.
    pub fn validate(&self, variables: &Value) -> Result<Value, Vec<VariableError>> {
        let size = serde_json::to_vec(variables)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_VARIABLES_BYTES {
            return Err(vec![VariableError {
                path: String::new(),
                message: format!(
                    "the variables are {size} bytes; the limit is {MAX_VARIABLES_BYTES}"
                ),
            }]);
        }
        let mut filled = variables.clone();
        fill_defaults(&self.schema, &mut filled);
        let mut errors: Vec<VariableError> = self
            .validator
            .iter_errors(&filled)
            .map(|e| {
                let mut path = e.instance_path().to_string();
                // A missing property is reported where it belongs, not at its parent.
                if let jsonschema::error::ValidationErrorKind::Required {
                    property: Value::String(p),
                } = e.kind()
                {
                    path.push('/');
                    path.push_str(&p.replace('~', "~0").replace('/', "~1"));
                }
                VariableError {
                    path,
                    message: e.to_string(),
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(filled)
        } else {
            errors.sort_by(|a, b| a.path.cmp(&b.path).then(a.message.cmp(&b.message)));
            errors.dedup();
            Err(errors)
        }
    }
}

/// Inserts `default`s of missing properties, recursing into objects that
/// exist (or were just created from a default), and into array items.
fn fill_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(obj) => {
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (name, sub) in props {
                    if !obj.contains_key(name) {
                        if let Some(d) = sub.get("default") {
                            obj.insert(name.clone(), d.clone());
                        } else if sub.get("type").and_then(Value::as_str) == Some("object")
                            && has_nested_defaults(sub)
                        {
                            // An absent optional object whose fields have defaults stays absent.
                            continue;
                        }
                    }
                    if let Some(child) = obj.get_mut(name) {
                        fill_defaults(sub, child);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
                for item in items {
                    fill_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn has_nested_defaults(schema: &Value) -> bool {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .is_some_and(|p: &Map<String, Value>| {
            p.values()
                .any(|s| s.get("default").is_some() || has_nested_defaults(s))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> VariablesSchema {
        VariablesSchema::new(json!({
            "type": "object",
            "required": ["topic", "audience"],
            "additionalProperties": false,
            "properties": {
                "topic": {"type": "string", "minLength": 3, "maxLength": 50},
                "count": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
                "audience": {"type": "object", "required": ["level"], "properties": {
                    "level": {"enum": ["beginner", "expert"]},
                    "language": {"type": "string", "default": "en"}
                }},
                "tags": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "weight": {"type": "number", "default": 1}
                }}}
            }
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_filled_in_nested_objects_and_arrays() {
        let out = schema().validate(&json!({"topic": "rust", "audience": {"level": "expert"}, "tags": [{"name": "a"}, {"name": "b", "weight": 2}]})).unwrap();
        assert_eq!(
            out,
            json!({
                "topic": "rust", "count": 3,
                "audience": {"level": "expert", "language": "en"},
                "tags": [{"name": "a", "weight": 1}, {"name": "b", "weight": 2}]
            })
        );
    }

    #[test]
    fn a_missing_required_property_is_reported_at_its_own_path() {
        let errors = schema().validate(&json!({"audience": {}})).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/audience/level", "/topic"], "{errors:?}");
    }

    #[test]
    fn every_error_comes_with_its_path() {
        let errors = schema()
            .validate(&json!({"topic": "ab", "count": 50, "audience": {"level": "guru"}, "extra": true, "tags": [{"name": 5}]}))
            .unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"/topic"), "{errors:?}");
        assert!(paths.contains(&"/count"), "{errors:?}");
        assert!(paths.contains(&"/audience/level"), "{errors:?}");
        assert!(paths.contains(&"/tags/0/name"), "{errors:?}");
        assert!(
            paths.contains(&""),
            "additionalProperties is reported at the root: {errors:?}"
        );
        assert!(errors.len() >= 5);
        let missing = schema().validate(&json!({})).unwrap_err();
        assert!(
            missing.iter().any(|e| e.message.contains("topic"))
                && missing.iter().any(|e| e.message.contains("audience")),
            "{missing:?}"
        );
    }

    #[test]
    fn bad_schemas_and_oversized_variables_are_refused() {
        assert_eq!(
            VariablesSchema::new(json!({"type": "string"})).unwrap_err(),
            SchemaError::NotAnObject
        );
        assert!(matches!(
            VariablesSchema::new(
                json!({"type": "object", "properties": {"a": {"type": "nonsense"}}})
            ),
            Err(SchemaError::Invalid(_))
        ));
        assert!(matches!(
            VariablesSchema::new(
                json!({"type": "object", "properties": {"a": {"minLength": "three"}}})
            ),
            Err(SchemaError::Invalid(_))
        ));
        let big = json!({"topic": "x".repeat(MAX_VARIABLES_BYTES)});
        let errors = schema().validate(&big).unwrap_err();
        assert!(errors[0].message.contains("limit"), "{errors:?}");
    }
}
