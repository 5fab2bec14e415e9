//! Moves the dashboard's bytes: HTTP/1.1 (over TLS off loopback) by hyper.
//! What a request means is decided by `covey_protocol::dashboard`; who may
//! see it, by the login book.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use covey_protocol::dashboard::{
    self, Asset, COOKIE, MAX_BODY_BYTES, RequestError, Route, token_from_cookie, token_from_form,
};
use governor::{Quota, RateLimiter};
use http_body_util::{BodyExt, Either, Full, Limited, channel::Channel};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::{Exposure, Listener, view::Board, view::Sent, view::Viewer};
use crate::{operator::admin::Role, state::audit::AuditEvent};

type Body = Either<Full<Bytes>, Channel<Bytes>>;

const PAGE: &str = include_str!("assets/index.html");
const LOGIN_PAGE: &str = include_str!("assets/login.html");
const SCRIPT: &str = include_str!("assets/dashboard.js");
const STYLE: &str = include_str!("assets/dashboard.css");
const CHART_SCRIPT: &str = include_str!("assets/uPlot.iife.min.js");
const CHART_STYLE: &str = include_str!("assets/uPlot.min.css");

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// Live feeds open at once; more get 503.
const MAX_FEEDS: usize = 32;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The feed sends at most this often, however fast the run moves: enough
/// for a person watching, and it keeps a thousand-device round's events
/// from turning into as many snapshots.
const FEED_INTERVAL: Duration = Duration::from_secs(1);
/// How long connections live on once the run has ended.
const FINAL_GRACE: Duration = Duration::from_secs(2);
/// A feed sends at least this often, so proxies keep the stream open.
const FEED_HEARTBEAT: Duration = Duration::from_secs(10);

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
>;

struct Shared {
    board: Arc<Board>,
    exposure: Exposure,
    port: u16,
    tls: bool,
    feeds: Arc<Semaphore>,
    /// Refused sign-ins go into the audit trail at this rate at most, so a
    /// guessing script cannot flood it; the rest are only counted.
    refusals_audited: Limiter,
}

/// Serves until the task is aborted.
pub async fn serve(listener: Listener, board: Arc<Board>) {
    let Listener {
        listener,
        exposure,
        tls,
    } = listener;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("dashboard: cannot listen: {e}");
            return;
        }
    };
    let shared = Arc::new(Shared {
        board,
        exposure,
        port,
        tls: tls.is_some(),
        feeds: Arc::new(Semaphore::new(MAX_FEEDS)),
        refusals_audited: RateLimiter::direct(Quota::per_minute(
            std::num::NonZeroU32::new(20).unwrap_or(std::num::NonZeroU32::MIN),
        )),
    });
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("dashboard: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let mut stopped = shared.board.live();
        tokio::spawn(async move {
            let _permit = permit;
            // The run's end (the hub drops its side) ends the connection too,
            // so no open browser keeps the store alive after the server stops.
            let stop = async move { while stopped.changed().await.is_ok() {} };
            let service = service_fn(move |request: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(request, &shared).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 << 10);
            let serve = async move {
                match acceptor {
                    None => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await;
                        match handshake {
                            Ok(Ok(tls)) => {
                                builder.serve_connection(TokioIo::new(tls), service).await
                            }
                            Ok(Err(e)) => {
                                debug!("dashboard: TLS handshake failed: {e}");
                                Ok(())
                            }
                            Err(_) => Ok(()),
                        }
                    }
                }
            };
            let mut serve = std::pin::pin!(serve);
            let served = tokio::select! {
                served = &mut serve => served,
                // A live feed still gets the finished run's last snapshot.
                () = stop => tokio::time::timeout(FINAL_GRACE, serve)
                    .await
                    .unwrap_or(Ok(())),
            };
            if let Err(e) = served {
                debug!("dashboard: connection ended: {e}");
            }
        });
    }
}

