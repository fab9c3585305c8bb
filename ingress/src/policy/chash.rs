//! Hashing a request onto an endpoint: the key expression of
//! `upstream-hash-by` / `nginx.org/lb-method: hash …` (nginx variables and
//! literal text), a stable 64-bit hash, and a consistent-hash ring with
//! virtual nodes, so that removing one of n endpoints remaps only the keys
//! it owned (≈ 1/n) and adding one takes ≈ 1/(n+1) from the others.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, Uri};

/// Streaming 64-bit FNV-1a with a final avalanche (MurmurHash3's fmix64):
/// stable across runs and builds, so cookies and rings survive restarts.
#[derive(Debug, Clone, Copy)]
pub struct Hasher(u64);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher {
    pub fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// The hash of `bytes`.
pub fn hash64(bytes: &[u8]) -> u64 {
    Hasher::default().write(bytes).finish()
}

/// Virtual nodes per endpoint (as ketama and lua-resty-chash: 160).
pub const VNODES: u32 = 160;

/// A consistent-hash ring over endpoints `0..n`, placed by their
/// addresses (not their order), so a ring built after an endpoint left
/// still places every other endpoint where it was.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// `(point, endpoint index)`, sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn new(endpoints: &[SocketAddr]) -> Ring {
        let mut points = Vec::with_capacity(endpoints.len() * VNODES as usize);
        for (i, addr) in endpoints.iter().enumerate() {
            let name = addr.to_string();
            let mut base = Hasher::default();
            base.write(name.as_bytes());
            for v in 0..VNODES {
                let point = base.clone().write(b"#").write(&v.to_le_bytes()).finish();
                points.push((point, u32::try_from(i).unwrap_or(u32::MAX)));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Index into `points` of the first point at or after `key` (wrapping).
    fn slot(&self, key: u64) -> usize {
        let i = self.points.partition_point(|&(p, _)| p < key);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// The endpoint owning `key`.
    pub fn owner(&self, key: u64) -> Option<usize> {
        self.points.get(self.slot(key)).map(|&(_, e)| e as usize)
    }

    /// The first endpoint clockwise from `key` that `ok` accepts.
    pub fn find(&self, key: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.slot(key);
        let n = self.points.len();
        (0..n).map(|k| self.points[(start + k) % n].1 as usize).find(|&e| ok(e))
    }

    /// A position on the ring owned by `endpoint`: a point inside one of
    /// its arcs chosen by `rand` (so that keys made this way spread over
    /// its arcs and move with them when endpoints join).
    pub fn position_of(&self, endpoint: usize, rand: u64) -> Option<u64> {
        let arcs: Vec<usize> = (0..self.points.len())
            .filter(|&j| self.points[j].1 as usize == endpoint)
            .collect();
        let j = *arcs.get(usize::try_from(rand % arcs.len().max(1) as u64).unwrap_or(0))?;
        let end = self.points[j].0;
        let start = match j {
            0 => self.points[self.points.len() - 1].0,
            _ => self.points[j - 1].0,
        };
        // The arc is (start, end], wrapping; its length is never 0 unless
        // two points collide, in which case `end` itself is the answer.
        let len = end.wrapping_sub(start);
        if len == 0 {
            return Some(end);
        }
        Some(start.wrapping_add(1).wrapping_add((rand >> 16) % len))
    }
}

/// One piece of a hash key expression.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Text(String),
    /// `$request_uri`: the target as the client sent it (path and query).
    RequestUri,
    /// `$uri`: the path.
    Uri,
    /// `$args` / `$query_string`.
    Args,
    /// `$remote_addr`.
    RemoteAddr,
    /// nginx `ip_hash`: the first three octets of an IPv4 address, the
    /// whole of an IPv6 one.
    RemoteNet,
    /// `$host`: lowercased, without port.
    Host,
    /// `$scheme`.
    Scheme,
    /// `$request_method`.
    Method,
    /// `$http_NAME`: a header, `_` read as `-` (lowercase).
    Header(String),
    /// `$cookie_NAME`.
    Cookie(String),
    /// `$arg_NAME`: a query parameter, raw.
    Arg(String),
}

/// What a key expression is evaluated on.
pub struct RequestView<'a> {
    pub uri: &'a Uri,
    pub method: &'a http::Method,
    pub headers: &'a HeaderMap,
    /// The normalized host (lowercase, no port).
    pub host: &'a str,
    pub client: IpAddr,
    pub https: bool,
}

/// Parses an nginx expression: variables (`$name`, `${name}`) and literal
/// text, like `$host$request_uri` or `user-$cookie_session`.
pub fn parse_expression(expr: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = expr;
    while let Some(dollar) = rest.find('$') {
        text.push_str(&rest[..dollar]);
        rest = &rest[dollar + 1..];
        let (name, after) = if let Some(braced) = rest.strip_prefix('{') {
            let close = braced.find('}').ok_or("unclosed ${")?;
            (&braced[..close], &braced[close + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        if name.is_empty() {
            return Err("a '$' without a variable name".into());
        }
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(variable(name)?);
        rest = after;
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    if !parts.iter().any(|p| !matches!(p, Part::Text(_))) {
        return Err("no variable: every request would go to the same endpoint".into());
    }
    Ok(parts)
}

fn variable(name: &str) -> Result<Part, String> {
    let lower = name.to_ascii_lowercase();
    let named = |prefix: &str| lower.strip_prefix(prefix).filter(|n| !n.is_empty());
    if let Some(h) = named("http_") {
        return Ok(Part::Header(h.replace('_', "-")));
    }
    if let Some(c) = name.strip_prefix("cookie_").filter(|n| !n.is_empty()) {
        return Ok(Part::Cookie(c.to_string()));
    }
    if let Some(a) = name.strip_prefix("arg_").filter(|n| !n.is_empty()) {
        return Ok(Part::Arg(a.to_string()));
    }
    Ok(match lower.as_str() {
        "request_uri" => Part::RequestUri,
        "uri" | "document_uri" => Part::Uri,
        "args" | "query_string" => Part::Args,
        "remote_addr" | "binary_remote_addr" => Part::RemoteAddr,
        "host" => Part::Host,
        "scheme" => Part::Scheme,
        "request_method" => Part::Method,
        _ => {
            return Err(format!(
                "variable ${name} is not supported (supported: $request_uri, $uri, $args, $remote_addr, \
                 $host, $scheme, $request_method, $http_NAME, $cookie_NAME, $arg_NAME)"
            ))
        }
    })
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

/// The raw value of query parameter `name` (case-insensitive, as nginx).
pub fn query_arg<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        k.eq_ignore_ascii_case(name).then_some(v)
    })
}

/// Hashes the value of `parts` for `req` (the concatenation of the pieces;
/// a missing header, cookie or argument is empty, as in nginx).
pub fn hash_request(parts: &[Part], req: &RequestView<'_>) -> u64 {
    let mut h = Hasher::default();
    for part in parts {
        match part {
            Part::Text(t) => {
                h.write(t.as_bytes());
            }
            Part::RequestUri => {
                h.write(req.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
            }
            Part::Uri => {
                h.write(req.uri.path().as_bytes());
            }
            Part::Args => {
                h.write(req.uri.query().unwrap_or_default().as_bytes());
            }
            Part::RemoteAddr => {
                h.write(req.client.to_canonical().to_string().as_bytes());
            }
            Part::RemoteNet => match req.client.to_canonical() {
                IpAddr::V4(a) => {
                    h.write(&a.octets()[..3]);
                }
                IpAddr::V6(a) => {
                    h.write(&a.octets());
                }
            },
            Part::Host => {
                h.write(req.host.as_bytes());
            }
            Part::Scheme => {
                h.write(if req.https { b"https" } else { b"http" });
            }
            Part::Method => {
                h.write(req.method.as_str().as_bytes());
            }
            Part::Header(name) => {
                if let Some(v) = req.headers.get(name.as_str()) {
                    h.write(v.as_bytes());
                }
            }
            Part::Cookie(name) => {
                if let Some(v) = cookie(req.headers, name) {
                    h.write(v.as_bytes());
                }
            }
            Part::Arg(name) => {
                if let Some(v) = query_arg(req.uri, name) {
                    h.write(v.as_bytes());
                }
            }
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn removing_one_of_n_endpoints_remaps_only_its_share() {
        for n in [3u16, 5, 10, 20] {
            let all = addrs(n);
            let ring = Ring::new(&all);
            // Endpoint 1 goes; the others keep their addresses (new indices).
            let mut fewer = all.clone();
            let gone = fewer.remove(1);
            let smaller = Ring::new(&fewer);
            let keys = 20_000u64;
            let mut moved = 0u64;
            let mut counts = vec![0u64; all.len()];
            for k in 0..keys {
                let key = hash64(&k.to_le_bytes());
                let before = all[ring.owner(key).unwrap()];
                counts[ring.owner(key).unwrap()] += 1;
                let after = fewer[smaller.owner(key).unwrap()];
                if before != after {
                    moved += 1;
                    // Only keys of the removed endpoint move.
                    assert_eq!(before, gone, "n={n}: a key of a remaining endpoint moved");
                }
            }
            let share = moved as f64 / keys as f64;
            let ideal = 1.0 / f64::from(n);
            assert!(
                (share - ideal).abs() < ideal * 0.5,
                "n={n}: moved {share:.3}, ideal {ideal:.3}"
            );
            // Spread: every endpoint owns within a factor of ~2 of its share.
            for c in counts {
                let s = c as f64 / keys as f64;
                assert!(s > ideal * 0.5 && s < ideal * 1.6, "n={n}: share {s:.3}");
            }
        }
    }

    #[test]
    fn ring_find_skips_and_positions_map_back() {
        let all = addrs(4);
        let ring = Ring::new(&all);
        for k in 0..200u64 {
            let key = hash64(&k.to_le_bytes());
            let owner = ring.owner(key).unwrap();
            let next = ring.find(key, |e| e != owner).unwrap();
            assert_ne!(next, owner);
            for e in 0..4 {
                let pos = ring.position_of(e, key).unwrap();
                assert_eq!(ring.owner(pos), Some(e));
            }
        }
        assert_eq!(Ring::new(&[]).owner(1), None);
    }

    #[test]
    fn expressions() {
        use Part::*;
        for (expr, want) in [
            ("$request_uri", Ok(vec![RequestUri])),
            ("$host$request_uri", Ok(vec![Host, RequestUri])),
            ("${host}-x-$remote_addr", Ok(vec![Host, Text("-x-".into()), RemoteAddr])),
            ("$http_X_User_Id", Ok(vec![Header("x-user-id".into())])),
            ("$cookie_sess", Ok(vec![Cookie("sess".into())])),
            (
                "u:$arg_id;",
                Ok(vec![Text("u:".into()), Arg("id".into()), Text(";".into())]),
            ),
            ("$binary_remote_addr", Ok(vec![RemoteAddr])),
            ("plain", Err(())),
            ("$", Err(())),
            ("${host", Err(())),
            ("$server_addr", Err(())),
        ] {
            assert_eq!(parse_expression(expr).map_err(|_| ()), want, "{expr}");
        }
    }

    #[test]
    fn request_values() {
        let uri: Uri = "/a/b?id=7&X=y".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("cookie", "a=1; sess=abc".parse().unwrap());
        headers.insert("x-user", "bob".parse().unwrap());
        let view = |client: [u8; 4]| RequestView {
            uri: &uri,
            method: &http::Method::GET,
            headers: &headers,
            host: "x.test",
            client: IpAddr::from(client),
            https: false,
        };
        assert_eq!(cookie(&headers, "sess"), Some("abc"));
        assert_eq!(cookie(&headers, "nope"), None);
        assert_eq!(query_arg(&uri, "x"), Some("y"));
        let h = |expr: &str, c: [u8; 4]| hash_request(&parse_expression(expr).unwrap(), &view(c));
        let text = |s: &str| hash64(s.as_bytes());
        assert_eq!(h("$request_uri", [1, 2, 3, 4]), text("/a/b?id=7&X=y"));
        assert_eq!(h("$host$uri", [1, 2, 3, 4]), text("x.test/a/b"));
        assert_eq!(h("$cookie_sess-$http_x_user-$arg_id", [1, 2, 3, 4]), text("abc-bob-7"));
        assert_eq!(h("$remote_addr", [1, 2, 3, 4]), text("1.2.3.4"));
        assert_ne!(h("$remote_addr", [1, 2, 3, 4]), h("$remote_addr", [1, 2, 3, 5]));
        // ip_hash: the /24 decides.
        let net = |c: [u8; 4]| hash_request(&[Part::RemoteNet], &view(c));
        assert_eq!(net([1, 2, 3, 4]), net([1, 2, 3, 200]));
        assert_ne!(net([1, 2, 3, 4]), net([1, 2, 4, 4]));
    }
}
