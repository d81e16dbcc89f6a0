"""The real clients of each protocol against a running tchserve, compared with its TorchServe REST
route. Run by tests/protocols.rs, one suite per process (tritonclient's and kserve's gRPC modules
register the same protobuf names).

    protocols.py SUITE --http HOST:PORT --grpc HOST:PORT --grpc-management HOST:PORT \
        --image FILE --mlp-archive NAME

Suites: triton (tritonclient HTTP and gRPC), kserve (the kserve package's v1 and v2 REST and v2
gRPC clients), torchserve-grpc (stubs made by grpcio-tools from the server's .proto files), auth
(keys in gRPC metadata, against a server with token authorization on and --key-file).
Models the server must hold: `mlp` (float32 [784] -> [10]), `cls` (an image classifier), `txt`
(a text classifier), `two` (two named inputs, int64 `ids` [3] and float32 `dense` [2] -> [2]) and
`pair` (float32 [2] -> two named outputs, `double` float32 [2] and `total` int64).
Tensors must be bitwise equal; handler answers (labels and scores) equal to 1e-6. Exits non-zero,
naming the check, at the first difference.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import numpy as np

ARGS = None
CHECKS = []


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    CHECKS.append(what)


def rest(path, body=None, headers=None, method=None):
    """(status, body bytes) of a call to the HTTP inference listener."""
    req = urllib.request.Request(
        f"http://{ARGS.http}{path}", data=body, headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def mlp_input(rows):
    rng = np.random.default_rng(7)
    return rng.standard_normal((rows, 784)).astype(np.float32)


def mlp_reference(x):
    """The TorchServe REST route's answer for x, as float32."""
    status, body = rest(
        "/predictions/mlp",
        json.dumps(x.tolist()).encode(),
        {"Content-Type": "application/json"},
    )
    check(status == 200, f"REST mlp answers ({status} {body[:200]!r})")
    return np.array(json.loads(body), dtype=np.float32).reshape(x.shape[0], 10)


def image_reference():
    with open(ARGS.image, "rb") as f:
        jpeg = f.read()
    status, body = rest("/predictions/cls", jpeg, {"Content-Type": "image/jpeg"})
    check(status == 200, f"REST cls answers ({status})")
    return jpeg, json.loads(body)


def preprocessed(jpeg):
    """The picture as the image classifier's preprocessing leaves it, computed as torchvision
    does on a PIL image: the shorter side resized to 256 (PIL's bilinear, antialiased), the
    centre 224x224, scaled to [0, 1] and normalised, in float32. TorchServe's vision handlers
    take these numbers in place of the picture."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = img.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def image_as_numbers(jpeg, want_cls):
    """The REST route answers the preprocessed picture as it answers the picture."""
    pre = preprocessed(jpeg)
    for body in (pre.tolist(), {"data": pre.tolist()}):
        status, got = rest("/predictions/cls", json.dumps(body).encode(), {"Content-Type": "application/json"})
        check(status == 200, f"REST cls numbers answer ({status} {got[:300]!r})")
        check(close(json.loads(got), want_cls), f"REST cls numbers: {got[:300]!r} == {want_cls}")
    status, got = rest("/predictions/cls", json.dumps([pre.tolist()] * 2).encode(), {"Content-Type": "application/json"})
    check(status == 200 and close(json.loads(got), [want_cls] * 2), f"REST cls two pictures as numbers ({status})")
    status, got = rest("/predictions/cls", json.dumps(pre[:, :100, :100].tolist()).encode())
    check(status == 400 and b"[3, 224, 224]" in got, f"REST cls numbers of the wrong size: 400 naming the shape ({status} {got!r})")
    return pre


TEXT = "I love this movie, it is wonderful"
TEXT = "I love this movie, it is wonderful"


def text_reference():
    status, body = rest("/predictions/txt", TEXT.encode(), {"Content-Type": "text/plain"})
    check(status == 200, f"REST txt answers ({status})")
    return json.loads(body)


TWO_IDS = np.array([[1, 2, 3], [0, 0, 10]], dtype=np.int64)
TWO_DENSE = np.array([[0.5, 0.25], [1.0, 2.0]], dtype=np.float32)


def two_reference():
    """The REST route's answer for the two-input model, inputs named in one JSON object."""
    body = json.dumps({"ids": TWO_IDS.tolist(), "dense": TWO_DENSE.tolist()}).encode()
    status, body = rest("/predictions/two", body, {"Content-Type": "application/json"})
    check(status == 200, f"REST two answers ({status} {body[:200]!r})")
    want = np.array(json.loads(body), dtype=np.float32)
    check(want.tolist() == [[6.5, -5.75], [11.0, -8.0]], f"REST two: {want.tolist()}")
    return want


