//! Egress: what may leave a machine, the secrets the gateway swaps in on the
//! way out, and the audit log of what did. Also the gateway's admin protocol,
//! spoken by the daemon over a unix socket no machine can reach.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a machine may connect, through the egress gateway. Nothing else is
/// reachable (deny by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// Destinations: `host` (exact), `*.suffix` (any subdomain), an IP
    /// address or CIDR (`10.1.0.0/16`), each with an optional `:port`
    /// (IPv6 in brackets: `[::1]:443`). Loopback, private and link-local
    /// addresses are reachable only through a rule that names them as
    /// addresses.
    pub allow: Vec<String>,
}

impl EgressPolicy {
    /// Checks every rule; the error names the bad one and the syntax.
    pub fn validate(&self) -> Result<(), String> {
        if self.allow.len() > 1000 {
            return Err("an egress policy may have at most 1000 rules".into());
        }
        self.allow.iter().try_for_each(|r| Rule::parse(r).map(drop))
    }

    /// The first rule that allows `host:port`, if any.
    pub fn allowing(&self, host: &str, port: u16) -> Option<&str> {
        self.allow
            .iter()
            .find(|r| Rule::parse(r).is_ok_and(|rule| rule.matches_host(host, port)))
            .map(String::as_str)
    }

    /// Whether a rule names `ip` as an address (or a CIDR holding it) with `port`.
    pub fn names_address(&self, ip: IpAddr, port: u16) -> bool {
        self.allow
            .iter()
            .any(|r| Rule::parse(r).is_ok_and(|rule| rule.covers_address(ip, port)))
    }
}

/// One destination rule of a policy or of a secret's `allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    /// `None`: any port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A lowercase host name without a trailing dot.
    Exact(String),
    /// `*.suffix`: any name ending in `.suffix` (not `suffix` itself).
    Suffix(String),
    /// An address range (a single address has the full prefix length).
    Network { addr: IpAddr, prefix: u8 },
}

impl Rule {
    pub fn parse(rule: &str) -> Result<Rule, String> {
        let bad = |why: &str| {
            Err(format!(
                "invalid egress rule {rule:?}: {why}. Use host, *.suffix, an IP address or CIDR, \
                 each with an optional :port (e.g. \"pypi.org\", \"*.github.com:443\", \"10.0.0.0/8\", \"[::1]:8080\")"
            ))
        };
        let (host, port) = if let Some(rest) = rule.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return bad("unclosed '['");
            };
            match after {
                "" => (inside, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (inside, Some(p)),
                    None => return bad("text after ']'"),
                },
            }
        } else if rule.matches(':').count() == 1 {
            let (h, p) = rule.split_once(':').expect("one colon");
            (h, Some(p))
        } else {
            (rule, None)
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return bad("the port must be 1-65535"),
            },
        };
        if let Some((addr, prefix)) = host.split_once('/') {
            let (Ok(addr), Ok(prefix)) = (addr.parse::<IpAddr>(), prefix.parse::<u8>()) else {
                return bad("a CIDR is ADDRESS/PREFIX");
            };
            if prefix > max_prefix(addr) {
                return bad("the prefix is longer than the address");
            }
            return Ok(Rule {
                target: Target::Network { addr, prefix },
                port,
            });
        }
        if let Ok(addr) = host.parse::<IpAddr>() {
            let prefix = max_prefix(addr);
            return Ok(Rule {
                target: Target::Network { addr, prefix },
                port,
            });
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let (suffix, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return bad("not a host name");
        }
        let target = if suffix {
            Target::Suffix(name.to_owned())
        } else {
            Target::Exact(name.to_owned())
        };
        Ok(Rule { target, port })
    }

    /// Whether a request for `host:port` (a name or an address literal, as
    /// the client asked for it) matches this rule.
    pub fn matches_host(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match &self.target {
            Target::Exact(name) => *name == host,
            Target::Suffix(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            Target::Network { .. } => host.parse().is_ok_and(|ip| self.covers_address(ip, port)),
        }
    }

    /// Whether this rule names the address `ip` (with `port`) explicitly.
    pub fn covers_address(&self, ip: IpAddr, port: u16) -> bool {
        let Target::Network { addr, prefix } = self.target else {
            return false;
        };
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let ip = canonical(ip);
        match (canonical(addr), ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry, so
/// `::ffff:127.0.0.1` can't slip past a check for `127.0.0.1`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether an address is outside the public internet: loopback, private,
/// link-local, shared (CGNAT), unique-local, unspecified, multicast or
/// documentation ranges. The gateway reaches those only where a policy rule
/// names the address.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0xdb8)
                || (s[0] == 0x64 && s[1] == 0xff9b)
        }
    }
}

