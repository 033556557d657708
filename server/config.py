"""The server's configuration in one place: grouped dataclasses whose field metadata (a one-line doc, the flag,
bounds, choices) is the single source for validation, the `serve` / `serve-cluster` flags, the Ray Serve
builder's string arguments and README's flag table (`python -m deltaserve.server.config` prints it).

Every group validates itself in `__post_init__`, so a config built from flags, from Ray arguments or in code
is checked the same way; a bad value raises ConfigError naming the flag. The groups are frozen: change one
with `ServerConfig.replace`, which validates again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltaserve.server.errors import ConfigError

Preload = tuple[str, str]  # (adapter id, adapter directory)


@dataclass(frozen=True)
class Setting:
    """What a config field carries besides its type and default."""

    doc: str  # one line: the flag's help and README's "what it does"
    flags: tuple[str, ...] = ()  # spellings, primary first; default: --field-name
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    shown: str | None = None  # the default as help and README show it, where the value itself says little
    env: str | None = None  # the CLI's default is this environment variable when it is set
    cli: bool = True  # False: no flag (set in code only)
    ray: bool = True  # False: not an argument of the Ray Serve application


def setting(default: Any, doc: str, **options: Any) -> Any:
    """A dataclass field carrying its Setting; a list default becomes a fresh copy per instance."""
    metadata = {"setting": Setting(doc, **options)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ---- fields, flags and types ----
def spec(item: dataclasses.Field) -> Setting:
    return item.metadata["setting"]


def flag_of(item: dataclasses.Field) -> str:
    """The field's primary flag, e.g. --max-batch-size."""
    return (spec(item).flags or ("--" + item.name.replace("_", "-"),))[0]


def flags_of(item: dataclasses.Field) -> tuple[str, ...]:
    return spec(item).flags or (flag_of(item),)


@functools.cache
def settings_of(config_class: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved type) for every field of `config_class` that carries a Setting."""
    hints = typing.get_type_hints(config_class)
    return tuple((item, hints[item.name]) for item in dataclasses.fields(config_class) if "setting" in item.metadata)


def _shape(kind: Any) -> tuple[Any, bool, bool]:
    """(element type, optional, repeated) of a field type such as `int | None` or `list[str]`."""
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is list:
        return typing.get_args(kind)[0], optional, True
    return kind, optional, False


# ---- one converter per type: text (a flag, a Ray argument) to a value ----
def _parse_bool(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    if text.strip().lower() not in words:
        raise ValueError(text)
    return words[text.strip().lower()]


def _parse_preload(text: str) -> Preload:
    adapter_id, sep, path = text.partition("=")
    if not sep or not adapter_id or not path:
        raise ValueError(text)
    return adapter_id, path


PARSERS: dict[Any, Callable[[str], Any]] = {
    int: int,
    float: float,
    str: str,
    bool: _parse_bool,
    Preload: _parse_preload,
}
TYPE_NAMES = {int: "an integer", float: "a number", str: "text", bool: "true or false", Preload: "ID=DIR"}


def parse_one(item: dataclasses.Field, kind: Any, text: str) -> Any:
    """One element of the field from text; ConfigError names the flag."""
    element = _shape(kind)[0]
    try:
        return PARSERS[element](text)
    except ValueError:
        raise ConfigError(f"{flag_of(item)} must be {TYPE_NAMES[element]}, got {text!r}", item.name) from None


def parse_text(item: dataclasses.Field, kind: Any, text: str) -> Any:
    """The field's value from one string (Ray arguments): lists are comma-separated, "none" clears an optional."""
    _, optional, repeated = _shape(kind)
    if optional and text.strip().lower() in ("", "none", "null"):
        return None
    if repeated:
        return [parse_one(item, kind, part) for part in text.split(",") if part]
    return parse_one(item, kind, text)


# ---- validation, shared by every group ----
def _is_a(value: Any, element: Any) -> bool:
    if element is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if element is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if element == Preload:
        return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value)
    return isinstance(value, typing.get_origin(element) or element)