def triton_two_inputs(client, module, what):
    """A model of two named inputs through a tritonclient module (HTTP or gRPC): given in either
    order, answered as the REST route answers; one missing is the protocol's 400."""
    from tritonclient.utils import InferenceServerException

    want = two_reference()
    md = client.get_model_metadata("two", **({"as_json": True} if "grpc" in what else {}))
    names = [(i["name"], i["datatype"]) for i in md["inputs"]]
    check(names == [("ids", "INT64"), ("dense", "FP32")], f"{what}: two inputs in the metadata {names}")
    ids = module.InferInput("ids", list(TWO_IDS.shape), "INT64")
    ids.set_data_from_numpy(TWO_IDS)
    dense = module.InferInput("dense", list(TWO_DENSE.shape), "FP32")
    dense.set_data_from_numpy(TWO_DENSE)
    r = client.infer("two", [dense, ids])
    same_floats(r.as_numpy("output0"), want, f"{what} two inputs")
    try:
        client.infer("two", [dense])
        check(False, f"{what}: a missing input is refused")
    except InferenceServerException as e:
        check("'ids' is missing" in e.message(), f"{what}: the error names the missing input: {e.message()}")
    still_serving(f"{what}: a missing input")


def triton_two_outputs(client, module, what):
    """A handler of two named outputs through a tritonclient module: both, or the one asked
    for, each typed as the model gives it and equal to the REST route's answer."""
    x = np.array([[1.0, 2.0], [3.5, 4.0]], dtype=np.float32)
    status, body = rest("/predictions/pair", json.dumps(x.tolist()).encode(), {"Content-Type": "application/json"})
    check(status == 200, f"REST pair answers ({status} {body[:200]!r})")
    rows = json.loads(body)
    want_double = np.array([r["double"] for r in rows], dtype=np.float32)
    want_total = np.array([r["total"] for r in rows], dtype=np.int64)
    check(want_total.tolist() == [3, 8], f"REST pair totals {want_total.tolist()}")
    i = module.InferInput("input0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    for names in (["double", "total"], ["total"]):
        outs = [module.InferRequestedOutput(n) for n in names]
        r = client.infer("pair", [i], outputs=outs)
        if "double" in names:
            same_floats(r.as_numpy("double"), want_double, f"{what} pair double")
        total = r.as_numpy("total")
        check(total.dtype == np.int64 and total.tolist() == want_total.tolist(), f"{what} pair total {total}")
        if names == ["total"]:
            check(r.as_numpy("double") is None, f"{what}: only the output asked for")


def close(got, want):
    """Handler answers (labels with scores) equal but for the last bits of each score: a model
    large enough to use both cores rounds differently when another model's batch holds one of
    them, whichever protocol carried the request."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(close(g, w) for g, w in zip(got, want))
    if isinstance(want, float):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-6
    return got == want


def same_floats(got, want, what):
    got = np.asarray(got, dtype=np.float32)
    check(got.shape == want.shape, f"{what}: shape {got.shape} == {want.shape}")
    check(got.tobytes() == want.tobytes(), f"{what}: bitwise equal to the REST route")


def still_serving(what):
    status, _ = rest("/ping")
    check(status == 200, f"still serving after {what}")


def triton():
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    x1, x4 = mlp_input(1), mlp_input(4)
    want1, want4 = mlp_reference(x1), mlp_reference(x4)
    jpeg, want_cls = image_reference()

    h = thttp.InferenceServerClient(url=ARGS.http)
    check(h.is_server_live(), "http: server live")
    check(h.is_server_ready(), "http: server ready")
    check(h.is_model_ready("mlp"), "http: model ready")
    md = h.get_model_metadata("mlp")
    check(md["platform"] == "pytorch_torchscript", "http: platform")
    check(
        md["inputs"] == [{"name": "input0", "datatype": "FP32", "shape": [-1, 784]}],
        f"http: input metadata {md['inputs']}",
    )
    for binary in (False, True):
        for x, want in ((x1, want1), (x4, want4)):
            i = thttp.InferInput("input0", list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=binary)
            o = thttp.InferRequestedOutput("output0", binary_data=binary)
            r = h.infer("mlp", [i], outputs=[o], request_id="abc")
            same_floats(r.as_numpy("output0"), want, f"http mlp binary={binary} rows={len(x)}")
            check(r.get_response()["id"] == "abc", "http: the id is echoed")
    # Request bodies compressed as tritonclient compresses them (Content-Encoding).
    for algorithm in ("gzip", "deflate"):
        i = thttp.InferInput("input0", list(x4.shape), "FP32")
        i.set_data_from_numpy(x4, binary_data=True)
        r = h.infer("mlp", [i], request_compression_algorithm=algorithm)
        same_floats(r.as_numpy("output0"), want4, f"http mlp, body compressed with {algorithm}")
    # A JPEG as a BYTES element, as Triton's image client sends it.
    i = thttp.InferInput("input0", [1], "BYTES")
    i.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=True)
    r = h.infer("cls", [i])
    got = json.loads(r.as_numpy("output0")[0])
    check(close(got, want_cls), f"http cls BYTES: {got} == {want_cls}")
    # TorchServe's own sample (kf_request_json/v2/mnist/mnist_v2_bytes.json): base64 in JSON,
    # shape [-1], an input named by a uuid.
    import base64

    sample = {"inputs": [{"name": "312a4eb0-0ca7-4803-a101-a6d2c18486fe", "shape": [-1], "datatype": "BYTES",
                          "data": [base64.b64encode(jpeg).decode()]}]}
    status, body = rest("/v2/models/cls/infer", json.dumps(sample).encode(), {"Content-Type": "application/json"})
    check(status == 200, f"http cls TorchServe's BYTES sample ({status} {body[:300]!r})")
    out = json.loads(body)["outputs"][0]
    check(out["shape"] == [1] and close(json.loads(out["data"][0]), want_cls), f"http cls BYTES [-1]: {out}")
    # The picture preprocessed, as FP32 numbers (TorchServe's KServe v2 MNIST sample sends a
    # digit so): one answer for [3, 224, 224], a list of them for a batch.
    pre = image_as_numbers(jpeg, want_cls)
    for x, want in ((pre, want_cls), (np.stack([pre, pre]), [want_cls, want_cls])):
        i = thttp.InferInput("input0", list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=True)
        got = json.loads(h.infer("cls", [i]).as_numpy("output0")[0])
        check(close(got, want), f"http cls FP32 {list(x.shape)}: {got} == {want}")
    i = thttp.InferInput("input0", [2], "FP32")
    i.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    try:
        h.infer("txt", [i])
        check(False, "http: FP32 into a text model is refused")
    except InferenceServerException as e:
        check(e.status() == "400" and "takes text" in e.message(), f"http: FP32 into a text model ({e})")
    # Bad input: the protocol's error, naming the input, and the server goes on.
    i = thttp.InferInput("input0", [1, 784], "FP64")
    i.set_data_from_numpy(x1.astype(np.float64))
    try:
        h.infer("mlp", [i])
        check(False, "http: FP64 into an FP32 model is refused")
    except InferenceServerException as e:
        check(e.status() == "400", f"http: wrong datatype is 400 ({e.status()})")
        check("input0" in e.message(), f"http: the error names the input: {e.message()}")
    still_serving("a bad HTTP request")
    # A route Triton has and tchserve does not: the client reads the error (it cannot decode
    # TorchServe's error shape). tests/serving.rs checks the shape of a 413 on these routes.
    try:
        h.get_model_config("mlp")
        check(False, "http: model config is refused")
    except InferenceServerException as e:
        check(e.status() == "404", f"http: model config is refused ({e})")
        # tritonclient says it could not decode an error body not in the protocol's shape.
        check("decoding the response" not in e.message(), f"http: model config: the protocol's shape ({e})")
    # Text as a BYTES element in JSON, to the text handler.
    want_txt = text_reference()
    i = thttp.InferInput("input0", [1], "BYTES")
    i.set_data_from_numpy(np.array([TEXT.encode()], dtype=np.object_), binary_data=False)
    got = json.loads(h.infer("txt", [i]).as_numpy("output0")[0])
    check(close(got, want_txt), f"http txt BYTES: {got} == {want_txt}")
    # The answers keep the shape the elements came in.
    i = thttp.InferInput("input0", [1, 1], "BYTES")
    i.set_data_from_numpy(np.array([[TEXT.encode()]], dtype=np.object_), binary_data=True)
    out = h.infer("txt", [i]).as_numpy("output0")
    check(out.shape == (1, 1), f"http txt BYTES [1, 1] is answered as [1, 1]: {out.shape}")
    got = json.loads(out[0][0])
    check(close(got, want_txt), f"http txt BYTES [1, 1]: {got} == {want_txt}")
    index = h.get_model_repository_index()
    check({m["name"] for m in index} >= {"mlp", "cls", "txt"}, f"http: repository index {index}")
    # Triton's settings override is refused rather than left out.
    try:
        h.load_model("mlp", config='{"max_batch_size": 4}')
        check(False, "http: a load with a config override is refused")
    except InferenceServerException as e:
        check(e.status() == "400" and "config" in e.message(), f"http: load with config: 400 ({e})")
    triton_two_inputs(h, thttp, "http")
    triton_two_outputs(h, thttp, "http")

    g = tgrpc.InferenceServerClient(url=ARGS.grpc)
    check(g.is_server_live(), "grpc: server live")
    check(g.is_server_ready(), "grpc: server ready")
    check(g.is_model_ready("mlp"), "grpc: model ready")
    # As Triton answers: a model that is not there is not ready, rather than an error.
    check(g.is_model_ready("nope") is False, "grpc: an unknown model is not ready")
    gmd = g.get_model_metadata("mlp", as_json=True)
    check(gmd["inputs"][0]["datatype"] == "FP32", f"grpc: metadata {gmd}")
    check(g.get_server_metadata(as_json=True)["name"] == "tchserve", "grpc: server metadata")
    for x, want in ((x1, want1), (x4, want4)):
        i = tgrpc.InferInput("input0", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        r = g.infer("mlp", [i], request_id="xyz")
        same_floats(r.as_numpy("output0"), want, f"grpc mlp rows={len(x)}")
        check(r.get_response().id == "xyz", "grpc: the id is echoed")
    i = tgrpc.InferInput("input0", [1], "BYTES")
    i.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
    r = g.infer("cls", [i])
    got = json.loads(r.as_numpy("output0")[0])
    check(close(got, want_cls), "grpc cls BYTES")
    i = tgrpc.InferInput("input0", list(pre.shape), "FP32")
    i.set_data_from_numpy(pre)
    got = json.loads(g.infer("cls", [i]).as_numpy("output0")[0])
    check(close(got, want_cls), f"grpc cls FP32: {got} == {want_cls}")
    i = tgrpc.InferInput("input0", [1, 784], "INT64")
    i.set_data_from_numpy(np.zeros((1, 784), dtype=np.int64))
    try:
        g.infer("mlp", [i])
        check(False, "grpc: INT64 into an FP32 model is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT", f"grpc: INVALID_ARGUMENT ({e.status()})")
        check("input0" in e.message(), f"grpc: the error names the input: {e.message()}")
    try:
        g.infer("nope", [i])
        check(False, "grpc: an unknown model is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.NOT_FOUND", f"grpc: NOT_FOUND ({e.status()})")
    still_serving("bad gRPC requests")
    try:
        g.load_model("mlp", config='{"max_batch_size": 4}')
        check(False, "grpc: a load with a config override is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT" and "config" in e.message(), f"grpc: load with config ({e})")
    index = g.get_model_repository_index(as_json=True)
    check({m["name"] for m in index["models"]} >= {"mlp", "cls"}, "grpc: repository index")
    triton_two_inputs(g, tgrpc, "grpc")
    triton_two_outputs(g, tgrpc, "grpc")


def kserve_suite():
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
    from kserve.inference_client import RESTConfig

    x4 = mlp_input(4)
    want4 = mlp_reference(x4)
    jpeg, want_cls = image_reference()
    want_txt = text_reference()
    base = f"http://{ARGS.http}"

    async def run():
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        check(await v1.is_server_live(base), "kserve v1: live (GET /)")
        check(await v1.is_model_ready(base, "mlp"), "kserve v1: model ready")
        # A model of one tensor takes the instances in one request, as the REST route takes
        # the rows: in any of the forms TorchServe's envelope and TensorFlow Serving write.
        for body in (
            {"instances": x4.tolist()},
            {"instances": [{"data": row} for row in x4.tolist()]},
            {"instances": [{"input0": row} for row in x4.tolist()]},
            {"inputs": x4.tolist()},
            {"inputs": {"input0": x4.tolist()}},
        ):
            r = await v1.infer(base, body, model_name="mlp")
            same_floats(r["predictions"], want4, f"kserve v1 mlp {json.dumps(body)[:30]}...")
        # More instances than the model's job queue holds: still one request.
        x150 = mlp_input(150)
        r = await v1.infer(base, {"instances": x150.tolist()}, model_name="mlp")
        same_floats(r["predictions"], mlp_reference(x150), "kserve v1 mlp, 150 instances")
        import base64

        r = await v1.infer(
            base,
            {"instances": [{"b64": base64.b64encode(jpeg).decode()}]},
            model_name="cls",
        )
        check(close(r["predictions"], [want_cls]), "kserve v1 cls b64 instance")
        # TensorFlow Serving names the input.
        r = await v1.infer(
            base,
            {"instances": [{"image": {"b64": base64.b64encode(jpeg).decode()}}]},
            model_name="cls",
        )
        check(close(r["predictions"], [want_cls]), "kserve v1 cls named b64 instance")
        # TorchServe's vision handlers take an instance's `data` as the picture's numbers.
        r = await v1.infer(base, {"instances": [{"data": preprocessed(jpeg).tolist()}]}, model_name="cls")
        check(close(r["predictions"], [want_cls]), "kserve v1 cls instance of numbers")
        r = await v1.infer(base, {"instances": [TEXT, TEXT]}, model_name="txt")
        check(close(r["predictions"], [want_txt, want_txt]), "kserve v1 txt instances")
        try:
            await v1.infer(base, {"instances": [[1.0, 2.0]]}, model_name="mlp")
            check(False, "kserve v1: a wrong shape is refused")
        except Exception as e:  # the client raises on a non-2xx answer
            check("400" in str(e), f"kserve v1: 400 ({e})")
        await v1.close()

        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        check(await v2.is_server_live(base), "kserve v2 REST: live")
        check(await v2.is_model_ready(base, "mlp"), "kserve v2 REST: model ready")
        i = InferInput("input0", list(x4.shape), "FP32")
        i.set_data_from_numpy(x4, binary_data=False)
        r = await v2.infer(base, InferRequest(model_name="mlp", infer_inputs=[i]), model_name="mlp")
        same_floats(r.outputs[0].as_numpy(), want4, "kserve v2 REST mlp")
        i = InferInput("input0", [1, 784], "FP64")
        i.set_data_from_numpy(x4[:1].astype(np.float64), binary_data=False)
        try:
            await v2.infer(base, InferRequest(model_name="mlp", infer_inputs=[i]), model_name="mlp")
            check(False, "kserve v2 REST: FP64 into an FP32 model is refused")
        except Exception as e:
            check("400" in str(e) and "input0" in str(e), f"kserve v2 REST: 400 naming the input ({e})")
        await v2.close()

        g = InferenceGRPCClient(ARGS.grpc)
        check(await g.is_server_ready(), "kserve grpc: ready")
        i = InferInput("input0", list(x4.shape), "FP32")
        i.set_data_from_numpy(x4, binary_data=True)
        r = await g.infer(InferRequest(model_name="mlp", infer_inputs=[i]))
        same_floats(r.outputs[0].as_numpy(), want4, "kserve v2 gRPC mlp")
        i = InferInput("input0", [1, 3], "FP32")
        i.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32), binary_data=True)
        try:
            await g.infer(InferRequest(model_name="mlp", infer_inputs=[i]))
            check(False, "kserve grpc: a wrong shape is refused")
        except Exception as e:  # the client wraps grpc's error
            check("INVALID_ARGUMENT" in str(e) and "input0" in str(e), f"kserve grpc error: {e}")
        await g.close()

    asyncio.run(run())

    # KServe's stubs name the model in field 1 of the repository calls, where Triton's put the
    # repository: both are served.
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as kpb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(ARGS.grpc))
    try:
        r = stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="txt"))
    except grpc.RpcError as e:
        # A server without enable_model_api (KServe's runtime) refuses, in the words of
        # TorchServe's management RPCs, and keeps serving.
        check(
            e.code() == grpc.StatusCode.PERMISSION_DENIED and "Model API disabled" in e.details(),
            f"kserve stubs: unload refused ({e.code()}, {e.details()})",
        )
        check(stub.ModelReady(kpb.ModelReadyRequest(name="txt")).ready, "kserve stubs: still ready")
        still_serving("kserve clients")
        return
    check(r.model_name == "txt" and r.isUnloaded, f"kserve stubs: unload {r}")
    check(not stub.ModelReady(kpb.ModelReadyRequest(name="txt")).ready, "kserve stubs: unloaded is not ready")
    r = stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="txt"))
    check(r.model_name == "txt" and r.isLoaded, f"kserve stubs: load {r}")
    check(stub.ModelReady(kpb.ModelReadyRequest(name="txt")).ready, "kserve stubs: loaded is ready")
    still_serving("kserve clients")


def torchserve_stubs():
    """Makes TorchServe's Python gRPC stubs with grpcio-tools, as TorchServe's users do, and puts
    them on the import path."""
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp()
    proto_dir = os.path.join(os.path.dirname(__file__), "../../crates/server/proto")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for f in ("torchserve_inference.proto", "torchserve_management.proto", "google/rpc/status.proto"):
        rc = protoc.main(
            ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", f]
        )
        check(rc == 0, f"grpcio-tools compiles {f}")
    # TorchServe's `open_inference_grpc.proto` is the v2 protocol's under another package; its
    # stubs call the same methods by that package's name.
    with open(os.path.join(proto_dir, "inference_v2.proto")) as f:
        v2 = f.read()
    check("package inference;" in v2, "the v2 proto names its package")
    with open(os.path.join(out, "open_inference_grpc.proto"), "w") as f:
        f.write(v2.replace("package inference;", "package org.pytorch.serve.grpc.openinference;"))
    rc = protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}", "open_inference_grpc.proto"])
    check(rc == 0, "grpcio-tools compiles open_inference_grpc.proto")
    sys.path.insert(0, out)


def torchserve_open_inference(x1, want1, jpeg, want_cls):
    """The v2 service under TorchServe's name, as its KServe tests call it."""
    import grpc
    import open_inference_grpc_pb2 as oip
    import open_inference_grpc_pb2_grpc as oip_grpc

    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(ARGS.grpc))
    check(stub.ServerLive(oip.ServerLiveRequest()).live, "open inference: ServerLive")
    check(stub.ServerReady(oip.ServerReadyRequest()).ready, "open inference: ServerReady")
    check(stub.ModelReady(oip.ModelReadyRequest(name="mlp")).ready, "open inference: ModelReady")
    md = stub.ModelMetadata(oip.ModelMetadataRequest(name="mlp"))
    check(md.inputs[0].datatype == "FP32", f"open inference: ModelMetadata {md}")
    request = oip.ModelInferRequest(model_name="mlp", id="oip")
    request.inputs.add(name="input0", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(x1.tobytes())
    r = stub.ModelInfer(request)
    check(r.id == "oip", "open inference: the id is echoed")
    same_floats(np.frombuffer(r.raw_output_contents[0], dtype=np.float32).reshape(1, 10), want1, "open inference mlp")
    request = oip.ModelInferRequest(model_name="cls")
    request.inputs.add(name="input0", datatype="BYTES", shape=[-1]).contents.bytes_contents.append(jpeg)
    r = stub.ModelInfer(request)
    got = json.loads(r.raw_output_contents[0][4:])
    check(close(got, want_cls), f"open inference cls BYTES [-1]: {got}")
    try:
        stub.RepositoryIndex(oip.RepositoryIndexRequest())
        check(False, "open inference: TorchServe's service has no repository methods")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.UNIMPLEMENTED, f"open inference: RepositoryIndex is UNIMPLEMENTED ({e.code()})")


