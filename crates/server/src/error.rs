//! The one mapping from what went wrong to an HTTP status and TorchServe's error body
//! `{"code", "type", "message"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tchserve_runtime::job::PredictError;

/// An API error: status, TorchServe's exception name, and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `type` field: the exception name TorchServe clients know.
    pub kind: &'static str,
    /// The `message` field.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400 BadRequestException.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequestException", message)
    }

    /// 404 ModelNotFoundException.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ModelNotFoundException", message)
    }

    /// 404 ModelVersionNotFoundException.
    pub fn version_not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ModelVersionNotFoundException",
            message,
        )
    }

    /// 400 InvalidKeyException: token authorization refused the request.
    pub fn invalid_key() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidKeyException",
            "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
        )
    }

    /// 404 ResourceNotFoundException, for unknown paths.
    pub fn resource_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "Requested resource is not found, please refer to API document.",
        )
    }

    /// 405 MethodNotAllowedException.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowedException",
            "Requested method is not allowed, please refer to API document.",
        )
    }

    /// 409 ConflictStatusException.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "ConflictStatusException", message)
    }

    /// 403 InvalidModelVersionException.
    pub fn forbidden_version(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "InvalidModelVersionException",
            message,
        )
    }

    /// 503 ServiceUnavailableException.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            message,
        )
    }

    /// 500 InternalServerException.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            message,
        )
    }

    /// 413 RequestTooLargeException: the body is over `max_request_size`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            format!("the request body exceeds max_request_size ({limit} bytes)"),
        )
    }

    /// 408 RequestTimeoutException: the client did not send its request in time.
    pub fn timeout_reading(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "RequestTimeoutException",
            message,
        )
    }

    /// 504 RequestTimeoutException.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "RequestTimeoutException",
            message,
        )
    }
}

impl From<PredictError> for ApiError {
    fn from(e: PredictError) -> Self {
        match e {
            PredictError::BadInput(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "InvalidInputException", m)
            }
            PredictError::ModelFailed(m) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerException",
                m,
            ),
            PredictError::WorkerDied => ApiError::internal("Worker died."),
            PredictError::Timeout(s) => {
                ApiError::timeout(format!("Prediction timed out after {s} s"))
            }
        }
    }
}

/// TorchServe's JSON style: 2-space indent and a trailing newline.
pub fn pretty_json(value: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

/// A JSON response in TorchServe's style.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        pretty_json(value),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(
            self.status,
            &serde_json::json!({"code": self.status.as_u16(), "type": self.kind, "message": self.message}),
        )
    }
}
