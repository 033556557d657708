"""Structured output and tool calling on the OpenAI door (docs/structured.md).

A body's `response_format`, vLLM's `guided_*` fields or `structured_outputs`, and `tools` with `tool_choice`
become at most one `GrammarSpec` on the core's request. Tools are rendered by the model's chat template when it
takes `tools` (transformers' `apply_chat_template(tools=...)`); a template that does not (SmolLM2's) gets a
system message listing them and asking for a JSON call, `{"name": ..., "arguments": {...}}`. The reply is
parsed into OpenAI's `tool_calls`: under `tool_choice` "required" or a named function the output is
grammar-constrained to that call shape, so it always parses; under "auto" it is parsed from what the model
wrote (a JSON call, an array of them, or `<tool_call>...</tool_call>` blocks), and is plain content otherwise.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from deltaserve.server.engine.grammar import MAX_SCHEMA_DEPTH, GrammarKind, GrammarSpec
from deltaserve.server.frontends.core import ChatTurn, FieldError, ToolCall

MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolPlan:
    """The tools a chat request offers and how the reply may use them."""

    tools: tuple[dict[str, Any], ...]  # OpenAI's {"type": "function", "function": {...}} entries
    choice: str  # "auto", "required" or "named"
    named: str = ""  # the function tool_choice names

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    def parameters(self, name: str) -> dict[str, Any]:
        tool = next(t for t in self.tools if t["function"]["name"] == name)
        return tool["function"].get("parameters") or {"type": "object", "properties": {}}


# ---- response_format and vLLM's guided fields ---------------------------------------------------------------
def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | bool):
        return json.dumps(value)
    raise FieldError(param, f"{param} must be a JSON schema (an object or its JSON text)")


def response_format_grammar(value: dict[str, Any] | None) -> GrammarSpec | None:
    """OpenAI's response_format: text (none), json_object, or json_schema {name, schema, strict}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError("response_format", "response_format must be an object with a type")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec(GrammarKind.JSON_OBJECT, param="response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise FieldError("response_format.json_schema", "response_format.json_schema needs a schema")
        param = "response_format.json_schema.schema"
        return GrammarSpec(GrammarKind.JSON_SCHEMA, _schema_text(spec["schema"], param), param=param)
    raise FieldError(
        "response_format.type", f"response_format.type {kind!r} is not one of text, json_object, json_schema"
    )


def guided_grammar(body: Any) -> GrammarSpec | None:
    """The one constraint among response_format, guided_json/regex/choice/grammar and structured_outputs."""
    found: list[GrammarSpec] = []
    format_spec = response_format_grammar(body.response_format)
    if format_spec is not None:
        found.append(format_spec)
    found += _guided(
        {
            "json": body.guided_json,
            "regex": body.guided_regex,
            "choice": body.guided_choice,
            "grammar": body.guided_grammar,
        },
        "guided_",
    )
    if body.structured_outputs is not None:
        if not isinstance(body.structured_outputs, dict):
            raise FieldError("structured_outputs", "structured_outputs must be an object")
        outputs = dict(body.structured_outputs)
        if outputs.pop("json_object", None):
            found.append(GrammarSpec(GrammarKind.JSON_OBJECT, param="structured_outputs.json_object"))
        unknown = set(outputs) - {"json", "regex", "choice", "grammar"}
        if unknown:
            raise FieldError("structured_outputs", f"structured_outputs.{sorted(unknown)[0]} is not supported")
        found += _guided(outputs, "structured_outputs.")
    if len(found) > 1:
        raise FieldError(found[1].param, f"give one constraint: {found[0].param} and {found[1].param} are both set")
    return found[0] if found else None


def _guided(values: dict[str, Any], prefix: str) -> list[GrammarSpec]:
    specs = []
    for key, value in values.items():
        if value is None:
            continue
        param = prefix + key
        if key == "json":
            specs.append(GrammarSpec(GrammarKind.JSON_SCHEMA, _schema_text(value, param), param=param))
        elif key == "choice":
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise FieldError(param, f"{param} must be a list of strings")
            specs.append(GrammarSpec(GrammarKind.CHOICE, choices=tuple(value), param=param))
        else:
            if not isinstance(value, str):
                raise FieldError(param, f"{param} must be a string")
            kind = GrammarKind.REGEX if key == "regex" else GrammarKind.GRAMMAR
            specs.append(GrammarSpec(kind, value, param=param))
    return specs


