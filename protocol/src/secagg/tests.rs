//! The whole protocol in memory: members and a session exchange messages
//! directly, with dropouts injected at each phase.

use std::sync::OnceLock;

use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use super::{session::Phase, *};

struct Identity {
    cert: Vec<u8>,
    key_pem: String,
}

/// A CA and 60 enrolled identities, made once: key generation dominates.
fn identities() -> &'static (String, Vec<Identity>) {
    static IDS: OnceLock<(String, Vec<Identity>)> = OnceLock::new();
    IDS.get_or_init(|| {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let ids = (0..60)
            .map(|i| {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::new(Vec::new()).unwrap();
                p.distinguished_name
                    .push(DnType::CommonName, format!("device {i}"));
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                let cert = p.signed_by(&key, &issuer).unwrap();
                Identity {
                    cert: cert.der().to_vec(),
                    key_pem: key.serialize_pem(),
                }
            })
            .collect();
        (ca_pem, ids)
    })
}

fn secrets(rng: &mut impl RngCore) -> [[u8; 32]; 3] {
    let mut s = [[0u8; 32]; 3];
    for k in &mut s {
        rng.fill_bytes(k);
    }
    s
}

const ROUND: RoundId = RoundId(9);

struct Outcome {
    result: Result<(Vec<u32>, usize), SessionAbort>,
    /// Sum of the inputs of members whose masked input was accepted.
    expected: Vec<u32>,
    survivors: usize,
}

/// Runs one round; `drop_at[i]` is the phase at which member i vanishes.
fn run_round(
    params: SecAggParams,
    bits: u32,
    len: usize,
    drop_at: &[Option<Phase>],
    min_survivors: usize,
    seed: u64,
) -> Outcome {
    let (ca_pem, ids) = identities();
    let verifier = PeerVerifier::from_ca_pem(ca_pem).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n = drop_at.len();
    let mut session = Session::new(ROUND, params, bits, len, 0..n, min_survivors);
    let mask = prg::ring_mask(bits);
    let inputs: Vec<Vec<u32>> = (0..n)
        .map(|_| (0..len).map(|_| rng.next_u32() & mask).collect())
        .collect();
    let mut members: Vec<Option<Participant>> = (0..n)
        .map(|_| Some(Participant::new(ROUND, params, bits, secrets(&mut rng))))
        .collect();
    let leave =
        |phase: Phase, members: &mut Vec<Option<Participant>>, session: &mut Session<usize>| {
            for (i, m) in members.iter_mut().enumerate() {
                if drop_at[i] == Some(phase) && m.take().is_some() {
                    session.drop_member(i);
                }
            }
        };
    let outcome = |result, expected, survivors| Outcome {
        result,
        expected,
        survivors,
    };

    leave(Phase::Advertise, &mut members, &mut session);
    for (i, m) in members.iter().enumerate() {
        if let Some(p) = m {
            let signer = KeySigner::from_pem(&ids[i].key_pem).unwrap();
            let ad = p.advertise(|msg| signer.sign(msg)).unwrap();
            session.advertise(i, ad, &ids[i].cert).unwrap();
        }
    }
    assert_eq!(session.pending(), 0);
    let rosters = match session.close_advertise() {
        Ok(r) => r,
        Err(e) => return outcome(Err(e), Vec::new(), 0),
    };
    leave(Phase::Share, &mut members, &mut session);
    for (i, roster) in rosters {
        if let Some(p) = &mut members[i] {
            let shares = p
                .on_roster(
                    &roster,
                    verifier.roster_check(ROUND, keys::UnixTime::now()),
                    &mut rng,
                )
                .unwrap();
            session.share_keys(i, shares).unwrap();
        }
    }
    let incoming = match session.close_share() {
        Ok(r) => r,
        Err(e) => return outcome(Err(e), Vec::new(), 0),
    };
    leave(Phase::MaskedInput, &mut members, &mut session);
    let mut expected = vec![0u32; len];
    let mut survivors = 0;
    for (i, shares) in incoming {
        let Some(p) = &mut members[i] else { continue };
        if p.on_incoming(shares).is_err() {
            // Too few neighbours to ever be unmasked: it stays silent.
            members[i] = None;
            session.drop_member(i);
            continue;
        }
        let mut words = inputs[i].clone();
        p.mask(&mut words).unwrap();
        session.masked_input(i, &words).unwrap();
        for (e, x) in expected.iter_mut().zip(&inputs[i]) {
            *e = e.wrapping_add(*x) & mask;
        }
        survivors += 1;
    }
    let requests = match session.close_masked_input() {
        Ok(r) => r,
        Err(e) => return outcome(Err(e), expected, survivors),
    };
    leave(Phase::Unmask, &mut members, &mut session);
    for (i, request) in requests {
        if let Some(p) = &mut members[i] {
            let shares = p.on_unmask(&request).unwrap();
            session.unmask(i, shares).unwrap();
        }
    }
    assert_eq!(session.pending(), 0);
    outcome(session.finish(), expected, survivors)
}