def _check_value(item: dataclasses.Field, kind: Any, value: Any) -> None:
    element, optional, repeated = _shape(kind)
    rules, flag = spec(item), flag_of(item)
    if value is None and optional:
        return
    if repeated and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{flag} must be a list, got {value!r}", item.name)
    for each in value if repeated else [value]:
        if not _is_a(each, element):
            name = TYPE_NAMES.get(element, getattr(element, "__name__", str(element)))
            raise ConfigError(f"{flag} must be {name}, got {each!r}", item.name)
        if rules.minimum is not None and each < rules.minimum:
            raise ConfigError(f"{flag} must be at least {rules.minimum:g}, got {each!r}", item.name)
        if rules.maximum is not None and each > rules.maximum:
            raise ConfigError(f"{flag} must be at most {rules.maximum:g}, got {each!r}", item.name)
        if rules.choices and each not in rules.choices:
            raise ConfigError(f"{flag} must be one of {', '.join(rules.choices)}; got {each!r}", item.name)


@dataclass(frozen=True)
class ConfigGroup:
    """Base of the config groups: every field with a Setting is checked against it on construction."""

    def __post_init__(self) -> None:
        for item, kind in settings_of(type(self)):
            _check_value(item, kind, getattr(self, item.name))


# ---- the server's groups ----
PORT = {"minimum": 0, "maximum": 65535, "metavar": "PORT"}


@dataclass(frozen=True)
class FrontDoorConfig(ConfigGroup):
    """Where the server listens (`serve` only; the cluster has its own proxies)."""

    host: str = setting("127.0.0.1", "address to bind", metavar="ADDRESS")
    port: int = setting(50051, "gRPC port (0 picks a free one; the log line says which)", **PORT)
    http_port: int | None = setting(
        None, "also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) here", **PORT
    )
    metrics_port: int | None = setting(None, "serve Prometheus /metrics on this port (docs/metrics.md)", **PORT)


@dataclass(frozen=True)
class BaseModelConfig(ConfigGroup):
    """The frozen base model and how it is loaded."""

    model: str | None = setting(
        None,
        "a local Hugging Face causal-LM directory (any decoder whose attention goes through transformers' "
        "AttentionInterface; tested families and refusals: docs/models.md)",
        metavar="DIR",
        shown="embedded SmolLM2-135M-Instruct",
    )
    dtype: str = setting(
        "auto",
        "weights and compute dtype; auto is float32 on CPU, bfloat16 on CUDA",
        choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
    )
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N", metavar="DEVICE")
    quantize: str = setting(
        "none", "load the base through bitsandbytes (NF4 runs on CPU too)", choices=("none", "nf4", "int8")
    )
    torch_threads: int | None = setting(
        None,
        "torch threads of the engine, the one thread that computes (the server's other threads use one each)",
        minimum=1,
        shown="torch's default: the machine's cores",
    )


@dataclass(frozen=True)
class BatchingConfig(ConfigGroup):
    """How many requests run together, how long they may be, and how much prompt one step takes."""

    max_batch_size: int = setting(
        256, "sequences decoded together (admission is also bounded by free KV-cache blocks)", minimum=1
    )
    max_seq_len: int = setting(2048, "context per request, prompt plus output (capped by the model)", minimum=1)
    default_max_new_tokens: int = setting(256, "max_new_tokens for requests that do not set it", minimum=1)
    max_prefill_tokens: int = setting(
        512,
        "prompt tokens prefilled per engine step; longer prompts are prefilled in chunks between decode steps",
        minimum=1,
    )
    max_waiting_requests: int = setting(
        1024, "requests queued beyond the running batch; more are refused with RESOURCE_EXHAUSTED", minimum=1
    )
    max_n: int = setting(
        16,
        "sequences one request may ask for (OpenAI n and best_of); more are refused with INVALID_ARGUMENT",
        minimum=1,
        maximum=256,
    )


MEMORY_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_memory(text: str) -> int | None:
    """Bytes from '1073741824', '512MiB', '1 GiB' (binary units); None for 'auto'. ValueError otherwise."""
    cleaned = text.strip().lower().replace(" ", "")
    if cleaned == "auto":
        return None
    digits = cleaned.rstrip("kmgtib")
    unit = cleaned[len(digits) :]
    if unit not in MEMORY_UNITS or not digits:
        raise ValueError(text)
    value = float(digits) * MEMORY_UNITS[unit]
    if not 1 <= value < float("inf"):  # also refuses nan
        raise ValueError(text)
    return int(value)


