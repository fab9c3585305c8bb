//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's
//! leaderelection does it: the holder renews `renewTime` every retry period;
//! others take over once `renewTime + leaseDurationSeconds` has passed.
//! Writes use the Lease's resourceVersion, so two candidates racing for an
//! expired Lease cannot both win.
//!
//! Only cluster-wide writes (Ingress status, Events) are gated by this;
//! every node still serves traffic. [`while_leader`] runs such a writer.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Runs a writer only while `is_leader` is true: `start` is called with a
/// fresh token each time the lease is won, and the task it returns is
/// cancelled (and awaited) when it is lost or `cancel` fires. `what`
/// names the writes in the log line.
pub async fn while_leader<F, Fut>(
    mut is_leader: watch::Receiver<bool>,
    cancel: CancellationToken,
    what: &str,
    mut start: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = is_leader.wait_for(|l| *l) => if r.is_err() { return },
        }
        let term = cancel.child_token();
        let writer = tokio::spawn(start(term.clone()));
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = is_leader.wait_for(|l| !*l) => tracing::info!("not the leader any more: {what} stop"),
        }
        term.cancel();
        let _ = writer.await;
    }
}

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity (the node name, usually).
    pub identity: String,
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before giving up.
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Runs the election until cancelled; `is_leader` follows the outcome.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    tx: watch::Sender<bool>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> (LeaderElector, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (
            LeaderElector {
                api: Api::namespaced(client, &config.namespace),
                config,
                tx,
            },
            rx,
        )
    }

    pub async fn run(self, cancel: CancellationToken) {
        let mut last_renew = tokio::time::Instant::now();
        loop {
            let leader = *self.tx.borrow();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_renew = tokio::time::Instant::now();
                    if !leader {
                        tracing::info!(lease = %self.config.name, identity = %self.config.identity, "became leader");
                        self.tx.send_replace(true);
                    }
                }
                Ok(false) => {
                    if leader {
                        tracing::warn!(lease = %self.config.name, "lost the lease to another holder");
                        self.tx.send_replace(false);
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %self.config.name, error = %e, "lease update failed");
                    if leader && last_renew.elapsed() > self.config.renew_deadline {
                        tracing::warn!(lease = %self.config.name, "renew deadline passed; stepping down");
                        self.tx.send_replace(false);
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.tx.send_replace(false);
                    return;
                }
                _ = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
    }

    /// One round: returns whether we hold the Lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let me = &self.config.identity;
        let duration_s = self.config.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Someone else created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let held_by_me = &holder == me;
        if !held_by_me && !holder.is_empty() {
            let lease_for = spec.lease_duration_seconds.unwrap_or(duration_s).max(1) as i64;
            let renewed = spec.renew_time.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
            if renewed + lease_for > now.as_second() {
                return Ok(false);
            }
        }
        let mut new = spec;
        if !held_by_me {
            new.acquire_time = Some(MicroTime(now));
            new.lease_transitions = Some(new.lease_transitions.unwrap_or(0) + 1);
        }
        new.holder_identity = Some(me.clone());
        new.lease_duration_seconds = Some(duration_s);
        new.renew_time = Some(MicroTime(now));
        lease.spec = Some(new);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // The resourceVersion moved: someone else wrote first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