async fn respond(request: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let route = match dashboard::route(request.method().as_str(), request.uri().path()) {
        Ok(route) => route,
        Err(e) => return error(&e),
    };
    if shared.exposure == Exposure::Loopback && !loopback_host(&request, shared.port) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "the dashboard answers only to 127.0.0.1, localhost or [::1] on this port\n",
        );
    }
    let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
    let login = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| token_from_cookie(v.as_bytes()))
        .map(|token| shared.board.logins.check(&token, now_unix));
    let viewer = match &login {
        Some(Ok((_, login))) => Some(Viewer {
            role: login.role,
            signed_in: true,
        }),
        _ if shared.exposure == Exposure::Loopback => Some(Viewer {
            role: Role::Auditor,
            signed_in: false,
        }),
        _ => None,
    };
    match route {
        Route::LoginPage => html(StatusCode::OK, &login_page("")),
        Route::Login => sign_in(request, shared, now_unix).await,
        Route::Logout => {
            if let Some(Ok((digest, _))) = login
                && let Err(e) = shared.board.logins.sign_out(digest)
            {
                warn!("dashboard: cannot end a login: {e}");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign out\n");
            }
            let mut response = redirect("/login");
            set_cookie(&mut response, "", 0, shared.tls);
            response
        }
        Route::Asset(asset) => {
            let body = match asset {
                Asset::Script => SCRIPT,
                Asset::Style => STYLE,
                Asset::ChartScript => CHART_SCRIPT,
                Asset::ChartStyle => CHART_STYLE,
            };
            with_type(StatusCode::OK, asset.content_type(), body.to_owned())
        }
        Route::Page => match viewer {
            Some(_) => html(StatusCode::OK, PAGE),
            None => redirect("/login"),
        },
        Route::State => match viewer {
            None => text(StatusCode::UNAUTHORIZED, "sign in at /login first\n"),
            Some(viewer) => match shared.board.snapshot(viewer, &mut Sent::default()) {
                Ok(snapshot) => json(&snapshot),
                Err(e) => {
                    warn!("dashboard: cannot read the state: {e}");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the state\n")
                }
            },
        },
        Route::Events => match viewer {
            None => text(StatusCode::UNAUTHORIZED, "sign in at /login first\n"),
            Some(viewer) => feed(shared, viewer),
        },
    }
}

/// `POST /login`: a token for a cookie. Each outcome is audited.
async fn sign_in(request: Request<Incoming>, shared: &Shared, now_unix: i64) -> Response<Body> {
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(&RequestError::BodyTooLarge),
    };
    let checked = token_from_form(&body)
        .map_err(|e| e.to_string())
        .and_then(|token| {
            let held = shared.board.logins.check(&token, now_unix);
            held.map(|(digest, login)| (token, digest, login))
                .map_err(|e| e.to_string())
        });
    match checked {
        Ok((token, digest, login)) => {
            let event = AuditEvent::DashboardSignedIn {
                actor: login.actor,
                role: login.role,
                login: digest.to_string(),
            };
            if let Err(e) = shared.board.audit(event) {
                warn!("dashboard: cannot audit a sign-in: {e}");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot record the sign-in\n",
                );
            }
            info!(role = %login.role, login = %digest, "dashboard sign-in");
            let mut response = redirect("/");
            let max_age = login.expires_unix.saturating_sub(now_unix);
            set_cookie(&mut response, &token.to_text(), max_age, shared.tls);
            response
        }
        Err(reason) => {
            shared.board.refused_sign_in();
            if shared.refusals_audited.check().is_ok() {
                let event = AuditEvent::DashboardRefused {
                    reason: reason.clone(),
                };
                if let Err(e) = shared.board.audit(event) {
                    warn!("dashboard: cannot audit a refused sign-in: {e}");
                }
            }
            html(StatusCode::UNAUTHORIZED, &login_page(&reason))
        }
    }
}

