//! The web dashboard's requests, decided without I/O: which page or feed a
//! request asks for, and the login token it carries. The server's HTTP
//! driver hands these functions a request's method, path, cookie header and
//! form body; the fuzz target hands them anything.
//!
//! A login is a bearer token the server issues to an enrolled auditor,
//! operator or admin over the operator API. The server stores only its
//! SHA-256, so a copy of the database logs nobody in.

use std::fmt;

use ring::{digest, rand::SecureRandom};

/// The largest request body the dashboard reads (the login form).
pub const MAX_BODY_BYTES: usize = 4 << 10;
/// The longest path (query included) the dashboard routes.
pub const MAX_PATH_BYTES: usize = 512;
/// The cookie a browser holds its login in.
pub const COOKIE: &str = "covey_login";
/// Every token starts with this, so a leaked one is recognisable in a scan.
pub const TOKEN_PREFIX: &str = "covey-login-";
const TOKEN_BYTES: usize = 32;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The dashboard page.
    Page,
    /// The login form.
    LoginPage,
    /// `POST /login`: exchange a token for a cookie.
    Login,
    /// `POST /logout`: end this login everywhere.
    Logout,
    /// The page's own script and style, and the vendored chart library.
    Asset(Asset),
    /// One snapshot of everything the page shows, as JSON.
    State,
    /// The same snapshots as server-sent events, as the run moves.
    Events,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    Script,
    Style,
    ChartScript,
    ChartStyle,
}

impl Asset {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Script | Self::ChartScript => "text/javascript; charset=utf-8",
            Self::Style | Self::ChartStyle => "text/css; charset=utf-8",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no such page: {0}")]
    NotFound(String),
    #[error("{path} does not take {method} (use {allowed})")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("the request path is longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("the request body is larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("the login form has no token field")]
    NoToken,
    #[error("not a Covey login token: {0}")]
    BadToken(&'static str),
}

impl RequestError {
    /// The HTTP status that goes with the error.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::PathTooLong => 414,
            Self::BodyTooLarge => 413,
            Self::NoToken | Self::BadToken(_) => 400,
        }
    }
}

/// Routes a request by method and path; a query string is ignored.
pub fn route(method: &str, path: &str) -> Result<Route, RequestError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(RequestError::PathTooLong);
    }
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let (route, allowed) = match path {
        "/" => (Route::Page, "GET"),
        "/login" if method == "POST" => (Route::Login, "GET or POST"),
        "/login" => (Route::LoginPage, "GET or POST"),
        "/logout" => (Route::Logout, "POST"),
        "/dashboard.js" => (Route::Asset(Asset::Script), "GET"),
        "/dashboard.css" => (Route::Asset(Asset::Style), "GET"),
        "/uPlot.iife.min.js" => (Route::Asset(Asset::ChartScript), "GET"),
        "/uPlot.min.css" => (Route::Asset(Asset::ChartStyle), "GET"),
        "/api/state" => (Route::State, "GET"),
        "/api/events" => (Route::Events, "GET"),
        other => {
            let shown: String = other.chars().take(80).collect();
            return Err(RequestError::NotFound(shown));
        }
    };
    let ok = match route {
        Route::Login | Route::Logout => method == "POST",
        _ => method == "GET" || method == "HEAD",
    };
    if ok {
        Ok(route)
    } else {
        Err(RequestError::MethodNotAllowed {
            method: method.chars().take(16).collect(),
            path: path.to_owned(),
            allowed,
        })
    }
}

/// A login's secret, as the holder sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginToken([u8; TOKEN_BYTES]);

/// What the server keeps of a token: its SHA-256.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoginDigest(pub [u8; 32]);

