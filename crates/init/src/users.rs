//! Resolving user specs through the machine's own `/etc/passwd` and
//! `/etc/group`.
//!
//! We parse the files ourselves: NSS (`getpwnam`) does not work in a static
//! binary, and the image's files are the only database that matters here.

use std::fs;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (including the primary group, as `initgroups`
    /// does).
    pub groups: Vec<u32>,
    /// Home directory from `/etc/passwd`, used as `HOME` when the
    /// environment has none.
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Parses `/etc/passwd` text; malformed lines are skipped, as libc does.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// Parses `/etc/group` text; malformed lines are skipped.
fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn numeric(s: &str) -> Option<u32> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Resolves `uid`, `uid:gid`, `name` or `name:group` against the given
/// passwd and group file contents.
///
/// Follows runc's rules: a numeric uid need not exist in passwd (its group
/// is then 0 and it has no home); a name must exist; the supplementary groups
/// are the groups that list the user's name as a member.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Credentials, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(format!(
            "invalid user {spec:?}: expected uid, uid:gid, name or name:group"
        ));
    }
    let users = parse_passwd(passwd);
    let groups = parse_group(group);

    let (uid, entry) = match numeric(user_part) {
        Some(uid) => (uid, users.iter().find(|u| u.uid == uid)),
        None => {
            let e = users
                .iter()
                .find(|u| u.name == user_part)
                .ok_or_else(|| format!("unknown user {user_part:?}: no such entry in /etc/passwd"))?;
            (e.uid, Some(e))
        }
    };
    let gid = match group_part {
        None => entry.map_or(0, |e| e.gid),
        Some(g) => match numeric(g) {
            Some(gid) => gid,
            None => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| format!("unknown group {g:?}: no such entry in /etc/group"))?
                    .gid
            }
        },
    };
    let mut supplementary = vec![gid];
    if let Some(e) = entry {
        for g in groups.iter().filter(|g| g.members.contains(&e.name)) {
            if !supplementary.contains(&g.gid) {
                supplementary.push(g.gid);
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|e| e.home.clone()),
    })
}

/// Resolves `spec` against the `/etc/passwd` and `/etc/group` of the
/// filesystem we run in. A missing file counts as empty, so numeric ids
/// still work in images without one.
pub fn resolve_system(spec: &str) -> Result<Credentials, String> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    resolve(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line
bad:x:notanumber:1::/:/bin/sh
robot:x:1000:1000:Robot,,,:/home/robot:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
";
    const GROUP: &str = "\
root:x:0:
wheel:x:10:robot,admin
docker:x:998: admin , robot
robot:x:1000:
nogroup:x:65534:
weird:x:
";

    fn ok(spec: &str) -> Credentials {
        resolve(spec, PASSWD, GROUP).unwrap()
    }

    #[test]
    fn parses_and_skips_malformed_lines() {
        let users = parse_passwd(PASSWD);
        assert_eq!(
            users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            ["root", "daemon", "robot", "nobody"]
        );
        let groups = parse_group(GROUP);
        assert_eq!(groups.len(), 5);
        assert_eq!(groups[2].members, ["admin", "robot"]);
        assert!(groups[0].members.is_empty());
    }

    #[test]
    fn by_name() {
        assert_eq!(
            ok("robot"),
            Credentials {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 10, 998],
                home: Some("/home/robot".into())
            }
        );
        assert_eq!(
            ok("root"),
            Credentials {
                uid: 0,
                gid: 0,
                groups: vec![0],
                home: Some("/root".into())
            }
        );
    }

    #[test]
    fn numeric_uid_with_and_without_entry() {
        assert_eq!(ok("1000").home.as_deref(), Some("/home/robot"));
        assert_eq!(ok("1000").groups, vec![1000, 10, 998]);
        assert_eq!(
            ok("4242"),
            Credentials {
                uid: 4242,
                gid: 0,
                groups: vec![0],
                home: None
            }
        );
    }

    #[test]
    fn explicit_group() {
        let c = ok("robot:docker");
        assert_eq!((c.uid, c.gid), (1000, 998));
        assert_eq!(c.groups, vec![998, 10]);
        let c = ok("4242:4343");
        assert_eq!((c.uid, c.gid, c.groups), (4242, 4343, vec![4343]));
        let c = ok("nobody:0");
        assert_eq!((c.uid, c.gid), (65534, 0));
    }

    #[test]
    fn errors() {
        assert!(
            resolve("ghost", PASSWD, GROUP)
                .unwrap_err()
                .contains("unknown user \"ghost\"")
        );
        assert!(
            resolve("robot:ghosts", PASSWD, GROUP)
                .unwrap_err()
                .contains("unknown group \"ghosts\"")
        );
        assert!(resolve("", PASSWD, GROUP).is_err());
        assert!(resolve(":0", PASSWD, GROUP).is_err());
        assert!(resolve("robot:", PASSWD, GROUP).is_err());
        // "bad" has a malformed uid and so does not exist.
        assert!(resolve("bad", PASSWD, GROUP).is_err());
        // Digits that overflow a u32 are a name, and no such name exists.
        assert!(resolve("99999999999", PASSWD, GROUP).is_err());
    }

    #[test]
    fn empty_files() {
        assert_eq!(
            resolve("7:8", "", "").unwrap(),
            Credentials {
                uid: 7,
                gid: 8,
                groups: vec![8],
                home: None
            }
        );
        assert!(resolve("robot", "", "").is_err());
    }
}