def torchserve_grpc():
    import grpc

    torchserve_stubs()
    import torchserve_inference_pb2 as inf
    import torchserve_inference_pb2_grpc as inf_grpc
    import torchserve_management_pb2 as mgmt
    import torchserve_management_pb2_grpc as mgmt_grpc
    from google.protobuf import empty_pb2

    x1 = mlp_input(1)
    want1 = mlp_reference(x1)
    jpeg, want_cls = image_reference()
    stub = inf_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(ARGS.grpc))
    health = json.loads(stub.Ping(empty_pb2.Empty()).health)
    check(health == {"status": "Healthy"}, f"torchserve grpc: ping {health}")
    torchserve_open_inference(x1, want1, jpeg, want_cls)
    r = stub.Predictions(
        inf.PredictionsRequest(model_name="mlp", input={"data": json.dumps(x1.tolist()).encode()})
    )
    same_floats(np.array(json.loads(r.prediction)).reshape(1, 10), want1, "torchserve grpc mlp")
    r = stub.Predictions(inf.PredictionsRequest(model_name="cls", input={"data": jpeg}))
    check(close(json.loads(r.prediction), want_cls), "torchserve grpc cls")
    # A model of two inputs takes each as an entry of the input map.
    want_two = two_reference()
    two_input = {"ids": json.dumps(TWO_IDS.tolist()).encode(), "dense": json.dumps(TWO_DENSE.tolist()).encode()}
    r = stub.Predictions(inf.PredictionsRequest(model_name="two", input=two_input))
    same_floats(np.array(json.loads(r.prediction)), want_two, "torchserve grpc two inputs")
    answers = list(stub.StreamPredictions(inf.PredictionsRequest(model_name="cls", input={"data": jpeg})))
    check(len(answers) == 1 and close(json.loads(answers[0].prediction), want_cls), "StreamPredictions")
    reqs = [
        inf.PredictionsRequest(model_name="cls", input={"data": jpeg}, sequence_id="s1"),
        inf.PredictionsRequest(model_name="cls", input={"data": b"not an image"}, sequence_id="s1"),
        inf.PredictionsRequest(model_name="cls", input={"data": jpeg}, sequence_id="s1"),
    ]
    answers = list(stub.StreamPredictions2(iter(reqs)))
    check(len(answers) == 3, "StreamPredictions2 answers each request")
    check(all(a.sequence_id == "s1" for a in answers), "StreamPredictions2 echoes sequence_id")
    check(answers[1].status.code == 3, f"StreamPredictions2: the bad one says INVALID_ARGUMENT ({answers[1].status})")
    check(close(json.loads(answers[2].prediction), want_cls), "StreamPredictions2 goes on after a failure")
    # Many small messages sent ahead on one stream, as a client that does not wait sends
    # them: each is answered, in order. Read one at a time, unread ones piled up in h2 past its
    # limit and the whole connection was closed (GOAWAY) after about 150.
    want_txt = text_reference()
    ahead = [
        inf.PredictionsRequest(model_name="txt", input={"data": TEXT.encode()}, sequence_id=str(i))
        for i in range(400)
    ]
    answers = list(stub.StreamPredictions2(iter(ahead)))
    check([a.sequence_id for a in answers] == [str(i) for i in range(400)], "400 sent ahead: all answered, in order")
    check(
        all(a.status.code == 0 and close(json.loads(a.prediction), want_txt) for a in answers),
        "400 sent ahead: each is the REST answer",
    )
    # A message that cannot be read (past max_request_size) ends the stream with its error,
    # after the answers owed for the messages before it.
    huge = inf.PredictionsRequest(model_name="txt", input={"data": b"x" * (8 * 1024 * 1024)})
    got = []
    try:
        for a in stub.StreamPredictions2(iter(ahead[:3] + [huge])):
            got.append(a)
        check(False, "a message past max_request_size ends the stream with an error")
    except grpc.RpcError as e:
        # RESOURCE_EXHAUSTED, as grpc-java under TorchServe answers a message over its limit.
        check(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"too large in a stream: {e.code()}")
    check([a.sequence_id for a in got] == ["0", "1", "2"], f"answers owed before it: {[a.sequence_id for a in got]}")
    try:
        stub.Predictions(huge)
        check(False, "a unary message past max_request_size is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"too large: {e.code()}")
        check("message length too large" in (e.details() or ""), f"too large: {e.details()}")
    # Compressed requests, as grpcio sends them when asked to.
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        r = stub.Predictions(
            inf.PredictionsRequest(model_name="mlp", input={"data": json.dumps(x1.tolist()).encode()}),
            compression=compression,
        )
        same_floats(np.array(json.loads(r.prediction)).reshape(1, 10), want1, f"torchserve grpc {compression}")
    # A call whose deadline passes while the model runs ends as DEADLINE_EXCEEDED where the
    # client's clock fires first, CANCELLED where the server's does; the server's access log has
    # it as cancelled (checked by the test that runs this suite).
    for _ in range(3):
        try:
            stub.Predictions(inf.PredictionsRequest(model_name="cls", input={"data": jpeg}), timeout=0.005)
        except grpc.RpcError as e:
            passed = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
            check(e.code() in passed, f"a short deadline ({e.code()})")
    try:
        stub.Predictions(inf.PredictionsRequest(model_name="nope", input={"data": b"[1]"}))
        check(False, "torchserve grpc: an unknown model is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, f"NOT_FOUND ({e.code()})")
        check("nope" in e.details(), f"the message names the model: {e.details()}")
    try:
        stub.Predictions(inf.PredictionsRequest(model_name="mlp", input={"data": b"[1, 2]"}))
        check(False, "torchserve grpc: a wrong shape is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"INVALID_ARGUMENT ({e.code()})")

    m = mgmt_grpc.ManagementAPIsServiceStub(grpc.insecure_channel(ARGS.grpc_management))
    listed = json.loads(m.ListModels(mgmt.ListModelsRequest()).msg)
    check({x["modelName"] for x in listed["models"]} >= {"mlp", "cls"}, f"ListModels {listed}")
    # As TorchServe answers: the status text for changes, JSON for describe and list.
    r = m.RegisterModel(
        mgmt.RegisterModelRequest(url=ARGS.mlp_archive, model_name="mlp2", initial_workers=1, synchronous=True)
    ).msg
    check(r == 'Model "mlp2" Version: 1.0 registered with 1 initial workers', f"RegisterModel {r!r}")
    d = json.loads(m.DescribeModel(mgmt.DescribeModelRequest(model_name="mlp2")).msg)
    check(len(d[0]["workers"]) == 1, "DescribeModel")
    # TorchServe's field names, so its clients' code runs unchanged.
    r = m.RegisterModel(
        mgmt.RegisterModelRequest(
            url=ARGS.mlp_archive, model_name="mlp3", startup_timeout=7, response_timeout=9, synchronous=True
        )
    ).msg
    d = json.loads(m.DescribeModel(mgmt.DescribeModelRequest(model_name="mlp3")).msg)[0]
    check((d["startupTimeout"], d["responseTimeout"]) == (7, 9), f"RegisterModel timeouts {d}")
    m.UnregisterModel(mgmt.UnregisterModelRequest(model_name="mlp3"))
    r = m.ScaleWorker(mgmt.ScaleWorkerRequest(model_name="mlp2", min_worker=2, synchronous=True)).msg
    check(r == "Workers scaled to 2 for model: mlp2", f"ScaleWorker {r!r}")
    # min_worker left unset (proto3's 0) means TorchServe's default of 1, not none.
    r = m.ScaleWorker(mgmt.ScaleWorkerRequest(model_name="mlp2", synchronous=True)).msg
    check(r == "Workers scaled to 1 for model: mlp2", f"ScaleWorker without min_worker {r!r}")
    # Values the REST API refuses are refused here too; proto3's unset (0, "") is not a value.
    for what, call in (
        ("a negative min_worker", lambda: m.ScaleWorker(mgmt.ScaleWorkerRequest(model_name="mlp2", min_worker=-1))),
        ("no url", lambda: m.RegisterModel(mgmt.RegisterModelRequest(model_name="mlp3"))),
    ):
        try:
            call()
            check(False, f"{what} is refused")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: INVALID_ARGUMENT ({e.code()}, {e.details()})")
    r = m.SetDefault(mgmt.SetDefaultRequest(model_name="mlp2", model_version="1.0")).msg
    check(r == 'Default version successfully updated for model "mlp2" to "1.0"', f"SetDefault {r!r}")
    r = m.UnregisterModel(mgmt.UnregisterModelRequest(model_name="mlp2")).msg
    check(r == 'Model "mlp2" unregistered', f"UnregisterModel {r!r}")
    try:
        m.DescribeModel(mgmt.DescribeModelRequest(model_name="mlp2"))
        check(False, "DescribeModel of an unregistered model fails")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, f"NOT_FOUND after unregister ({e.code()})")
    still_serving("TorchServe gRPC calls")


def model_api_off():
    """Without enable_model_api, TorchServe's gRPC management refuses registration changes as
    TorchServe does, in the words its own test (test_gRPC_model_control.py) matches."""
    import grpc

    torchserve_stubs()
    import torchserve_management_pb2 as mgmt
    import torchserve_management_pb2_grpc as mgmt_grpc

    import tritonclient.grpc as tgrpc

    m = mgmt_grpc.ManagementAPIsServiceStub(grpc.insecure_channel(ARGS.grpc_management))
    # The v2 service's repository calls are refused in the same words.
    triton = tgrpc.InferenceServerClient(url=ARGS.grpc)
    v2 = triton._client_stub
    from tritonclient.grpc import service_pb2

    for what, call in (
        ("RegisterModel", lambda: m.RegisterModel(mgmt.RegisterModelRequest(url=ARGS.mlp_archive))),
        ("UnregisterModel", lambda: m.UnregisterModel(mgmt.UnregisterModelRequest(model_name="mlp"))),
        ("RepositoryModelLoad", lambda: v2.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="mlp"))),
        ("RepositoryModelUnload", lambda: v2.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name="mlp"))),
    ):
        try:
            call()
            check(False, f"{what} without enable_model_api is refused")
        except grpc.RpcError as e:
            check(
                e.code() == grpc.StatusCode.PERMISSION_DENIED and "Model API disabled" in e.details(),
                f"{what}: PERMISSION_DENIED, Model API disabled ({e.code()}, {e.details()})",
            )
    listed = json.loads(m.ListModels(mgmt.ListModelsRequest()).msg)
    check(any(x["modelName"] == "mlp" for x in listed["models"]), "ListModels still answers")
    still_serving("TorchServe gRPC without the model API")


