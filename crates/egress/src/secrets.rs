//! Sealed secrets and their placeholders: opening what the daemon sealed,
//! and swapping placeholders for values only where each secret may go.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hangar_api::egress::gateway::MachineSecret;
use hangar_api::egress::{PLACEHOLDER_LEN, PLACEHOLDER_PREFIX, Rule, SealedPayload, SecretInjection, SecretPlacement};
use zeroize::Zeroizing;

/// A secret opened for one machine. The value lives only here, in the
/// gateway's memory, and is wiped when the machine's rules are replaced.
pub struct OpenSecret {
    pub name: String,
    value: Zeroizing<String>,
    hosts: Vec<Rule>,
    /// `hosts` as the secret's owner wrote them, for error messages.
    hosts_shown: String,
    allowed_in: Vec<SecretPlacement>,
    inject: Option<SecretInjection>,
}

impl std::fmt::Debug for OpenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSecret")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl OpenSecret {
    pub fn allows_host(&self, host: &str, port: u16) -> bool {
        self.hosts.iter().any(|r| r.matches_host(host, port))
    }

    fn allows_in(&self, place: SecretPlacement) -> bool {
        place == SecretPlacement::Header || self.allowed_in.contains(&place)
    }
}

/// One machine's secrets, by placeholder.
#[derive(Debug, Default)]
pub struct Secrets {
    by_placeholder: HashMap<String, Arc<OpenSecret>>,
}

/// Opens sealed secrets with the gateway's key. A payload sealed for
/// another app or under another name is refused.
pub fn open(key: &crypto_box::SecretKey, app: &str, list: &[MachineSecret]) -> Result<Secrets, String> {
    let mut by_placeholder = HashMap::new();
    for s in list {
        if !is_placeholder(s.placeholder.as_bytes()) {
            return Err(format!("secret {}: malformed placeholder", s.name));
        }
        let sealed = B64
            .decode(&s.sealed)
            .map_err(|e| format!("secret {}: sealed value is not base64: {e}", s.name))?;
        let plain = Zeroizing::new(
            key.unseal(&sealed)
                .map_err(|_| format!("secret {}: cannot open it with this gateway's key", s.name))?,
        );
        let payload: SealedPayload =
            serde_json::from_slice(&plain).map_err(|e| format!("secret {}: bad sealed payload: {e}", s.name))?;
        if payload.app != app || payload.name != s.name {
            return Err(format!(
                "secret {}: sealed for {}/{}, not for this machine's app {app}",
                s.name, payload.app, payload.name
            ));
        }
        let hosts = payload
            .allowed_hosts
            .iter()
            .map(|h| Rule::parse(h))
            .collect::<Result<_, _>>()?;
        let open = OpenSecret {
            name: payload.name.clone(),
            value: Zeroizing::new(payload.value.clone()),
            hosts,
            hosts_shown: payload.allowed_hosts.join(", "),
            allowed_in: payload.allowed_in.clone(),
            inject: payload.inject.clone(),
        };
        drop(Zeroizing::new(payload.value));
        by_placeholder.insert(s.placeholder.clone(), Arc::new(open));
    }
    Ok(Secrets { by_placeholder })
}

fn is_placeholder(s: &[u8]) -> bool {
    s.len() == PLACEHOLDER_LEN
        && s.starts_with(PLACEHOLDER_PREFIX.as_bytes())
        && s[PLACEHOLDER_PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Whether `text` holds anything shaped like a placeholder.
pub fn has_placeholder(text: &[u8]) -> bool {
    placeholders(text).next().is_some()
}

/// Positions of everything shaped like a placeholder in `text`.
fn placeholders(text: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let prefix = PLACEHOLDER_PREFIX.as_bytes();
    let mut from = 0;
    std::iter::from_fn(move || {
        while from + PLACEHOLDER_LEN <= text.len() {
            let at = from + text[from..].windows(prefix.len()).position(|w| w == prefix)?;
            from = at + 1;
            if at + PLACEHOLDER_LEN <= text.len() && is_placeholder(&text[at..at + PLACEHOLDER_LEN]) {
                from = at + PLACEHOLDER_LEN;
                return Some(at);
            }
        }
        None
    })
}

/// Why a request may not go out as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A placeholder was sent where its secret may not go (or one that no
    /// secret of this machine has).
    Exfiltration { secret: Option<String>, reason: String },
    /// The secret may go to this host, but not in this part of the request.
    Placement { secret: String, reason: String },
}

/// Swaps placeholders for one request to `host:port`, remembering which
/// secrets it used.
pub struct Substitution<'a> {
    secrets: &'a Secrets,
    host: &'a str,
    port: u16,
    pub used: BTreeSet<String>,
}

impl<'a> Substitution<'a> {
    pub fn new(secrets: &'a Secrets, host: &'a str, port: u16) -> Self {
        Substitution {
            secrets,
            host,
            port,
            used: BTreeSet::new(),
        }
    }

    pub fn has_secrets(&self) -> bool {
        !self.secrets.by_placeholder.is_empty()
    }

