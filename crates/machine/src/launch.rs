//! What a machine runs: the image's process and environment with the
//! machine config's overrides applied (Docker's rules where they differ).

use hangar_api::MachineConfig;
use hangar_image::ImageConfig;

use crate::{Error, Result};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The main process of a machine, ready to hand to the sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<String>,
}

/// What egress adds to a machine's environment.
#[derive(Debug, Clone, Default)]
pub struct EgressEnv {
    /// Proxy and CA settings; the machine's config may override them.
    pub defaults: Vec<(String, String)>,
    /// One placeholder per secret; nothing overrides them.
    pub secrets: Vec<(String, String)>,
}

/// Combines image and machine config. Fails if nothing says what to run.
pub fn plan(
    machine_id: &str,
    app: &str,
    config: &MachineConfig,
    image: &ImageConfig,
    egress: &EgressEnv,
) -> Result<LaunchPlan> {
    let args = if let Some(exec) = &config.init.exec {
        exec.clone()
    } else {
        // As in Docker: overriding the entrypoint drops the image's Cmd.
        let (entrypoint, image_cmd) = match &config.init.entrypoint {
            Some(ep) => (ep.clone(), Vec::new()),
            None => (image.entrypoint.clone(), image.cmd.clone()),
        };
        let cmd = config.init.cmd.clone().unwrap_or(image_cmd);
        entrypoint.into_iter().chain(cmd).collect()
    };
    if args.is_empty() || args[0].is_empty() {
        return Err(Error::BadRequest(
            "the image has no Entrypoint or Cmd: set config.init.cmd (e.g. [\"sleep\", \"infinity\"])".into(),
        ));
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match env.iter_mut().find(|(key, _)| key == k) {
        Some(slot) => slot.1 = v.to_owned(),
        None => env.push((k.to_owned(), v.to_owned())),
    };
    set("PATH", DEFAULT_PATH);
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    set("HOSTNAME", machine_id);
    set("HANGAR_MACHINE_ID", machine_id);
    set("HANGAR_APP_NAME", app);
    for (k, v) in &egress.defaults {
        set(k, v);
    }
    for (k, v) in &config.env {
        set(k, v);
    }
    for (k, v) in &egress.secrets {
        set(k, v);
    }
    Ok(LaunchPlan {
        args,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: image
            .working_dir
            .clone()
            .filter(|d| d.starts_with('/'))
            .unwrap_or_else(|| "/".into()),
        user: config
            .init
            .user
            .clone()
            .or_else(|| image.user.clone())
            .filter(|u| !u.is_empty()),
    })
}

/// Checks the parts of a config that can be checked before the image is
/// known, so a bad request changes nothing.
pub fn validate(config: &MachineConfig) -> Result<()> {
    for key in config.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(Error::BadRequest(format!(
                "invalid environment variable name {key:?}: it must be non-empty and contain no '=' or NUL"
            )));
        }
    }
    if config.env.values().any(|v| v.contains('\0')) {
        return Err(Error::BadRequest("environment values must not contain NUL".into()));
    }
    if let Some(g) = &config.guest {
        if g.cpus == 0 || g.cpus > 64 {
            return Err(Error::BadRequest(format!("guest.cpus must be 1..=64, got {}", g.cpus)));
        }
        if !(16..=1 << 20).contains(&g.memory_mb) {
            return Err(Error::BadRequest(format!(
                "guest.memory_mb must be 16..=1048576, got {}",
                g.memory_mb
            )));
        }
        if let Some(gb) = g.disk_gb
            && !(1..=1 << 16).contains(&gb)
        {
            return Err(Error::BadRequest(format!("guest.disk_gb must be 1..=65536, got {gb}")));
        }
    }
    for f in &config.files {
        hangar_rootfs::confined::components(&f.guest_path)?;
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&f.raw_value)
            .map_err(|e| {
                Error::BadRequest(format!(
                    "files: raw_value for {} is not valid base64: {e}",
                    f.guest_path
                ))
            })?;
        if f.mode.is_some_and(|m| m > 0o7777) {
            return Err(Error::BadRequest(format!(
                "files: mode for {} must be at most 0o7777",
                f.guest_path
            )));
        }
    }
    let argv_ok = |v: &Option<Vec<String>>| v.as_ref().is_none_or(|a| a.iter().all(|s| !s.contains('\0')));
    if !(argv_ok(&config.init.cmd) && argv_ok(&config.init.entrypoint) && argv_ok(&config.init.exec)) {
        return Err(Error::BadRequest("init commands must not contain NUL".into()));
    }
    for (i, service) in config.services.iter().enumerate() {
        if service.internal_port == 0 || service.ports.iter().any(|p| p.port == 0) {
            return Err(Error::BadRequest(format!("services[{i}]: ports must be 1..=65535")));
        }
        if let Some(c) = &service.concurrency {
            let (soft, hard) = (c.soft_limit.unwrap_or(1), c.hard_limit.unwrap_or(u32::MAX));
            if soft == 0 || hard == 0 || soft > hard {
                return Err(Error::BadRequest(format!(
                    "services[{i}].concurrency: limits must be at least 1, and soft_limit at most hard_limit"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_env_precedence() {
        let mut c = MachineConfig::default();
        c.env.insert("HTTP_PROXY".into(), "http://mine:1".into());
        c.env.insert("TOKEN".into(), "from-config".into());
        let egress = EgressEnv {
            defaults: vec![("HTTP_PROXY".into(), "http://127.0.0.1:3128".into())],
            secrets: vec![("TOKEN".into(), "placeholder".into())],
        };
        let p = plan("m1", "a", &c, &image(), &egress).unwrap();
        assert!(
            p.env.contains(&"HTTP_PROXY=http://mine:1".to_owned()),
            "the config overrides proxy defaults"
        );
        assert!(
            p.env.contains(&"TOKEN=placeholder".to_owned()),
            "nothing overrides a secret's placeholder"
        );
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            env: vec!["PATH=/opt/bin".into(), "A=1".into()],
            working_dir: Some("/app".into()),
            user: Some("app".into()),
            ..Default::default()
        }
    }

    #[test]
    fn image_defaults_and_overrides() {
        let mut c = MachineConfig::default();
        let p = plan("m1", "a", &c, &image(), &Default::default()).unwrap();
        assert_eq!(p.args, ["/entry", "serve"]);
        assert_eq!(p.cwd, "/app");
        assert_eq!(p.user.as_deref(), Some("app"));
        assert!(p.env.contains(&"PATH=/opt/bin".to_owned()));

        c.init.cmd = Some(vec!["x".into()]);
        assert_eq!(
            plan("m1", "a", &c, &image(), &Default::default()).unwrap().args,
            ["/entry", "x"]
        );
        c.init.cmd = None;
        c.init.entrypoint = Some(vec!["/bin/sh".into()]);
        assert_eq!(
            plan("m1", "a", &c, &image(), &Default::default()).unwrap().args,
            ["/bin/sh"]
        );
        c.init.exec = Some(vec!["/bin/true".into()]);
        assert_eq!(
            plan("m1", "a", &c, &image(), &Default::default()).unwrap().args,
            ["/bin/true"]
        );
        c.env.insert("A".into(), "2".into());
        let env = plan("m1", "a", &c, &image(), &Default::default()).unwrap().env;
        assert!(env.contains(&"A=2".to_owned()) && !env.contains(&"A=1".to_owned()));
    }

    #[test]
    fn nothing_to_run_is_a_bad_request() {
        let err = plan(
            "m",
            "a",
            &MachineConfig::default(),
            &ImageConfig::default(),
            &Default::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::BadRequest(_)));
    }

    #[test]
    fn validation() {
        let mut c = MachineConfig::default();
        c.env.insert("A=B".into(), "x".into());
        assert!(validate(&c).is_err());
        let mut c = MachineConfig::default();
        c.files.push(hangar_api::MachineFile {
            guest_path: "/etc/../x".into(),
            raw_value: "aGk=".into(),
            mode: None,
        });
        assert!(validate(&c).is_err());
        c.files[0].guest_path = "/etc/x".into();
        assert!(validate(&c).is_ok());
        c.files[0].raw_value = "!!".into();
        assert!(validate(&c).is_err());
    }
}
