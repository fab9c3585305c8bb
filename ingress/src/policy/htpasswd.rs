//! Basic authentication (`auth-type: basic`): the users of an htpasswd
//! file (`auth-secret-type: auth-file`, key `auth`) or of a Secret whose
//! keys are users (`auth-map`), checked as nginx's `auth_basic` checks
//! them. Hashes: bcrypt (`$2a$`, `$2b$`, `$2y$`), APR1-MD5 (`$apr1$`),
//! MD5-crypt (`$1$`), `{SHA}`, `{SSHA}` and `{PLAIN}`; other lines are
//! reported (by user, never by hash) and that user cannot log in.
//!
//! Successful checks are remembered (a salted digest of the credentials,
//! bounded) so that a keep-alive client does not pay for bcrypt on every
//! request; the memory goes with the policy, so a changed Secret starts
//! afresh.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use base64::Engine as _;
use http::HeaderValue;
use md5::{Digest as _, Md5};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// Remembered successful credentials per policy.
const CACHE_SIZE: usize = 1024;

/// One user's password hash.
#[derive(Clone)]
enum Hash {
    Bcrypt(String),
    /// `$apr1$` or `$1$`: the magic, salt and the whole line's hash.
    Md5Crypt {
        magic: &'static str,
        salt: String,
        full: String,
    },
    Sha1([u8; 20]),
    SaltedSha1 {
        digest: [u8; 20],
        salt: Vec<u8>,
    },
    Plain(String),
}