    /// `text` with every placeholder replaced, or `None` if it has none.
    pub fn rewrite(&mut self, text: &[u8], place: SecretPlacement) -> Result<Option<Vec<u8>>, Refusal> {
        let mut out = Vec::new();
        let mut copied = 0;
        for at in placeholders(text) {
            let placeholder = std::str::from_utf8(&text[at..at + PLACEHOLDER_LEN]).expect("placeholders are ASCII");
            let Some(secret) = self.secrets.by_placeholder.get(placeholder) else {
                return Err(Refusal::Exfiltration {
                    secret: None,
                    reason: "the request carries a secret placeholder that is not one of this machine's".into(),
                });
            };
            if !secret.allows_host(self.host, self.port) {
                return Err(Refusal::Exfiltration {
                    secret: Some(secret.name.clone()),
                    reason: format!(
                        "secret {} may only be sent to {}, not to {}:{}",
                        secret.name, secret.hosts_shown, self.host, self.port
                    ),
                });
            }
            if !secret.allows_in(place) {
                return Err(Refusal::Placement {
                    secret: secret.name.clone(),
                    reason: format!(
                        "secret {} may not be placed in the request's {}; only in headers{}",
                        secret.name,
                        place_name(place),
                        secret
                            .allowed_in
                            .iter()
                            .map(|p| format!(", {}", place_name(*p)))
                            .collect::<String>()
                    ),
                });
            }
            out.extend_from_slice(&text[copied..at]);
            out.extend_from_slice(secret.value.as_bytes());
            copied = at + PLACEHOLDER_LEN;
            self.used.insert(secret.name.clone());
        }
        if copied == 0 {
            return Ok(None);
        }
        out.extend_from_slice(&text[copied..]);
        Ok(Some(out))
    }

    /// Rewrites a header value; inside `Basic` credentials too, since a
    /// token in a URL's userinfo (`https://x:$TOKEN@host/`) reaches the
    /// gateway base64-encoded.
    pub fn rewrite_header(&mut self, name: &str, value: &[u8]) -> Result<Option<Vec<u8>>, Refusal> {
        if name.eq_ignore_ascii_case("authorization")
            && let Some(encoded) = value.strip_prefix(b"Basic ")
            && let Ok(decoded) = B64.decode(encoded.trim_ascii())
        {
            let decoded = Zeroizing::new(decoded);
            if let Some(plain) = self.rewrite(&decoded, SecretPlacement::Header)? {
                let plain = Zeroizing::new(plain);
                return Ok(Some(format!("Basic {}", B64.encode(&*plain)).into_bytes()));
            }
        }
        self.rewrite(value, SecretPlacement::Header)
    }

    /// Headers to set on this request for the secrets with `inject`.
    pub fn injections(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for s in self.secrets.by_placeholder.values() {
            if let Some(inject) = &s.inject
                && s.allows_host(self.host, self.port)
            {
                let format = inject.format.as_deref().unwrap_or("Bearer {value}");
                out.push((inject.header.clone(), format.replace("{value}", &s.value).into_bytes()));
                self.used.insert(s.name.clone());
            }
        }
        out
    }
}

impl Secrets {
    /// A redactor for the values of the named secrets, if any.
    pub fn redactor(&self, names: &BTreeSet<String>) -> Option<Redactor> {
        let pairs: Vec<(Zeroizing<Vec<u8>>, Vec<u8>)> = self
            .by_placeholder
            .iter()
            .filter(|(_, s)| names.contains(&s.name))
            .map(|(p, s)| (Zeroizing::new(s.value.as_bytes().to_vec()), p.clone().into_bytes()))
            .collect();
        (!pairs.is_empty()).then(|| Redactor {
            pairs,
            carry: Zeroizing::new(Vec::new()),
        })
    }
}

/// Puts placeholders back where an upstream's answer holds a secret's value
/// (an echo, an error message quoting the token), so a request that used a
/// secret can't bring its value back into the machine. Streams: a value
/// split across chunks is caught by holding back a possible start of one.
pub struct Redactor {
    pairs: Vec<(Zeroizing<Vec<u8>>, Vec<u8>)>,
    carry: Zeroizing<Vec<u8>>,
}

impl Redactor {
    /// The next chunk, redacted, minus a tail that may begin a value.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = Zeroizing::new(std::mem::take(&mut *self.carry));
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'scan: while i < buf.len() {
            for (value, placeholder) in &self.pairs {
                let rest = &buf[i..];
                if rest.starts_with(value) {
                    out.extend_from_slice(placeholder);
                    i += value.len();
                    continue 'scan;
                }
                if value.starts_with(rest) {
                    self.carry.extend_from_slice(rest);
                    return out;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }

    /// What was held back, once the stream has ended.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut *self.carry)
    }

    /// A whole value (a header's).
    pub fn redact(&mut self, text: &[u8]) -> Vec<u8> {
        let mut out = self.feed(text);
        out.extend(self.finish());
        out
    }
}

