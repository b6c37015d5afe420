//! Request parameters the way Grape (GitLab's API framework) takes them: from the query
//! string, a JSON body or a form body, merged into one map; form keys like `info[name]` and
//! `tag_list[]` nest. Errors follow Grape: 400 with `{"error": "..."}`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use serde_json::{Map, Value};

pub struct Params(pub Map<String, Value>);

/// A 400 in Grape's format.
pub struct ParamError(pub String);

impl IntoResponse for ParamError {
    fn into_response(self) -> Response {
        crate::error::GitlabError::from(self).into_response()
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

    /// A Boolean as Grape coerces it (dry-types `Params::Bool`, `coercions/params.rb`): the
    /// value's text is looked up in its true and false lists, so `False` (what Python agents
    /// send), `on` and `no` work; an empty string is no value at all.
    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ParamError> {
        const TRUE: [&str; 14] = [
            "1", "on", "On", "ON", "t", "true", "True", "TRUE", "T", "y", "yes", "Yes", "YES", "Y",
        ];
        const FALSE: [&str; 14] = [
            "0", "off", "Off", "OFF", "f", "false", "False", "FALSE", "F", "n", "no", "No", "NO",
            "N",
        ];
        let text = match self.0.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Bool(b)) => return Ok(Some(*b)),
            Some(Value::String(s)) if s.is_empty() => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Err(ParamError(format!("{name} is invalid"))),
        };
        // dry-types lists three spellings of each word; any case is taken here.
        let is = |list: &[&str]| list.iter().any(|v| v.eq_ignore_ascii_case(&text));
        if is(&TRUE) {
            Ok(Some(true))
        } else if is(&FALSE) {
            Ok(Some(false))
        } else {
            Err(ParamError(format!("{name} is invalid")))
        }
    }

    /// An Integer as Grape coerces it (`Integer(text, 10)`); like GitLab, values beyond the
    /// 64-bit range are invalid rather than truncated.
    pub fn integer(&self, name: &str) -> Result<Option<i64>, ParamError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
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

    /// An integer that must lie in `range` (what the column behind it holds).
    pub fn integer_in(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ParamError> {
        match self.integer(name)? {
            Some(v) if !range.contains(&v) => Err(ParamError(format!(
                "{name} is invalid: {v} is not between {} and {}",
                range.start(),
                range.end()
            ))),
            other => Ok(other),
        }
    }

    /// A string that must be one of `values` (Grape's `values:`).
    pub fn one_of(&self, name: &str, values: &[&str]) -> Result<Option<String>, ParamError> {
        match self.string(name)? {
            Some(v) if !values.contains(&v.as_str()) => {
                Err(ParamError(format!("{name} does not have a valid value")))
            }
            other => Ok(other),
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