def auth():
    """With token authorization on: gRPC calls need the key in their metadata."""
    import grpc
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    keys = json.load(open(ARGS.key_file))
    inference = {"authorization": f"Bearer {keys['inference']['key']}"}
    management = {"authorization": f"Bearer {keys['management']['key']}"}
    g = tgrpc.InferenceServerClient(url=ARGS.grpc)
    check(g.is_server_live(), "v2 grpc: live needs no key (a probe)")
    x = mlp_input(1)
    i = tgrpc.InferInput("input0", [1, 784], "FP32")
    i.set_data_from_numpy(x)
    try:
        g.infer("mlp", [i])
        check(False, "v2 grpc: ModelInfer without a key is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.UNAUTHENTICATED", f"v2 grpc: UNAUTHENTICATED ({e.status()})")
    r = g.infer("mlp", [i], headers=inference)
    check(r.as_numpy("output0").shape == (1, 10), "v2 grpc: ModelInfer with the inference key")
    try:
        g.unload_model("mlp", headers=inference)
        check(False, "v2 grpc: unloading with the inference key is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.UNAUTHENTICATED", f"v2 grpc unload: UNAUTHENTICATED ({e.status()})")

    torchserve_stubs()
    import torchserve_inference_pb2_grpc as inf_grpc
    import torchserve_management_pb2 as mgmt
    import torchserve_management_pb2_grpc as mgmt_grpc
    from google.protobuf import empty_pb2

    stub = inf_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(ARGS.grpc))
    try:
        stub.Ping(empty_pb2.Empty())
        check(False, "torchserve grpc: Ping without a key is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.PERMISSION_DENIED, f"Ping: PERMISSION_DENIED, as TorchServe ({e.code()})")
        check("Token Authorization failed" in e.details(), f"the REST API's message: {e.details()}")
    check("Healthy" in stub.Ping(empty_pb2.Empty(), metadata=list(inference.items())).health, "Ping with the key")
    m = mgmt_grpc.ManagementAPIsServiceStub(grpc.insecure_channel(ARGS.grpc_management))
    try:
        m.ListModels(mgmt.ListModelsRequest(), metadata=list(inference.items()))
        check(False, "ListModels with the inference key is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.PERMISSION_DENIED, f"ListModels: PERMISSION_DENIED ({e.code()})")
    listed = json.loads(m.ListModels(mgmt.ListModelsRequest(), metadata=list(management.items())).msg)
    check(any(x["modelName"] == "mlp" for x in listed["models"]), "ListModels with the management key")


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("suite", choices=["triton", "kserve", "torchserve-grpc", "auth", "model-api-off"])
    p.add_argument("--http", required=True)
    p.add_argument("--grpc", required=True)
    p.add_argument("--grpc-management", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--mlp-archive", required=True, help="the mlp's archive in the model store")
    p.add_argument("--key-file", help="key_file.json of a server with token authorization on")
    ARGS = p.parse_args()
    # kserve parses the command line when imported: leave it nothing to misread.
    sys.argv = sys.argv[:1]
    suites = {"triton": triton, "kserve": kserve_suite, "torchserve-grpc": torchserve_grpc, "auth": auth,
              "model-api-off": model_api_off}
    suites[ARGS.suite]()
    print(f"ok: {len(CHECKS)} checks of {ARGS.suite}")


if __name__ == "__main__":
    main()
