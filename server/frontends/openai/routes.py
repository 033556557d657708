"""The FastAPI routes of the OpenAI-compatible door: thin, each one hands its body to `OpenAIServing`. The adapter
admin routes run the server's one bearer-token check first."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from deltaserve.server.frontends.auth import HTTP_ADMIN_NEEDS, BearerToken
from deltaserve.server.frontends.openai.errors import error_json, error_response
from deltaserve.server.frontends.openai.protocol import ChatBody, CompletionBody, LoadAdapterBody, UnloadAdapterBody
from deltaserve.server.frontends.openai.serving import OpenAIServing
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


async def _validation_error(request: HttpRequest, err: RequestValidationError) -> JSONResponse:
    """FastAPI answers 422; OpenAI's API (and its clients) expect 400 for a malformed body."""
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request body"}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return error_response(400, f"the request body is not valid JSON: {reason}", None, "invalid_argument")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return error_response(400, message, param, "invalid_argument")


async def _http_error(request: HttpRequest, err: StarletteHTTPException) -> JSONResponse:
    return error_response(err.status_code, str(err.detail))


async def admin(
    token: BearerToken, request: HttpRequest, action: Callable[[], Awaitable[dict[str, Any]]]
) -> JSONResponse:
    """Run an admin action after the bearer check; any refusal in OpenAI's error shape (401 with its challenge)."""
    try:
        token.check(request.headers.get("authorization"), HTTP_ADMIN_NEEDS)
        return JSONResponse(await action())
    except Exception as err:
        return error_json(err)


def build_app(serving: OpenAIServing, token: BearerToken) -> FastAPI:
    """The door's FastAPI app (without the body limit, which the ASGI plumbing adds)."""
    app = FastAPI(title="deltaserve (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    async def completions(body: CompletionBody, request: HttpRequest) -> Any:
        return await serving.serve(request, lambda: serving.completion_plan(body), body.stream, body.stream_options)

    async def chat_completions(body: ChatBody, request: HttpRequest) -> Any:
        return await serving.serve(request, lambda: serving.chat_plan(body), body.stream, body.stream_options)

    async def load_adapter(body: LoadAdapterBody, request: HttpRequest) -> JSONResponse:
        return await admin(token, request, lambda: serving.load_adapter(body))

    async def unload_adapter(body: UnloadAdapterBody, request: HttpRequest) -> JSONResponse:
        return await admin(token, request, lambda: serving.unload_adapter(body))

    app.add_api_route("/v1/models", serving.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", serving.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", load_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"])
    return app
