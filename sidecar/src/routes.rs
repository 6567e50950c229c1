//! Which brokers serve which queue: `orders=host:port[,host:port];emails=...`.
//! A host may be a headless Service name that resolves to every broker pod.

use sluice_config::validate_queue_name;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("route {0:?}: expected QUEUE=HOST:PORT[,HOST:PORT...]")]
    Malformed(String),
    #[error("route {route:?}: {reason}")]
    Invalid { route: String, reason: String },
}

/// Parses routes from `--route` values and/or `SLUICE_ROUTES` (`;`-separated).
pub fn parse_routes<'a>(
    specs: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, Vec<String>>, RouteError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for spec in specs.into_iter().flat_map(|s| s.split(';')) {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        let (queue, addrs) = spec
            .split_once('=')
            .ok_or_else(|| RouteError::Malformed(spec.into()))?;
        let queue = queue.trim();
        validate_queue_name(queue).map_err(|e| RouteError::Invalid {
            route: spec.into(),
            reason: e.to_string(),
        })?;
        for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let addr = addr.strip_prefix("http://").unwrap_or(addr);
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => out
                    .entry(queue.to_string())
                    .or_default()
                    .push(addr.to_string()),
                _ => {
                    return Err(RouteError::Invalid {
                        route: spec.into(),
                        reason: format!("{addr:?} is not HOST:PORT"),
                    });
                }
            }
        }
        if !out.contains_key(queue) {
            return Err(RouteError::Malformed(spec.into()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let r = parse_routes(["orders=a:1,b:2;emails=http://svc.ns.svc:7171", "x=c:3"]).unwrap();
        assert_eq!(r["orders"], vec!["a:1", "b:2"]);
        assert_eq!(r["emails"], vec!["svc.ns.svc:7171"]);
        assert_eq!(r["x"], vec!["c:3"]);
        for bad in ["orders", "orders=", "Orders=a:1", "o=a", "o=a:x", "o=:1"] {
            assert!(parse_routes([bad]).is_err(), "{bad:?} accepted");
        }
    }
}
