//! TorchServe's gRPC APIs: `InferenceAPIsService` on the gRPC inference port and
//! `ManagementAPIsService` on the gRPC management port. Answers are TorchServe's REST bodies;
//! errors are gRPC statuses with the REST API's messages.

use std::collections::HashMap;
use std::pin::Pin;

use tchserve_backend::job::{Part, Payload, Prediction};
use tokio_stream::{Stream, StreamExt as _};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};

use super::management as ops;
use crate::core::ApiError;
use crate::frontends::grpc::{message_limit, model_api_enabled, non_empty, rpc_status, status_of};
use crate::frontends::proto::org::pytorch::serve::grpc as proto;
use crate::frontends::{AppState, pretty_json};

use proto::inference::inference_ap_is_service_server::{
    InferenceApIsService, InferenceApIsServiceServer,
};
use proto::inference::{PredictionResponse, PredictionsRequest, TorchServeHealthResponse};
use proto::management::management_ap_is_service_server::{
    ManagementApIsService, ManagementApIsServiceServer,
};
use proto::management::{
    DescribeModelRequest, ListModelsRequest, ManagementResponse, RegisterModelRequest,
    ScaleWorkerRequest, SetDefaultRequest, UnregisterModelRequest,
};

/// The inference service.
#[derive(Debug, Clone)]
pub struct Inference(pub AppState);

/// The management service.
#[derive(Debug, Clone)]
pub struct Management(pub AppState);

/// The inference service, ready to serve.
pub fn inference_service(st: AppState) -> InferenceApIsServiceServer<Inference> {
    let limit = message_limit(&st);
    InferenceApIsServiceServer::new(Inference(st))
        // A message's size is checked before it is read into memory, and after decompression.
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
}

/// The management service, ready to serve.
pub fn management_service(st: AppState) -> ManagementApIsServiceServer<Management> {
    let limit = message_limit(&st);
    ManagementApIsServiceServer::new(Management(st))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
}

impl Inference {
    async fn predict(&self, req: PredictionsRequest) -> Result<Vec<u8>, ApiError> {
        // The REST API's fields by name, in a stable order.
        let mut parts: Vec<Part> = req
            .input
            .into_iter()
            .map(|(name, data)| Part {
                name,
                content_type: None,
                data,
                shape: None,
            })
            .collect();
        parts.sort_by(|a, b| a.name.cmp(&b.name));
        let payload = Payload {
            parts,
            ..Payload::default()
        };
        let version = non_empty(&req.model_version);
        match self
            .0
            .infer
            .infer(&req.model_name, version, payload)
            .await?
        {
            Prediction::Json(body) => Ok(body),
            Prediction::Tensor(_) | Prediction::Tensors(_) => {
                Err(ApiError::internal("unexpected tensor answer"))
            }
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<PredictionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InferenceApIsService for Inference {
    async fn ping(&self, _: Request<()>) -> Result<Response<TorchServeHealthResponse>, Status> {
        let status = if self.0.infer.server_healthy() {
            "Healthy"
        } else {
            "Unhealthy"
        };
        Ok(Response::new(TorchServeHealthResponse {
            health: grpc_json(&serde_json::json!({ "status": status })),
        }))
    }

    async fn predictions(
        &self,
        req: Request<PredictionsRequest>,
    ) -> Result<Response<PredictionResponse>, Status> {
        let body = self
            .predict(req.into_inner())
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(PredictionResponse {
            prediction: body.into(),
            ..PredictionResponse::default()
        }))
    }

    type StreamPredictionsStream = ResponseStream;

    async fn stream_predictions(
        &self,
        req: Request<PredictionsRequest>,
    ) -> Result<Response<Self::StreamPredictionsStream>, Status> {
        // Built-in handlers answer in one piece: the stream holds that one answer.
        let body = self
            .predict(req.into_inner())
            .await
            .map_err(|e| status_of(&e))?;
        let one = PredictionResponse {
            prediction: body.into(),
            ..PredictionResponse::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(one)))))
    }

    type StreamPredictions2Stream = ResponseStream;

    async fn stream_predictions2(
        &self,
        req: Request<Streaming<PredictionsRequest>>,
    ) -> Result<Response<Self::StreamPredictions2Stream>, Status> {
        let mut incoming = req.into_inner();
        let this = self.clone();
        // Each message is queued as soon as it arrives, as TorchServe queues it, so a stream
        // batches like separate calls. Reading only after answering would also leave a client
        // that sends ahead with its messages unread, and past h2's limit on those the whole
        // connection is closed. Answers go out in the order of the requests; a failed one
        // answers with its status and the stream goes on.
        let answers = stream_from_task(move |tx| async move {
            let this = &this;
            let mut pending = futures_util::stream::FuturesOrdered::new();
            let mut reading = true;
            // A message that could not be read ends the stream, after the answers owed before it.
            let mut broken = None;
            loop {
                tokio::select! {
                    next = incoming.next(), if reading && pending.len() < STREAM_AHEAD => match next {
                        Some(Ok(req)) => pending.push_back(async move {
                            let sequence = req.sequence_id.clone();
                            match this.predict(req).await {
                                Ok(body) => PredictionResponse {
                                    prediction: body.into(),
                                    sequence_id: sequence,
                                    status: None,
                                },
                                Err(e) => PredictionResponse {
                                    prediction: Default::default(),
                                    sequence_id: sequence,
                                    status: Some(rpc_status(&e)),
                                },
                            }
                        }),
                        Some(Err(status)) => {
                            broken = Some(status);
                            reading = false;
                        }
                        None => reading = false,
                    },
                    Some(answer) = pending.next(), if !pending.is_empty() => {
                        if tx.send(Ok(answer)).await.is_err() {
                            return;
                        }
                    }
                    else => {
                        if let Some(status) = broken {
                            let _ = tx.send(Err(status)).await;
                        }
                        return;
                    }
                }
            }
        });
        Ok(Response::new(answers))
    }
}

