//! A bearer token's text: what a token may look like (the server's `hash-token` and the
//! clients check it the same way), and [`BearerToken`], the client-side interceptor that
//! sends one.

use std::fmt;

use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// Why `token` cannot be a bearer token: empty, or not printable ASCII without spaces.
pub fn check_token_text(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// A client-side interceptor adding `authorization: Bearer <token>` to every call, or
/// nothing without a token. Its `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A token as given on a command line; the error is a message for a person, for clap's
    /// `value_parser`.
    pub fn parse(token: &str) -> Result<Self, String> {
        check_token_text(token)?;
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| "a token must be printable ASCII without spaces".to_owned())?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("BearerToken(<redacted>)"),
            None => f.write_str("BearerToken(none)"),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interceptor_never_shows_its_token() {
        let token = BearerToken::parse("s3cret").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(BearerToken::parse("with space").is_err());
    }
}