impl LoginToken {
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, ring::error::Unspecified> {
        let mut bytes = [0u8; TOKEN_BYTES];
        rng.fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// The text a holder pastes into the login form.
    pub fn to_text(&self) -> String {
        let mut text = String::with_capacity(TOKEN_PREFIX.len() + 2 * TOKEN_BYTES);
        text.push_str(TOKEN_PREFIX);
        for b in self.0 {
            text.push(char::from(HEX[usize::from(b >> 4)]));
            text.push(char::from(HEX[usize::from(b & 15)]));
        }
        text
    }

    pub fn parse(text: &str) -> Result<Self, RequestError> {
        let hex = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(RequestError::BadToken(
                "it does not start with covey-login-",
            ))?;
        if hex.len() != 2 * TOKEN_BYTES {
            return Err(RequestError::BadToken("wrong length"));
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            let nibble = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                _ => Err(RequestError::BadToken("not lower-case hex")),
            };
            bytes[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Ok(Self(bytes))
    }

    pub fn digest(&self) -> LoginDigest {
        let d = digest::digest(&digest::SHA256, &self.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        LoginDigest(out)
    }
}

impl fmt::Debug for LoginToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret, not even in a debug log.
        write!(f, "LoginToken({})", self.digest())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for LoginDigest {
    /// The login's id in the audit trail: the digest's first 8 bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for LoginDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The token of a login form (`application/x-www-form-urlencoded`).
pub fn token_from_form(body: &[u8]) -> Result<LoginToken, RequestError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(RequestError::BodyTooLarge);
    }
    let text = std::str::from_utf8(body).map_err(|_| RequestError::BadToken("not UTF-8"))?;
    let value = text
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "token")
        .map(|(_, value)| value)
        .ok_or(RequestError::NoToken)?;
    // Tokens are letters, digits and dashes, which forms send as they are;
    // a browser turns pasted spaces into `+` or `%20`.
    let value = value
        .trim_matches('+')
        .trim_start_matches("%20")
        .trim_end_matches("%20");
    LoginToken::parse(value)
}

/// The token in a `Cookie` header, if it carries one that parses.
pub fn token_from_cookie(header: &[u8]) -> Option<LoginToken> {
    let text = std::str::from_utf8(header).ok()?;
    text.split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| LoginToken::parse(value).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routes_pages_feeds_and_refuses_the_rest() {
        assert_eq!(route("GET", "/"), Ok(Route::Page));
        assert_eq!(route("GET", "/?x=1"), Ok(Route::Page));
        assert_eq!(route("HEAD", "/api/state"), Ok(Route::State));
        assert_eq!(route("GET", "/api/events"), Ok(Route::Events));
        assert_eq!(route("GET", "/login"), Ok(Route::LoginPage));
        assert_eq!(route("POST", "/login"), Ok(Route::Login));
        assert_eq!(
            route("GET", "/uPlot.iife.min.js"),
            Ok(Route::Asset(Asset::ChartScript))
        );
        assert_eq!(
            route("GET", "/../etc/passwd"),
            Err(RequestError::NotFound("/../etc/passwd".into()))
        );
        let e = route("GET", "/logout").unwrap_err();
        assert_eq!(e.status(), 405);
        assert_eq!(e.to_string(), "/logout does not take GET (use POST)");
        assert_eq!(route("DELETE", "/").unwrap_err().status(), 405);
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(route("GET", &long), Err(RequestError::PathTooLong));
    }

    #[test]
    fn tokens_round_trip_and_only_the_digest_is_shown() {
        let rng = ring::rand::SystemRandom::new();
        let token = LoginToken::generate(&rng).unwrap();
        let text = token.to_text();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert_eq!(LoginToken::parse(&text).unwrap(), token);
        assert!(!format!("{token:?}").contains(&text[TOKEN_PREFIX.len()..]));
        let other = LoginToken::generate(&rng).unwrap();
        assert_ne!(token.digest(), other.digest());
        assert_eq!(token.digest().to_string().len(), 16);
    }

    #[test]
    fn forms_and_cookies_carry_tokens() {
        let token = LoginToken([7; 32]);
        let text = token.to_text();
        let form = format!("next=%2F&token={text}");
        assert_eq!(token_from_form(form.as_bytes()).unwrap(), token);
        assert_eq!(
            token_from_form(format!("token=+{text}+").as_bytes()).unwrap(),
            token
        );
        assert_eq!(token_from_form(b"user=x"), Err(RequestError::NoToken));
        assert_eq!(
            token_from_form(b"token=hunter2"),
            Err(RequestError::BadToken(
                "it does not start with covey-login-"
            ))
        );
        assert_eq!(
            token_from_form(&vec![b'a'; MAX_BODY_BYTES + 1]),
            Err(RequestError::BodyTooLarge)
        );
        let cookie = format!("theme=dark; {COOKIE}={text}; other=1");
        assert_eq!(token_from_cookie(cookie.as_bytes()), Some(token));
        assert_eq!(token_from_cookie(b"covey_login=covey-login-00"), None);
        assert_eq!(token_from_cookie(&[0xff, 0xfe]), None);
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(method in ".{0,8}", path in ".{0,600}", body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = route(&method, &path);
            let _ = token_from_form(&body);
            let _ = token_from_cookie(&body);
        }

        #[test]
        fn any_token_round_trips(bytes in any::<[u8; 32]>()) {
            let token = LoginToken(bytes);
            prop_assert_eq!(LoginToken::parse(&token.to_text()).unwrap(), token);
        }
    }
}
