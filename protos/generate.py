"""Regenerate the Python protobuf/gRPC modules from protos/ into client/v1 (run: `make proto`).

The generated gRPC module imports its messages as `deltaserve.v1`; the modules live in the client
package, so that import is rewritten to `deltaserve.client.v1`.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "client" / "v1"


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
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for generated in sorted((staging / "deltaserve" / "v1").glob("*.py*")):
        text = generated.read_text()
        text = text.replace("from deltaserve.v1 import", "from deltaserve.client.v1 import")
        (OUT_DIR / generated.name).write_text(text)
        print(f"wrote {(OUT_DIR / generated.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