/// Where in a request a secret's placeholder may be replaced by its value.
/// Headers always; the URL and the body only where the secret says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecretPlacement {
    Header,
    Url,
    Body,
}

/// A header the gateway sets on every request to the secret's hosts, from
/// machines holding the secret, whether or not the request carries the
/// placeholder (as Fly's tokenizer does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretInjection {
    /// e.g. `Authorization`.
    pub header: String,
    /// The header's value, with `{value}` where the secret goes; `Bearer
    /// {value}` if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// `POST /v1/apps/{app}/secrets`; `PUT …/secrets/{name}` rotates (replaces
/// value and bindings; machines keep their placeholders).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecretRequest {
    /// Also the environment variable that holds the placeholder in a machine:
    /// letters, digits and `_`, not starting with a digit.
    #[serde(default)]
    pub name: String,
    /// The real value. Sealed to the gateway's key at once; never returned.
    pub value: String,
    /// Hosts (egress rule syntax) where the placeholder may be swapped for
    /// the value. At least one.
    pub allowed_hosts: Vec<String>,
    /// Where besides headers the value may be placed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_in: Vec<SecretPlacement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<SecretInjection>,
}

impl CreateSecretRequest {
    pub fn validate(&self) -> Result<(), String> {
        validate_secret_name(&self.name)?;
        if self.value.is_empty() || self.value.len() > 64 * 1024 {
            return Err("a secret's value must be 1 byte to 64 KiB".into());
        }
        if self.value.contains(['\r', '\n', '\0']) {
            return Err("a secret's value must not contain CR, LF or NUL: it goes into HTTP headers".into());
        }
        if self.allowed_hosts.is_empty() {
            return Err(format!(
                "secret {}: allowed_hosts is empty; list the hosts it is for (e.g. [\"api.github.com\"])",
                self.name
            ));
        }
        for h in &self.allowed_hosts {
            Rule::parse(h).map_err(|e| format!("allowed_hosts: {e}"))?;
        }
        if let Some(inject) = &self.inject {
            let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if inject.header.is_empty() || !inject.header.bytes().all(token_char) {
                return Err(format!("inject.header {:?} is not an HTTP header name", inject.header));
            }
            if let Some(f) = &inject.format
                && (!f.contains("{value}") || f.contains(['\r', '\n', '\0']))
            {
                return Err("inject.format must contain {value} and no CR, LF or NUL".into());
            }
        }
        Ok(())
    }
}

pub fn validate_secret_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid secret name {name:?}: use letters, digits and '_', not starting with a digit \
             (it becomes the machine's environment variable, e.g. GITHUB_TOKEN)"
        ))
    }
}

/// A secret as the API shows it: never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct Secret {
    pub name: String,
    pub app: String,
    pub allowed_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_in: Vec<SecretPlacement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<SecretInjection>,
    /// Increases with each rotation.
    pub version: u32,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct SecretList {
    pub secrets: Vec<Secret>,
}

