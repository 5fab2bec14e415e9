//! Connection tasks: accept, handshake, and one task per stream that moves
//! frames between the peer and the hub. Nothing here decides anything.

use super::*;
use crate::cluster::route::Steer;
use covey_protocol::message::Redirect;

pub(super) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        // Refusing before the handshake costs one packet, not a TLS exchange.
        let slot = match shared.connection_limits.admit() {
            Ok(slot) => slot,
            Err(refusal) => {
                shared.metrics.refuse_connection(refusal.as_str());
                incoming.refuse();
                continue;
            }
        };
        if shared.connection_limits.under_pressure() && !incoming.remote_address_validated() {
            // A spoofed source never answers the retry, so floods from
            // forged addresses cost no handshake.
            if incoming.retry().is_err() {
                shared
                    .metrics
                    .refuse_connection(crate::operator::metrics::ADDRESS_VALIDATION_FAILED);
            }
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    // No address in the log: the refusal reason is enough.
                    info!("handshake refused: {e}");
                    shared
                        .metrics
                        .refuse_connection(crate::operator::metrics::HANDSHAKE_FAILED);
                    return;
                }
            };
            let Some(client) = peer_pseudonym(&conn, &shared.key) else {
                close(&conn, CloseCode::ProtocolViolation, "no client certificate");
                return;
            };
            let _client_slot = match shared.connection_limits.admit_client(client) {
                Ok(slot) => slot,
                Err(refusal) => {
                    debug!(client = %client, "refused: {refusal}");
                    shared.metrics.refuse_connection(refusal.as_str());
                    close(&conn, CloseCode::Busy, refusal.as_str());
                    return;
                }
            };
            let _open = OpenConnection::new(shared.metrics.clone());
            let role = shared.admitted.role(&client).unwrap_or_default();
            let admin_alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol)
                .is_some_and(|p| p == ADMIN_ALPN);
            match (admin_alpn, role) {
                (true, Role::Device) => {
                    close(
                        &conn,
                        CloseCode::Revoked,
                        "a device certificate has no operator role",
                    );
                    return;
                }
                (true, role) => {
                    let span = info_span!("operator", client = %client, %role);
                    serve_admin(conn, client, role, shared)
                        .instrument(span)
                        .await;
                    return;
                }
                (false, Role::Device) => {}
                (false, _) => {
                    close(
                        &conn,
                        CloseCode::Revoked,
                        "operator certificates cannot train",
                    );
                    return;
                }
            }
            let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
            let span = info_span!("client", client = %client);
            serve_connection(conn, client, id, shared)
                .instrument(span)
                .await;
        });
    }
}

/// The operator API: one JSON request per stream, answered on it.
pub(super) async fn serve_admin(
    conn: quinn::Connection,
    actor: Pseudonym,
    role: Role,
    shared: Arc<Shared>,
) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let response = match recv.read_to_end(MAX_REQUEST_BYTES).await {
            Err(e) => AdminResponse::Refused {
                reason: format!("request unreadable or over {MAX_REQUEST_BYTES} bytes: {e}"),
            },
            Ok(body) => match serde_json::from_slice::<AdminRequest>(&body) {
                Err(e) => AdminResponse::Refused {
                    reason: format!("not an operator request: {e}"),
                },
                Ok(request) => {
                    let asked = ask(&shared, |reply| Event::Admin {
                        actor,
                        role,
                        request,
                        reply,
                    })
                    .await;
                    asked.unwrap_or(AdminResponse::Refused {
                        reason: "the server is stopping".into(),
                    })
                }
            },
        };
        let body = serde_json::to_vec(&response).unwrap_or_default();
        if send.write_all(&body).await.is_err() {
            break;
        }
        let _ = send.finish();
    }
}

pub(super) fn peer_pseudonym(conn: &quinn::Connection, key: &PseudonymKey) -> Option<Pseudonym> {
    peer_certificate(conn).map(|c| key.pseudonym_of(&c))
}

pub(super) fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}

pub(super) fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    conn.close(VarInt::from_u32(code as u32), reason.as_bytes());
}

/// A reason to close one client's connection.
#[derive(Debug)]
pub(super) struct PeerFault {
    code: CloseCode,
    reason: String,
}

