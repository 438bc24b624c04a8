//! Phase 1 of the request path ([`super::Proxy::route`]) over a request head, for the fuzz
//! targets in `fuzz/` (cargo feature `fuzzing`; not part of latchkey's API).

use super::{Form, Proxy, Routed};

/// What phase 1 learned of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub form: &'static str,
    /// The connection the request names, if it names one.
    pub id: Option<String>,
    pub has_token: bool,
    /// The path and query to send on.
    pub path_and_query: String,
    /// Forward form: the scheme, host and port the request URL names.
    pub requested: Option<(&'static str, String, Option<u16>)>,
}

/// Routes a request as the proxy's first phase does; the error is the answer's message.
pub fn route(req: &http::Request<()>) -> Result<Route, String> {
    let form = |f: Form| f.as_str();
    match Proxy::route(req, req.uri()).map_err(|e| e.to_string())? {
        Routed::Named(r) => Ok(Route {
            form: form(r.form),
            id: Some(r.id.as_str().to_string()),
            has_token: r.token.is_some(),
            path_and_query: r.path_and_query.into_owned(),
            requested: r
                .requested
                .map(|q| (q.scheme.as_str(), q.host.to_string(), q.port)),
        }),
        Routed::Unnamed(u) => Ok(Route {
            form: form(u.form),
            id: None,
            has_token: u.token.is_some(),
            path_and_query: u.path_and_query.into_owned(),
            requested: Some((
                u.requested.scheme.as_str(),
                u.requested.host.to_string(),
                u.requested.port,
            )),
        }),
    }
}
