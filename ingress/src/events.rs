//! Kubernetes Events for configuration problems: every problem of an
//! Ingress (an annotation ferry does not honour, refuses or cannot parse;
//! a rule, backend or TLS entry it had to skip) becomes one `Warning`
//! Event (`events.k8s.io/v1`) on the object, so `kubectl describe
//! ingress` shows it.
//!
//! An Event is written once per problem per change: not again on later
//! snapshots while the same problem persists, again when it went away and
//! came back. Writes run in their own task, off the request path, paced by
//! a token bucket with a bounded queue (a burst of problems, as when a
//! cluster's Ingresses are first migrated, cannot flood the apiserver);
//! what overflows is counted and logged, never queued without bound. Only
//! the elected leader writes ([`run_while_leader`]); a new leader
//! announces the problems current when it takes over once more.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{EventLabels, IngressMetrics};
use crate::routes::Problem;

/// The problems of the configuration last applied, as `Engine::apply`
/// publishes them.
pub type ProblemsRx = watch::Receiver<Arc<Vec<Problem>>>;

/// The `Event.action` of every Event ferry writes.
pub const ACTION: &str = "LoadConfiguration";

/// How the Event writer identifies itself and paces its writes.
#[derive(Debug, Clone)]
pub struct EventConfig {
    /// `reportingController` (a qualified name, like the IngressClass
    /// controller name).
    pub controller: String,
    /// `reportingInstance`: this node (or pod).
    pub instance: String,
    /// Events that may be written back to back.
    pub burst: u32,
    /// Events per second once the burst is spent.
    pub per_second: u32,
    /// Problems waiting for a write; beyond this they are dropped (and
    /// counted), not queued.
    pub queue: usize,
    /// One write's timeout.
    pub timeout: Duration,
}

impl EventConfig {
    pub fn new(instance: &str) -> EventConfig {
        EventConfig {
            controller: crate::DEFAULT_CONTROLLER_NAME.to_string(),
            instance: if instance.is_empty() {
                "ferry".into()
            } else {
                instance.into()
            },
            burst: 50,
            per_second: 5,
            queue: 1000,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why an Event is written, from the problem's field and message.
pub fn reason(p: &Problem) -> &'static str {
    if p.field.starts_with("metadata.annotations[") {
        if p.message.starts_with("refused") {
            "RefusedAnnotation"
        } else if p.message.starts_with("not supported") {
            "UnsupportedAnnotation"
        } else {
            "InvalidAnnotation"
        }
    } else if p.object.starts_with("Secret ") {
        "InvalidSecret"
    } else {
        "IngressProblem"
    }
}

/// Whether a problem is about an annotation (the
/// `ferry_ingress_annotation_problems` gauge counts these).
pub fn is_annotation_problem(p: &Problem) -> bool {
    p.field.starts_with("metadata.annotations[")
}

/// The object a problem names (`Ingress ns/name`, `Secret ns/name`) as an
/// Event's `regarding`; `None` for what is no object (a flag).
pub fn regarding(p: &Problem) -> Option<ObjectReference> {
    let (kind, key) = p.object.split_once(' ')?;
    let (namespace, name) = key.split_once('/')?;
    let api_version = match kind {
        "Ingress" => "networking.k8s.io/v1",
        "Secret" | "Service" => "v1",
        _ => return None,
    };
    if namespace.is_empty() || name.is_empty() {
        return None;
    }
    Some(ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    })
}

/// The Event for `p`, or `None` when it names no object. `seq` keeps the
/// names of Events created in the same nanosecond apart.
pub fn event(p: &Problem, config: &EventConfig, now: Timestamp, seq: u64) -> Option<Event> {
    let regarding = regarding(p)?;
    let name = regarding.name.clone().unwrap_or_default();
    let mut note = format!("{}: {}", p.field, p.message);
    truncate(&mut note, 1024);
    Some(Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}{seq:x}", now.as_nanosecond())),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(reason(p).into()),
        action: Some(ACTION.into()),
        note: Some(note),
        regarding: Some(regarding),
        reporting_controller: Some(config.controller.clone()),
        reporting_instance: Some(config.instance.chars().take(128).collect()),
        ..Event::default()
    })
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Which problems are current, to tell new ones from persisting ones.
#[derive(Debug, Default)]
pub struct Tracker {
    current: HashSet<String>,
}

