"""Checks every manifest under deploy/ and proves the checks can fail. Run by tests/deploy.rs:

    .venv-clients/bin/python tests/clients/deploy_check.py [--self-test | --no-self-test]

For each YAML file, one line: ok or FAIL, and why. Exits non-zero on any failure.

1. yamllint, with deploy/.yamllint, strict: a warning fails too.
2. Schemas. Core Kubernetes kinds go to kubernetes-validate in strict mode (an unknown field
   fails) for each version in KUBERNETES_VERSIONS: the oldest the manifests promise to work on
   (the preStop sleep action is on by default from 1.30) and the newest the package knows.
   KServe kinds go to jsonschema, against the openAPIV3Schema of KServe's CRDs kept in
   tests/data/kserve (see the README there). Two changes at load time:
   - every object schema with `properties`, no `additionalProperties` and no
     `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`. KServe's CRDs
     are structural, so the API server would not refuse an unknown field there: it would drop
     it without a word. A misspelt field that silently does nothing is what this should catch.
   - `metadata`, a bare object in a CRD (the API server checks it itself), is checked against
     Kubernetes' own ObjectMeta, strict, from kubernetes-validate.
   A kind that neither knows fails: nothing goes unchecked.
3. Facts other code relies on: the KServe runtime's args are exactly RUNTIME_ARGS (the tests run
   the image with them); every Deployment probes liveness on /ping and readiness on
   /v2/health/ready, port 8080; images are tchserve/tchserve:0.1.0-(cpu|gpu), the GPU one
   exactly where a GPU is asked for; management stays on loopback and off the Service;
   the grace period outlasts graceful_shutdown_timeout; names referred to across files exist.
4. Self-test (alone with --self-test; after the checks unless --no-self-test): each check is
   handed a manifest broken in memory in one way, and must report it.

--extract-kserve-crds DIR --source TEXT rewrites tests/data/kserve from KServe's config/crd/full.
"""

import argparse
import copy
import hashlib
import importlib.resources
import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KSERVE_SCHEMAS = ROOT / "tests" / "data" / "kserve"
KUBERNETES_VERSIONS = ("1.30", "1.37")

IMAGE = re.compile(r"tchserve/tchserve:0\.1\.0-(cpu|gpu)")
HTTP_PORT = 8080
GRPC_V2_PORT = 8081
MODEL_STORE = "/home/model-server/model-store"
RUNTIME_NAME = "kserve-tchserve"
# What tests run the image with; the runtime's args must be exactly these, in this order.
RUNTIME_ARGS = [
    "--foreground",
    "--model-store=/mnt/models/model-store",
    "--ts-config=/mnt/models/config/config.properties",
    "--disable-token-auth",
    "--ncs",
    "--log-dir=/tmp/tchserve",
    "--set=inference_address=http://0.0.0.0:8080",
    "--set=management_address=http://127.0.0.1:8085",
    "--set=metrics_address=http://0.0.0.0:8082",
    "--set=grpc_inference_address=0.0.0.0",
    "--set=grpc_inference_port=8081",
    "--set=grpc_management_address=127.0.0.1",
    "--set=grpc_management_port=8086",
    "--set=graceful_shutdown_timeout=25",
]

# (apiVersion, kind) -> schema file stem in tests/data/kserve.
KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice",
}
# CRD file in config/crd/full -> (served version, schema file stem).
KSERVE_CRDS = {
    "serving.kserve.io_clusterservingruntimes.yaml": ("v1alpha1", "clusterservingruntime"),
    "serving.kserve.io_servingruntimes.yaml": ("v1alpha1", "servingruntime"),
    "serving.kserve.io_inferenceservices.yaml": ("v1beta1", "inferenceservice"),
}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def short(text, limit=240):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------- yamllint

_LINT_CONFIG = None


def lint_errors(text, path):
    global _LINT_CONFIG
    if _LINT_CONFIG is None:
        _LINT_CONFIG = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    return [
        f"yamllint {p.line}:{p.column} {p.level}: {p.desc}" + (f" ({p.rule})" if p.rule else "")
        for p in linter.run(text, _LINT_CONFIG, str(path))
    ]