@dataclass(frozen=True)
class KVCacheConfig(ConfigGroup):
    """The paged KV cache: block size, pool size and the automatic prefix cache."""

    block_size: int = setting(16, "tokens per KV-cache block", minimum=1, maximum=4096)
    kv_cache_memory: str = setting(
        "auto",
        "bytes of the KV-cache block pool (a number, or with KiB/MiB/GiB); auto: on CUDA what is left under "
        "--gpu-memory-utilization after the weights, adapter slots and activations, on CPU 1 GiB",
        metavar="BYTES",
    )
    gpu_memory_utilization: float = setting(
        0.9,
        "share of the GPU's memory the server may use, KV cache included (CUDA, auto only)",
        minimum=0.01,
        maximum=1.0,
    )
    prefix_caching: bool = setting(
        True,
        "turn off the prefix cache, which reuses the KV blocks of a prompt prefix computed before for the same adapter",
        flags=("--no-prefix-caching",),
        shown="caching on",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_memory(self.kv_cache_memory)
        except ValueError:
            raise ConfigError(
                f"--kv-cache-memory must be auto or a size such as 1073741824, 512MiB or 2GiB; "
                f"got {self.kv_cache_memory!r}",
                "kv_cache_memory",
            ) from None

    @property
    def kv_cache_bytes(self) -> int | None:
        """The pool's size in bytes, or None for auto."""
        return parse_memory(self.kv_cache_memory)


@dataclass(frozen=True)
class AdapterConfig(ConfigGroup):
    """Adapter capacity, start-up adapters and what an adapter file may be."""

    max_adapters: int = setting(
        8,
        "adapter slots on the device (least recently used idle adapters are evicted)",
        flags=("--max-resident-adapters", "--max-adapters"),
        minimum=1,
    )
    max_cpu_adapters: int = setting(
        32, "adapters kept parsed in host memory besides those on the device; the rest are re-read", minimum=0
    )
    max_lora_rank: int = setting(
        64, "largest LoRA rank accepted (a slot holds this rank)", flags=("--max-lora-rank", "--max-rank"), minimum=1
    )
    max_bottleneck_size: int = setting(
        64, "largest bottleneck adapter dimension accepted (a slot holds this size)", minimum=1
    )
    preload: list[Preload] = setting([], "load this adapter at start-up (repeatable)", metavar="ID=DIR")
    adapter_dir: list[str] = setting(
        [], "register every adapter directory under DIR at start-up, named after it (repeatable)", metavar="DIR"
    )
    adapter_root: list[str] = setting(
        [], "LoadAdapter paths must resolve under one of these (repeatable)", metavar="DIR", shown="any path"
    )
    allow_pickle: bool = setting(False, "also read adapter_model.bin (weights-only unpickling)")
    max_adapter_bytes: int | None = setting(None, "refuse adapter weight files above this", minimum=0, metavar="N")
    adapter_source: list[str] = setting(
        [],
        "load adapters that requests name from this store on first use: a directory, s3://bucket/prefix or any "
        "fsspec URL, or hf-cache://DIR (repeatable, tried in order; docs/adapters.md)",
        metavar="URI",
    )
    adapter_cache_dir: str = setting(
        "",
        "where adapters downloaded from sources are kept (one server per directory: it clears its ds-* entries)",
        metavar="DIR",
        shown="a fresh temporary directory per server",
    )
    adapter_cache_bytes: int = setting(
        4 << 30, "bytes of downloaded adapters kept (least recently used dropped first)", minimum=1, shown="4 GiB"
    )
    adapter_negative_ttl_s: float = setting(
        10.0, "seconds an id no source has is answered NOT_FOUND without asking the sources again", minimum=0
    )
    adapter_refresh_s: float = setting(
        30.0, "seconds between re-checks of a bare source name for a newer version (name@rev pins one)", minimum=0
    )
    adapter_download_timeout_s: float = setting(
        60.0, "seconds one source lookup or download may take (DEADLINE_EXCEEDED after)", minimum=0.1
    )


@dataclass(frozen=True)
class SecurityConfig(ConfigGroup):
    """Who may administer adapters, transport security and request size."""

    admin_token: str | None = setting(
        None,
        "require 'authorization: Bearer TOKEN' on adapter administration (env DELTASERVE_ADMIN_TOKEN)",
        env="DELTASERVE_ADMIN_TOKEN",
        metavar="TOKEN",
    )
    tls_cert: str | None = setting(None, "PEM certificate: serve gRPC (and HTTP) over TLS", metavar="FILE")
    tls_key: str | None = setting(None, "PEM private key for --tls-cert", metavar="FILE")
    max_request_bytes: int = setting(
        4 * 1024 * 1024,
        "largest request message accepted (RESOURCE_EXHAUSTED above)",
        minimum=1,
        shown="4194304 (4 MiB)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tls_cert and not self.tls_key:
            raise ConfigError("--tls-cert needs --tls-key", "tls_key")


@dataclass(frozen=True)
class MergeConfig(ConfigGroup):
    """Automatic merging of the adapter that carries nearly all traffic (server/engine/merge.py)."""

    merge_policy: str = setting(
        "off",
        "auto: merge the adapter that carries nearly all traffic, unmerge when the mix changes",
        choices=("off", "auto"),
    )
    merge_window_requests: int = setting(
        32, "admitted requests the auto merge policy looks back over (and waits after a switch)", minimum=1
    )


@dataclass(frozen=True)
class SchedulingConfig(ConfigGroup):
    """How the engine shares itself between tenants: the policy and per-tenant limits (docs/scheduling.md)."""

    scheduling: str = setting(
        "fair",
        "fair: virtual token counters per tenant (VTC; least served first, FIFO within a tenant); fifo: arrival "
        "order; priority: a request's priority first (and may preempt), fair within a level",
        choices=("fair", "fifo", "priority"),
    )
    tenant_max_running: int | None = setting(
        None, "requests one tenant may have in the batch at once (a tenant is the adapter, unless named)", minimum=1
    )
    tenant_max_queued: int | None = setting(
        None, "requests one tenant may have queued; more are refused at once (RESOURCE_EXHAUSTED / 429)", minimum=1
    )
    tenant_max_kv_blocks: int | None = setting(None, "KV-cache blocks one tenant's requests may hold", minimum=1)
    tenant_limits_file: str | None = setting(
        None,
        'JSON overrides per tenant, e.g. {"team-a": {"max_running": 4, "max_queued": 64, "max_kv_blocks": 512}}',
        metavar="FILE",
    )
    metrics_max_tenants: int = setting(
        64, "distinct tenants with their own metrics label; the rest are reported as 'other'", minimum=0
    )


@dataclass(frozen=True)
class OperationsConfig(ConfigGroup):
    """Metrics labels, shutdown and logging."""

    metrics_max_adapters: int = setting(
        64, "distinct adapter ids with their own metrics label; the rest are reported as 'other'", minimum=0
    )
    shutdown_grace_seconds: float = setting(
        30.0,
        "seconds in-flight requests may take to finish after SIGTERM/SIGINT",
        flags=("--shutdown-grace",),
        minimum=0,
        metavar="SECONDS",
    )
    log_level: str = setting(
        "INFO", "logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL", metavar="LEVEL", ray=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL; got {self.log_level!r}")


@dataclass(frozen=True)
class ServerConfig:
    """One server's configuration: the groups. Build it from flat setting names with `ServerConfig.of`."""

    doors: FrontDoorConfig = field(default_factory=FrontDoorConfig)  # where it listens
    base: BaseModelConfig = field(default_factory=BaseModelConfig)  # the base model and how it is loaded
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # batch and sequence limits
    kv: KVCacheConfig = field(default_factory=KVCacheConfig)  # the paged KV cache and prefix caching
    adapters: AdapterConfig = field(default_factory=AdapterConfig)  # adapter capacity and start-up adapters
    security: SecurityConfig = field(default_factory=SecurityConfig)  # admin token, TLS, request size
    merge: MergeConfig = field(default_factory=MergeConfig)  # the auto merge policy
    scheduler: SchedulingConfig = field(default_factory=SchedulingConfig)  # tenants: policy and limits
    ops: OperationsConfig = field(default_factory=OperationsConfig)  # metrics labels, shutdown, logging

    GROUPS: ClassVar[dict[str, type[ConfigGroup]]]  # group attribute -> class, set below
    GROUP_OF: ClassVar[dict[str, str]]  # flat setting name -> group attribute, set below

    @classmethod
    def of(cls, **settings: Any) -> ServerConfig:
        """A config from flat setting names (each unique across the groups), e.g. `of(max_batch_size=4)`."""
        grouped: dict[str, dict[str, Any]] = {name: {} for name in cls.GROUPS}
        for name, value in settings.items():
            if name not in cls.GROUP_OF:
                raise ConfigError(f"unknown setting {name!r}", name)
            grouped[cls.GROUP_OF[name]][name] = value
        return cls(**{name: group(**grouped[name]) for name, group in cls.GROUPS.items()})

    def settings(self) -> dict[str, Any]:
        """The flat settings: `ServerConfig.of(**config.settings()) == config`."""
        return {name: getattr(getattr(self, group), name) for name, group in self.GROUP_OF.items()}

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with some flat settings changed, validated again."""
        return ServerConfig.of(**{**self.settings(), **changes})


def _group_index(groups: Mapping[str, type[ConfigGroup]]) -> dict[str, str]:
    index: dict[str, str] = {}
    for group_name, group in groups.items():
        for item in dataclasses.fields(group):
            if item.name in index:  # flat names are how tests, benchmarks and Ray address settings
                raise TypeError(f"setting {item.name!r} is in two config groups")
            index[item.name] = group_name
    return index


ServerConfig.GROUPS = {item.name: item.default_factory for item in dataclasses.fields(ServerConfig)}
ServerConfig.GROUP_OF = _group_index(ServerConfig.GROUPS)


# ---- flags: argparse and README ----
def _help(item: dataclasses.Field, kind: Any) -> str:
    """The flag's help line: its doc and its default."""
    return f"{spec(item).doc} (default: {shown_default(item, kind)})"


def shown_default(item: dataclasses.Field, kind: Any) -> str:
    rules = spec(item)
    if rules.shown is not None:
        return rules.shown
    value = item.default_factory() if item.default is dataclasses.MISSING else item.default
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _metavar(item: dataclasses.Field, kind: Any) -> str | None:
    rules, element = spec(item), _shape(kind)[0]
    if rules.metavar or element is bool:
        return rules.metavar
    if rules.choices:
        return "{" + ",".join(rules.choices) + "}"
    return {int: "N", float: "X"}.get(element, "TEXT")


def _argparse_type(item: dataclasses.Field, kind: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse_one(item, kind, text)
        except ConfigError as err:  # argparse prefixes `argument --flag:` itself and exits 2
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{flag_of(item)} ")) from None

    convert.__name__ = TYPE_NAMES[_shape(kind)[0]]
    return convert


def _argparse_options(item: dataclasses.Field, kind: Any) -> dict[str, Any]:
    element, _, repeated = _shape(kind)
    rules = spec(item)
    options: dict[str, Any] = {"dest": item.name, "help": _help(item, kind).replace("%", "%%")}
    if element is bool and not repeated:  # a flag that is on by default is spelled to turn it off
        return {**options, "action": "store_false" if item.default else "store_true"}
    default = item.default_factory() if item.default is dataclasses.MISSING else item.default
    if rules.env and os.environ.get(rules.env):
        default = os.environ[rules.env]
    options.update(type=_argparse_type(item, kind), default=default, metavar=_metavar(item, kind))
    if repeated:
        options["action"] = "append"
    return options


def add_flags(parser: argparse.ArgumentParser, groups: Iterable[type]) -> None:
    """One flag per field of each config class (fields with `cli=False` are set in code only)."""
    for group in groups:
        for item, kind in settings_of(group):
            if spec(item).cli:
                parser.add_argument(*flags_of(item), **_argparse_options(item, kind))


def values_from(args: argparse.Namespace, group: type) -> dict[str, Any]:
    """The parsed flags of one config class, by field name."""
    return {item.name: getattr(args, item.name) for item, _ in settings_of(group) if hasattr(args, item.name)}


def flag_table(groups: Iterable[type] | None = None) -> str:
    """README's table of the `serve` flags (or of `groups`), one row per flag: spellings, default, doc."""
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for group in ServerConfig.GROUPS.values() if groups is None else groups:
        for item, kind in settings_of(group):
            metavar = _metavar(item, kind)
            spellings = [f"`{flag} {metavar}`" if metavar else f"`{flag}`" for flag in flags_of(item)]
            rows.append(f"| {', '.join(spellings)} | {shown_default(item, kind)} | {spec(item).doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flag_table())