impl Tracker {
    /// Replaces the current problems with `problems`; returns those that
    /// were not current before (each once, in order).
    pub fn update<'a>(&mut self, problems: &'a [Problem]) -> Vec<&'a Problem> {
        let mut next = HashSet::with_capacity(problems.len());
        let mut new = Vec::new();
        for p in problems {
            let key = p.to_string();
            if !self.current.contains(&key) && !next.contains(&key) {
                new.push(p);
            }
            next.insert(key);
        }
        self.current = next;
        new
    }

    pub fn is_current(&self, p: &Problem) -> bool {
        self.current.contains(&p.to_string())
    }
}

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new(burst: u32, per_second: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst.max(1)),
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_second.max(1)),
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: tokio::time::Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }
}

fn count(metrics: &IngressMetrics, result: &'static str) {
    metrics.events.get_or_create(&EventLabels { result }).inc();
}

/// Writes an Event for every new problem until `cancel` fires or the
/// engine goes away.
pub async fn run(
    client: kube::Client,
    mut problems: ProblemsRx,
    config: EventConfig,
    metrics: IngressMetrics,
    cancel: CancellationToken,
) {
    let mut tracker = Tracker::default();
    let mut pending: VecDeque<Problem> = VecDeque::new();
    let mut bucket = Bucket::new(config.burst, config.per_second);
    let mut seq = 0u64;
    let mut dropped_warned = false;
    // Set when the problems changed since the tracker last saw them.
    let mut dirty = true;
    // Bounded: every turn waits for a change, a token or cancellation, or
    // consumes one pending problem.
    loop {
        if dirty {
            dirty = false;
            let current = problems.borrow_and_update().clone();
            for p in tracker.update(&current) {
                if regarding(p).is_none() {
                    continue;
                }
                if pending.len() >= config.queue {
                    count(&metrics, "dropped");
                    if !dropped_warned {
                        tracing::warn!(
                            queue = config.queue,
                            "too many new configuration problems at once; \
                            Events for some are dropped (they are still logged)"
                        );
                        dropped_warned = true;
                    }
                    continue;
                }
                pending.push_back(p.clone());
            }
        }
        let mut wait = None;
        while let Some(p) = pending.front() {
            if !tracker.is_current(p) {
                // Gone before its turn: nothing to report any more.
                pending.pop_front();
                continue;
            }
            if let Err(d) = bucket.take(tokio::time::Instant::now()) {
                wait = Some(d);
                break;
            }
            let Some(p) = pending.pop_front() else { break };
            seq = seq.wrapping_add(1);
            let Some(ev) = event(&p, &config, Timestamp::now(), seq) else {
                continue;
            };
            let namespace = ev.metadata.namespace.clone().unwrap_or_default();
            let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
            let params = PostParams::default();
            let write = tokio::time::timeout(config.timeout, api.create(&params, &ev));
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = write => r,
            };
            match result {
                Ok(Ok(_)) => {
                    count(&metrics, "written");
                    tracing::debug!(problem = %p, reason = reason(&p), "event written");
                }
                Ok(Err(e)) => {
                    count(&metrics, "failed");
                    tracing::warn!(problem = %p, error = %e, "writing an Event failed");
                }
                Err(_) => {
                    count(&metrics, "failed");
                    tracing::warn!(problem = %p, timeout = ?config.timeout, "writing an Event timed out");
                }
            }
            if pending.is_empty() {
                dropped_warned = false;
            }
        }
        let token = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = problems.changed() => match r {
                Ok(()) => dirty = true,
                Err(_) => return,
            },
            _ = token => {}
        }
    }
}

