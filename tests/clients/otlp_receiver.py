"""A minimal OTLP/HTTP trace receiver for the tracing tests: the collector's end of
`POST /v1/traces` with `application/x-protobuf` bodies (gzip-encoded or not).

    otlp_receiver.py --port-file PATH --out PATH

Binds 127.0.0.1 on a free port and writes the port to --port-file (atomically, once listening).
Appends one JSON line per span to --out, flushed after every request:
    {"trace_id": hex, "span_id": hex, "parent_span_id": hex or "", "name": str,
     "attributes": {key: value}, "start_ns": int, "end_ns": int, "service_name": str}
Answers 200 with an empty ExportTraceServiceResponse. Runs until killed (SIGTERM exits cleanly).
Needs opentelemetry-proto (in .venv-clients).
"""

import argparse
import gzip
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def value(v):
    """An AnyValue as plain JSON."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def spans(request):
    for rs in request.resource_spans:
        resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                    "start_ns": s.start_time_unix_nano,
                    "end_ns": s.end_time_unix_nano,
                    "service_name": resource.get("service.name", ""),
                }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries a Content-Length

    def answer(self, status, body=b"", content_type="application/x-protobuf"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0] != "/v1/traces":
            return self.answer(404, b"not found\n", "text/plain")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-protobuf":
            return self.answer(415, b"application/x-protobuf only\n", "text/plain")
        try:
            if self.headers.get("Content-Encoding", "").strip().lower() == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
        except Exception as e:  # noqa: BLE001 - a bad body is the sender's error
            return self.answer(400, f"{e}\n".encode(), "text/plain")
        lines = "".join(json.dumps(s, sort_keys=True) + "\n" for s in spans(request))
        with self.server.lock:
            self.server.out.write(lines)
            self.server.out.flush()
        self.answer(200, ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.out = open(args.out, "a", encoding="utf-8")
    tmp = f"{args.port_file}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever()
    finally:
        server.out.close()


if __name__ == "__main__":
    main()
