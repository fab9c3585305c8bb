//! Shared helpers of the black-box tests: network-namespace topologies and
//! the Service proxy's e2e scenarios (run against every dataplane).
#![allow(dead_code)]

pub mod netns;
pub mod proxy_scenarios;
pub mod skip;
