"""A TGIS client process built from vllm-tgis-adapter's own generated stubs (not from this repository's proto).

    python tests/server/tgis_client.py HOST:PORT

Reads one JSON call per line on stdin, {"method": "Generate", "request": {...}} (the request as proto JSON
with TGIS field names), calls fmaas.GenerationService/<method> and writes one JSON line back:
{"ok": true, "response": {...}} (GenerateStream: "responses": [...]) or {"ok": false, "code": "NOT_FOUND",
"details": "..."}. {"method": "descriptor"} returns the stubs' FileDescriptorProto, base64-encoded.

It runs in its own process because its generated module registers package `fmaas` in protobuf's default
descriptor pool under another file name than deltaserve's own copy, and one process cannot hold both.
The package's __init__ imports vLLM, so only the generated modules are loaded, by file path.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import pathlib
import sys

import grpc
from google.protobuf import json_format

PB_PACKAGE = "vllm_tgis_adapter.grpc.pb"


def load_stubs():
    """vllm_tgis_adapter/grpc/pb/generation_pb2{,_grpc}.py without running vllm_tgis_adapter/__init__.py."""
    top = importlib.util.find_spec("vllm_tgis_adapter")
    if top is None or not top.submodule_search_locations:
        raise ImportError("vllm-tgis-adapter is not installed (make install adds it with --no-deps)")
    pb_dir = pathlib.Path(top.submodule_search_locations[0]) / "grpc" / "pb"
    spec = importlib.util.spec_from_file_location(
        PB_PACKAGE, pb_dir / "__init__.py", submodule_search_locations=[str(pb_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PB_PACKAGE] = package  # its parents are never imported: the submodules resolve through it
    spec.loader.exec_module(package)
    messages = importlib.import_module(f"{PB_PACKAGE}.generation_pb2")
    services = importlib.import_module(f"{PB_PACKAGE}.generation_pb2_grpc")
    return messages, services


REQUEST_TYPES = {
    "Generate": "BatchedGenerationRequest",
    "GenerateStream": "SingleGenerationRequest",
    "Tokenize": "BatchedTokenizeRequest",
    "ModelInfo": "ModelInfoRequest",
}


def _as_json(message) -> dict:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def main() -> int:
    messages, services = load_stubs()
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = services.GenerationServiceStub(channel)
        for line in sys.stdin:
            call = json.loads(line)
            method = call["method"]
            if method == "descriptor":
                reply = {"ok": True, "descriptor": base64.b64encode(messages.DESCRIPTOR.serialized_pb).decode()}
            else:
                request = json_format.ParseDict(call.get("request", {}), getattr(messages, REQUEST_TYPES[method])())
                try:
                    if method == "GenerateStream":
                        reply = {
                            "ok": True,
                            "responses": [_as_json(r) for r in stub.GenerateStream(request, timeout=120)],
                        }
                    else:
                        reply = {"ok": True, "response": _as_json(getattr(stub, method)(request, timeout=120))}
                except grpc.RpcError as err:
                    reply = {"ok": False, "code": err.code().name, "details": err.details()}
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