fn place_name(place: SecretPlacement) -> &'static str {
    match place {
        SecretPlacement::Header => "headers",
        SecretPlacement::Url => "URL",
        SecretPlacement::Body => "body",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(key: &crypto_box::SecretKey, payload: &SealedPayload) -> String {
        let ct = key
            .public_key()
            .seal(&mut crypto_box::aead::OsRng, &serde_json::to_vec(payload).unwrap())
            .unwrap();
        B64.encode(ct)
    }

    fn payload(name: &str, hosts: &[&str], allowed_in: Vec<SecretPlacement>) -> SealedPayload {
        SealedPayload {
            app: "a".into(),
            name: name.into(),
            value: format!("{name}-VALUE"),
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            allowed_in,
            inject: None,
        }
    }

    const P1: &str = "hangar_secret_0123456789abcdef0123456789abcdef01234567";
    const P2: &str = "hangar_secret_fedcba9876543210fedcba9876543210fedcba98";

    fn secrets(key: &crypto_box::SecretKey) -> Secrets {
        let list = vec![
            MachineSecret {
                name: "GH".into(),
                placeholder: P1.into(),
                sealed: sealed(key, &payload("GH", &["api.github.com:443"], vec![])),
            },
            MachineSecret {
                name: "BODY".into(),
                placeholder: P2.into(),
                sealed: sealed(key, &payload("BODY", &["*.example.org"], vec![SecretPlacement::Body])),
            },
        ];
        open(key, "a", &list).unwrap()
    }

    #[test]
    fn swaps_only_where_allowed() {
        let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        let s = secrets(&key);
        let mut sub = Substitution::new(&s, "api.github.com", 443);
        let out = sub
            .rewrite_header("authorization", format!("Bearer {P1}").as_bytes())
            .unwrap();
        assert_eq!(out.unwrap(), b"Bearer GH-VALUE");
        assert_eq!(sub.rewrite_header("x", b"plain").unwrap(), None);
        // Inside Basic credentials.
        let basic = format!("Basic {}", B64.encode(format!("x-access-token:{P1}")));
        let out = sub.rewrite_header("Authorization", basic.as_bytes()).unwrap().unwrap();
        assert_eq!(
            out,
            format!("Basic {}", B64.encode("x-access-token:GH-VALUE")).as_bytes()
        );
        assert_eq!(sub.used.iter().collect::<Vec<_>>(), ["GH"]);
        // Not in the URL unless the secret says so.
        assert!(matches!(
            sub.rewrite(format!("/?t={P1}").as_bytes(), SecretPlacement::Url),
            Err(Refusal::Placement { .. })
        ));
        // Another host: exfiltration, in any part of the request.
        let mut sub = Substitution::new(&s, "evil.test", 443);
        let err = sub.rewrite_header("x-leak", P1.as_bytes()).unwrap_err();
        assert!(
            matches!(err, Refusal::Exfiltration { secret: Some(ref n), .. } if n == "GH"),
            "{err:?}"
        );
        let mut sub = Substitution::new(&s, "api.github.com", 80);
        assert!(
            sub.rewrite_header("x", P1.as_bytes()).is_err(),
            "the rule names port 443"
        );
        // An unknown placeholder is refused too.
        let unknown = "hangar_secret_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut sub = Substitution::new(&s, "api.github.com", 443);
        assert!(matches!(
            sub.rewrite(unknown.as_bytes(), SecretPlacement::Header),
            Err(Refusal::Exfiltration { secret: None, .. })
        ));
        // Body substitution where allowed, several times over.
        let mut sub = Substitution::new(&s, "x.example.org", 80);
        let body = format!("{{\"a\":\"{P2}\",\"b\":\"{P2}\"}}");
        let out = sub.rewrite(body.as_bytes(), SecretPlacement::Body).unwrap().unwrap();
        assert_eq!(out, b"{\"a\":\"BODY-VALUE\",\"b\":\"BODY-VALUE\"}");
    }

    #[test]
    fn redacts_values_across_chunks() {
        let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        let s = secrets(&key);
        let mut r = s.redactor(&["GH".to_string()].into()).unwrap();
        let mut out = r.feed(b"token=GH-VA");
        assert_eq!(out, b"token=", "a possible start of the value is held back");
        out.extend(r.feed(b"LUE; again GH-VALUE and GH-"));
        out.extend(r.feed(b"nothing"));
        out.extend(r.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("token={P1}; again {P1} and GH-nothing")
        );
        assert!(s.redactor(&["OTHER".to_string()].into()).is_none());
    }

    #[test]
    fn scanning_edges() {
        let text = format!("{}{P1}x{}", &P1[..20], &P2[..PLACEHOLDER_LEN - 1]);
        assert_eq!(placeholders(text.as_bytes()).collect::<Vec<_>>(), [20]);
        assert_eq!(placeholders(P1.to_uppercase().as_bytes()).count(), 0);
    }

    #[test]
    fn refuses_payloads_for_elsewhere() {
        let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        let mut p = payload("GH", &["h"], vec![]);
        p.app = "other".into();
        let list = [MachineSecret {
            name: "GH".into(),
            placeholder: P1.into(),
            sealed: sealed(&key, &p),
        }];
        assert!(open(&key, "a", &list).unwrap_err().contains("sealed for other/GH"));
        let stranger = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        assert!(open(&stranger, "other", &list).unwrap_err().contains("cannot open"));
    }
}