# ---- tools ---------------------------------------------------------------------------------------------
def tool_plan(tools: list[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """The body's tools and tool_choice, checked; None when no tool may be called (none given, or "none")."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise FieldError("tool_choice", "tool_choice needs tools")
        return None
    if len(tools) > MAX_TOOLS:
        raise FieldError("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    checked = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise FieldError(f"tools[{i}]", f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise FieldError(f"tools[{i}].function.name", f"tools[{i}].function.name must match [A-Za-z0-9_.-]{{1,64}}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise FieldError(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters must be an object")
        checked.append({"type": "function", "function": function})
    names = [tool["function"]["name"] for tool in checked]
    if len(set(names)) != len(names):
        raise FieldError("tools", "tools name a function twice")
    if tool_choice == "none":
        return None
    if tool_choice in (None, "auto", "required"):
        return ToolPlan(tuple(checked), tool_choice or "auto")
    named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if named not in names:
        raise FieldError(
            "tool_choice", f"tool_choice must be none, auto, required or a function of tools, got {tool_choice!r}"
        )
    return ToolPlan(tuple(checked), "named", named)


def tool_grammar(plan: ToolPlan) -> GrammarSpec | None:
    """For "required" and a named function: a JSON schema of one call, {"name": const, "arguments": params}.
    Each function's parameters move under the call schema's `$defs` as `call<i>`, their local `$ref`s rewritten
    to that place: clients such as instructor send parameters with `$defs` and `#/$defs/...` references."""
    if plan.choice == "auto":
        return None
    names = [plan.named] if plan.choice == "named" else plan.names
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/call{i}"}},
            "required": ["name", "arguments"],
        }
        for i, name in enumerate(names)
    ]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema["$defs"] = {f"call{i}": _rebased(plan.parameters(name), f"#/$defs/call{i}") for i, name in enumerate(names)}
    return GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema), param="tools")


def _rebased(schema: Any, root: str, depth: int = 1) -> Any:
    """`schema` with every local reference ("#", "#/...") pointing below `root` instead of at the top."""
    if depth > MAX_SCHEMA_DEPTH:  # checked here too: this walk recurses
        raise FieldError("tools", f"tools: a function's parameters nest deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, list):
        return [_rebased(item, root, depth + 1) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rebased = {key: _rebased(value, root, depth + 1) for key, value in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        rebased["$ref"] = root + ref[1:]
    return rebased


def fallback_prompt(plan: ToolPlan) -> str:
    """The system text that lists the tools for a chat template that cannot render them."""
    listed = "\n".join(json.dumps(tool["function"]) for tool in plan.tools)
    return (
        "You can call these functions (each given as JSON: its name, description and parameters as a JSON "
        f"schema):\n{listed}\nTo call a function, answer with only a JSON object "
        '{"name": <function name>, "arguments": {<argument values>}}; to call several, a JSON array of them. '
        "Otherwise answer normally."
    )


def render_turns(turns: list[ChatTurn], plan: ToolPlan | None, native: bool) -> list[ChatTurn]:
    """The chat as the template is given it. A template that renders tools (`native`) takes the turns as they
    are; otherwise assistant calls become the JSON text the fallback prompt asks for and the tools are listed
    in the system message."""
    if native:
        return turns
    rendered = []
    for turn in turns:
        if turn.tool_calls:
            calls = [{"name": c.name, "arguments": _json_or_text(c.arguments)} for c in turn.tool_calls]
            text = json.dumps(calls[0] if len(calls) == 1 else calls)
            rendered.append(ChatTurn(turn.role, (turn.content + "\n" if turn.content else "") + text))
        else:
            rendered.append(ChatTurn(turn.role, turn.content))
    if plan is None:
        return rendered
    prompt = fallback_prompt(plan)
    if rendered and rendered[0].role == "system":
        return [ChatTurn("system", rendered[0].content + "\n\n" + prompt), *rendered[1:]]
    return [ChatTurn("system", prompt), *rendered]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def message_calls(raw: list[Any] | None, index: int) -> tuple[ToolCall, ...]:
    """An assistant message's tool_calls from the history."""
    calls = []
    for j, call in enumerate(raw or []):
        where = f"messages[{index}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise FieldError(
                where, f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}"
            )
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(ToolCall(str(call.get("id") or _call_id()), function["name"], arguments))
    return tuple(calls)


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_reply(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls in OpenAI's shape) of a reply; content None when the reply is calls only."""
    candidates = [m.group(1) for m in _TAGGED.finditer(text)] or [text.strip()]
    calls: list[dict[str, Any]] = []
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            return text, []
        items = value if isinstance(value, list) else [value]
        for item in items:
            call = _call(item, plan)
            if call is None:
                return text, []
            calls.append(call)
    return (None, calls) if calls else (text, [])


def _call(item: Any, plan: ToolPlan) -> dict[str, Any] | None:
    if not isinstance(item, dict) or item.get("name") not in plan.names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": _call_id(),
        "type": "function",
        "function": {"name": item["name"], "arguments": json.dumps(arguments)},
    }