/// Messages of one StreamPredictions2 stream held at once, queued or answered and waiting for
/// those before them: past it the stream is read no further until answers go out, so one
/// client cannot grow the server's memory without bound. Far above any job queue, so a client
/// that sends ahead within reason is never slowed.
const STREAM_AHEAD: usize = 4096;

/// The REST API's pretty JSON without its final newline, as TorchServe's gRPC API writes it.
fn grpc_json(value: &serde_json::Value) -> String {
    let mut s = pretty_json(value);
    s.truncate(s.trim_end().len());
    s
}

/// A stream of what `body`, run as a task of its own, sends into its channel.
fn stream_from_task<F, Fut>(body: F) -> ResponseStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<PredictionResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A management answer as TorchServe's gRPC API gives it: the status text itself for the calls
/// that change something, the JSON document for describe and list.
fn msg(o: ops::Outcome) -> Result<Response<ManagementResponse>, Status> {
    match o {
        Ok((_, body)) => Ok(Response::new(ManagementResponse {
            msg: match body.get("status").and_then(|s| s.as_str()) {
                Some(status) => status.to_string(),
                None => grpc_json(&body),
            },
        })),
        Err(e) => Err(status_of(&e)),
    }
}

fn put(params: &mut HashMap<String, String>, key: &str, value: impl ToString, set: bool) {
    if set {
        params.insert(key.to_string(), value.to_string());
    }
}

#[tonic::async_trait]
impl ManagementApIsService for Management {
    async fn describe_model(
        &self,
        req: Request<DescribeModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.into_inner();
        msg(ops::describe_model(
            &self.0,
            &r.model_name,
            non_empty(&r.model_version),
            r.customized,
        ))
    }

    async fn list_models(
        &self,
        req: Request<ListModelsRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.into_inner();
        let mut q = HashMap::new();
        put(&mut q, "limit", r.limit, r.limit > 0);
        put(
            &mut q,
            "next_page_token",
            r.next_page_token,
            r.next_page_token > 0,
        );
        msg(ops::list_models(&self.0, &q))
    }

    async fn register_model(
        &self,
        req: Request<RegisterModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        model_api_enabled(&self.0)?;
        let r = req.into_inner();
        let mut q = HashMap::new();
        // An empty url is proto3's unset: the REST API's 400 "Parameter url is required.".
        put(&mut q, "url", &r.url, !r.url.is_empty());
        put(
            &mut q,
            "model_name",
            &r.model_name,
            !r.model_name.is_empty(),
        );
        put(&mut q, "handler", &r.handler, !r.handler.is_empty());
        put(&mut q, "runtime", &r.runtime, !r.runtime.is_empty());
        // proto3 cannot tell 0 from unset: 0 means TorchServe's default, as in its gRPC API,
        // and so does a negative value, as the REST API takes one for these.
        put(&mut q, "batch_size", r.batch_size, r.batch_size > 0);
        put(
            &mut q,
            "max_batch_delay",
            r.max_batch_delay,
            r.max_batch_delay > 0,
        );
        put(
            &mut q,
            "initial_workers",
            r.initial_workers,
            r.initial_workers > 0,
        );
        put(
            &mut q,
            "response_timeout",
            r.response_timeout,
            r.response_timeout > 0,
        );
        put(
            &mut q,
            "startup_timeout",
            r.startup_timeout,
            r.startup_timeout > 0,
        );
        q.insert("synchronous".into(), r.synchronous.to_string());
        msg(ops::register_model(&self.0, &q).await)
    }

    async fn scale_worker(
        &self,
        req: Request<ScaleWorkerRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.into_inner();
        let mut q = HashMap::new();
        // 0 is proto3's unset: TorchServe's default of 1, not a scale to nothing. A negative
        // count is passed on, to be refused as the REST API refuses it.
        put(&mut q, "min_worker", r.min_worker, r.min_worker != 0);
        put(&mut q, "max_worker", r.max_worker, r.max_worker != 0);
        q.insert("synchronous".into(), r.synchronous.to_string());
        let version = non_empty(&r.model_version).map(str::to_owned);
        let in_path = version.is_some();
        msg(ops::scale_workers(&self.0, r.model_name, version, in_path, &q).await)
    }

    async fn set_default(
        &self,
        req: Request<SetDefaultRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.into_inner();
        msg(ops::set_default_version(&self.0, &r.model_name, &r.model_version).await)
    }

    async fn unregister_model(
        &self,
        req: Request<UnregisterModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        model_api_enabled(&self.0)?;
        let r = req.into_inner();
        msg(ops::unregister_model(&self.0, &r.model_name, non_empty(&r.model_version)).await)
    }
}