# ----------------------------------------------------------------------------------- schemas


def kubernetes_definitions():
    """kubernetes-validate's strict definitions for the newest version checked."""
    folder = f"v{KUBERNETES_VERSIONS[-1]}.0-local-strict"
    ref = importlib.resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", folder, "_definitions.json"
    )
    return json.loads(ref.read_text())


def tighten(node):
    """additionalProperties: false wherever the API server would prune unknown fields."""
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and isinstance(node.get("properties"), dict)
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            tighten(value)
    elif isinstance(node, list):
        for value in node:
            tighten(value)


_KSERVE_VALIDATORS = {}


def kserve_validator(stem):
    if stem not in _KSERVE_VALIDATORS:
        schema = json.loads((KSERVE_SCHEMAS / f"{stem}.schema.json").read_text())
        tighten(schema)
        defs = kubernetes_definitions()
        schema["properties"]["metadata"] = {"$ref": f"{defs['$id']}#/$defs/{OBJECT_META}"}
        registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
        jsonschema.Draft202012Validator.check_schema(schema)
        _KSERVE_VALIDATORS[stem] = jsonschema.Draft202012Validator(schema, registry=registry)
    return _KSERVE_VALIDATORS[stem]


def schema_errors(obj):
    """What is wrong with one object by its kind's schema; a kind with no schema is an error."""
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        return ["not a Kubernetes object: apiVersion and kind are required"]
    api, kind = obj["apiVersion"], obj["kind"]
    if api.split("/")[0] == "serving.kserve.io":
        stem = KSERVE_KINDS.get((api, kind))
        if stem is None:
            return [f"no schema for {api} {kind} in {KSERVE_SCHEMAS.relative_to(ROOT)}"]
        errors = sorted(kserve_validator(stem).iter_errors(obj), key=lambda e: e.json_path)
        return [f"KServe CRD schema: {e.json_path}: {short(e.message)}" for e in errors]
    found = {}  # the same problem in several versions is reported once, naming them all
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            found.setdefault(f"schema: {e.json_path}: {short(e.message)}", []).append(version)
        except kubernetes_validate.SchemaNotFoundError:
            found.setdefault(f"no schema for {api} {kind}", []).append(version)
    return [f"Kubernetes {', '.join(v)} {problem}" for problem, v in found.items()]


# ------------------------------------------------------------------------------------- facts


def properties_of(text):
    """The key=value pairs of a config.properties (comments and blank lines skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def host_port(address):
    """("0.0.0.0", 8080) from http://0.0.0.0:8080."""
    m = re.fullmatch(r"https?://(\[[^\]]+\]|[^:/]+):(\d+)", address or "")
    return (m.group(1), int(m.group(2))) if m else (None, None)


def set_flags(args):
    """The KEY=VALUE pairs given with --set=KEY=VALUE."""
    out = {}
    for arg in args or []:
        if arg.startswith("--set="):
            key, _, value = arg[len("--set=") :].partition("=")
            out[key] = value
    return out


def security_errors(where, container, pod_context=None):
    pod_context = pod_context or {}
    sc = container.get("securityContext") or {}
    errors = []
    if sc.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        errors.append(f"{where}: runAsNonRoot must be true")
    if sc.get("runAsUser", pod_context.get("runAsUser")) != 1000:
        errors.append(f"{where}: runAsUser must be 1000 (the image's model-server user)")
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        errors.append(f"{where}: capabilities must drop ALL")
    return errors


def image_errors(where, container):
    image = container.get("image", "")
    gpu_asked = any(
        "nvidia.com/gpu" in ((container.get("resources") or {}).get(k) or {})
        for k in ("limits", "requests")
    )
    m = IMAGE.fullmatch(image)
    if not m:
        return [f"{where}: image {image!r} is not {IMAGE.pattern}"]
    if (m.group(1) == "gpu") != gpu_asked:
        asked = "asked for" if gpu_asked else "not asked for"
        return [f"{where}: image {image} with nvidia.com/gpu {asked}"]
    return []