impl PeerFault {
    fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

pub(super) fn stream_fault(e: &StreamError) -> Option<PeerFault> {
    let code = match e {
        StreamError::Io(_) => return None,
        StreamError::Frame(FrameError::TooLarge { .. }) => CloseCode::FrameTooLarge,
        StreamError::Frame(_) | StreamError::Truncated => CloseCode::MalformedFrame,
        StreamError::Unexpected { .. } => CloseCode::ProtocolViolation,
        StreamError::Tensor(_) => CloseCode::ShapeMismatch,
    };
    Some(PeerFault::new(code, e.to_string()))
}

pub(super) async fn serve_connection(
    conn: quinn::Connection,
    client: Pseudonym,
    id: u64,
    shared: Arc<Shared>,
) {
    let hello_timeout = shared.hello_timeout;
    let handshake = tokio::time::timeout(hello_timeout, handshake(&conn, &shared, &client));
    match handshake.await.unwrap_or_else(|_| {
        Err(Some(PeerFault::new(
            CloseCode::ProtocolViolation,
            format!("no Hello within {}s", hello_timeout.as_secs()),
        )))
    }) {
        Ok(()) => {}
        Err(Some(fault)) => {
            warn!(code = ?fault.code, "closing connection: {}", fault.reason);
            close(&conn, fault.code, &fault.reason);
            return;
        }
        Err(None) => return,
    }
    debug!("connected");
    shared.metrics.connections_accepted.inc();
    let _ = shared
        .events
        .send(Event::Connected {
            client,
            conn: id,
            handle: conn.clone(),
        })
        .await;
    let mut streams = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => {
                let Ok((send, recv)) = accepted else { break };
                if let Err(refusal) = shared.connection_limits.allow_request(client) {
                    warn!("closing connection: {refusal}");
                    shared.metrics.refuse_connection(refusal.as_str());
                    close(&conn, CloseCode::Busy, refusal.as_str());
                    break;
                }
                let (conn2, shared2) = (conn.clone(), shared.clone());
                streams.spawn(async move {
                    if let Err(fault) = serve_stream(&conn2, send, recv, client, id, &shared2).await {
                        warn!(code = ?fault.code, "closing connection: {}", fault.reason);
                        close(&conn2, fault.code, &fault.reason);
                    }
                }.in_current_span());
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    streams.shutdown().await;
    debug!("disconnected");
    let lost = link_lost(&conn);
    let _ = shared
        .events
        .send(Event::Disconnected {
            client,
            conn: id,
            lost,
        })
        .await;
}

/// A link that died (timeout, reset) may come back; a peer that closed its
/// connection or stream meant to leave.
pub(super) fn link_lost(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)
    )
}

/// The first stream: `Hello` → `Welcome`, or a clear refusal.
pub(super) async fn handshake(
    conn: &quinn::Connection,
    shared: &Shared,
    client: &Pseudonym,
) -> Result<(), Option<PeerFault>> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|_| None)?;
    let hello = match read_message(&mut recv, shared.limits).await {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            return Err(Some(PeerFault::new(
                CloseCode::ProtocolViolation,
                format!("expected Hello, got {}", other.kind()),
            )));
        }
        Err(e) => return Err(stream_fault(&e)),
    };
    if hello.protocol != PROTOCOL_VERSION {
        let detail = format!(
            "incompatible protocol: this server speaks version {PROTOCOL_VERSION}, the client version {}",
            hello.protocol
        );
        let _ = write_message(
            &mut send,
            &Message::Error(ErrorReport {
                code: CloseCode::IncompatibleVersion,
                detail: detail.clone(),
            }),
        )
        .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        return Err(Some(PeerFault::new(CloseCode::IncompatibleVersion, detail)));
    }
    let steer = shared
        .router
        .as_ref()
        .map_or(Steer::Serve, |r| r.steer(client));
    let redirect = match steer {
        Steer::Serve => None,
        Steer::Move(to) => Some(Redirect {
            to: Some(to),
            after_ms: 0,
        }),
        Steer::Later(after) => Some(Redirect {
            to: None,
            after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
        }),
    };
    if let Some(redirect) = redirect {
        shared.metrics.redirects.inc();
        let _ = write_message(&mut send, &Message::Redirect(redirect)).await;
        let _ = send.finish();
        // The device closes; this only bounds how long it may take.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        return Err(None);
    }
    let welcome = Message::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        software: format!("covey-server {}", env!("CARGO_PKG_VERSION")),
    });
    write_message(&mut send, &welcome).await.map_err(|_| None)?;
    let _ = send.finish();
    Ok(())
}

