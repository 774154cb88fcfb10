//! Which machine a Host names.

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
        let host = host.trim().to_ascii_lowercase();
        // Without the port; an IPv6 literal can't be ours anyway.
        let host = host.rsplit_once(':').map_or(host.as_str(), |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host.as_str()
            }
        });
        let host = host.trim_end_matches('.');
        let rest = host.strip_suffix(&format!(".{}", domain.trim_end_matches('.').to_ascii_lowercase()))?;
        let labels: Vec<&str> = rest.split('.').collect();
        match labels.as_slice() {
            [app] if !app.is_empty() => Some(Route::App { app: app.to_string() }),
            [machine, app] if !machine.is_empty() && !app.is_empty() => {
                let (port, machine) = match machine.split_once('-') {
                    Some((p, m)) if !m.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                        (Some(p.parse().ok()?), m)
                    }
                    _ => (None, *machine),
                };
                Some(Route::Machine {
                    app: app.to_string(),
                    machine: machine.to_owned(),
                    port,
                })
            }
            _ => None,
        }
    }

    /// For metrics: `machine`, `port` (a machine's other port) or `app`.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Machine { port: None, .. } => "machine",
            Route::Machine { .. } => "port",
            Route::App { .. } => "app",
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