fn params(k: u32, t: f64) -> SecAggParams {
    SecAggParams {
        neighbors: k,
        threshold: Threshold::Fraction(t),
    }
}

const PHASES: [Phase; 4] = [
    Phase::Advertise,
    Phase::Share,
    Phase::MaskedInput,
    Phase::Unmask,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The unmasked sum is the plain sum of the survivors' inputs, whatever
    /// drops out where; a round that cannot be unmasked aborts.
    #[test]
    fn the_unmasked_sum_is_the_survivors_sum(
        n in 5usize..=50,
        k in 2u32..12,
        rate in 0.0f64..0.3,
        seed in any::<u64>(),
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5eed);
        let drop_at: Vec<Option<Phase>> = (0..n)
            .map(|_| (rng.random::<f64>() < rate).then(|| PHASES[rng.random_range(0..4)]))
            .collect();
        let out = run_round(params(k, 0.6), 16, 300, &drop_at, 3, seed);
        match out.result {
            Ok((sum, count)) => {
                prop_assert_eq!(count, out.survivors);
                prop_assert_eq!(sum, out.expected);
            }
            Err(SessionAbort::CorruptShares) => prop_assert!(false, "honest shares reported corrupt"),
            Err(_) => {}
        }
    }
}

#[test]
fn rounds_complete_at_every_dropout_phase() {
    // 30 members, degree 10, threshold 6: three dropouts at one phase (or
    // spread over all four) leave every neighbourhood above the threshold.
    let mut spread = vec![None; 30];
    for (i, phase) in PHASES.iter().enumerate() {
        spread[i * 7] = Some(*phase);
    }
    for drops in PHASES
        .iter()
        .map(|&p| {
            let mut d = vec![None; 30];
            for i in [0, 1, 2] {
                d[i] = Some(p);
            }
            d
        })
        .chain([vec![None; 30], spread])
    {
        let out = run_round(params(10, 0.6), 20, 1000, &drops, 10, 1);
        let (sum, count) = out.result.expect("round completes");
        assert_eq!(sum, out.expected);
        assert_eq!(count, out.survivors);
    }
}

#[test]
fn too_few_survivors_abort_cleanly() {
    let mut drops = vec![None; 10];
    for d in drops.iter_mut().take(5) {
        *d = Some(Phase::MaskedInput);
    }
    let out = run_round(params(4, 0.75), 16, 64, &drops, 6, 2);
    assert!(matches!(
        out.result,
        Err(SessionAbort::TooFewSurvivors {
            phase: "masked input",
            survivors: 5,
            needed: 6
        })
    ));
    // Dropping at unmask below a neighbourhood's threshold: nothing is
    // released, and no member was asked for both shares of anyone.
    let mut drops = vec![None; 10];
    for d in drops.iter_mut().take(6) {
        *d = Some(Phase::Unmask);
    }
    let out = run_round(params(4, 0.75), 16, 64, &drops, 2, 3);
    assert!(matches!(out.result, Err(SessionAbort::TooFewShares { .. })));
}

