"""Command-line front end for the client: `deltaserve generate|tokenize|info|adapters ...`.

The `deltaserve` console script belongs to the server package, which adds its own `serve` subcommand to
this parser (build_parser(extra_subcommands=...) or add_client_subcommands) and hands every other
subcommand to run_client_command, so the client stays importable without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeAlias

from deltaserve.client.client import DEFAULT_TARGET, Client, GenerateOptions
from deltaserve.client.errors import DeltaserveError
from deltaserve.client.types import AdapterInfo, GenerateResult, StreamChunk

TARGET_ENV = "DELTASERVE_TARGET"
ADMIN_TOKEN_ENV = "DELTASERVE_ADMIN_TOKEN"

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = Callable[[Client, argparse.Namespace], None]
SubparserAdder: TypeAlias = Callable[[Subparsers], None]


def add_global_options(parser: argparse.ArgumentParser, *, with_defaults: bool = True) -> None:
    """Connection options every client subcommand uses; defaults come from the environment.

    Subcommands get a copy without defaults (argparse.SUPPRESS), so `deltaserve generate X --timeout 5`
    works as well as `deltaserve --timeout 5 generate X` without the subcommand clobbering the latter.
    """

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument(
        "--target",
        default=default(os.environ.get(TARGET_ENV, DEFAULT_TARGET)),
        help=f"server address host:port (env {TARGET_ENV}, default {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", type=float, default=default(None), help="deadline per call in seconds")
    parser.add_argument(
        "--admin-token",
        default=default(os.environ.get(ADMIN_TOKEN_ENV)),
        help=f"sent as 'authorization: Bearer TOKEN' (env {ADMIN_TOKEN_ENV})",
    )


def _client_command(subparsers: Subparsers, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    """A client subcommand that also accepts the connection options after its name."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    add_global_options(parser, with_defaults=False)
    parser.set_defaults(handler=handler)
    return parser


def _add_generate(subparsers: Subparsers) -> None:
    p = _client_command(subparsers, "generate", "generate text from a prompt", _cmd_generate)
    p.add_argument("prompt")
    p.add_argument("--adapter", default="", help="adapter id; empty: the base model")
    p.add_argument(
        "--stack",
        action="append",
        default=[],
        metavar="ID",
        help="apply several adapters together (repeatable, in order)",
    )
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the server's")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability to stderr")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")