def probe_port(container, probe):
    port = ((probe or {}).get("httpGet") or {}).get("port")
    if isinstance(port, str):
        for p in container.get("ports") or []:
            if p.get("name") == port:
                return p.get("containerPort")
    return port


def deployment_errors(obj, context):
    errors = []
    pod = obj["spec"]["template"]
    spec = pod["spec"]
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key, value in (
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "8082"),
        ("prometheus.io/path", "/metrics"),
    ):
        if annotations.get(key) != value:
            errors.append(f"pod annotation {key} must be {value!r}")
    containers = spec.get("containers") or []
    for c in containers + (spec.get("initContainers") or []):
        where = f"container {c.get('name')}"
        errors += image_errors(where, c)
        errors += security_errors(where, c, spec.get("securityContext"))
    if not containers:
        return errors + ["no containers"]
    server = containers[0]
    for kind, path in (
        ("livenessProbe", "/ping"),
        ("readinessProbe", "/v2/health/ready"),
        ("startupProbe", None),
    ):
        probe = server.get(kind)
        got_path = ((probe or {}).get("httpGet") or {}).get("path")
        if probe is None or (path and got_path != path):
            errors.append(f"{kind} must be httpGet {path or 'on the server'}")
        elif probe_port(server, probe) != HTTP_PORT:
            errors.append(f"{kind} must be on port {HTTP_PORT}")
    # The settings of the mounted ConfigMap, as this container's --set flags leave them.
    props = {}
    for v in spec.get("volumes") or []:
        props.update(context["properties"].get((v.get("configMap") or {}).get("name"), {}))
    props.update(set_flags(server.get("args")))
    errors += address_errors(props, "config.properties with --set")
    # The grace period must cover the preStop sleep and the server's own drain.
    drain = int(props.get("graceful_shutdown_timeout", 30))
    pre_stop = ((server.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
    needed = drain + int(pre_stop.get("seconds", 0))
    if spec.get("terminationGracePeriodSeconds", 30) <= needed:
        errors.append(f"terminationGracePeriodSeconds must exceed {needed} (drain + preStop)")
    mounts = {m.get("mountPath"): m for m in server.get("volumeMounts") or []}
    if (mounts.get(MODEL_STORE) or {}).get("readOnly") is not True:
        errors.append(f"the model store must be mounted read-only at {MODEL_STORE}")
    for v in spec.get("volumes") or []:
        cm = (v.get("configMap") or {}).get("name")
        if cm and cm not in context["names"].get("ConfigMap", ()):
            errors.append(f"volume {v.get('name')}: no ConfigMap {cm} in deploy/")
        pvc = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if pvc and pvc not in context["names"].get("PersistentVolumeClaim", ()):
            errors.append(f"volume {v.get('name')}: no PersistentVolumeClaim {pvc} in deploy/")
    return errors


def selects_a_deployment(selector, context):
    return any(
        selector and all(labels.get(k) == v for k, v in selector.items())
        for labels in context["pod_labels"]
    )


def service_errors(obj, context):
    errors = []
    if not selects_a_deployment(obj["spec"].get("selector"), context):
        errors.append("the selector matches no Deployment's pods")
    for p in obj["spec"].get("ports") or []:
        if not p.get("name"):
            errors.append(f"port {p.get('port')} needs a name")
        if p.get("port") in (8081, 7071) or "manage" in str(p.get("name", "")):
            errors.append(f"port {p.get('name')}: management must stay off the Service")
    return errors


def address_errors(props, where):
    """Inference and metrics where the probes and scrapers look; management on loopback."""
    errors = []
    for key, want in (("inference_address", HTTP_PORT), ("metrics_address", 8082)):
        if host_port(props.get(key))[1] != want:
            errors.append(f"{where}: {key} must be on port {want}")
    for key in ("management_address", "grpc_management_address"):
        value = props.get(key, "")
        host = host_port(value)[0] if "://" in value else value
        if host not in LOOPBACK:
            errors.append(f"{where}: {key} must be loopback, not {value!r}")
    return errors


def config_map_errors(obj, context):
    text = (obj.get("data") or {}).get("config.properties")
    if text is None:
        return []
    props = properties_of(text)
    errors = address_errors(props, "config.properties")
    if "graceful_shutdown_timeout" not in props:
        errors.append("config.properties: graceful_shutdown_timeout must be set")
    return errors


def runtime_errors(obj, context):
    spec = obj["spec"]
    errors = []
    if obj["kind"] == "ClusterServingRuntime" and obj["metadata"].get("name") != RUNTIME_NAME:
        errors.append(f"the ClusterServingRuntime must be named {RUNTIME_NAME}")
    annotations = spec.get("annotations") or {}
    for key, value in (
        ("prometheus.kserve.io/port", "8082"),
        ("prometheus.kserve.io/path", "/metrics"),
    ):
        if annotations.get(key) != value:
            errors.append(f"annotation {key} must be {value!r}")
    missing = {"v1", "v2", "grpc-v2"} - set(spec.get("protocolVersions") or [])
    if missing:
        errors.append(f"protocolVersions lack {sorted(missing)}")
    if not any(f.get("name") == "pytorch" for f in spec.get("supportedModelFormats") or []):
        errors.append("supportedModelFormats must include pytorch")
    containers = {c.get("name"): c for c in spec.get("containers") or []}
    server = containers.get("kserve-container")
    if server is None:
        return errors + ["no container named kserve-container"]
    for c in containers.values():
        errors += image_errors(f"container {c.get('name')}", c)
        errors += security_errors(f"container {c.get('name')}", c)
    args = server.get("args") or []
    if args != RUNTIME_ARGS:
        i = next((i for i, (a, b) in enumerate(zip(args, RUNTIME_ARGS)) if a != b), None)
        if i is None:
            errors.append(f"kserve-container: {len(args)} args, not {len(RUNTIME_ARGS)}")
        else:
            errors.append(f"kserve-container arg {i}: {args[i]!r}, not {RUNTIME_ARGS[i]!r}")
    flags = set_flags(args)
    if host_port(flags.get("inference_address"))[1] != HTTP_PORT:
        errors.append(f"inference_address must be on {HTTP_PORT}, where KServe sends HTTP")
    if flags.get("grpc_inference_port") != str(GRPC_V2_PORT):
        errors.append(f"grpc_inference_port must be {GRPC_V2_PORT}, where KServe sends gRPC")
    return errors


def inference_service_errors(obj, context):
    model = ((obj["spec"].get("predictor") or {}).get("model")) or {}
    errors = []
    if model.get("runtime") != RUNTIME_NAME:
        errors.append(f"predictor.model.runtime must be {RUNTIME_NAME}")
    if (model.get("modelFormat") or {}).get("name") != "pytorch":
        errors.append("predictor.model.modelFormat.name must be pytorch")
    ports = model.get("ports") or []
    if model.get("protocolVersion") == "grpc-v2":
        if [(p.get("name"), p.get("containerPort")) for p in ports] != [("h2c", GRPC_V2_PORT)]:
            errors.append(f"grpc-v2 needs exactly one port, h2c {GRPC_V2_PORT}")
    elif ports:
        errors.append("only grpc-v2 declares a port (KServe's default 8080 serves HTTP)")
    return errors


def hpa_errors(obj, context):
    target = obj["spec"]["scaleTargetRef"]
    if target.get("name") not in context["names"].get(target.get("kind"), ()):
        return [f"scaleTargetRef: no {target.get('kind')} {target.get('name')} in deploy/"]
    return []


def pdb_errors(obj, context):
    selector = (obj["spec"].get("selector") or {}).get("matchLabels")
    return [] if selects_a_deployment(selector, context) else ["the selector matches no pods"]


FACTS = {
    "Deployment": deployment_errors,
    "Service": service_errors,
    "ConfigMap": config_map_errors,
    "ClusterServingRuntime": runtime_errors,
    "ServingRuntime": runtime_errors,
    "InferenceService": inference_service_errors,
    "HorizontalPodAutoscaler": hpa_errors,
    "PodDisruptionBudget": pdb_errors,
}


def fact_errors(obj, context):
    check = FACTS.get(obj.get("kind")) if isinstance(obj, dict) else None
    if check is None:
        return []
    try:
        return check(obj, context)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        # The schema check reports the shape; here it only must not crash the run.
        return [f"cannot check facts: {type(e).__name__} {e}"]


def build_context(files):
    names, pod_labels, props = {}, [], {}  # props: ConfigMap name -> its config.properties
    for _, _, docs in files:
        for obj in docs:
            if not isinstance(obj, dict):
                continue
            name = (obj.get("metadata") or {}).get("name")
            names.setdefault(obj.get("kind"), set()).add(name)
            if obj.get("kind") == "Deployment":
                labels = (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {})
                pod_labels.append(labels.get("labels") or {})
            if obj.get("kind") == "ConfigMap" and "config.properties" in (obj.get("data") or {}):
                props[name] = properties_of(obj["data"]["config.properties"])
    return {"names": names, "pod_labels": pod_labels, "properties": props}


# ------------------------------------------------------------------------------------ driver


def manifest_files():
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))
    return files + [DEPLOY / ".yamllint"]


