//! Request parameters the way Grape (GitLab's API framework) takes them: from the query
//! string, a JSON body or a form body, merged into one map; form keys like `info[name]` and
//! `tag_list[]` nest. Errors follow Grape: 400 with `{"error": "..."}`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

pub struct Params(pub Map<String, Value>);

/// A 400 in Grape's format.
pub struct ParamError(pub String);

impl IntoResponse for ParamError {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, Json(json!({ "error": self.0 }))).into_response()
    }
}

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut params = Map::new();
        if let Some(query) = req.uri().query() {
            merge_form(&mut params, query.as_bytes());
        }
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if is_json && !body.is_empty() {
            match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(map)) => params.extend(map),
                _ => return Err(ParamError("the body is not a JSON object".into()).into_response()),
            }
        } else if !body.is_empty() {
            merge_form(&mut params, &body);
        }
        Ok(Params(params))
    }
}

fn merge_form(params: &mut Map<String, Value>, data: &[u8]) {
    for (key, value) in form_urlencoded::parse(data) {
        let value = Value::String(value.into_owned());
        match key.split_once('[') {
            Some((name, "]")) => {
                let entry = params
                    .entry(name)
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(items) = entry {
                    items.push(value);
                }
            }
            Some((name, rest)) if rest.ends_with(']') => {
                let entry = params
                    .entry(name)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(map) = entry {
                    map.insert(rest.trim_end_matches(']').to_string(), value);
                }
            }
            _ => {
                params.insert(key.into_owned(), value);
            }
        }
    }
}

impl Params {
    pub fn has(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|v| !v.is_null())
    }

    pub fn required_string(&self, name: &str) -> Result<String, ParamError> {
        self.string(name)?
            .ok_or_else(|| ParamError(format!("{name} is missing")))
    }

    pub fn string(&self, name: &str) -> Result<Option<String>, ParamError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(ParamError(format!("{name} is invalid"))),
        }
    }

    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ParamError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" || s == "1" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" || s == "0" => Ok(Some(false)),
            Some(_) => Err(ParamError(format!("{name} is invalid"))),
        }
    }

    pub fn integer(&self, name: &str) -> Result<Option<i64>, ParamError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| ParamError(format!("{name} is invalid"))),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ParamError(format!("{name} is invalid"))),
            Some(_) => Err(ParamError(format!("{name} is invalid"))),
        }
    }

    /// An array of strings, or one comma-separated string.
    pub fn string_list(&self, name: &str) -> Result<Vec<String>, ParamError> {
        let items: Vec<String> = match self.0.get(name) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.split(',').map(String::from).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(ParamError(format!("{name} is invalid"))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ParamError(format!("{name} is invalid"))),
        };
        Ok(items
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect())
    }

    pub fn object(&self, name: &str) -> Result<Value, ParamError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(Value::Object(Map::new())),
            Some(v @ Value::Object(_)) => Ok(v.clone()),
            Some(_) => Err(ParamError(format!("{name} is invalid"))),
        }
    }
}
