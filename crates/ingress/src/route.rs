//! Which machine a Host names.

use crate::metrics::RouteKind;

/// A request's destination, from its Host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `{machine}.{app}.{domain}`, or `{port}-{machine}.…` for another port.
    Machine {
        app: String,
        machine: String,
        port: Option<u16>,
    },
    /// `{app}.{domain}`: any of the app's machines.
    App { app: String },
}

impl Route {
    /// `None` if the host is not under `domain` or has too many labels.
    pub fn parse(host: &str, domain: &str) -> Option<Route> {
        let host = host.trim();
        // Without the port; an IPv6 literal can't be ours anyway.
        let host = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let host = host.trim_end_matches('.');
        let domain = domain.trim_end_matches('.');
        // `….{domain}`, compared without case and without allocating: this
        // runs for every request.
        let split = host.len().checked_sub(domain.len() + 1)?;
        if !host.is_char_boundary(split)
            || host.as_bytes()[split] != b'.'
            || !host[split + 1..].eq_ignore_ascii_case(domain)
        {
            return None;
        }
        let rest = host[..split].to_ascii_lowercase();
        let mut labels = rest.split('.');
        let (first, second) = (labels.next()?, labels.next());
        if labels.next().is_some() || first.is_empty() {
            return None;
        }
        let Some(app) = second else {
            return Some(Route::App { app: rest });
        };
        if app.is_empty() {
            return None;
        }
        let (port, machine) = match first.split_once('-') {
            Some((p, m)) if !m.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (Some(p.parse().ok()?), m),
            _ => (None, first),
        };
        Some(Route::Machine {
            app: app.to_owned(),
            machine: machine.to_owned(),
            port,
        })
    }

    /// For metrics.
    pub(crate) fn kind(&self) -> RouteKind {
        match self {
            Route::Machine { port: None, .. } => RouteKind::Machine,
            Route::Machine { .. } => RouteKind::Port,
            Route::App { .. } => RouteKind::App,
        }
    }

    pub fn app(&self) -> &str {
        match self {
            Route::Machine { app, .. } | Route::App { app } => app,
        }
    }

    pub fn machine(&self) -> Option<&str> {
        match self {
            Route::Machine { machine, .. } => Some(machine),
            Route::App { .. } => None,
        }
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            Route::Machine { port, .. } => *port,
            Route::App { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let m = |app: &str, machine: &str, port| Route::Machine {
            app: app.into(),
            machine: machine.into(),
            port,
        };
        assert_eq!(
            Route::parse("web.shop.localhost:4281", "localhost"),
            Some(m("shop", "web", None))
        );
        assert_eq!(
            Route::parse("8080-web.shop.localhost", "localhost"),
            Some(m("shop", "web", Some(8080)))
        );
        assert_eq!(
            Route::parse("my-web.shop.localhost", "localhost"),
            Some(m("shop", "my-web", None))
        );
        assert_eq!(
            Route::parse("Shop.Example.COM.", "example.com"),
            Some(Route::App { app: "shop".into() })
        );
        for bad in [
            "localhost",
            "a.b.c.localhost",
            "web.shop.example.com",
            ".localhost",
            "99999-web.shop.localhost",
        ] {
            assert_eq!(Route::parse(bad, "localhost"), None, "{bad}");
        }
    }
}
