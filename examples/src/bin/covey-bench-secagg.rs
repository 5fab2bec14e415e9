//! Secure aggregation's cost per phase, in memory with the real crypto:
//! client time, server time and bytes per client, for n clients, d values
//! and a dropout rate (members that vanish before their masked input, the
//! costly case for the server, as in Bonawitz et al. 2017's Table 3).
//!
//! Every member runs the key phases and the unmask phase for real. Masking
//! is timed on `--masked-clients` members; the others send uniform words,
//! which costs the server the same, since it cannot tell them apart.
//!
//! `cargo build --release -p covey-examples &&
//!  target/release/covey-bench-secagg --clients 100 --dim 1663370 --dropout 0.1`
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use covey_protocol::{
    RoundId,
    secagg::{
        KeySigner, Participant, PeerVerifier, SecAggMessage, SecAggParams, Session, Threshold,
        prg::ring_mask,
    },
    tensor::ChunkPlan,
};
use covey_server::admission::pki;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Values per update (the CNN's 1,663,370 by default); masked words are
    /// the next power of two, the Hadamard rotation's length.
    #[arg(long, default_value_t = 1_663_370)]
    dim: usize,
    /// Fraction of members that drop before sending masked input.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    #[arg(long, default_value_t = 20)]
    neighbors: u32,
    #[arg(long, default_value_t = 0.6)]
    threshold: f64,
    #[arg(long, default_value_t = 20)]
    bits: u32,
    /// Members whose masking is timed (the rest send uniform words).
    #[arg(long, default_value_t = 3)]
    masked_clients: usize,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn secrets(rng: &mut impl RngCore) -> [[u8; 32]; 3] {
    let mut s = [[0u8; 32]; 3];
    for k in &mut s {
        rng.fill_bytes(k);
    }
    s
}

fn size(m: SecAggMessage) -> u64 {
    postcard::to_stdvec(&covey_protocol::Message::SecAgg(m)).map_or(0, |v| v.len() as u64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.clients < 3 || !(0.0..0.5).contains(&args.dropout) {
        bail!("need at least 3 clients and a dropout rate in [0, 0.5)");
    }
    let params = SecAggParams {
        neighbors: args.neighbors,
        threshold: Threshold::Fraction(args.threshold),
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let n = args.clients;
    let len = args.dim.next_power_of_two();
    let round = RoundId(1);
    let mut rng = ChaCha20Rng::seed_from_u64(7);

    eprintln!("enrolling {n} identities…");
    let ca = pki::create_ca()?;
    let verifier = PeerVerifier::from_ca_pem(&ca.cert_pem)?;
    let identities = (0..n)
        .map(|i| pki::issue_client_cert(&ca.key_pem, &format!("b{i}"), Duration::from_secs(3600)))
        .collect::<Result<Vec<_>, _>>()?;
    let signers = identities
        .iter()
        .map(|id| KeySigner::from_pem(&id.key_pem))
        .collect::<Result<Vec<_>, _>>()?;

    let mut session = Session::new(round, params, args.bits, len, 0..n, 2);
    let mut members: Vec<Participant> = (0..n)
        .map(|_| Participant::new(round, params, args.bits, secrets(&mut rng)))
        .collect();
    let mut client = [Duration::ZERO; 4];
    let mut server = [Duration::ZERO; 4];
    let mut bytes_up = [0u64; 4];
    let mut bytes_down = [0u64; 4];

    // Phase 1.
    for (i, m) in members.iter().enumerate() {
        let t = Instant::now();
        let ad = m.advertise(|msg| signers[i].sign(msg))?;
        client[0] += t.elapsed();
        bytes_up[0] += size(SecAggMessage::Advertise(ad.clone()));
        let t = Instant::now();
        session.advertise(i, ad, &identities[i].cert_der)?;
        server[0] += t.elapsed();
    }
    let t = Instant::now();
    let rosters = session.close_advertise().map_err(anyhow::Error::msg)?;
    server[0] += t.elapsed();

    // Phase 2.
    for (i, roster) in rosters {
        bytes_down[0] += size(SecAggMessage::Roster(roster.clone()));
        let t = Instant::now();
        let shares = members[i].on_roster(
            &roster,
            verifier.roster_check(round, covey_protocol::secagg::keys::UnixTime::now()),
            &mut rng,
        )?;
        client[1] += t.elapsed();
        bytes_up[1] += size(SecAggMessage::ShareKeys(shares.clone()));
        let t = Instant::now();
        session.share_keys(i, shares)?;
        server[1] += t.elapsed();
    }
    let t = Instant::now();
    let incoming = session.close_share().map_err(anyhow::Error::msg)?;
    server[1] += t.elapsed();

    // Phase 3: the first ⌈dropout·n⌉ members (by a seeded shuffle) vanish.
    let mut order: Vec<usize> = (0..n).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
    let dropped: std::collections::BTreeSet<usize> = order
        .iter()
        .take((args.dropout * n as f64).round() as usize)
        .copied()
        .collect();
    let mask = ring_mask(args.bits);
    let mut timed = 0;
    let mut mask_time = Duration::ZERO;
    let mut survivors = 0;
    for (i, shares) in incoming {
        bytes_down[1] += size(SecAggMessage::IncomingShares(shares.clone()));
        if dropped.contains(&i) {
            session.drop_member(i);
            continue;
        }
        let t = Instant::now();
        members[i].on_incoming(shares)?;
        client[2] += t.elapsed();
        let mut words: Vec<u32> = (0..len).map(|_| rng.random::<u32>() & mask).collect();
        if timed < args.masked_clients {
            let t = Instant::now();
            members[i].mask(&mut words)?;
            mask_time += t.elapsed();
            timed += 1;
        } else {
            // Still moves the member forward; its words stay uniform.
            members[i].mask(&mut [])?;
        }
        let t = Instant::now();
        session.masked_input(i, &words)?;
        server[2] += t.elapsed();
        survivors += 1;
    }
    bytes_up[2] = ChunkPlan::new(len, 16_384).ring_wire_bytes();
    let t = Instant::now();
    let requests = session.close_masked_input().map_err(anyhow::Error::msg)?;
    server[2] += t.elapsed();

    // Phase 4.
    for (i, request) in requests {
        bytes_down[2] += size(SecAggMessage::UnmaskRequest(request.clone()));
        let t = Instant::now();
        let shares = members[i].on_unmask(&request)?;
        client[3] += t.elapsed();
        bytes_up[3] += size(SecAggMessage::UnmaskShares(shares.clone()));
        let t = Instant::now();
        session.unmask(i, shares)?;
        server[3] += t.elapsed();
    }
    let t = Instant::now();
    let (_, count) = session
        .finish()
        .map_err(|e| anyhow::anyhow!("unmasking failed: {e}"))
        .context("a seeded shuffle left a neighbourhood below the threshold; lower --dropout")?;
    server[3] += t.elapsed();

    let per = |d: Duration, k: usize| d.as_secs_f64() / k.max(1) as f64;
    let client_s = [
        per(client[0], n),
        per(client[1], n),
        per(client[2], survivors) + per(mask_time, timed),
        per(client[3], survivors),
    ];
    let server_s = server.map(|d| d.as_secs_f64());
    let up = [
        bytes_up[0] / n as u64,
        bytes_up[1] / n as u64,
        bytes_up[2],
        bytes_up[3] / survivors.max(1) as u64,
    ];
    let down = [
        bytes_down[0] / n as u64,
        bytes_down[1] / n as u64,
        bytes_down[2] / survivors.max(1) as u64,
    ];
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "clients": n, "dim": args.dim, "words": len, "dropout": args.dropout,
                "neighbors": args.neighbors, "survivors": count,
                "client_s": client_s, "server_s": server_s,
                "bytes_up": up, "bytes_down": down,
            })
        );
    } else {
        println!(
            "n={n} d={} (words {len}) dropout={} k={} survivors={count}",
            args.dim, args.dropout, args.neighbors
        );
        for (p, name) in ["advertise", "share", "masked input", "unmask"]
            .iter()
            .enumerate()
        {
            println!(
                "{name:>13}: client {:>9.4} s  server {:>9.4} s  up {:>9} B",
                client_s[p], server_s[p], up[p]
            );
        }
        println!("  down per client: {:?} B", down);
    }
    Ok(())
}
