//! Tool schemas in the form most clients read. schemars writes an
//! `Option<T>` as `"type": [T, "null"]` (or `anyOf` with a null branch);
//! clients that map schemas onto a one-type dialect (Gemini's function
//! declarations, for one) reject or mangle that. For a property that may
//! be left out, "absent" already says what `null` would, so the null goes;
//! a required property that can be null keeps it. Rust's integer widths
//! (`"format": "uint32"`) are not JSON Schema formats, and validators warn
//! about each; the bounds (`minimum`) stay.

use serde_json::{Map, Value};

pub fn portable(mut schema: Map<String, Value>) -> Map<String, Value> {
    visit_object(&mut schema);
    schema
}

fn visit(v: &mut Value) {
    match v {
        Value::Object(o) => visit_object(o),
        Value::Array(a) => a.iter_mut().for_each(visit),
        _ => {}
    }
}

fn visit_object(o: &mut Map<String, Value>) {
    if o.get("format")
        .and_then(Value::as_str)
        .is_some_and(|f| f.starts_with("int") || f.starts_with("uint") || f == "float" || f == "double")
    {
        o.remove("format");
    }
    let required: Vec<String> = o
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if let Some(Value::Object(props)) = o.get_mut("properties") {
        for (name, prop) in props.iter_mut() {
            if !required.contains(name)
                && let Value::Object(p) = prop
            {
                drop_null(p);
            }
        }
    }
    o.values_mut().for_each(visit);
}

fn drop_null(p: &mut Map<String, Value>) {
    if let Some(Value::Array(types)) = p.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.pop().expect("one type");
            p.insert("type".into(), only);
        }
    }
    let Some(Value::Array(branches)) = p.get_mut("anyOf") else {
        return;
    };
    branches.retain(|b| b.get("type").and_then(Value::as_str) != Some("null"));
    if branches.len() == 1
        && let Some(Value::Object(only)) = branches.pop()
    {
        p.remove("anyOf");
        p.extend(only);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn optional_properties_lose_their_null_and_required_ones_keep_it() {
        let schema = json!({
            "type": "object",
            "required": ["exit_code"],
            "properties": {
                "exit_code": {"type": ["integer", "null"], "format": "int32"},
                "name": {"type": ["string", "null"], "description": "d"},
                "guest": {"anyOf": [{"$ref": "#/$defs/Guest"}, {"type": "null"}], "description": "g"},
            },
            "$defs": {"Guest": {"type": "object", "properties": {"kind": {"type": ["string", "null"]}}}},
        });
        let Value::Object(schema) = schema else { unreachable!() };
        let out = Value::Object(portable(schema));
        assert_eq!(out["properties"]["exit_code"], json!({"type": ["integer", "null"]}));
        assert_eq!(out["properties"]["name"], json!({"type": "string", "description": "d"}));
        assert_eq!(
            out["properties"]["guest"],
            json!({"$ref": "#/$defs/Guest", "description": "g"})
        );
        assert_eq!(out["$defs"]["Guest"]["properties"]["kind"]["type"], "string");
    }
}
