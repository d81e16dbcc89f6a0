//! The Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`), with Triton's
//! repository RPCs. Outputs always travel as `raw_output_contents`, as Triton answers.

use bytes::Bytes;
use tonic::server::NamedService as _;
use tonic::{Request, Response, Status};

use super::tensor::{self, Datatype};
use super::{InferInput, InputData, OutputData, RequestedOutput, load, run_infer, unload};
use crate::auth::Scope;
use crate::core::{ApiError, ModelMetadata, TensorMeta};
use crate::frontends::AppState;
use crate::frontends::grpc::{check_key, model_api_enabled, non_empty, status_of};
use crate::frontends::proto::inference as pb;
use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

/// The service.
#[derive(Debug, Clone)]
pub struct V2(pub AppState);

/// The service, ready to serve.
pub fn service(st: AppState) -> GrpcInferenceServiceServer<V2> {
    let st_limit = crate::frontends::grpc::message_limit(&st);
    GrpcInferenceServiceServer::new(V2(st))
        // A message's size is checked before it is read into memory.
        .max_decoding_message_size(st_limit)
        .max_encoding_message_size(usize::MAX)
        // Compressed requests, as Triton's clients send them on request; the size limit
        // applies to the decompressed message.
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Deflate)
}

/// TorchServe's name for the v2 service, `org.pytorch.serve.grpc.openinference`'s, as its
/// `ts_open_inference_protocol` serves it: clients made from its `open_inference_grpc.proto`
/// (TorchServe's KServe tests among them) call the same six methods.
pub const TORCHSERVE_NAME: &str = "org.pytorch.serve.grpc.openinference.GRPCInferenceService";

/// The v2 service under TorchServe's name (see [`TORCHSERVE_NAME`]). Its messages are the v2
/// protocol's, field for field, so a call is the v2 service's once its path names that service;
/// the repository methods, which TorchServe's service lacks, stay unimplemented there.
#[derive(Debug, Clone)]
pub struct TorchServeNamed(GrpcInferenceServiceServer<V2>);

/// The v2 service under TorchServe's name, ready to serve.
pub fn torchserve_named_service(st: AppState) -> TorchServeNamed {
    TorchServeNamed(service(st))
}

impl tonic::server::NamedService for TorchServeNamed {
    const NAME: &'static str = TORCHSERVE_NAME;
}

impl<B> tower::Service<axum::http::Request<B>> for TorchServeNamed
where
    GrpcInferenceServiceServer<V2>: tower::Service<axum::http::Request<B>>,
{
    type Response =
        <GrpcInferenceServiceServer<V2> as tower::Service<axum::http::Request<B>>>::Response;
    type Error = <GrpcInferenceServiceServer<V2> as tower::Service<axum::http::Request<B>>>::Error;
    type Future =
        <GrpcInferenceServiceServer<V2> as tower::Service<axum::http::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        const METHODS: [&str; 6] = [
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        ];
        let method = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|rest| rest.strip_prefix(TORCHSERVE_NAME))
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|m| METHODS.contains(m));
        if let Some(method) = method {
            let path = format!("/{}/{method}", GrpcInferenceServiceServer::<V2>::NAME);
            if let Ok(uri) = axum::http::Uri::builder().path_and_query(path).build() {
                *request.uri_mut() = uri;
            }
        }
        self.0.call(request)
    }
}

fn err(e: ApiError) -> Status {
    status_of(&e)
}

fn tensor_md(t: &TensorMeta) -> pb::model_metadata_response::TensorMetadata {
    let (name, datatype, shape) = super::tensor_metadata(t);
    pb::model_metadata_response::TensorMetadata {
        name,
        datatype: datatype.into(),
        shape,
    }
}