/// Server-sent events: a full snapshot first, then changes as they come.
fn feed(shared: &Shared, viewer: Viewer) -> Response<Body> {
    let Ok(permit) = shared.feeds.clone().try_acquire_owned() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live dashboards are open; close one or reload later\n",
        );
    };
    let (mut tx, body) = Channel::<Bytes>::new(2);
    let board = shared.board.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut live = board.live();
        let mut sent = Sent::default();
        loop {
            let message = match board.snapshot(viewer, &mut sent) {
                Ok(snapshot) => match serde_json::to_string(&snapshot) {
                    Ok(json) => format!("event: state\ndata: {json}\n\n"),
                    Err(e) => {
                        warn!("dashboard: cannot encode the state: {e}");
                        return;
                    }
                },
                Err(e) => format!(
                    "event: problem\ndata: {}\n\n",
                    serde_json::json!(e.to_string())
                ),
            };
            if tx.send(Frame::data(Bytes::from(message))).await.is_err() {
                return;
            }
            let ended = match tokio::time::timeout(FEED_HEARTBEAT, live.changed()).await {
                Ok(changed) => changed.is_err(),
                Err(_) => false,
            };
            if ended {
                // One last snapshot shows the finished run, then the stream ends.
                if let Ok(snapshot) = board.snapshot(viewer, &mut sent)
                    && let Ok(json) = serde_json::to_string(&snapshot)
                {
                    let _ = tx
                        .send(Frame::data(Bytes::from(format!(
                            "event: state\ndata: {json}\n\n"
                        ))))
                        .await;
                }
                return;
            }
            tokio::time::sleep(FEED_INTERVAL).await;
        }
    });
    let mut response = Response::new(Either::Right(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure(&mut response);
    response
}

/// Whether the Host header names this port on a loopback name.
fn loopback_host(request: &Request<Incoming>, port: u16) -> bool {
    let Some(host) = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|name| host == format!("{name}:{port}"))
}

fn login_page(problem: &str) -> String {
    // The problem is one of the server's own messages, never user input.
    let problem = problem
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    LOGIN_PAGE.replace("{{problem}}", &problem)
}

fn set_cookie(response: &mut Response<Body>, token: &str, max_age: i64, tls: bool) {
    let secure = if tls { "; Secure" } else { "" };
    let value = format!(
        "{COOKIE}={token}; Max-Age={}; Path=/; HttpOnly; SameSite=Strict{secure}",
        max_age.max(0)
    );
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

fn secure(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure(&mut response);
    response
}

fn html(status: StatusCode, body: &str) -> Response<Body> {
    with_type(status, "text/html; charset=utf-8", body.to_owned())
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    with_type(status, "text/plain; charset=utf-8", body.to_owned())
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_string(value) {
        Ok(body) => with_type(StatusCode::OK, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut response = text(StatusCode::SEE_OTHER, "");
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

fn error(e: &RequestError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = text(status, &format!("{e}\n"));
    if status == StatusCode::METHOD_NOT_ALLOWED
        && let RequestError::MethodNotAllowed { allowed, .. } = e
        && let Ok(value) = HeaderValue::from_str(&allowed.replace(" or ", ", "))
    {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

/// Why the dashboard could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen for the dashboard on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("dashboard TLS setup: {0}")]
    Tls(String),
}

/// Binds the dashboard now, so a bad address fails at start-up. Off
/// loopback it serves HTTPS with the server's own certificate.
pub fn bind(
    addr: SocketAddr,
    server: &crate::admission::pki::ServerIdentity,
) -> Result<Listener, BindError> {
    let exposure = Exposure::of(addr);
    let tls = match exposure {
        Exposure::Loopback => None,
        Exposure::Network => Some(Arc::new(
            crate::admission::pki::https_config(server)
                .map_err(|e| BindError::Tls(e.to_string()))?,
        )),
    };
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| BindError::Listen { addr, source })?;
    Ok(Listener {
        listener,
        exposure,
        tls,
    })
}
