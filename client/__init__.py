"""Python client for deltaserve: `Client` (blocking) and `AsyncClient` (asyncio) over gRPC.

    from deltaserve.client import Client

    with Client("localhost:50051") as client:
        client.wait_ready(timeout=60)
        print(client.generate("Hello", adapter_id="my-lora", max_new_tokens=32).text)

Every failed call raises DeltaserveError, whose `.code` is the gRPC status code.
"""

from deltaserve.client.client import AsyncClient, Client
from deltaserve.client.errors import DeltaserveError
from deltaserve.client.types import AdapterInfo, GenerateResult, ModelInfo, StreamChunk, TokenizeResult

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "Client",
    "DeltaserveError",
    "GenerateResult",
    "ModelInfo",
    "StreamChunk",
    "TokenizeResult",
]