/// Typed contents as little-endian bytes of `datatype` (BYTES elements length-prefixed).
fn contents_bytes(
    name: &str,
    datatype: Datatype,
    c: pb::InferTensorContents,
) -> Result<Bytes, ApiError> {
    let wrong = |field: &str| {
        ApiError::bad_request(format!(
            "input '{name}': {field} does not carry {} data",
            datatype.name()
        ))
    };
    let mut out = Vec::new();
    let filled = [
        ("bool_contents", !c.bool_contents.is_empty()),
        ("int_contents", !c.int_contents.is_empty()),
        ("int64_contents", !c.int64_contents.is_empty()),
        ("uint_contents", !c.uint_contents.is_empty()),
        ("uint64_contents", !c.uint64_contents.is_empty()),
        ("fp32_contents", !c.fp32_contents.is_empty()),
        ("fp64_contents", !c.fp64_contents.is_empty()),
        ("bytes_contents", !c.bytes_contents.is_empty()),
    ];
    let expected = match datatype {
        Datatype::Bool => "bool_contents",
        Datatype::Int8 | Datatype::Int16 | Datatype::Int32 => "int_contents",
        Datatype::Int64 => "int64_contents",
        Datatype::Uint8 | Datatype::Uint16 | Datatype::Uint32 => "uint_contents",
        Datatype::Uint64 => "uint64_contents",
        Datatype::Fp32 => "fp32_contents",
        Datatype::Fp64 => "fp64_contents",
        Datatype::Bytes => "bytes_contents",
        Datatype::Fp16 | Datatype::Bf16 => {
            return Err(ApiError::bad_request(format!(
                "input '{name}': {} data travels only as raw_input_contents",
                datatype.name()
            )));
        }
    };
    if let Some((field, _)) = filled.iter().find(|(f, set)| *set && *f != expected) {
        return Err(wrong(field));
    }
    let range = |v: i64, lo: i64, hi: i64| {
        if v < lo || v > hi {
            Err(ApiError::bad_request(format!(
                "input '{name}': {v} is out of range for {}",
                datatype.name()
            )))
        } else {
            Ok(v)
        }
    };
    match datatype {
        Datatype::Bool => out.extend(c.bool_contents.iter().map(|b| u8::from(*b))),
        Datatype::Int8 => {
            for v in &c.int_contents {
                out.extend(
                    (range(i64::from(*v), i8::MIN.into(), i8::MAX.into())? as i8).to_le_bytes(),
                );
            }
        }
        Datatype::Int16 => {
            for v in &c.int_contents {
                out.extend(
                    (range(i64::from(*v), i16::MIN.into(), i16::MAX.into())? as i16).to_le_bytes(),
                );
            }
        }
        Datatype::Int32 => c
            .int_contents
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Datatype::Int64 => c
            .int64_contents
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Datatype::Uint8 => {
            for v in &c.uint_contents {
                out.push(range(i64::from(*v), 0, u8::MAX.into())? as u8);
            }
        }
        Datatype::Uint16 => {
            for v in &c.uint_contents {
                out.extend((range(i64::from(*v), 0, u16::MAX.into())? as u16).to_le_bytes());
            }
        }
        Datatype::Uint32 => c
            .uint_contents
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Datatype::Uint64 => c
            .uint64_contents
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Datatype::Fp32 => c
            .fp32_contents
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Datatype::Fp64 => c
            .fp64_contents
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Datatype::Bytes => {
            out = tensor::join_bytes(c.bytes_contents.iter().map(|b| &b[..]));
        }
        Datatype::Fp16 | Datatype::Bf16 => unreachable!("refused above"),
    }
    Ok(out.into())
}