/// Sends `head` and then each model as f32 chunks, holding a download
/// permit until the device has acknowledged every byte, so the permits
/// bound what sits in send buffers, not just what is being written. A
/// device that stops reading is cut off after the transfer timeout.
pub(super) async fn send_models(
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    shared: &Shared,
    head: &Message,
    models: &[&[f32]],
    plan: ChunkPlan,
) -> Result<(), PeerFault> {
    let _permit = shared.downloads.acquire().await;
    let download = async {
        // Models go out as f32, which draws no randomness.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let sent = async {
            let mut n = write_message(send, head).await?;
            for model in models {
                n += write_tensor(send, model, plan, UpdateEncoding::F32, &mut rng).await?;
            }
            Ok::<u64, StreamError>(n)
        }
        .await;
        if let Ok(n) = sent {
            shared.metrics.bytes_out.inc_by(n);
        }
        let _ = send.finish();
        tokio::select! {
            _ = send.stopped() => {}
            _ = conn.closed() => {}
        }
    };
    tokio::time::timeout(shared.transfer_timeout, download)
        .await
        .map_err(|_| {
            PeerFault::new(
                CloseCode::ProtocolViolation,
                format!(
                    "model not received within {}s",
                    shared.transfer_timeout.as_secs_f64()
                ),
            )
        })
}

pub(super) async fn ask<T>(
    shared: &Shared,
    make: impl FnOnce(oneshot::Sender<T>) -> Event,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    shared.events.send(make(tx)).await.ok()?;
    rx.await.ok()
}