/// `n` members of a fresh session that have all advertised signed keys.
fn advertised(
    n: usize,
    bits: u32,
    len: usize,
    rng: &mut ChaCha20Rng,
) -> (Session<usize>, Vec<Participant>) {
    let (_, ids) = identities();
    let p = params(4, 0.75);
    let mut session = Session::new(ROUND, p, bits, len, 0..n, 2);
    let members: Vec<Participant> = (0..n)
        .map(|_| Participant::new(ROUND, p, bits, secrets(rng)))
        .collect();
    for (i, m) in members.iter().enumerate() {
        let signer = KeySigner::from_pem(&ids[i].key_pem).unwrap();
        session
            .advertise(i, m.advertise(|x| signer.sign(x)).unwrap(), &ids[i].cert)
            .unwrap();
    }
    (session, members)
}

/// The real check a member makes of a roster entry.
fn check_entry(verifier: &PeerVerifier) -> impl Fn(&RosterEntry, &PublicKeys) -> bool + '_ {
    verifier.roster_check(ROUND, keys::UnixTime::now())
}

#[test]
fn masked_inputs_look_uniform() {
    // A member's masked input, even of an all-zero update, is uniform: a
    // χ² test over its bytes (99.9% quantile of χ²(255) ≈ 330).
    let verifier = PeerVerifier::from_ca_pem(&identities().0).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let (mut session, mut members) = advertised(6, 32, 1 << 16, &mut rng);
    for (i, roster) in session.close_advertise().unwrap() {
        let shares = members[i]
            .on_roster(&roster, check_entry(&verifier), &mut rng)
            .unwrap();
        session.share_keys(i, shares).unwrap();
    }
    let (i, incoming) = session.close_share().unwrap().into_iter().next().unwrap();
    members[i].on_incoming(incoming).unwrap();
    let mut words = vec![0u32; 1 << 16];
    members[i].mask(&mut words).unwrap();
    let mut counts = [0f64; 256];
    for w in &words {
        for b in w.to_le_bytes() {
            counts[b as usize] += 1.0;
        }
    }
    let e = (words.len() * 4) as f64 / 256.0;
    let chi2: f64 = counts.iter().map(|c| (c - e).powi(2) / e).sum();
    assert!(chi2 < 330.0, "χ² = {chi2}");
    // Unmasking before the masked-input phase closed is refused by name.
    assert_eq!(
        session.finish().err(),
        Some(SessionAbort::NotUnmasking("masked input"))
    );
}

/// A member at the masked-input stage, with its roster and session.
fn masked_member() -> (Participant, Roster, Vec<u32>) {
    let verifier = PeerVerifier::from_ca_pem(&identities().0).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let (mut session, mut members) = advertised(8, 16, 16, &mut rng);
    let rosters = session.close_advertise().unwrap();
    for (i, roster) in &rosters {
        let shares = members[*i]
            .on_roster(roster, check_entry(&verifier), &mut rng)
            .unwrap();
        session.share_keys(*i, shares).unwrap();
    }
    let incoming = session.close_share().unwrap().remove(&0).unwrap();
    let mut m = members.swap_remove(0);
    m.on_incoming(incoming).unwrap();
    m.mask(&mut [0; 16]).unwrap();
    let neighbours = rosters[&0].neighbours.iter().map(|e| e.index).collect();
    (m, rosters[&0].clone(), neighbours)
}