/// Runs the Event writer (`run`) only while `is_leader` is true, like the
/// status writer: every node finds the same problems, one writes them.
pub async fn run_while_leader(
    client: kube::Client,
    problems: ProblemsRx,
    config: EventConfig,
    metrics: IngressMetrics,
    is_leader: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    ferry_cluster::lease::while_leader(is_leader, cancel, "Event writes", |term| {
        run(client.clone(), problems.clone(), config.clone(), metrics.clone(), term)
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(object: &str, field: &str, message: &str) -> Problem {
        Problem {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    #[test]
    fn reasons_follow_the_problem_kind() {
        let ann = "metadata.annotations[nginx.ingress.kubernetes.io/x]";
        for (object, field, message, want) in [
            ("Ingress a/b", ann, "refused: snippets are raw", "RefusedAnnotation"),
            (
                "Ingress a/b",
                ann,
                "not supported by ferry; annotation ignored",
                "UnsupportedAnnotation",
            ),
            ("Ingress a/b", ann, "\"5x\": not a time", "InvalidAnnotation"),
            ("Ingress a/b", "spec.rules[0].host", "invalid", "IngressProblem"),
            ("Secret a/s", "data", "tls.key: no PEM", "InvalidSecret"),
        ] {
            let p = problem(object, field, message);
            assert_eq!(reason(&p), want, "{p}");
            assert_eq!(is_annotation_problem(&p), field == ann);
        }
    }

    #[test]
    fn events_name_the_object_and_field() {
        let config = EventConfig::new("node-1");
        let p = problem(
            "Ingress shop/web",
            "metadata.annotations[nginx.ingress.kubernetes.io/made-up]",
            "not supported by ferry; annotation ignored",
        );
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let ev = event(&p, &config, now, 7).unwrap();
        assert_eq!(ev.metadata.namespace.as_deref(), Some("shop"));
        assert!(ev.metadata.name.as_deref().unwrap().starts_with("web."));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reason.as_deref(), Some("UnsupportedAnnotation"));
        assert_eq!(ev.action.as_deref(), Some(ACTION));
        assert_eq!(
            ev.note.as_deref(),
            Some(
                "metadata.annotations[nginx.ingress.kubernetes.io/made-up]: not supported by ferry; annotation ignored"
            )
        );
        let r = ev.regarding.unwrap();
        assert_eq!(
            (
                r.api_version.as_deref(),
                r.kind.as_deref(),
                r.namespace.as_deref(),
                r.name.as_deref()
            ),
            (Some("networking.k8s.io/v1"), Some("Ingress"), Some("shop"), Some("web"))
        );
        assert_eq!(ev.reporting_controller.as_deref(), Some(crate::DEFAULT_CONTROLLER_NAME));
        assert_eq!(ev.reporting_instance.as_deref(), Some("node-1"));
        // A name differs from the next one's even in the same nanosecond.
        let other = event(&p, &config, now, 8).unwrap();
        assert_ne!(ev.metadata.name, other.metadata.name);

        // Not an object: no Event; a long message is cut at 1 KiB.
        assert!(event(&problem("flag", "--default-tls-secret", "x"), &config, now, 1).is_none());
        let long = problem("Secret a/s", "data", &"é".repeat(1000));
        let ev = event(&long, &config, now, 1).unwrap();
        assert!(ev.note.unwrap().len() <= 1024);
        assert_eq!(ev.regarding.unwrap().api_version.as_deref(), Some("v1"));
    }

    #[test]
    fn tracker_reports_new_problems_once_and_again_after_they_return() {
        let a = problem("Ingress n/i", "metadata.annotations[x]", "a");
        let b = problem("Ingress n/i", "metadata.annotations[y]", "b");
        let mut t = Tracker::default();
        assert_eq!(t.update(&[a.clone(), a.clone()]), vec![&a]);
        assert!(t.update(std::slice::from_ref(&a)).is_empty());
        assert_eq!(t.update(&[a.clone(), b.clone()]), vec![&b]);
        assert!(t.update(std::slice::from_ref(&b)).is_empty());
        assert!(!t.is_current(&a));
        assert_eq!(t.update(&[a.clone(), b.clone()]), vec![&a]);
    }

    #[tokio::test]
    async fn bucket_allows_a_burst_then_paces() {
        let mut b = Bucket::new(3, 2);
        let now = tokio::time::Instant::now();
        for _ in 0..3 {
            assert!(b.take(now).is_ok());
        }
        let wait = b.take(now).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(now + wait).is_ok());
        assert!(b.take(now + wait).is_err());
    }
}
