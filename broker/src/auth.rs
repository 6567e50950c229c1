//! Who may use a queue. A queue whose settings list `access` ServiceAccounts is
//! opened only by calls that carry (`authorization: Bearer <token>`) a ServiceAccount
//! token issued for the queue's audience ([`sluice_config::token_audience`]); the
//! API server says whose token it is (TokenReview), and the broker compares that
//! with the list. Answers are cached briefly so the API server sees one review per
//! token and interval, not one per call.
//!
//! Who answers is behind [`TokenVerifier`]: the Kubernetes TokenReview client
//! (`tokenreview`, feature `tokenreview`) is linked only into the `sluice-broker`
//! binary, so `sluice dev` and an embedded broker build without a Kubernetes client.

#[cfg(feature = "tokenreview")]
pub mod tokenreview;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataMap;

use crate::error::BrokerError;
use crate::queue::Queue;

/// How long the API server's verdict on a token is reused. A revoked token (its pod
/// deleted) stops working within this time.
pub const ACCEPTED_TTL: Duration = Duration::from_secs(30);
/// A refused token is asked about again only after this (a client retrying with a
/// bad token does not turn into a stream of TokenReviews).
pub const REFUSED_TTL: Duration = Duration::from_secs(5);
/// Verdicts kept at most; the cache starts over when full.
const MAX_CACHED: usize = 10_000;
/// Longest token looked at; ServiceAccount tokens are about 1 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Whose token it is, as the authority (the API server) says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `namespace/name` of the ServiceAccount.
    ServiceAccount(String),
    /// Authenticated, but not as a ServiceAccount (a user, a node).
    Other(String),
    Refused(String),
}

impl Verdict {
    /// The verdict on an authenticated user of this name.
    pub fn of_user(username: &str) -> Verdict {
        service_account_of(username)
            .map(Verdict::ServiceAccount)
            .unwrap_or_else(|| Verdict::Other(username.to_string()))
    }
}

/// Asks the authority whose a token is: one question per call, no caching (the
/// [`Authenticator`] caches).
#[tonic::async_trait]
pub trait TokenVerifier: Send + Sync + 'static {
    /// The verdict on `token` presented for `audience`; an error when the authority
    /// could not be asked (the call is then UNAVAILABLE, not refused).
    async fn review(&self, audience: &str, token: &str) -> Result<Verdict, BrokerError>;
}