def load(paths):
    """(path, text, documents) for each file; documents is empty for deploy/.yamllint."""
    out = []
    for path in paths:
        text = path.read_text()
        docs = []
        if path.suffix in (".yaml", ".yml"):
            try:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as e:
                docs = [{"__unparsable__": short(e)}]
        out.append((path, text, docs))
    return out


def describe(obj):
    if not isinstance(obj, dict):
        return repr(obj)[:40]
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def check_file(path, text, docs, context):
    """The file's problems, and a short account of what was checked."""
    problems = lint_errors(text, path)
    done = ["yamllint"]
    if path.suffix in (".yaml", ".yml") and not docs:
        problems.append("no Kubernetes object in the file")
    for obj in docs:
        if isinstance(obj, dict) and "__unparsable__" in obj:
            problems.append(f"not YAML: {obj['__unparsable__']}")
            continue
        what = describe(obj)
        problems += [f"{what}: {e}" for e in schema_errors(obj) + fact_errors(obj, context)]
        if isinstance(obj, dict) and obj.get("apiVersion", "").startswith("serving.kserve.io/"):
            done.append(f"{what} (KServe CRD schema, facts)")
        else:
            done.append(f"{what} (Kubernetes {'+'.join(KUBERNETES_VERSIONS)} strict, facts)")
    return problems, done