def _add_adapters(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("adapters", help="load, unload and list adapters")
    actions = p.add_subparsers(
        dest="adapters_command", required=True, metavar="{load,unload,list,pin,unpin,merge,unmerge}"
    )
    load = _client_command(actions, "load", "load a PEFT adapter directory", _cmd_adapters_load)
    load.add_argument("adapter_id")
    load.add_argument("dir", help="adapter directory; sent as an absolute path")
    load.add_argument("--replace", action="store_true", help="switch an existing id to these weights")
    load.add_argument("--pin", action="store_true", help="keep it on the device, never evicted")
    for name, pinned in (("pin", True), ("unpin", False)):
        command = _client_command(actions, name, f"{name} an adapter on the device", _cmd_adapters_pin)
        command.add_argument("adapter_id")
        command.set_defaults(pinned=pinned)
    merge = _client_command(actions, "merge", "fold a LoRA adapter into the base weights", _cmd_adapters_merge)
    merge.add_argument("adapter_id")
    _client_command(actions, "unmerge", "restore the base weights exactly", _cmd_adapters_unmerge)
    unload = _client_command(actions, "unload", "unload an adapter", _cmd_adapters_unload)
    unload.add_argument("adapter_id")
    _client_command(actions, "list", "list loaded adapters", _cmd_adapters_list)


def add_client_subcommands(subparsers: Subparsers) -> None:
    """Add generate, tokenize, info and adapters; each sets `handler` for run_client_command."""
    _add_generate(subparsers)
    tokenize = _client_command(subparsers, "tokenize", "show how the server tokenizes a text", _cmd_tokenize)
    tokenize.add_argument("text")
    tokenize.add_argument("--chat", action="store_true", help="tokenize the text as one user chat message")
    _client_command(subparsers, "info", "describe the served model", _cmd_info)
    _add_adapters(subparsers)


def build_parser(extra_subcommands: SubparserAdder | None = None) -> argparse.ArgumentParser:
    """The full `deltaserve` parser; the server passes extra_subcommands to add `serve`."""
    parser = argparse.ArgumentParser(prog="deltaserve", description="Multi-adapter LLM inference over gRPC.")
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_client_subcommands(subparsers)
    if extra_subcommands is not None:
        extra_subcommands(subparsers)
    return parser


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    token = getattr(args, "admin_token", None)
    return [("authorization", f"Bearer {token}")] if token else []


def run_client_command(args: argparse.Namespace) -> int:
    """Run a parsed client subcommand; gRPC and argument errors print `error: ...` and return 1."""
    handler: Handler = args.handler
    try:
        with Client(args.target, timeout=args.timeout, metadata=_metadata(args)) as client:
            handler(client, args)
    except (DeltaserveError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the stream's cleanup has already cancelled the RPC
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `| head`: stop quietly; devnull keeps the exit-time flush from failing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for the client subcommands; prints help and returns 2 without one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return run_client_command(args)


# --- subcommand handlers -----------------------------------------------------------------------------


def _generate_inputs(args: argparse.Namespace) -> tuple[str | None, GenerateOptions]:
    """Map CLI flags to Client.generate arguments; --chat sends the prompt as one user message."""
    options = GenerateOptions(
        adapter_id=args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        logprobs=args.logprobs,
        adapter_stack=args.stack,
    )
    if not args.chat:
        return args.prompt, options
    options["messages"] = [{"role": "user", "content": args.prompt}]
    return None, options


def _cmd_generate(client: Client, args: argparse.Namespace) -> None:
    prompt, options = _generate_inputs(args)
    if not args.stream:
        result = client.generate(prompt, **options)
        print(result.text)
        _print_summary(result, result.logprobs)
        return
    last: StreamChunk | None = None
    logprobs: list[float] = []
    try:
        for chunk in client.generate_stream(prompt, **options):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            logprobs.extend(chunk.logprobs)
            last = chunk
    finally:
        print()  # end the partial line even when the stream fails, so `error: ...` starts its own
    if last is not None:
        _print_summary(last, logprobs)


def _print_summary(result: GenerateResult | StreamChunk, logprobs: list[float]) -> None:
    """One stderr line with why generation ended, so stdout carries only the generated text."""
    fields = [
        f"finish={result.finish_reason or 'unspecified'}",
        f"prompt_tokens={result.prompt_tokens}",
        f"generated_tokens={result.generated_tokens}",
    ]
    if result.stop_sequence:
        fields.append(f"stop={result.stop_sequence!r}")
    print(f"[{' '.join(fields)}]", file=sys.stderr)
    if logprobs:
        print("[logprobs=" + ",".join(f"{lp:.4f}" for lp in logprobs) + "]", file=sys.stderr)


def _cmd_tokenize(client: Client, args: argparse.Namespace) -> None:
    if args.chat:
        result = client.tokenize(messages=[{"role": "user", "content": args.text}])
    else:
        result = client.tokenize(args.text)
    width = max((len(str(i)) for i in result.token_ids), default=1)
    for token_id, token in zip(result.token_ids, result.tokens, strict=False):
        print(f"{token_id:>{width}}  {token!r}")
    print(f"[{len(result.token_ids)} tokens]", file=sys.stderr)


def _cmd_info(client: Client, args: argparse.Namespace) -> None:
    for key, value in dataclasses.asdict(client.model_info()).items():
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else value
        print(f"{key}: {shown}")


def _cmd_adapters_load(client: Client, args: argparse.Namespace) -> None:
    info = client.load_adapter(args.adapter_id, os.path.abspath(args.dir), replace=args.replace, pin=args.pin)
    print(_adapter_table([info]))


def _cmd_adapters_merge(client: Client, args: argparse.Namespace) -> None:
    print(_adapter_table([client.merge_adapter(args.adapter_id)]))


def _cmd_adapters_unmerge(client: Client, args: argparse.Namespace) -> None:
    print(f"unmerged {client.unmerge_adapter()}; base weights restored")


def _cmd_adapters_pin(client: Client, args: argparse.Namespace) -> None:
    print(_adapter_table([client.pin_adapter(args.adapter_id, args.pinned)]))


def _cmd_adapters_unload(client: Client, args: argparse.Namespace) -> None:
    draining = client.unload_adapter(args.adapter_id)
    suffix = f"; {draining} in-flight request(s) finish with it first" if draining else ""
    print(f"unloaded {args.adapter_id}{suffix}")


def _cmd_adapters_list(client: Client, args: argparse.Namespace) -> None:
    print(_adapter_table(client.list_adapters()))


def format_size(num_bytes: int) -> str:
    """Human-readable byte count, e.g. 1.5 MiB; adapters range from KiB to GiB."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _adapter_table(adapters: Sequence[AdapterInfo]) -> str:
    """Plain left-aligned columns, header first; easy to read and to cut/awk."""
    rows = [("ID", "KIND", "RANK", "SIZE", "STATE", "SERVED")]
    for a in adapters:
        rows.append((a.adapter_id, a.kind, str(a.rank), format_size(a.size_bytes), a.state, str(a.requests_served)))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


if __name__ == "__main__":
    sys.exit(main())
