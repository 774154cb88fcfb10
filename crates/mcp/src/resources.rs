//! Machines' logs and files as MCP resources:
//! `hangar://apps/{app}/machines/{machine_id}/logs` and
//! `hangar://apps/{app}/machines/{machine_id}/files/{path}`.

use base64::Engine as _;
use hangar_api::{AppList, Machine};
use rmcp::ErrorData;
use rmcp::model::{ReadResourceResult, Resource, ResourceContents, ResourceTemplate};

use crate::HangarMcp;
use crate::api::{ToolError, seg};

const SCHEME: &str = "hangar://apps/";
/// How much of a log a resource read returns: its end.
const LOG_TAIL: u64 = 256 * 1024;
/// How often a listening client's resource list is checked for changes.
pub const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What identifies a resource list, for change detection.
pub fn uris(resources: &[Resource]) -> Vec<String> {
    resources.iter().map(|r| r.uri.clone()).collect()
}

pub fn templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new(format!("{SCHEME}{{app}}/machines/{{machine_id}}/logs"), "machine-logs")
            .with_title("A machine's log")
            .with_description("The end (256 KiB) of what the machine's main process wrote to stdout and stderr.")
            .with_mime_type("text/plain"),
        ResourceTemplate::new(
            format!("{SCHEME}{{app}}/machines/{{machine_id}}/files/{{+path}}"),
            "machine-file",
        )
        .with_title("A file in a machine")
        .with_description("A file in a started machine, by absolute path (up to 4 MiB); text, or base64 when binary."),
    ]
}

fn logs_uri(app: &str, machine: &str) -> String {
    format!("{SCHEME}{}/machines/{}/logs", seg(app), seg(machine))
}

/// What a resource URI names.
#[derive(Debug, PartialEq)]
enum Target {
    Logs { app: String, machine: String },
    File { app: String, machine: String, path: String },
}

fn parse(uri: &str) -> Option<Target> {
    let rest = uri.strip_prefix(SCHEME)?;
    let (app, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("machines/")?;
    let (machine, rest) = rest.split_once('/')?;
    let (app, machine) = (decode(app)?, decode(machine)?);
    if app.is_empty() || machine.is_empty() {
        return None;
    }
    if rest == "logs" {
        return Some(Target::Logs { app, machine });
    }
    let path = rest.strip_prefix("files/")?;
    Some(Target::File {
        app,
        machine,
        path: format!("/{}", decode(path.trim_start_matches('/'))?),
    })
}

/// Undoes percent-encoding; `None` for a malformed escape or non-UTF-8.
fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn not_found(uri: &str, e: ToolError) -> ErrorData {
    ErrorData::resource_not_found(format!("{uri}: {e}"), None)
}

impl HangarMcp {
    /// One log resource per machine, in every app.
    pub(crate) async fn machine_logs(&self) -> Result<Vec<Resource>, ErrorData> {
        let internal = |e: ToolError| ErrorData::internal_error(e.message, None);
        let apps: AppList = self.api.get("/v1/apps".into()).await.map_err(internal)?;
        let mut out = Vec::new();
        for app in apps.apps {
            let machines: Vec<Machine> = self
                .api
                .get(format!("/v1/apps/{}/machines", seg(&app.name)))
                .await
                .map_err(internal)?;
            // The REST listing leaves destroyed machines out.
            for m in machines {
                out.push(
                    Resource::new(logs_uri(&app.name, &m.id), format!("{}/{} logs", app.name, m.name))
                        .with_description(format!("Log of machine {} ({}), now {}", m.name, m.id, m.state))
                        .with_mime_type("text/plain"),
                );
            }
        }
        Ok(out)
    }

    pub(crate) async fn read(&self, uri: &str) -> Result<ReadResourceResult, ErrorData> {
        let contents = match parse(uri) {
            Some(Target::Logs { app, machine }) => {
                let text = self
                    .logs(&app, &machine, LOG_TAIL)
                    .await
                    .map_err(|e| not_found(uri, e))?;
                ResourceContents::text(text, uri).with_mime_type("text/plain")
            }
            Some(Target::File { app, machine, path }) => {
                let bytes = self
                    .read_bytes(&app, &machine, &path)
                    .await
                    .map_err(|e| not_found(uri, e))?;
                match String::from_utf8(bytes) {
                    Ok(text) => ResourceContents::text(text, uri),
                    Err(e) => {
                        ResourceContents::blob(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()), uri)
                            .with_mime_type("application/octet-stream")
                    }
                }
            }
            None => {
                return Err(ErrorData::invalid_params(
                    format!("unknown resource {uri:?}: use {SCHEME}APP/machines/MACHINE/logs or …/files/PATH"),
                    None,
                ));
            }
        };
        Ok(ReadResourceResult::new(vec![contents]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let logs = Target::Logs {
            app: "default".into(),
            machine: "dev".into(),
        };
        assert_eq!(parse("hangar://apps/default/machines/dev/logs"), Some(logs));
        assert!(parse(&logs_uri("default", "dev")).is_some());
        let file = Target::File {
            app: "a".into(),
            machine: "m".into(),
            path: "/etc/my file".into(),
        };
        assert_eq!(parse("hangar://apps/a/machines/m/files/etc/my%20file"), Some(file));
        for bad in [
            "hangar://apps/a/machines/m",
            "hangar://apps//machines/m/logs",
            "hangar://apps/a/machines/m/other",
            "hangar://apps/a/machines/m/files/%zz",
            "file:///etc/hosts",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
