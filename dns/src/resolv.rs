//! The default upstreams: the `nameserver` lines of /etc/resolv.conf.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::error::DnsError;

/// Nameservers of a resolv.conf text, port 53 (scoped IPv6 `%if` suffixes dropped).
pub fn parse_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let addr = words.next()?;
            let addr = addr.split('%').next()?;
            addr.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

pub fn nameservers(path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_nameservers(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameserver_lines() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(
            parse_nameservers(text),
            vec!["10.0.0.2:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]
        );
    }
}
