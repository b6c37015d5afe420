//! Request parsing with Poseidon's error semantics: bad JSON, wrong types and bad query
//! values are 400 with a message; oversized bodies 413; unknown JSON fields are tolerated.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::ApiError;

/// A JSON body, read whole (clients break if we answer before reading it) and parsed
/// whatever its Content-Type says.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
        // serde reads a struct from a JSON array as well (`[2, 0]` as a claim): only objects
        // are bodies here, as in the reference.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// A boolean query parameter, spelled as the reference's Go `strconv.ParseBool` reads it
/// (`1 t T TRUE true True`, `0 f F FALSE false False`); anything else is a 400.
pub fn query_bool(
    query: &HashMap<String, String>,
    name: &str,
    default: bool,
) -> Result<bool, ApiError> {
    match query.get(name).map(String::as_str) {
        None | Some("") => Ok(default),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!(
            "query parameter {name} must be true or false, not {other:?}"
        ))),
    }
}

/// For `#[serde(deserialize_with)]` on a list of structs: each element must be a JSON object
/// (serde would read a struct from an array too).
pub fn list_of_objects<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::de::Error;
    let Some(items) = <Option<Vec<serde_json::Value>>>::deserialize(deserializer)? else {
        return Ok(None);
    };
    items
        .into_iter()
        .map(|item| {
            if !item.is_object() {
                return Err(D::Error::custom(format!(
                    "expected an object, found {item}"
                )));
            }
            T::deserialize(item).map_err(D::Error::custom)
        })
        .collect::<Result<Vec<T>, _>>()
        .map(Some)
}