/// The users allowed, with their hashes.
pub struct Users {
    users: HashMap<String, Hash>,
    /// Salt of the remembered-credentials digests.
    cache_salt: [u8; 16],
    cache: Mutex<HashSet<[u8; 20]>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl Users {
    /// Parses an htpasswd file; problems name the line and user only.
    pub fn from_htpasswd(text: &str, problems: &mut Vec<String>) -> Users {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                problems.push(format!(
                    "line {}: no ':' between user and password; line skipped",
                    i + 1
                ));
                continue;
            };
            // nginx uses the first line of a user.
            if users.contains_key(user) {
                continue;
            }
            match parse_hash(hash) {
                Some(h) => {
                    users.insert(user.to_string(), h);
                }
                None => problems.push(format!(
                    "line {}: user {user:?} has a password hash ferry does not support \
                     (bcrypt, $apr1$, $1$, {{SHA}}, {{SSHA}}, {{PLAIN}} are); the user cannot log in",
                    i + 1
                )),
            }
        }
        Users::new(users)
    }

    /// One user per entry (`auth-map`: key is the user, value the hash).
    pub fn from_map<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [u8])>, problems: &mut Vec<String>) -> Users {
        let mut users = HashMap::new();
        for (user, hash) in entries {
            let parsed = std::str::from_utf8(hash).ok().map(str::trim).and_then(parse_hash);
            match parsed {
                Some(h) => {
                    users.insert(user.to_string(), h);
                }
                None => problems.push(format!(
                    "user {user:?} has a password hash ferry does not support \
                     (bcrypt, $apr1$, $1$, {{SHA}}, {{SSHA}}, {{PLAIN}} are); the user cannot log in"
                )),
            }
        }
        Users::new(users)
    }

    fn new(users: HashMap<String, Hash>) -> Users {
        let mut cache_salt = [0u8; 16];
        for b in &mut cache_salt {
            *b = fastrand::u8(..);
        }
        Users {
            users,
            cache_salt,
            cache: Mutex::new(HashSet::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    fn cache_key(&self, credentials: &[u8]) -> [u8; 20] {
        let mut h = Sha1::new();
        h.update(self.cache_salt);
        h.update(credentials);
        h.finalize().into()
    }

    /// Whether the `Authorization` header value names a user with the
    /// right password. bcrypt runs on a blocking thread.
    pub async fn check(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(credentials) = authorization.and_then(|v| basic_credentials(v.as_bytes())) else {
            return false;
        };
        let key = self.cache_key(credentials);
        if self.cache.lock().is_ok_and(|c| c.contains(&key)) {
            return true;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let Some(hash) = std::str::from_utf8(user).ok().and_then(|u| self.users.get(u)) else {
            return false;
        };
        let ok = match hash {
            Hash::Bcrypt(h) => {
                let (h, password) = (h.clone(), password.to_vec());
                tokio::task::spawn_blocking(move || bcrypt::verify(&password, &h).unwrap_or(false))
                    .await
                    .unwrap_or(false)
            }
            other => verify(other, password),
        };
        if ok {
            if let Ok(mut c) = self.cache.lock() {
                if c.len() >= CACHE_SIZE {
                    c.clear();
                }
                c.insert(key);
            }
        }
        ok
    }
}

/// The base64 part of `Basic <base64>` (scheme in any case).
fn basic_credentials(v: &[u8]) -> Option<&[u8]> {
    let v = v.trim_ascii();
    if v.len() < 6 || !v[..6].eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    Some(v[6..].trim_ascii())
}

fn parse_hash(h: &str) -> Option<Hash> {
    let b64 = base64::engine::general_purpose::STANDARD;
    if h.starts_with("$2a$") || h.starts_with("$2b$") || h.starts_with("$2y$") || h.starts_with("$2x$") {
        return Some(Hash::Bcrypt(h.to_string()));
    }
    for magic in ["$apr1$", "$1$"] {
        if let Some(rest) = h.strip_prefix(magic) {
            let (salt, _) = rest.split_once('$')?;
            return Some(Hash::Md5Crypt {
                magic,
                salt: salt.chars().take(8).collect(),
                full: h.to_string(),
            });
        }
    }
    if let Some(rest) = h.strip_prefix("{SHA}") {
        let d = b64.decode(rest).ok()?;
        return Some(Hash::Sha1(d.try_into().ok()?));
    }
    if let Some(rest) = h.strip_prefix("{SSHA}") {
        let d = b64.decode(rest).ok()?;
        if d.len() < 20 {
            return None;
        }
        let (digest, salt) = d.split_at(20);
        return Some(Hash::SaltedSha1 {
            digest: digest.try_into().ok()?,
            salt: salt.to_vec(),
        });
    }
    h.strip_prefix("{PLAIN}").map(|p| Hash::Plain(p.to_string()))
}

fn verify(hash: &Hash, password: &[u8]) -> bool {
    match hash {
        Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
        Hash::Md5Crypt { magic, salt, full } => md5_crypt(password, salt.as_bytes(), magic)
            .as_bytes()
            .ct_eq(full.as_bytes())
            .into(),
        Hash::Sha1(d) => {
            let got: [u8; 20] = Sha1::digest(password).into();
            got.ct_eq(d).into()
        }
        Hash::SaltedSha1 { digest, salt } => {
            let mut h = Sha1::new();
            h.update(password);
            h.update(salt);
            let got: [u8; 20] = h.finalize().into();
            got.ct_eq(digest).into()
        }
        Hash::Plain(p) => p.as_bytes().ct_eq(password).into(),
    }
}

const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// MD5-crypt as Apache (`$apr1$`) and FreeBSD/glibc (`$1$`) define it:
/// the whole hash line, `magic salt $ 22 characters`.
pub fn md5_crypt(password: &[u8], salt: &[u8], magic: &str) -> String {
    let salt = &salt[..salt.len().min(8)];
    let mut ctx = Md5::new();
    ctx.update(password);
    ctx.update(magic.as_bytes());
    ctx.update(salt);
    let mut alt = Md5::new();
    alt.update(password);
    alt.update(salt);
    alt.update(password);
    let alt = alt.finalize();
    let mut left = password.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alt[..n]);
        left -= n;
    }
    let mut i = password.len();
    while i != 0 {
        if i & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update([password.first().copied().unwrap_or(0)]);
        }
        i >>= 1;
    }
    let mut fin: [u8; 16] = ctx.finalize().into();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(password);
        } else {
            c.update(fin);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(password);
        }
        if round & 1 == 1 {
            c.update(fin);
        } else {
            c.update(password);
        }
        fin = c.finalize().into();
    }
    let mut out = String::with_capacity(magic.len() + salt.len() + 23);
    out.push_str(magic);
    out.push_str(&String::from_utf8_lossy(salt));
    out.push('$');
    let mut to64 = |mut v: u32, n: usize| {
        for _ in 0..n {
            out.push(char::from(ITOA64[(v & 0x3f) as usize]));
            v >>= 6;
        }
    };
    let b = |i: usize| u32::from(fin[i]);
    to64((b(0) << 16) | (b(6) << 8) | b(12), 4);
    to64((b(1) << 16) | (b(7) << 8) | b(13), 4);
    to64((b(2) << 16) | (b(8) << 8) | b(14), 4);
    to64((b(3) << 16) | (b(9) << 8) | b(15), 4);
    to64((b(4) << 16) | (b(10) << 8) | b(5), 4);
    to64(b(11), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> HeaderValue {
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {v}")).unwrap()
    }

    // Made with `openssl passwd -apr1 -salt ...`, `openssl passwd -1 -salt ...`,
    // and `htpasswd -s` ({SHA} of "secret").
    const APR1: &str = "$apr1$xyz12345$hVFg3wOytQE97CWCezCu2/";
    const MD5: &str = "$1$saltsalt$9xy1btjgzLYfb7hivXtC//";
    const SHA: &str = "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=";

    #[test]
    fn md5_crypt_known_vectors() {
        assert_eq!(md5_crypt(b"secret", b"xyz12345", "$apr1$"), APR1);
        assert_eq!(md5_crypt(b"secret", b"saltsalt", "$1$"), MD5);
    }

    #[tokio::test]
    async fn each_hash_kind() {
        let bcrypt_line = bcrypt::hash_with_salt("secret", 4, [7u8; 16])
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        let text = format!(
            "# comment\nb:{bcrypt_line}\na:{APR1}\nm:{MD5}\ns:{SHA}\np:{{PLAIN}}secret\nd:abJnggxhB/yWI\nbroken line\na:{{PLAIN}}other\n"
        );
        let mut problems = Vec::new();
        let users = Users::from_htpasswd(&text, &mut problems);
        assert_eq!(users.len(), 5);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("\"d\"") && !problems[0].contains("abJ"),
            "{problems:?}"
        );
        assert!(problems[1].contains("line 8"));
        for user in ["b", "a", "m", "s", "p"] {
            assert!(users.check(Some(&basic(user, "secret"))).await, "{user}");
            assert!(!users.check(Some(&basic(user, "Secret"))).await, "{user}");
            // Twice: the second answer comes from the cache.
            assert!(users.check(Some(&basic(user, "secret"))).await, "{user}");
        }
        assert!(
            !users.check(Some(&basic("a", "other"))).await,
            "first line of a user wins"
        );
        assert!(!users.check(Some(&basic("nobody", "secret"))).await);
        assert!(!users.check(None).await);
        assert!(!users.check(Some(&HeaderValue::from_static("Bearer x"))).await);
        assert!(!users.check(Some(&HeaderValue::from_static("Basic !!!"))).await);
        assert!(
            users
                .check(Some(
                    &HeaderValue::from_str(&basic("p", "secret").to_str().unwrap().replace("Basic", "basic")).unwrap()
                ))
                .await
        );
    }

    #[tokio::test]
    async fn auth_map_entries() {
        let mut problems = Vec::new();
        let users = Users::from_map(
            [("alice", SHA.as_bytes()), ("bob", b"plaintext".as_slice())],
            &mut problems,
        );
        assert_eq!(users.len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("bob") && !problems[0].contains("plaintext"));
        assert!(users.check(Some(&basic("alice", "secret"))).await);
    }
}
