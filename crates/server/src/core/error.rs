//! What can go wrong serving a request, and the one mapping from each kind to an HTTP status,
//! TorchServe's exception name and a gRPC status code. Frontends only choose the body's shape:
//! TorchServe's `{"code", "type", "message"}` or the KServe protocols' `{"error"}`.

use axum::http::StatusCode;
use tchserve_backend::job::PredictError;

/// An error of the core, by kind; each frontend renders it in its protocol's shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or out of bounds.
    #[error("{0}")]
    BadRequest(String),
    /// The archive cannot be served.
    #[error("{0}")]
    InvalidModel(String),
    /// A remote archive could not be downloaded.
    #[error("{0}")]
    DownloadFailed(String),
    /// The model's handler cannot turn this input into model input.
    #[error("{0}")]
    InvalidInput(String),
    /// Token authorization refused the request.
    #[error(
        "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
    )]
    InvalidKey,
    /// `/token` was asked for a key type other than inference or management.
    #[error("{0}")]
    UnknownKeyType(String),
    /// No model of that name.
    #[error("{0}")]
    ModelNotFound(String),
    /// The model has no such version.
    #[error("{0}")]
    VersionNotFound(String),
    /// No route for the path.
    #[error("Requested resource is not found, please refer to API document.")]
    ResourceNotFound,
    /// A known path with the wrong method.
    #[error("Requested method is not allowed, please refer to API document.")]
    MethodNotAllowed,
    /// The model version is already registered.
    #[error("{0}")]
    Conflict(String),
    /// The default version cannot be removed while others exist.
    #[error("{0}")]
    DefaultVersion(String),
    /// The body is over `max_request_size` (the limit, in bytes).
    #[error("the request body exceeds max_request_size ({0} bytes)")]
    TooLarge(usize),
    /// The client did not send its request in time.
    #[error("{0}")]
    ReadTimeout(String),
    /// The answer did not come within the response timeout.
    #[error("{0}")]
    Timeout(String),
    /// No worker, or a full queue: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// A feature of TorchServe's that tchserve does not have (explanations).
    #[error("{0}")]
    NotImplemented(String),
    /// The model ran out of memory (TorchServe's 507).
    #[error("{0}")]
    OutOfResources(String),
    /// The server or the model failed.
    #[error("{0}")]
    Internal(String),
}

/// gRPC status codes, by their numbers in the gRPC specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum GrpcCode {
    /// 3.
    InvalidArgument = 3,
    /// 4.
    DeadlineExceeded = 4,
    /// 5.
    NotFound = 5,
    /// 6.
    AlreadyExists = 6,
    /// 7.
    PermissionDenied = 7,
    /// 8.
    ResourceExhausted = 8,
    /// 9.
    FailedPrecondition = 9,
    /// 12.
    Unimplemented = 12,
    /// 13.
    Internal = 13,
    /// 14.
    Unavailable = 14,
    /// 16.
    Unauthenticated = 16,
}

