//! The Kubernetes side of [`TokenVerifier`]: a TokenReview per question. Built only
//! with the `tokenreview` feature, which only the `sluice-broker` binary needs.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use std::time::Duration;

use super::{TokenVerifier, Verdict};
use crate::error::BrokerError;

/// The API server gets this long to answer a review.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Reviews tokens with the API server (the broker's ServiceAccount needs
/// `system:auth-delegator`).
pub struct KubeTokenReview {
    client: kube::Client,
}

impl KubeTokenReview {
    pub fn new(client: kube::Client) -> Self {
        KubeTokenReview { client }
    }
}

#[tonic::async_trait]
impl TokenVerifier for KubeTokenReview {
    async fn review(&self, audience: &str, token: &str) -> Result<Verdict, BrokerError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    BrokerError::Unavailable(
                        "the Kubernetes API did not answer a TokenReview in time".into(),
                    )
                })?
                .map_err(|e| BrokerError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Ok(Verdict::Refused(why));
        }
        // The API server answers for the audiences it was asked about; a token
        // for another audience is refused above. Check the answer names ours.
        if let Some(auds) = &status.audiences
            && !auds.iter().any(|a| a == audience)
        {
            return Ok(Verdict::Refused(format!(
                "token is not for audience {audience}"
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        Ok(Verdict::of_user(&username))
    }
}
