//! Releasing a round: its summed updates (a single server's, or the merge
//! of leaves' partial sums at the root) into the mean update the server
//! optimizer applies. Ring words are decoded here; central DP's noise is
//! added here, once, to the whole sum, and the ledger records the spend;
//! nothing here sees a single device's update.

use covey_privacy::quantize::Quantizer;
use covey_protocol::RoundId;
use tracing::warn;

use crate::{
    config::Settings,
    fold::merge::{Aggregate, Summed},
    rounds::dp::{DpMode, Privacy, PrivacyLedger},
};

/// Why a round's aggregate could not be released; the round is retried.
#[derive(Debug, thiserror::Error)]
#[error("releasing the round's aggregate: {0}")]
pub struct ReleaseError(String);

/// The quantizer ring-word updates are encoded with: distributed DP's, or
/// secure aggregation's own when DP is off; `None` when updates are floats.
pub fn ring_quantizer(settings: &Settings) -> Option<Quantizer> {
    match settings.dp.map(|dp| dp.mode) {
        Some(DpMode::Distributed(plan)) => Some(plan.quantizer),
        Some(DpMode::Central { .. }) => None,
        None => settings.secagg.and_then(|sa| sa.noiseless).map(|(_, q)| q),
    }
}

/// The mean update of `sum`, and under DP the ledger after this release.
/// `ring` is the quantizer ring-word updates were encoded with.
pub async fn mean_update(
    settings: &Settings,
    privacy: Option<&Privacy>,
    ring: Option<Quantizer>,
    sum: Aggregate,
    within_clip: u64,
    round: RoundId,
) -> Result<(Vec<f32>, Option<PrivacyLedger>), ReleaseError> {
    let corrupt = ReleaseError;
    // Under DP: noise on the sum, a fixed denominator, and the ledger
    // entry that goes into the same transaction as the version.
    let (mean, ledger) = match (privacy, sum) {
        (None, Aggregate::Summed(Summed::Floats(sum))) => match &settings.buffer {
            // FedBuff: the staleness-weighted sum over K, not a mean,
            // so stale updates move the model less.
            Some(buffer) => {
                let mut total = sum.into_sum().map_err(|e| corrupt(e.to_string()))?;
                let inv = 1.0 / buffer.size as f32;
                total.iter_mut().for_each(|v| *v *= inv);
                (total, None)
            }
            None => (sum.mean().map_err(|e| corrupt(e.to_string()))?, None),
        },
        (Some(p), Aggregate::Summed(Summed::Ring { words, count, .. })) => {
            if count == 0 {
                return Err(corrupt("no update was aggregated".into()));
            }
            let DpMode::Distributed(plan) = p.dp.mode else {
                return Err(corrupt("a ring aggregate without distributed DP".into()));
            };
            let (mean, at_risk) =
                p.dp.decode_sum(&plan, &words)
                    .map_err(|e| corrupt(e.to_string()))?;
            if at_risk > 0 {
                warn!(
                    round = %round,
                    coordinates = at_risk,
                    "the modular sum came near the ring's edge and may have wrapped: raise privacy.bits or lower the clip"
                );
            }
            let mut ledger = p.ledger.clone();
            ledger.spend(&p.dp);
            (mean, Some(ledger))
        }
        (Some(p), Aggregate::Summed(Summed::Floats(sum))) => {
            let mut total = sum.into_sum().map_err(|e| corrupt(e.to_string()))?;
            let (dp, clip, rng) = (p.dp, p.ledger.clip, p.rng.clone());
            let mut ledger = p.ledger.clone();
            let (total, ledger) = tokio::task::spawn_blocking(move || {
                let mut rng = rng.lock().map_err(|_| "noise source poisoned".to_owned())?;
                dp.privatize(&mut total, clip, &mut rng)
                    .map_err(|e| e.to_string())?;
                ledger.clip = dp
                    .next_clip(
                        clip,
                        usize::try_from(within_clip).unwrap_or(usize::MAX),
                        &mut rng,
                    )
                    .map_err(|e| e.to_string())?;
                ledger.spend(&dp);
                Ok::<_, String>((total, ledger))
            })
            .await
            .map_err(|e| corrupt(format!("noise task: {e}")))?
            .map_err(corrupt)?;
            (total, Some(ledger))
        }
        (None, Aggregate::Buffered { updates, weights }) => {
            let aggregator = settings.aggregator;
            let combined =
                tokio::task::spawn_blocking(move || aggregator.aggregate(&updates, &weights))
                    .await
                    .map_err(|e| corrupt(format!("aggregation task: {e}")))?
                    .map_err(|e| corrupt(e.to_string()))?;
            (combined, None)
        }
        (None, Aggregate::Summed(Summed::Ring { words, count, .. })) => {
            // Secure aggregation without DP: the survivors' plain mean.
            let Some(quantizer) = ring.filter(|_| count > 0) else {
                return Err(corrupt("a ring aggregate without its quantizer".into()));
            };
            let (mut mean, at_risk) = quantizer
                .decode(&words)
                .map_err(|e| corrupt(e.to_string()))?;
            if at_risk > 0 {
                warn!(
                    round = %round,
                    coordinates = at_risk,
                    "the modular sum came near the ring's edge and may have wrapped: raise secure_aggregation.bits or lower its clip"
                );
            }
            let inv = 1.0 / count as f32;
            mean.iter_mut().for_each(|v| *v *= inv);
            (mean, None)
        }
        (Some(_), Aggregate::Buffered { .. }) => {
            return Err(corrupt(
                "the round's aggregate does not match its privacy mode".into(),
            ));
        }
    };
    Ok((mean, ledger))
}