impl V2 {
    async fn infer(&self, req: pb::ModelInferRequest) -> Result<pb::ModelInferResponse, ApiError> {
        let st = &self.0;
        let v = non_empty(&req.model_version);
        let named = v.is_some();
        let meta: ModelMetadata = st.infer.metadata(&req.model_name, v)?;
        if !req.raw_input_contents.is_empty() && req.raw_input_contents.len() != req.inputs.len() {
            return Err(ApiError::bad_request(format!(
                "raw_input_contents has {} entries for {} inputs",
                req.raw_input_contents.len(),
                req.inputs.len()
            )));
        }
        if !req.raw_input_contents.is_empty()
            && let Some(i) = req.inputs.iter().find(|i| i.contents.is_some())
        {
            return Err(ApiError::bad_request(format!(
                "input '{}': contents and raw_input_contents are both set; send one",
                i.name
            )));
        }
        let mut raw = req.raw_input_contents.into_iter();
        let mut inputs = Vec::with_capacity(req.inputs.len());
        for input in req.inputs {
            let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "input '{}': unknown datatype '{}'",
                    input.name, input.datatype
                ))
            })?;
            let data = match raw.next() {
                Some(bytes) => bytes,
                None => contents_bytes(&input.name, datatype, input.contents.unwrap_or_default())?,
            };
            inputs.push(InferInput {
                name: input.name,
                datatype,
                shape: input.shape,
                data: InputData::Binary(data),
            });
        }
        if let Some(o) = req
            .outputs
            .iter()
            .find(|o| o.parameters.contains_key("classification"))
        {
            return Err(ApiError::bad_request(format!(
                "output '{}': the classification extension is not supported; the image \
                 handlers answer with labels already",
                o.name
            )));
        }
        let outputs = (!req.outputs.is_empty()).then(|| {
            req.outputs
                .into_iter()
                .map(|o| RequestedOutput {
                    name: o.name,
                    binary: true,
                })
                .collect()
        });
        let done = run_infer(&st.infer, &meta, named, inputs, outputs, true).await?;
        let mut response = pb::ModelInferResponse {
            model_name: meta.name.clone(),
            model_version: meta.version.clone(),
            id: req.id,
            ..pb::ModelInferResponse::default()
        };
        for out in done.outputs {
            response
                .outputs
                .push(pb::model_infer_response::InferOutputTensor {
                    name: out.name,
                    datatype: out.datatype.name().into(),
                    shape: out.shape,
                    ..Default::default()
                });
            response.raw_output_contents.push(match out.data {
                OutputData::Raw(b) => b.into(),
                OutputData::Items(items) => {
                    tensor::join_bytes(items.iter().map(Vec::as_slice)).into()
                }
            });
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for V2 {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.0.infer.server_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        check_key(self.0.tokens.as_deref(), Scope::Inference, req.metadata())?;
        let r = req.into_inner();
        // As Triton answers: a model (or version) that is not there is not ready, rather than an
        // error, so that a client polling for a model being loaded sees `false` until it is.
        let ready = match self.0.infer.model_ready(&r.name, non_empty(&r.version)) {
            Ok(ready) => ready,
            Err(e) if e.status() == axum::http::StatusCode::NOT_FOUND => false,
            Err(e) => return Err(err(e)),
        };
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "tchserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["binary_tensor_data".into(), "model_repository".into()],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        check_key(self.0.tokens.as_deref(), Scope::Inference, req.metadata())?;
        let r = req.into_inner();
        let m = self
            .0
            .infer
            .metadata(&r.name, non_empty(&r.version))
            .map_err(err)?;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions: m.versions.clone(),
            platform: "pytorch_torchscript".into(),
            inputs: m.inputs.iter().map(tensor_md).collect(),
            outputs: m.outputs.iter().map(tensor_md).collect(),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        check_key(self.0.tokens.as_deref(), Scope::Inference, req.metadata())?;
        self.infer(req.into_inner())
            .await
            .map(Response::new)
            .map_err(err)
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        check_key(self.0.tokens.as_deref(), Scope::Management, req.metadata())?;
        let ready_only = req.into_inner().ready;
        let models = super::repository_index(&self.0, ready_only)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.into(),
                reason: e.reason.into(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        check_key(self.0.tokens.as_deref(), Scope::Management, req.metadata())?;
        model_api_enabled(&self.0)?;
        let mut req = req.into_inner();
        let parameters = std::mem::take(&mut req.parameters);
        let named: Vec<&str> = parameters.keys().map(String::as_str).collect();
        let model = repository_model(req.into());
        load(&self.0, &model, &named).await.map_err(err)?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {
            model_name: model,
            is_loaded: true,
        }))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        check_key(self.0.tokens.as_deref(), Scope::Management, req.metadata())?;
        model_api_enabled(&self.0)?;
        let model = repository_model(req.into_inner().into());
        unload(&self.0, &model).await.map_err(err)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {
            model_name: model,
            is_unloaded: true,
        }))
    }
}

/// The two fields a repository request may name its model in: `(field 1, field 2)`.
struct RepositoryRequest(String, String);

impl From<pb::RepositoryModelLoadRequest> for RepositoryRequest {
    fn from(r: pb::RepositoryModelLoadRequest) -> Self {
        RepositoryRequest(r.repository_name, r.model_name)
    }
}

impl From<pb::RepositoryModelUnloadRequest> for RepositoryRequest {
    fn from(r: pb::RepositoryModelUnloadRequest) -> Self {
        RepositoryRequest(r.repository_name, r.model_name)
    }
}

/// The model a repository request names. Triton's protocol puts it in field 2, after the
/// repository's name; KServe's, on the same method, in field 1 alone. A request with field 2
/// empty is KServe's.
fn repository_model(r: RepositoryRequest) -> String {
    let RepositoryRequest(first, second) = r;
    if second.is_empty() { first } else { second }
}
