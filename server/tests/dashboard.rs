//! The web dashboard against a real server on loopback: who sees what,
//! every sign-in on the record, bad requests refused without disturbing
//! rounds, the live feed moving with commits, and HTTPS off loopback.

mod common;

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use common::*;
use covey_protocol::identity::IdentityBundle;
use covey_server::{
    Server, StateDir,
    operator::admin::{AdminClientError, AdminReply, AdminRequest, Role, call},
    state::audit::AuditEvent,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 exchange (Connection: close) over `stream`.
async fn exchange(mut stream: impl AsyncRead + AsyncWrite + Unpin, request: &[u8]) -> Reply {
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn request(method: &str, path: &str, host: &str, cookie: Option<&str>, body: &str) -> Vec<u8> {
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: &str,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let host = addr.to_string();
    exchange(stream, &request(method, path, &host, cookie, body)).await
}

fn dashboard_addr(server: &Server) -> SocketAddr {
    let url = server
        .dashboard_url()
        .expect("the dashboard is on by default");
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

async fn login(identity: &IdentityBundle, hours: u64) -> Result<String, AdminClientError> {
    match call(identity, &AdminRequest::DashboardLogin { hours }).await? {
        AdminReply::DashboardLogin { token, .. } => Ok(token),
        other => panic!("{other:?}"),
    }
}

/// Signs in with `token`; returns the cookie to send back.
async fn sign_in(addr: SocketAddr, token: &str) -> String {
    let reply = http(addr, "POST", "/login", None, &format!("token={token}")).await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(reply.header("location"), Some("/"));
    let cookie = reply.header("set-cookie").unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    cookie.split(';').next().unwrap().to_owned()
}

fn roles(state: &StateDir, names: [(&str, Role); 2]) -> [IdentityBundle; 2] {
    let store = state.open_store().unwrap();
    names.map(|(name, role)| {
        state
            .enroll_as(&store, name, Duration::from_secs(3600), None, role)
            .unwrap()
            .0
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_decide_who_sees_names_and_every_sign_in_is_on_the_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 3);
    // Three check-ins start a round: the run stays idle while we look.
    cfg.rounds.min_clients = 3;
    let state = init(tmp.path(), &cfg);
    enroll(&state, &["alice-phone", "bob-phone"]);
    let [auditor, operator] = roles(&state, [("aud", Role::Auditor), ("op", Role::Operator)]);
    let server = Server::open(&state).unwrap();
    let (addr, web) = (server.local_addr().unwrap(), dashboard_addr(&server));
    let stopper = server.stopper();
    let running = tokio::spawn(server.run());
    let at = |b: &IdentityBundle| IdentityBundle {
        server_addr: addr.to_string(),
        ..b.clone()
    };
    let (auditor, operator) = (at(&auditor), at(&operator));

    // Anyone on this host gets the auditor's view: pseudonyms, no names.
    let anonymous = http(web, "GET", "/api/state", None, "").await;
    assert_eq!(anonymous.status, 200);
    let view = anonymous.json();
    assert_eq!(view["viewer"]["role"], "auditor");
    assert_eq!(view["viewer"]["signed_in"], false);
    assert_eq!(view["devices"]["active"], 4);
    assert!(!anonymous.body.contains("alice-phone"));
    assert_eq!(view["audit"]["verified"], true);

    // A signed-in auditor still sees pseudonyms only; an operator sees names.
    let aud_token = login(&auditor, 1).await.unwrap();
    let aud_cookie = sign_in(web, &aud_token).await;
    let seen = http(web, "GET", "/api/state", Some(&aud_cookie), "").await;
    assert_eq!(seen.json()["viewer"]["signed_in"], true);
    assert!(!seen.body.contains("alice-phone"));
    let op_token = login(&operator, 1).await.unwrap();
    let op_cookie = sign_in(web, &op_token).await;
    let seen = http(web, "GET", "/api/state", Some(&op_cookie), "").await;
    assert_eq!(seen.json()["viewer"]["role"], "operator");
    assert!(seen.body.contains("alice-phone"));

    // Refusals: a made-up token, a malformed one, a login of zero hours.
    let fake = format!("token=covey-login-{}", "ab".repeat(32));
    let refused = http(web, "POST", "/login", None, &fake).await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("unknown or revoked login"));
    let refused = http(web, "POST", "/login", None, "token=letmein").await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("not a Covey login token"));
    match login(&auditor, 0).await {
        Err(AdminClientError::Refused(reason)) => {
            assert!(reason.contains("1 to 720 hours"), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    // Signing out ends the login: the cookie is worth nothing after.
    let out = http(web, "POST", "/logout", Some(&op_cookie), "").await;
    assert_eq!(out.status, 303);
    let seen = http(web, "GET", "/api/state", Some(&op_cookie), "").await;
    assert_eq!(seen.json()["viewer"]["signed_in"], false);
    assert!(!seen.body.contains("alice-phone"));

    // Revoking the auditor's certificate ends its logins at once.
    match call(&operator, &AdminRequest::Revoke { name: "aud".into() })
        .await
        .unwrap()
    {
        AdminReply::Revoked { certificates: 1 } => {}
        other => panic!("{other:?}"),
    }
    let seen = http(web, "GET", "/api/state", Some(&aud_cookie), "").await;
    assert_eq!(seen.json()["viewer"]["signed_in"], false);

    // The trail has it all, and the dashboard verified it.
    let view = http(web, "GET", "/api/state", None, "").await.json();
    assert_eq!(view["audit"]["verified"], true);
    stopper.stop().await;
    running.await.unwrap().unwrap();
    let store = state.open_store().unwrap();
    let events: Vec<AuditEvent> = store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|e| e.entry().unwrap().event)
        .collect();
    let count = |f: fn(&AuditEvent) -> bool| events.iter().filter(|e| f(e)).count();
    assert_eq!(
        count(|e| matches!(e, AuditEvent::DashboardLoginIssued { .. })),
        2
    );
    assert_eq!(
        count(|e| matches!(e, AuditEvent::DashboardSignedIn { .. })),
        2
    );
    assert_eq!(
        count(|e| matches!(e, AuditEvent::DashboardRefused { .. })),
        2
    );
    assert_eq!(
        count(|e| matches!(e, AuditEvent::DashboardLoginsRevoked { .. })),
        1
    );
    // No token is ever written down, only digests.
    let trail: String = store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|e| e.json.clone())
        .collect();
    for token in [&aud_token, &op_token] {
        let secret = token.trim_start_matches("covey-login-");
        assert!(!trail.contains(secret));
    }
}

/// Reads server-sent events until one shows `version`, merging each
/// message's changed rounds as the page does; returns every version seen
/// on the way and the rounds as merged.
async fn follow(web: SocketAddr, until: u64) -> (Vec<u64>, BTreeMap<u64, serde_json::Value>) {
    let mut stream = tokio::net::TcpStream::connect(web).await.unwrap();
    let host = web.to_string();
    stream
        .write_all(&request("GET", "/api/events", &host, None, ""))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut rounds = BTreeMap::new();
    let mut buffer = String::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
            .await
            .expect("the feed went quiet")
            .unwrap();
        assert!(n > 0, "the feed ended before version {until}: {seen:?}");
        buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
        while let Some(at) = buffer.find("\n\n") {
            let event: String = buffer.drain(..at + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                let view: serde_json::Value = serde_json::from_str(data).unwrap();
                if view["rounds_reset"] == true {
                    rounds.clear();
                }
                for line in view["rounds"].as_array().unwrap() {
                    rounds.insert(line["round"].as_u64().unwrap(), line.clone());
                }
                let version = view["live"]["version"].as_u64().unwrap();
                if seen.last() != Some(&version) {
                    seen.push(version);
                }
                if version >= until {
                    return (seen, rounds);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_while_rounds_commit_and_the_feed_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), &config("logreg", 3, 2));
    let bundles = enroll(&state, &["a", "b"]);
    let server = Server::open(&state).unwrap();
    let (addr, web) = (server.local_addr().unwrap(), dashboard_addr(&server));
    let mut commits = server.subscribe();
    let running = tokio::spawn(server.run());
    let feed = tokio::spawn(follow(web, 3));

    let big = "x".repeat(8 << 10);
    let reply = http(web, "POST", "/login", None, &big).await;
    assert_eq!(reply.status, 413);
    assert!(reply.body.contains("larger than 4096 bytes"));
    let long = format!("/{}", "a".repeat(600));
    assert_eq!(http(web, "GET", &long, None, "").await.status, 414);
    let reply = http(web, "PUT", "/", None, "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET"));
    assert_eq!(http(web, "GET", "/etc/passwd", None, "").await.status, 404);
    // DNS rebinding: a page on another origin reaching this port by a
    // name that resolves to loopback.
    let stream = tokio::net::TcpStream::connect(web).await.unwrap();
    let rebound = exchange(
        stream,
        &request("GET", "/api/state", "evil.example:80", None, ""),
    )
    .await;
    assert_eq!(rebound.status, 421);
    // Not HTTP at all.
    let stream = tokio::net::TcpStream::connect(web).await.unwrap();
    let garbage = exchange(stream, b"\x16\x03\x01\x00\xff\x01garbage\r\n\r\n").await;
    assert_ne!(garbage.status, 200);
    // Oversized headers.
    let stream = tokio::net::TcpStream::connect(web).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: {web}\r\nX-Junk: {}\r\n\r\n",
        "j".repeat(200 << 10)
    );
    let reply = exchange(stream, huge.as_bytes()).await;
    assert_ne!(reply.status, 200);

    // The run goes on, and the open feed saw it happen.
    let clients = spawn_scripted(&bundles, addr, Duration::ZERO);
    let mut last = 0;
    while last < 3 {
        last = commits.recv().await.unwrap().version.0;
    }
    let (seen, rounds) = feed.await.unwrap();
    assert_eq!(seen.last(), Some(&3));
    assert!(seen.len() >= 2, "the feed did not move: {seen:?}");
    // The changes the feed sent add up to the whole history, each round
    // committed in turn.
    let committed: Vec<_> = rounds
        .values()
        .filter(|r| r["outcome"] == "committed")
        .map(|r| r["committed_version"].as_u64().unwrap())
        .collect();
    assert_eq!(committed, [1, 2, 3], "{rounds:?}");
    assert_eq!(running.await.unwrap().unwrap().final_version, 3);
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_dashboard_is_https_and_needs_a_login() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 3);
    cfg.rounds.min_clients = 3;
    cfg.dashboard.listen = "0.0.0.0:0".parse().unwrap();
    let state = init(tmp.path(), &cfg);
    let [auditor, _] = roles(&state, [("aud", Role::Auditor), ("op", Role::Operator)]);
    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap();
    let url = server.dashboard_url().unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let port: u16 = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], port));
    let stopper = server.stopper();
    let running = tokio::spawn(server.run());

    // Plain HTTP gets nowhere.
    let plain = http(web, "GET", "/api/state", None, "").await;
    assert_ne!(plain.status, 200);

    let ca = state.ca_cert_pem().unwrap();
    let call = |method: &'static str, path: &'static str, cookie: Option<String>, body: String| {
        let ca = ca.clone();
        async move {
            https(
                web,
                &ca,
                "covey-server",
                &request(method, path, "covey-server", cookie.as_deref(), &body),
            )
            .await
        }
    };

    // Without a login: nothing but the login page.
    let reply = call("GET", "/api/state", None, String::new()).await;
    assert_eq!(reply.status, 401);
    let reply = call("GET", "/", None, String::new()).await;
    assert_eq!(reply.status, 303);
    assert_eq!(reply.header("location"), Some("/login"));
    assert_eq!(call("GET", "/login", None, String::new()).await.status, 200);

    // With one: the auditor's view, and a cookie only sent over HTTPS.
    let auditor = IdentityBundle {
        server_addr: addr.to_string(),
        ..auditor
    };
    let token = login(&auditor, 1).await.unwrap();
    let reply = call("POST", "/login", None, format!("token={token}")).await;
    assert_eq!(reply.status, 303);
    let set = reply.header("set-cookie").unwrap().to_owned();
    assert!(set.contains("; Secure"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let reply = call("GET", "/api/state", Some(cookie), String::new()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["viewer"]["role"], "auditor");

    stopper.stop().await;
    running.await.unwrap().unwrap();
}

/// One HTTPS exchange with `web`, trusting `root` for `name`.
async fn https(web: SocketAddr, root: &str, name: &'static str, request: &[u8]) -> Reply {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(covey_server::admission::pki::parse_cert(root, "root").unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(web).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(rustls::pki_types::ServerName::try_from(name).unwrap(), tcp)
        .await
        .unwrap();
    exchange(stream, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_own_certificate_serves_the_dashboard_under_the_hosts_name() {
    let tmp = tempfile::tempdir().unwrap();
    let issued = rcgen::generate_simple_self_signed(vec!["dash.example".to_owned()]).unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    let mut cfg = config("logreg", 1, 3);
    cfg.rounds.min_clients = 3;
    cfg.dashboard.listen = "0.0.0.0:0".parse().unwrap();
    cfg.dashboard.certificate = Some(cert);
    let state = init(&tmp.path().join("state"), &cfg);
    // Half a pair is refused at start, saying what is missing.
    match Server::open(&state) {
        Err(e) => assert!(
            e.to_string().contains("set both certificate and key"),
            "{e}"
        ),
        Ok(_) => panic!("a certificate without its key was accepted"),
    }
    let mut text = std::fs::read_to_string(state.root().join("config.toml")).unwrap();
    text = text.replace(
        "# key = \"/etc/ssl/covey/privkey.pem\"",
        &format!("key = {:?}", key.display().to_string()),
    );
    std::fs::write(state.root().join("config.toml"), text).unwrap();
    let server = Server::open(&state).unwrap();
    let port: u16 = server
        .dashboard_url()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], port));
    let stopper = server.stopper();
    let running = tokio::spawn(server.run());
    let get = request("GET", "/", "dash.example", None, "");
    let reply = https(web, &issued.cert.pem(), "dash.example", &get).await;
    assert_eq!(reply.status, 303);
    assert_eq!(reply.header("location"), Some("/login"));
    stopper.stop().await;
    running.await.unwrap().unwrap();
}