pub(super) async fn serve_stream(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    client: Pseudonym,
    conn_id: u64,
    shared: &Shared,
) -> Result<(), PeerFault> {
    let first = match read_message(&mut recv, shared.limits).await {
        Ok(m) => m,
        Err(e) => return stream_fault(&e).map_or(Ok(()), Err),
    };
    match first {
        Message::CheckIn => {
            let waiting = ask(shared, |reply| Event::CheckIn {
                client,
                conn: conn_id,
                reply,
            });
            let assignment = tokio::select! {
                a = waiting => a,
                _ = conn.closed() => None,
            };
            match assignment {
                Some(Assignment::Task(pkg)) => {
                    let plan = ChunkPlan::new(pkg.model.len(), pkg.task.chunk_len);
                    let head = Message::Task(pkg.task.clone());
                    send_models(
                        &mut send,
                        conn,
                        shared,
                        &head,
                        &[pkg.model.as_slice()],
                        plan,
                    )
                    .await?;
                }
                Some(Assignment::Evaluate(pkg)) => {
                    let plan = ChunkPlan::new(pkg.task.spec.param_count(), pkg.task.chunk_len);
                    let head = Message::Evaluate(pkg.task.clone());
                    let models: Vec<&[f32]> = pkg.models.iter().map(|m| m.as_slice()).collect();
                    send_models(&mut send, conn, shared, &head, &models, plan).await?;
                }
                Some(Assignment::Finished(version)) => {
                    let _ = write_message(
                        &mut send,
                        &Message::RunFinished {
                            final_version: version,
                        },
                    )
                    .await;
                }
                None => {}
            }
            let _ = send.finish();
            Ok(())
        }
        Message::Update(header) => {
            let round = header.round;
            let num_examples = header.num_examples;
            let loss = header.metrics.loss;
            let within_clip = header.within_clip;
            let payload = header.payload;
            let Some(decision) = ask(shared, |reply| Event::BeginUpdate {
                client,
                conn: conn_id,
                header,
                reply,
            })
            .await
            else {
                return Ok(());
            };
            let plan = match decision {
                Ok(plan) => plan,
                Err(RejectReason::ShapeMismatch) => {
                    return Err(PeerFault::new(
                        CloseCode::ShapeMismatch,
                        "update header does not match the task's model or encoding",
                    ));
                }
                Err(reason) => {
                    let _ = recv.stop(VarInt::from_u32(0));
                    let _ = write_message(
                        &mut send,
                        &Message::UpdateReceipt(UpdateReceipt::Rejected(reason)),
                    )
                    .await;
                    let _ = send.finish();
                    return Ok(());
                }
            };
            // Bounds how many model-sized buffers exist at once; the client
            // sends nothing until it has one.
            let permit = shared.uploads.acquire().await;
            let limits = FrameLimits {
                max_frame: shared.limits.max_frame,
            };
            let go = write_message(&mut send, &Message::SendUpdate).await;
            let reading = async {
                match payload {
                    _ if go.is_err() => Err(StreamError::Io(std::io::Error::other(
                        "stream closed before the update was sent",
                    ))),
                    Payload::Floats(encoding) => read_tensor(&mut recv, plan, encoding, limits)
                        .await
                        .map(|v| (Values::Floats(v), plan.wire_bytes(encoding))),
                    Payload::Ring { bits } => read_words(&mut recv, plan, bits, limits)
                        .await
                        .map(|w| (Values::Words(w), plan.ring_wire_bytes())),
                }
            };
            // A device that stalls must not keep the slot from the others.
            let Ok(read) = tokio::time::timeout(shared.transfer_timeout, reading).await else {
                drop(permit);
                let _ = ask(shared, |reply| Event::FinishUpdate {
                    client,
                    conn: conn_id,
                    round,
                    result: Err(Undelivered::Abandoned),
                    reply,
                })
                .await;
                return Err(PeerFault::new(
                    CloseCode::ProtocolViolation,
                    format!(
                        "update not sent within {}s",
                        shared.transfer_timeout.as_secs_f64()
                    ),
                ));
            };
            drop(permit);
            let (result, fault) = match read {
                Ok((values, bytes)) => {
                    shared.metrics.bytes_in.inc_by(bytes);
                    (
                        Ok(Received {
                            values,
                            num_examples,
                            loss,
                            within_clip,
                        }),
                        None,
                    )
                }
                Err(StreamError::Tensor(AssembleError::NonFinite { index })) => {
                    warn!(chunk = index, "rejected an update with non-finite values");
                    let _ = recv.stop(VarInt::from_u32(0));
                    (Err(Undelivered::Rejected(RejectReason::NonFinite)), None)
                }
                Err(StreamError::Io(_)) if link_lost(conn) => (Err(Undelivered::Interrupted), None),
                Err(StreamError::Io(_)) => (Err(Undelivered::Abandoned), None),
                Err(e) => (
                    Err(Undelivered::Rejected(RejectReason::ShapeMismatch)),
                    stream_fault(&e),
                ),
            };
            let receipt = ask(shared, |reply| Event::FinishUpdate {
                client,
                conn: conn_id,
                round,
                result,
                reply,
            })
            .await;
            if let Some(fault) = fault {
                return Err(fault);
            }
            if let Some(receipt) = receipt {
                let _ = write_message(&mut send, &Message::UpdateReceipt(receipt)).await;
            }
            let _ = send.finish();
            Ok(())
        }
        Message::EvalReport(report) => {
            let _ = shared
                .events
                .send(Event::EvalReport { client, report })
                .await;
            let _ = send.finish();
            Ok(())
        }
        Message::SecAgg(message) => {
            let certificate = peer_certificate(conn)
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let waiting = ask(shared, |reply| Event::SecAgg {
                client,
                message,
                certificate,
                reply,
            });
            let answer = tokio::select! {
                a = waiting => a,
                _ = conn.closed() => None,
            };
            if let Some(answer) = answer {
                let _ = write_message(&mut send, &Message::SecAgg(answer)).await;
            }
            let _ = send.finish();
            Ok(())
        }
        Message::Renew(request) => {
            let certificate = peer_certificate(conn)
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let answer = ask(shared, |reply| Event::Renew {
                client,
                request,
                certificate,
                reply,
            })
            .await;
            let message = match answer {
                Some(Ok(renewed)) => Message::Renewed(renewed),
                Some(Err(detail)) => Message::Error(ErrorReport {
                    code: CloseCode::ProtocolViolation,
                    detail,
                }),
                None => return Ok(()),
            };
            let _ = write_message(&mut send, &message).await;
            let _ = send.finish();
            Ok(())
        }
        Message::FetchAsset(request) => {
            let _permit = shared.downloads.acquire().await;
            match crate::state::assets::serve(
                &mut send,
                &shared.assets,
                request,
                shared.transfer_timeout,
            )
            .await
            {
                Ok(bytes) => {
                    shared.metrics.bytes_out.inc_by(bytes);
                }
                Err(refusal) => debug!("asset not sent: {}", refusal.0),
            }
            let _ = send.finish();
            Ok(())
        }
        other => Err(PeerFault::new(
            CloseCode::ProtocolViolation,
            format!("unexpected {} at the start of a stream", other.kind()),
        )),
    }
}