/// Checks ServiceAccount tokens with a [`TokenVerifier`], caching its verdicts.
pub struct Authenticator {
    verifier: Arc<dyn TokenVerifier>,
    /// The namespace of the queues this broker serves (part of the audience).
    namespace: String,
    /// Token -> (the queue it was reviewed for, the verdict, until when it holds).
    /// Keyed by the token alone so a hit allocates nothing.
    cache: Mutex<HashMap<String, (String, Verdict, Instant)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// The bearer token of a call, if it carries one.
pub fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, BrokerError> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        BrokerError::Unauthenticated("the authorization header is not ASCII".into())
    })?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            BrokerError::Unauthenticated("the authorization header is not `Bearer <token>`".into())
        })?;
    if token.len() > MAX_TOKEN_BYTES {
        return Err(BrokerError::Unauthenticated(format!(
            "the bearer token is over {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(Some(token))
}

impl Authenticator {
    pub fn new(verifier: Arc<dyn TokenVerifier>, namespace: impl Into<String>) -> Self {
        Authenticator {
            verifier,
            namespace: namespace.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Lets the call to a queue with an access list through if `token` is a
    /// ServiceAccount token for this queue's audience of an account on the list.
    pub async fn authorize(&self, queue: &Queue, token: Option<&str>) -> Result<(), BrokerError> {
        let allowed = &queue.settings.access;
        let token = token.ok_or_else(|| {
            BrokerError::Unauthenticated(format!(
                "queue {} admits only listed ServiceAccounts: send `authorization: Bearer <token>` with a token for audience {}",
                queue.name(),
                sluice_config::token_audience(&self.namespace, queue.name())
            ))
        })?;
        // A queue and its dead-letter queue share an audience, and a verdict.
        let name = queue.name();
        let base = name.strip_suffix(sluice_config::DLQ_SUFFIX).unwrap_or(name);
        match self.verdict(base, token).await? {
            Verdict::ServiceAccount(sa) if allowed.contains(&sa) => Ok(()),
            Verdict::ServiceAccount(who) | Verdict::Other(who) => {
                Err(BrokerError::PermissionDenied(format!(
                    "{who} may not use queue {name}: its access list is {}",
                    allowed.join(", ")
                )))
            }
            Verdict::Refused(why) => Err(BrokerError::Unauthenticated(format!(
                "token refused for audience {}: {why}",
                sluice_config::token_audience(&self.namespace, base)
            ))),
        }
    }

    async fn verdict(&self, base: &str, token: &str) -> Result<Verdict, BrokerError> {
        if let Some((queue, v, until)) = self.cache.lock().unwrap().get(token)
            && queue == base
            && Instant::now() < *until
        {
            return Ok(v.clone());
        }
        let audience = sluice_config::token_audience(&self.namespace, base);
        let verdict = self.verifier.review(&audience, token).await?;
        let ttl = match verdict {
            Verdict::Refused(_) => REFUSED_TTL,
            _ => ACCEPTED_TTL,
        };
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            token.to_string(),
            (base.to_string(), verdict.clone(), Instant::now() + ttl),
        );
        Ok(verdict)
    }
}

/// `system:serviceaccount:<ns>:<name>` → `<ns>/<name>`.
fn service_account_of(username: &str) -> Option<String> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    Some(format!("{ns}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    #[test]
    fn usernames_of_service_accounts() {
        assert_eq!(
            service_account_of("system:serviceaccount:apps:billing").as_deref(),
            Some("apps/billing")
        );
        assert_eq!(service_account_of("alice"), None);
        assert_eq!(service_account_of("system:node:n1"), None);
    }

    #[test]
    fn bearer_tokens() {
        let mut m = MetadataMap::new();
        assert!(bearer_token(&m).unwrap().is_none());
        m.insert(
            "authorization",
            MetadataValue::from_static("Bearer abc.def"),
        );
        assert_eq!(bearer_token(&m).unwrap(), Some("abc.def"));
        m.insert("authorization", MetadataValue::from_static("Basic abc"));
        let e = bearer_token(&m).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        m.insert("authorization", MetadataValue::from_static("Bearer "));
        assert!(bearer_token(&m).is_err());
    }

    /// Answers from a table and counts the questions.
    struct Table(Mutex<usize>);

    #[tonic::async_trait]
    impl TokenVerifier for Table {
        async fn review(&self, audience: &str, token: &str) -> Result<Verdict, BrokerError> {
            *self.0.lock().unwrap() += 1;
            Ok(match (audience, token) {
                (_, "good") => Verdict::of_user("system:serviceaccount:apps:billing"),
                _ => Verdict::Refused("not authenticated".into()),
            })
        }
    }

    #[tokio::test]
    async fn verdicts_are_cached_per_token_and_queue() {
        let table = Arc::new(Table(Mutex::new(0)));
        let auth = Authenticator::new(table.clone(), "apps");
        let sa = Verdict::ServiceAccount("apps/billing".into());
        assert_eq!(auth.verdict("orders", "good").await.unwrap(), sa);
        assert_eq!(auth.verdict("orders", "good").await.unwrap(), sa);
        assert_eq!(
            *table.0.lock().unwrap(),
            1,
            "the second answer came from the cache"
        );
        // The same token for another queue (another audience) is asked about anew.
        assert_eq!(auth.verdict("emails", "good").await.unwrap(), sa);
        assert_eq!(*table.0.lock().unwrap(), 2);
        assert!(matches!(
            auth.verdict("orders", "bad").await.unwrap(),
            Verdict::Refused(_)
        ));
        assert!(matches!(
            auth.verdict("orders", "bad").await.unwrap(),
            Verdict::Refused(_)
        ));
        assert_eq!(*table.0.lock().unwrap(), 3, "refusals are cached too");
    }
}
