//! Errors of the cluster crate: conversion of API objects and source failures.

use std::path::PathBuf;

/// An object that ferry cannot use, named by kind, namespace/name and field.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {object}: field {field}: {reason}")]
pub struct InvalidObject {
    pub kind: &'static str,
    pub object: String,
    pub field: String,
    pub reason: String,
}

impl InvalidObject {
    pub fn new(
        kind: &'static str,
        object: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            object: object.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: document {index}: {message}")]
    Document {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{path}: document {index}: {source}")]
    Invalid {
        path: PathBuf,
        index: usize,
        source: InvalidObject,
    },
    #[error("watching {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubernetes config: {0}")]
    KubeConfig(String),
}
