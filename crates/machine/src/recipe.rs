//! The build recipe: what was done to a machine through the API, step by
//! step (commands run through exec, files written through the files API),
//! so that an exported image comes with a Dockerfile that says how it was
//! made, the record incremental builds usually lack.
//!
//! Steps are appended to `machines/<id>/steps.jsonl`, one JSON line each,
//! without an fsync: exec is the hot path, and a step lost to a power cut
//! costs a line of a recipe, nothing more. A checkpoint records how many
//! steps it includes; a rollback cuts the file back to that, and a fork
//! starts with its parent's steps.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::{Manager, now_ms, rfc3339};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Step {
    Exec {
        at_ms: i64,
        command: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    Wrote {
        at_ms: i64,
        path: String,
    },
}

impl Step {
    pub fn exec(command: &[String], cwd: Option<&str>, user: Option<&str>) -> Step {
        Step::Exec {
            at_ms: now_ms(),
            command: command.to_vec(),
            cwd: cwd.map(str::to_owned),
            user: user.map(str::to_owned),
        }
    }

    pub fn wrote(path: &str) -> Step {
        Step::Wrote {
            at_ms: now_ms(),
            path: path.to_owned(),
        }
    }
}

impl Manager {
    fn steps_path(&self, machine: &str) -> PathBuf {
        self.paths(machine).dir.join("steps.jsonl")
    }

    /// Appends a step. Best effort (see the module docs).
    pub(crate) fn record_step(&self, machine: &str, step: &Step) {
        let mut line = serde_json::to_vec(step).expect("a step serializes");
        line.push(b'\n');
        let appended = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.steps_path(machine))
            .and_then(|mut f| f.write_all(&line));
        if let Err(e) = appended {
            tracing::warn!(machine, "recording a step of the build recipe: {e}");
        }
    }

    /// The machine's steps, the first `limit` of them if given.
    pub(crate) fn steps(&self, machine: &str, limit: Option<u64>) -> Vec<Step> {
        let text = fs::read_to_string(self.steps_path(machine)).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .take(limit.map_or(usize::MAX, |n| n as usize))
            .collect()
    }

    /// Keeps only the first `count` steps (after a rollback), or gives
    /// machine `to` the first `count` steps of `from` (a fork).
    pub(crate) fn keep_steps(&self, from: &str, to: &str, count: Option<u64>) {
        let steps = self.steps(from, count);
        let mut text = Vec::new();
        for s in &steps {
            text.extend(serde_json::to_vec(s).expect("a step serializes"));
            text.push(b'\n');
        }
        if let Err(e) = crate::sandbox::write_atomic(&self.steps_path(to), &text) {
            tracing::warn!(machine = to, "writing the build recipe's steps: {e}");
        }
    }

    /// How many steps the machine has taken.
    pub(crate) fn step_count(&self, machine: &str) -> u64 {
        self.steps(machine, None).len() as u64
    }
}

/// A Dockerfile that rebuilds what `steps` did on top of `base`.
pub(crate) fn dockerfile(base: &str, what: &str, steps: &[Step]) -> String {
    let mut out = format!(
        "# What {what} became, as recorded by Hangar: every command run through\n\
         # exec, in order. Files written through the files API are noted; their\n\
         # contents are in the image, not here.\n\
         FROM {base}\n"
    );
    let (mut cwd, mut user): (Option<&str>, Option<&str>) = (None, None);
    for step in steps {
        match step {
            Step::Exec {
                at_ms,
                command,
                cwd: c,
                user: u,
            } => {
                if c.as_deref() != cwd {
                    out.push_str(&format!("WORKDIR {}\n", c.as_deref().unwrap_or("/")));
                    cwd = c.as_deref();
                }
                if u.as_deref() != user {
                    out.push_str(&format!("USER {}\n", u.as_deref().unwrap_or("root")));
                    user = u.as_deref();
                }
                // The exec form (a JSON array): the exact argv, no shell.
                let argv = serde_json::to_string(command).expect("strings serialize");
                out.push_str(&format!("# {}\nRUN {argv}\n", rfc3339(*at_ms)));
            }
            Step::Wrote { at_ms, path } => {
                out.push_str(&format!("# {}: wrote {path} through the files API\n", rfc3339(*at_ms)));
            }
        }
    }
    out
}
