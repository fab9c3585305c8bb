//! Paths and redirects: regex paths and rewrites, redirects, aliases, HSTS.

use super::Reader;

/// The path and redirect settings of one Ingress.
#[derive(Debug, Default)]
pub struct PathPolicy {}

impl PathPolicy {
    pub fn parse(_r: &mut Reader<'_>) -> PathPolicy {
        PathPolicy {}
    }

    pub fn describe(&self) -> Vec<String> {
        Vec::new()
    }
}
