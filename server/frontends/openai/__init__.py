"""The OpenAI-compatible HTTP door (`--http-port`): completions, chat completions, the model list and vLLM-style
adapter load/unload, served by uvicorn inside the gRPC server's event loop.

`protocol` holds the request bodies, `serving` the translation to and from the front-door core, `routes` the
FastAPI app, `errors` OpenAI's error shape, `logprobs` per-token text and `server` the uvicorn plumbing
(`OpenAIFrontDoor`).
"""