#[test]
fn a_member_never_reveals_both_shares_of_a_neighbour() {
    let (mut m, _, neighbours) = masked_member();
    let both = UnmaskRequest {
        round: ROUND,
        survivors: neighbours.clone(),
        dropped: vec![neighbours[0]],
    };
    assert_eq!(
        m.on_unmask(&both),
        Err(SecAggError::BothShares(neighbours[0]))
    );
    // Refused once, it answers nothing more this round.
    let fair = UnmaskRequest {
        round: ROUND,
        survivors: neighbours[1..].to_vec(),
        dropped: vec![neighbours[0]],
    };
    assert_eq!(m.on_unmask(&fair), Err(SecAggError::AlreadyAnswered));

    // Asked twice in turn (survivor, then dropped): the second is refused.
    let (mut m, _, neighbours) = masked_member();
    let first = UnmaskRequest {
        round: ROUND,
        survivors: neighbours.clone(),
        dropped: Vec::new(),
    };
    assert_eq!(
        m.on_unmask(&first).unwrap().self_mask.len(),
        neighbours.len()
    );
    let second = UnmaskRequest {
        round: ROUND,
        survivors: Vec::new(),
        dropped: neighbours.clone(),
    };
    assert_eq!(m.on_unmask(&second), Err(SecAggError::AlreadyAnswered));
}

#[test]
fn substituted_keys_are_refused() {
    let (ca_pem, ids) = identities();
    let verifier = PeerVerifier::from_ca_pem(ca_pem).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let p = params(4, 0.75);
    let n = 6;
    let (mut session, members) = advertised(n, 16, 16, &mut rng);
    // A server that does not check signatures refuses them itself.
    let stranger = Participant::new(ROUND, p, 16, secrets(&mut rng));
    let signer = KeySigner::from_pem(&ids[1].key_pem).unwrap();
    let mut other = Session::new(ROUND, p, 16, 16, 0..n, 2);
    let forged = stranger.advertise(|x| signer.sign(x)).unwrap();
    assert!(other.advertise(0, forged, &ids[0].cert).is_err());

    let rosters = session.close_advertise().unwrap();
    let check = check_entry(&verifier);
    // The server swaps a neighbour's keys for its own: the signature no
    // longer matches, or the graph changes; either way the member refuses.
    let (victim, roster) = rosters.iter().next().unwrap();
    let mut tampered = roster.clone();
    let target = tampered.neighbours[0].index as usize;
    tampered.keys[target] = stranger.public_keys();
    tampered.keys.sort();
    let mut m = Participant::new(ROUND, p, 16, secrets(&mut rng));
    assert!(m.on_roster(&tampered, &check, &mut rng).is_err());
    // Replace a neighbour's certificate with another enrolled one.
    let mut tampered = roster.clone();
    tampered.neighbours[0].certificate = ids[59].cert.clone();
    let mut real = members.into_iter().nth(*victim).unwrap();
    assert_eq!(
        real.on_roster(&tampered, &check, &mut rng).err(),
        Some(SecAggError::BadSignature(tampered.neighbours[0].index))
    );
    // A lowered threshold is refused too.
    let mut lowered = roster.clone();
    lowered.threshold = 2;
    assert!(matches!(
        real.on_roster(&lowered, &check, &mut rng),
        Err(SecAggError::ThresholdMismatch { .. })
    ));
}

#[test]
fn unsafe_thresholds_are_refused() {
    assert!(params(10, 0.5).validate().is_err());
    assert!(params(10, 0.51).validate().is_ok());
    assert!(params(10, 0.6).threshold_for(10) == Ok(6));
    assert!(
        SecAggParams {
            neighbors: 10,
            threshold: Threshold::Count(5)
        }
        .validate()
        .is_err()
    );
}

#[test]
fn certificates_are_checked_at_the_time_given() {
    let (ca_pem, ids) = identities();
    let verifier = PeerVerifier::from_ca_pem(ca_pem).unwrap();
    let signer = KeySigner::from_pem(&ids[0].key_pem).unwrap();
    let signature = signer.sign(b"keys").unwrap();
    let now = keys::UnixTime::now();
    assert!(verifier.verify(&ids[0].cert, b"keys", &signature, now));
    // Before the certificate's validity (rcgen's default starts in 1975).
    let before = keys::UnixTime::since_unix_epoch(std::time::Duration::ZERO);
    assert!(!verifier.verify(&ids[0].cert, b"keys", &signature, before));
    assert!(!verifier.verify(&ids[0].cert, b"other", &signature, now));
}