impl ApiError {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_)
            | ApiError::InvalidModel(_)
            | ApiError::DownloadFailed(_)
            | ApiError::InvalidInput(_)
            | ApiError::InvalidKey
            | ApiError::UnknownKeyType(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_)
            | ApiError::VersionNotFound(_)
            | ApiError::ResourceNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::DefaultVersion(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::OutOfResources(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The exception name TorchServe's clients know (the `type` of its error body).
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequestException",
            ApiError::InvalidModel(_) => "InvalidModelException",
            ApiError::DownloadFailed(_) => "DownloadArchiveException",
            ApiError::InvalidInput(_) => "InvalidInputException",
            // TorchServe answers every refusal of its token route so.
            ApiError::InvalidKey | ApiError::UnknownKeyType(_) => "InvalidKeyException",
            ApiError::ModelNotFound(_) => "ModelNotFoundException",
            ApiError::VersionNotFound(_) => "ModelVersionNotFoundException",
            ApiError::ResourceNotFound => "ResourceNotFoundException",
            ApiError::MethodNotAllowed => "MethodNotAllowedException",
            ApiError::Conflict(_) => "ConflictStatusException",
            ApiError::DefaultVersion(_) => "InvalidModelVersionException",
            ApiError::TooLarge(_) => "RequestTooLargeException",
            ApiError::ReadTimeout(_) | ApiError::Timeout(_) => "RequestTimeoutException",
            ApiError::Unavailable(_) => "ServiceUnavailableException",
            // TorchServe names its 507 so too.
            ApiError::Internal(_) | ApiError::OutOfResources(_) => "InternalServerException",
            ApiError::NotImplemented(_) => "NotImplementedException",
        }
    }

    /// The gRPC status a gRPC frontend answers with.
    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            ApiError::BadRequest(_)
            | ApiError::InvalidModel(_)
            | ApiError::DownloadFailed(_)
            | ApiError::InvalidInput(_)
            | ApiError::UnknownKeyType(_) => GrpcCode::InvalidArgument,
            ApiError::InvalidKey => GrpcCode::Unauthenticated,
            ApiError::ModelNotFound(_)
            | ApiError::VersionNotFound(_)
            | ApiError::ResourceNotFound => GrpcCode::NotFound,
            ApiError::MethodNotAllowed => GrpcCode::Unimplemented,
            ApiError::Conflict(_) => GrpcCode::AlreadyExists,
            ApiError::DefaultVersion(_) => GrpcCode::FailedPrecondition,
            ApiError::TooLarge(_) => GrpcCode::ResourceExhausted,
            ApiError::ReadTimeout(_) | ApiError::Timeout(_) => GrpcCode::DeadlineExceeded,
            ApiError::Unavailable(_) => GrpcCode::Unavailable,
            ApiError::Internal(_) => GrpcCode::Internal,
            ApiError::OutOfResources(_) => GrpcCode::ResourceExhausted,
            ApiError::NotImplemented(_) => GrpcCode::Unimplemented,
        }
    }

    /// The message for the user.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The same error, its message led by `prefix` (which part of a request it concerns). A
    /// state of the server or the model (no worker, a full queue, a timeout) concerns no one
    /// part, and keeps its message as it is.
    pub fn prefixed(self, prefix: &str) -> Self {
        let lead = |m: String| format!("{prefix}{m}");
        match self {
            ApiError::BadRequest(m) => ApiError::BadRequest(lead(m)),
            ApiError::InvalidModel(m) => ApiError::InvalidModel(lead(m)),
            ApiError::DownloadFailed(m) => ApiError::DownloadFailed(lead(m)),
            ApiError::InvalidInput(m) => ApiError::InvalidInput(lead(m)),
            ApiError::Internal(m) => ApiError::Internal(lead(m)),
            ApiError::OutOfResources(m) => ApiError::OutOfResources(lead(m)),
            other => other,
        }
    }

    /// 400 BadRequestException.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    /// 400 InvalidModelException.
    pub fn invalid_model(message: impl Into<String>) -> Self {
        ApiError::InvalidModel(message.into())
    }

    /// 404 ModelNotFoundException.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        ApiError::ModelNotFound(message.into())
    }

    /// 404 ModelVersionNotFoundException.
    pub fn version_not_found(message: impl Into<String>) -> Self {
        ApiError::VersionNotFound(message.into())
    }

    /// 400 InvalidKeyException.
    pub fn invalid_key() -> Self {
        ApiError::InvalidKey
    }

    /// 404 ResourceNotFoundException.
    pub fn resource_not_found() -> Self {
        ApiError::ResourceNotFound
    }

    /// 405 MethodNotAllowedException.
    pub fn method_not_allowed() -> Self {
        ApiError::MethodNotAllowed
    }

    /// 409 ConflictStatusException.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::Conflict(message.into())
    }

    /// 403 InvalidModelVersionException.
    pub fn forbidden_version(message: impl Into<String>) -> Self {
        ApiError::DefaultVersion(message.into())
    }

    /// 503 ServiceUnavailableException.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::Unavailable(message.into())
    }

    /// 501: explanations, which tchserve's handlers do not have.
    pub fn no_explanations() -> Self {
        ApiError::NotImplemented(
            "explanations are not supported: tchserve's handlers have no explain step".into(),
        )
    }

    /// 500 InternalServerException.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::Internal(message.into())
    }

    /// 413 RequestTooLargeException.
    pub fn too_large(limit: usize) -> Self {
        ApiError::TooLarge(limit)
    }

    /// 408 RequestTimeoutException.
    pub fn timeout_reading(message: impl Into<String>) -> Self {
        ApiError::ReadTimeout(message.into())
    }

    /// 504 RequestTimeoutException.
    pub fn timeout(message: impl Into<String>) -> Self {
        ApiError::Timeout(message.into())
    }
}

