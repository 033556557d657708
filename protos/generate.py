"""Regenerate the Python protobuf/gRPC modules from protos/ into the client package (run: `make proto`).

protos/deltaserve/v1 -> client/v1 and protos/fmaas (the TGIS-compatible API) -> client/fmaas. A generated
gRPC module imports its messages by proto package (`deltaserve.v1`, `fmaas`); the modules live in the client
package, so that import is rewritten to `deltaserve.client.v1` / `deltaserve.client.fmaas`. Likewise the module
name a message module gives its classes (their `__module__`), so that pickle finds them: Ray Serve's gRPC proxy
pickles each request on its way to the deployment.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
# proto package directory -> (output directory, the import path its modules are rewritten to)
OUTPUTS = {
    "deltaserve/v1": (ROOT / "client" / "v1", "deltaserve.client.v1"),
    "fmaas": (ROOT / "client" / "fmaas", "deltaserve.client.fmaas"),
}


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    staging = ROOT / "build" / "proto"
    staging.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={staging}",
        f"--pyi_out={staging}",
        f"--grpc_python_out={staging}",
        *protos,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for package_dir, (out_dir, import_path) in OUTPUTS.items():
        out_dir.mkdir(parents=True, exist_ok=True)
        proto_import = package_dir.replace("/", ".")
        for generated in sorted((staging / package_dir).glob("*.py*")):
            text = generated.read_text()
            text = text.replace(f"from {proto_import} import", f"from {import_path} import")
            text = text.replace(f"'{proto_import}.{generated.stem}'", f"'{import_path}.{generated.stem}'")
            (out_dir / generated.name).write_text(text)
            print(f"wrote {(out_dir / generated.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