def check_all(files):
    context = build_context(files)
    failed = 0
    kinds = set()
    for path, text, docs in files:
        problems, done = check_file(path, text, docs, context)
        rel = path.relative_to(ROOT)
        kinds.update(o.get("kind") for o in docs if isinstance(o, dict))
        if problems:
            failed += 1
            print(f"FAIL {rel}: {len(problems)} problem(s)")
            for p in problems:
                print(f"     {p}")
        else:
            print(f"ok   {rel}: {', '.join(done)}")
    # A manifest set missing a whole kind would pass the per-file checks without a word.
    for kind in ("Deployment", "Service", "ClusterServingRuntime", "InferenceService"):
        if kind not in kinds:
            print(f"FAIL deploy/: no {kind} at all")
            failed += 1
    return failed


# --------------------------------------------------------------------------------- self-test


def find(files, suffix, kind):
    for path, text, docs in files:
        if str(path.relative_to(ROOT)).endswith(suffix):
            for obj in docs:
                if isinstance(obj, dict) and obj.get("kind") == kind:
                    return copy.deepcopy(obj)
    raise SystemExit(f"self-test: no {kind} in a file ending {suffix}")


def rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


def self_test(files):
    """Each case breaks one thing; the check it targets must report it, and must not report the
    unbroken original (else the case proves nothing)."""
    context = build_context(files)
    schema = schema_errors

    def facts(obj):
        return fact_errors(obj, context)

    def set_arg(obj, old, new):
        args = obj["spec"]["containers"][0]["args"]
        args[args.index(old)] = new

    def set_property(obj, key, value):
        props = obj["data"]["config.properties"]
        obj["data"]["config.properties"] = re.sub(
            rf"(?m)^{key}=.*$", f"{key}={value}", props
        )

    deployment = ("kubernetes/deployment.yaml", "Deployment")
    service = ("kubernetes/service.yaml", "Service")
    runtime = ("kserve/runtime.yaml", "ClusterServingRuntime")
    isvc_grpc = ("kserve/inferenceservice-grpc.yaml", "InferenceService")
    isvc_v1 = ("kserve/inferenceservice-v1.yaml", "InferenceService")
    config = ("kubernetes/configmap.yaml", "ConfigMap")
    hpa = ("kubernetes/hpa.yaml", "HorizontalPodAutoscaler")
    cases = [
        ("misspelt container field in a Deployment", deployment, schema,
         lambda o: rename(o["spec"]["template"]["spec"]["containers"][0],
                          "imagePullPolicy", "imagePulPolicy")),
        ("string for an int in a Service port", service, schema,
         lambda o: o["spec"]["ports"][0].update(port="8080")),
        ("misspelt field in an HPA", hpa, schema,
         lambda o: rename(o["spec"], "minReplicas", "minReplica")),
        ("unknown field in the ClusterServingRuntime spec", runtime, schema,
         lambda o: o["spec"].update(grpcPort=8081)),
        ("misspelt container field in the ClusterServingRuntime", runtime, schema,
         lambda o: rename(o["spec"]["containers"][0], "args", "arg")),
        ("misspelt storageUri in an InferenceService", isvc_v1, schema,
         lambda o: rename(o["spec"]["predictor"]["model"], "storageUri", "storageUrl")),
        ("unknown metadata field in an InferenceService", isvc_v1, schema,
         lambda o: o["metadata"].update(lables={"a": "b"})),
        ("string for an int in an InferenceService port", isvc_grpc, schema,
         lambda o: o["spec"]["predictor"]["model"]["ports"][0].update(containerPort="8081")),
        ("a kind no schema covers", deployment, schema,
         lambda o: o.update(apiVersion="example.com/v1", kind="Widget")),
        ("a KServe kind with no stored schema", runtime, schema,
         lambda o: o.update(kind="InferenceGraph")),
        ("runtime gRPC on the wrong port", runtime, facts,
         lambda o: set_arg(o, "--set=grpc_inference_port=8081", "--set=grpc_inference_port=9000")),
        ("runtime args reordered", runtime, facts,
         lambda o: o["spec"]["containers"][0]["args"].reverse()),
        ("readiness on /ping", deployment, facts,
         lambda o: o["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
         .update(path="/ping")),
        ("liveness on another port", deployment, facts,
         lambda o: o["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
         .update(port=8081)),
        ("an image of another name", deployment, facts,
         lambda o: o["spec"]["template"]["spec"]["containers"][0].update(image="tchserve:latest")),
        ("the GPU image without a GPU", deployment, facts,
         lambda o: o["spec"]["template"]["spec"]["containers"][0]
         .update(image="tchserve/tchserve:0.1.0-gpu")),
        ("a grace period shorter than the drain", deployment, facts,
         lambda o: o["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30)),
        ("management on every interface", config, facts,
         lambda o: set_property(o, "management_address", "http://0.0.0.0:8081")),
        ("grpc-v2 without its h2c port", isvc_grpc, facts,
         lambda o: o["spec"]["predictor"]["model"].pop("ports")),
    ]
    failed = 0
    for name, (suffix, kind), check, mutate in cases:
        original = find(files, suffix, kind)
        broken = copy.deepcopy(original)
        mutate(broken)
        before, after = check(original), check(broken)
        if before or not after or broken == original:
            failed += 1
            print(f"FAIL self-test: {name}: original {before or 'ok'}, broken {after or 'ok'}")
        else:
            print(f"ok   self-test: {name}: {short(after[0], 110)}")

    # yamllint on text broken in memory.
    path, text, _ = next(f for f in files if f[0].name == "deployment.yaml")
    for name, broken in (
        ("a line over 100 characters", text + "#" + " word" * 22 + "\n"),
        ("trailing spaces", text.replace("replicas: 2\n", "replicas: 2  \n", 1)),
        ("a duplicated key", text.replace("  replicas: 2\n", "  replicas: 2\n  replicas: 3\n", 1)),
        ("yes for a boolean", text + "extra: yes\n"),
    ):
        before, after = lint_errors(text, path), lint_errors(broken, path)
        if before or not after or broken == text:
            failed += 1
            print(f"FAIL self-test: yamllint, {name}: {after or 'not reported'}")
        else:
            print(f"ok   self-test: yamllint, {name}: {short(after[0], 110)}")
    total = len(cases) + 4
    print(f"self-test: {total - failed} of {total} broken manifests reported")
    return failed


# ------------------------------------------------------------------------------- extraction


def dedupe(schema, min_size=300):
    """Moves every subschema that occurs more than once (and is not tiny) to $defs, named after
    the field where it first occurs. Validation is unchanged; the file shrinks several times over,
    since KServe's CRDs repeat the pod and container schemas for every predictor kind."""

    def canon(node):
        return json.dumps(node, sort_keys=True, separators=(",", ":"))

    counts = {}

    def count(node):
        if isinstance(node, dict):
            key = canon(node)
            counts[key] = counts.get(key, 0) + 1
            for value in node.values():
                count(value)
        elif isinstance(node, list):
            for value in node:
                count(value)

    count(schema)
    shared = {k for k, n in counts.items() if n > 1 and len(k) >= min_size}
    names, defs = {}, {}

    def name_for(field):
        base = re.sub(r"[^A-Za-z0-9]+", "_", field) or "schema"
        name, i = base, 2
        while name in defs:
            name, i = f"{base}_{i}", i + 1
        return name

    def rewrite(node, field):
        if isinstance(node, dict):
            key = canon(node)
            if key in shared:
                if key not in names:
                    names[key] = name_for(field)
                    defs[names[key]] = None  # reserve the name before recursing
                    defs[names[key]] = fields(node, field)
                return {"$ref": f"#/$defs/{names[key]}"}
            return fields(node, field)
        if isinstance(node, list):
            return [rewrite(v, field) for v in node]
        return node

    def fields(node, field):
        # `properties` maps names to schemas: the map itself is never a schema to share.
        out = {}
        for k, v in node.items():
            if k == "properties":
                out[k] = {pk: rewrite(pv, pk) for pk, pv in v.items()}
            elif k in ("default", "enum", "required", "example"):
                out[k] = v
            else:
                out[k] = rewrite(v, f"{field}_item" if k == "items" else field)
        return out

    out = rewrite(schema, "root")
    out["$defs"] = dict(sorted(defs.items()))
    return out


def extract(crd_dir, source):
    crd_dir = Path(crd_dir)
    KSERVE_SCHEMAS.mkdir(parents=True, exist_ok=True)
    for file, (version, stem) in KSERVE_CRDS.items():
        crd = yaml.safe_load((crd_dir / file).read_text())
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = dedupe(served["schema"]["openAPIV3Schema"])
        kind = crd["spec"]["names"]["kind"]
        head = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"{crd['spec']['group']}/{version} {kind}: openAPIV3Schema of "
            f"config/crd/full/{file}, {source}; repeated subschemas moved to $defs",
        }
        text = json.dumps({**head, **schema}, indent=1, sort_keys=True) + "\n"
        (KSERVE_SCHEMAS / f"{stem}.schema.json").write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        print(f"wrote {stem}.schema.json ({len(text)} bytes, sha256 {digest})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--self-test", action="store_true", help="run only the self-test")
    ap.add_argument("--no-self-test", action="store_true", help="skip the self-test")
    ap.add_argument("--extract-kserve-crds", metavar="DIR", help="KServe's config/crd/full")
    ap.add_argument("--source", default="KServe", help="provenance for the extracted schemas")
    args = ap.parse_args()
    if args.extract_kserve_crds:
        extract(args.extract_kserve_crds, args.source)
        return 0
    files = load(manifest_files())
    failed = 0
    if not args.self_test:
        failed += check_all(files)
    if not args.no_self_test:
        failed += self_test(files)
    if failed:
        print(f"deploy_check: {failed} failure(s)")
        return 1
    done = "self-test" if args.self_test else f"{len(files)} files checked"
    print(f"deploy_check: {done}, all good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