impl From<PredictError> for ApiError {
    fn from(e: PredictError) -> Self {
        match e {
            PredictError::BadInput(m) => ApiError::InvalidInput(m),
            PredictError::ModelFailed(m) => ApiError::Internal(m),
            PredictError::WorkerDied => ApiError::internal("Worker died."),
            PredictError::Unavailable(m) => ApiError::unavailable(m),
            PredictError::Timeout(s) => {
                ApiError::timeout(format!("Prediction timed out after {s} s"))
            }
            e @ PredictError::Expired(_) => ApiError::timeout(e.to_string()),
            e @ PredictError::OutOfMemory(_) => ApiError::OutOfResources(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_concerns_one_part_of_a_request_names_it() {
        let part = "input 'input0': ";
        assert_eq!(
            ApiError::bad_request("3 values for 4").prefixed(part),
            ApiError::bad_request("input 'input0': 3 values for 4")
        );
        assert_eq!(
            ApiError::internal("the model failed").prefixed(part),
            ApiError::internal("input 'input0': the model failed")
        );
        for state in [
            ApiError::unavailable("Model \"m\" has no worker"),
            ApiError::Timeout("timed out".into()),
        ] {
            assert_eq!(state.clone().prefixed(part), state);
        }
    }

    #[test]
    fn each_kind_has_one_status_everywhere() {
        let cases = [
            (ApiError::bad_request("x"), 400, "BadRequestException", 3),
            (
                ApiError::InvalidInput("x".into()),
                400,
                "InvalidInputException",
                3,
            ),
            (ApiError::invalid_key(), 400, "InvalidKeyException", 16),
            (
                ApiError::model_not_found("x"),
                404,
                "ModelNotFoundException",
                5,
            ),
            (
                ApiError::version_not_found("x"),
                404,
                "ModelVersionNotFoundException",
                5,
            ),
            (ApiError::conflict("x"), 409, "ConflictStatusException", 6),
            (
                ApiError::forbidden_version("x"),
                403,
                "InvalidModelVersionException",
                9,
            ),
            (ApiError::too_large(5), 413, "RequestTooLargeException", 8),
            (ApiError::timeout("x"), 504, "RequestTimeoutException", 4),
            (
                ApiError::unavailable("x"),
                503,
                "ServiceUnavailableException",
                14,
            ),
            (ApiError::internal("x"), 500, "InternalServerException", 13),
            (
                ApiError::from(PredictError::OutOfMemory("x".into())),
                507,
                "InternalServerException",
                8,
            ),
        ];
        for (e, status, kind, grpc) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.kind(), kind, "{e:?}");
            assert_eq!(e.grpc_code() as i32, grpc, "{e:?}");
        }
        assert_eq!(
            ApiError::too_large(5).message(),
            "the request body exceeds max_request_size (5 bytes)"
        );
    }

    #[test]
    fn a_bad_input_is_the_client_s_fault() {
        let e = ApiError::from(PredictError::BadInput("no".into()));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = ApiError::from(PredictError::Timeout(3));
        assert_eq!(e.message(), "Prediction timed out after 3 s");
    }
}