/// What is sealed to the gateway's key: the value with everything that
/// bounds its use, so that a ciphertext moved to another secret, app or set
/// of hosts in the database still only works where it was meant to.
#[derive(Clone, Serialize, Deserialize)]
pub struct SealedPayload {
    pub app: String,
    pub name: String,
    pub value: String,
    pub allowed_hosts: Vec<String>,
    #[serde(default)]
    pub allowed_in: Vec<SecretPlacement>,
    #[serde(default)]
    pub inject: Option<SecretInjection>,
}

impl std::fmt::Debug for SealedPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedPayload")
            .field("app", &self.app)
            .field("name", &self.name)
            .field("allowed_hosts", &self.allowed_hosts)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/egress/seal-key`: the key secrets are sealed to, for clients
/// that seal their own (as with Fly's tokenizer and its `Proxy-Tokenizer`
/// header).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct SealKey {
    /// X25519 public key, hex (tokenizer's `SEAL_KEY`). Seal with a NaCl
    /// sealed box (libsodium `crypto_box_seal`).
    pub seal_key: String,
}

/// How the gateway decided on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressOutcome {
    /// Sent upstream (`status` is the upstream's answer, 502 if it failed).
    Allowed,
    /// No rule allows the destination, or it is internal or the daemon's.
    Denied,
    /// A secret's placeholder was sent where that secret may not go.
    Exfiltration,
}

/// One entry of the egress audit log. Never holds a secret's value: URLs
/// are recorded as the machine sent them (with placeholders).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct EgressLogEntry {
    pub id: i64,
    /// RFC 3339, when the request arrived.
    pub time: String,
    pub machine_id: String,
    pub app: String,
    /// `GET`, …, or `CONNECT` for a tunnel that was refused or not TLS.
    pub method: String,
    /// `http` or `https`.
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// The path, without the query string.
    pub path: String,
    /// The upstream's status; the gateway's own (403, 502) when it answered.
    pub status: u16,
    pub outcome: EgressOutcome,
    /// Why a request was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy rule that allowed the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Names of the secrets swapped in (or attempted, on exfiltration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: f64,
}

/// `GET /v1/apps/{app}/egress-log`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EgressLogQuery {
    /// Only this machine's requests.
    #[serde(default)]
    pub machine: Option<String>,
    /// RFC 3339; entries at or after.
    #[serde(default)]
    pub since: Option<String>,
    /// RFC 3339; entries before.
    #[serde(default)]
    pub until: Option<String>,
    /// Newest first, at most this many (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct EgressLog {
    pub entries: Vec<EgressLogEntry>,
}

/// The gateway's admin protocol (a unix socket, daemon only).
pub mod gateway {
    use super::*;

    /// `GET /v1/info`.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Info {
        /// New for each run of the gateway: a change means it restarted and
        /// lost its machines, which the daemon then registers again.
        pub boot_id: String,
        /// X25519 public key secrets are sealed to (hex).
        pub seal_key: String,
        /// The CA machines trust for TLS through the gateway (PEM).
        pub ca_pem: String,
    }

    /// `PUT /v1/machines/{id}`: place (or update) a machine's listener and
    /// rules. Idempotent.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct MachineEgress {
        pub app: String,
        /// The sandbox this registration is for: an unregistration names
        /// it, so that a newer sandbox of the machine keeps its own.
        pub instance: String,
        /// The init process whose network namespace gets the listener; if
        /// `None` (gVisor, whose network stack is its own), the listener is
        /// the unix socket [`socket_path`], which the machine's init relays
        /// its 127.0.0.1:3128 to.
        pub pid: Option<u32>,
        pub policy: EgressPolicy,
        pub secrets: Vec<MachineSecret>,
    }

    /// A secret as one machine holds it.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct MachineSecret {
        pub name: String,
        pub placeholder: String,
        /// The sealed [`SealedPayload`], base64.
        pub sealed: String,
    }

    /// Where the gateway listens for a machine it can't enter: a directory
    /// per machine, so that the daemon can bind-mount it into the machine
    /// before the socket exists (and it survives a gateway restart).
    pub fn socket_dir(gateway_dir: &std::path::Path, machine_id: &str) -> std::path::PathBuf {
        gateway_dir.join("machines").join(machine_id)
    }

    pub const SOCKET_NAME: &str = "proxy.sock";

    /// `PUT /v1/machines`: the full set; machines not in it are dropped.
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct MachineSet {
        pub machines: std::collections::BTreeMap<String, MachineEgress>,
    }

    /// The gateway's error body, as the daemon's.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct AdminError {
        pub error: String,
    }
}

/// The port the gateway listens on inside every machine.
pub const PROXY_PORT: u16 = 3128;

/// Every placeholder starts with this, then 40 lowercase hex digits; the
/// gateway looks for it everywhere in outgoing requests.
pub const PLACEHOLDER_PREFIX: &str = "hangar_secret_";
pub const PLACEHOLDER_LEN: usize = PLACEHOLDER_PREFIX.len() + 40;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        let r = Rule::parse("*.Example.org:443").unwrap();
        assert!(r.matches_host("a.example.org", 443));
        assert!(r.matches_host("a.b.example.org.", 443));
        assert!(!r.matches_host("example.org", 443));
        assert!(!r.matches_host("badexample.org", 443));
        assert!(!r.matches_host("a.example.org", 80));

        let r = Rule::parse("deb.example").unwrap();
        assert!(r.matches_host("DEB.example", 80) && r.matches_host("deb.example", 8443));
        assert!(!r.matches_host("x.deb.example", 80));

        let r = Rule::parse("127.0.0.1:8443").unwrap();
        assert!(r.matches_host("127.0.0.1", 8443) && !r.matches_host("127.0.0.1", 8444));
        assert!(r.covers_address("::ffff:127.0.0.1".parse().unwrap(), 8443));
        assert!(!r.covers_address("127.0.0.2".parse().unwrap(), 8443));

        let r = Rule::parse("10.0.0.0/8").unwrap();
        assert!(r.covers_address("10.9.8.7".parse().unwrap(), 1));
        assert!(!r.covers_address("11.0.0.1".parse().unwrap(), 1));
        let r = Rule::parse("[::1]:80").unwrap();
        assert!(r.matches_host("[::1]", 80) && r.matches_host("::1", 80));
        assert!(
            Rule::parse("0.0.0.0/0")
                .unwrap()
                .covers_address("8.8.8.8".parse().unwrap(), 53)
        );

        for bad in [
            "",
            "a:b",
            "a:0",
            "*.",
            "a..b",
            "1.2.3.4/33",
            "[::1",
            "a b",
            "a:1:2x",
            "http://x",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
        // A name rule never names an address.
        assert!(
            !Rule::parse("localhost")
                .unwrap()
                .covers_address("127.0.0.1".parse().unwrap(), 80)
        );
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn secret_requests() {
        let mut r = CreateSecretRequest {
            name: "GITHUB_TOKEN".into(),
            value: "ghp_x".into(),
            allowed_hosts: vec!["api.github.com".into()],
            allowed_in: vec![],
            inject: None,
        };
        assert!(r.validate().is_ok());
        r.name = "1X".into();
        assert!(r.validate().is_err());
        r.name = "X".into();
        r.value = "a\nb".into();
        assert!(r.validate().is_err());
        r.value = "v".into();
        r.allowed_hosts.clear();
        assert!(r.validate().unwrap_err().contains("allowed_hosts"));
    }
}

/// Rules come from API callers: no string makes the parser panic, and what
/// it accepts it prints back as it parses again.
#[cfg(test)]
mod rule_properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_rule_parses_or_fails(rule in ".{0,80}") {
            let _ = Rule::parse(&rule);
        }

        #[test]
        fn hosts_and_ports_parse(host in "[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9-]{0,20}){0,3}", port in 1u16..) {
            let rule = format!("{host}:{port}");
            prop_assert!(Rule::parse(&rule).is_ok(), "{}", rule);
        }
    }
}
