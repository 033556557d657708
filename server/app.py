"""Assembling and running a server: model, runner, registry, engine, gRPC services, health, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import tempfile

import grpc
from deltaserve.adapters import ReadOptions, load_adapter, served_kinds, tensor_bytes
from deltaserve.adapters.digest import content_digest
from deltaserve.adapters.directory import within
from deltaserve.client.fmaas import generation_pb2 as tgis_pb
from deltaserve.client.fmaas import generation_pb2_grpc as tgis_grpc
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.client.v1 import deltaserve_pb2_grpc as pb_grpc
from deltaserve.server.config import ServerConfig
from deltaserve.server.engine.engine import Engine, EngineConfig
from deltaserve.server.engine.merge import AutoMergePolicy, MergeController
from deltaserve.server.engine.scheduler import Policy, SchedulerConfig, TenantLimits, tenant_overrides
from deltaserve.server.errors import ConfigError
from deltaserve.server.frontends.auth import AdapterPathPolicy, AdminTokenInterceptor, BearerToken
from deltaserve.server.frontends.core import FrontDoorCore
from deltaserve.server.frontends.grpc_api import AdaptersService, GenerationService
from deltaserve.server.frontends.tgis import TgisGenerationService
from deltaserve.server.kernels.threads import default_threads, single_threaded_executor
from deltaserve.server.metrics import Metrics
from deltaserve.server.model.kv_cache import blocks_for
from deltaserve.server.model.loader import LoadedModel, load_model
from deltaserve.server.model.runner import NO_ADAPTERS, ModelRunner, PrefillChunk
from deltaserve.server.residency.registry import AdapterRegistry, DeviceSlots
from deltaserve.server.residency.sources import AdapterCache, AdapterResolver, FsSource, open_source
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
LISTENER_CLOSE_SECONDS = 2.0  # after the drain, for the last responses to leave before the listeners close
# After the engine dies, the listeners stay open this long, answering UNAVAILABLE and NOT_SERVING, so that a client
# racing the exit is told to retry elsewhere instead of meeting a connection torn down under its call (CANCELLED).
DEATH_LINGER_SECONDS = 2.0
VERSION = importlib.metadata.version("deltaserve")  # pyproject.toml's version, the only place it is written


def _context_length(loaded: LoadedModel, requested: int) -> int:
    """The served context: the requested length, capped by the model's positions (sliding windows need no cap:
    the attention function applies each layer's window)."""
    config = loaded.model.config
    return min(requested, getattr(config, "max_position_embeddings", requested) or requested)


CPU_KV_CACHE_BYTES = 1 << 30


def _kv_cache_blocks(config: ServerConfig, runner: ModelRunner, max_seq_len: int) -> int:
    """Blocks in the KV-cache pool (the null block included): --kv-cache-memory over one block's bytes.
    Refuses a pool that cannot hold one request of --max-seq-len."""
    kv, block_size = config.kv, config.kv.block_size
    budget = kv.kv_cache_bytes
    if budget is None:
        budget = _auto_kv_cache_bytes(config, runner, max_seq_len)
    num_blocks = budget // runner.block_bytes(block_size)
    needed = blocks_for(max_seq_len, block_size)
    if num_blocks - 1 < needed:
        raise ConfigError(
            f"the KV cache ({kv.kv_cache_memory}: {budget} bytes, {max(num_blocks - 1, 0)} usable blocks of "
            f"{block_size} tokens) cannot hold one request of --max-seq-len {max_seq_len} ({needed} blocks); "
            "raise --kv-cache-memory or lower --max-seq-len",
            "kv_cache_memory",
        )
    return num_blocks


def _auto_kv_cache_bytes(config: ServerConfig, runner: ModelRunner, max_seq_len: int) -> int:
    """CPU: 1 GiB. CUDA: the device's memory times --gpu-memory-utilization, less what is in use now (weights,
    adapter slots, other processes) and an estimate of the largest step's activations."""
    import torch

    device = runner.device
    if device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    budget = (
        int(total * config.kv.gpu_memory_utilization) - (total - free) - _activation_bytes(config, runner, max_seq_len)
    )
    log.info("KV cache: %.2f GiB of %.2f GiB (auto)", budget / (1 << 30), total / (1 << 30))
    return max(budget, 0)


def _activation_bytes(config: ServerConfig, runner: ModelRunner, max_seq_len: int) -> int:
    """A generous estimate of a step's transient memory: a prefill chunk's hidden states, MLP and attention
    scores, a full decode batch's gathered K/V, and fp32 logits."""
    model_config = runner.model.config
    element = runner.dtype.itemsize
    tokens, rows = config.batching.max_prefill_tokens, config.batching.max_batch_size
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * model_config.hidden_size
    hidden = tokens * (3 * intermediate + 8 * model_config.hidden_size) * element
    scores = runner.num_heads * tokens * max_seq_len * 4
    gathered = 2 * rows * max_seq_len * runner.num_kv_heads * runner.head_dim * element
    logits = 3 * rows * model_config.vocab_size * 4
    return 2 * (hidden + scores + gathered + logits)


def _eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def adapters_under(directories: list[str]) -> list[tuple[str, str]]:
    """(id, path) for every adapter directory directly under each of `directories`; the id is its name."""
    found = []
    for directory in directories:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                found.append((name, path))
    return found


def _tls_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    """The scheduler's policy and limits from the flags; ConfigError for an unreadable or invalid limits file."""
    group = config.scheduler
    overrides = {}
    if group.tenant_limits_file:
        try:
            with open(group.tenant_limits_file, encoding="utf-8") as handle:
                overrides = tenant_overrides(json.load(handle))
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            raise ConfigError(f"--tenant-limits-file {group.tenant_limits_file}: {err}", "tenant_limits_file") from None
    limits = TenantLimits(group.tenant_max_running, group.tenant_max_queued, group.tenant_max_kv_blocks)
    return SchedulerConfig(Policy(group.scheduling), limits, overrides)


class Server:
    """A running deltaserve: build with `Server.create(config)` (loads the model), then `await start()`."""

    def __init__(self, config: ServerConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        scheduling = scheduler_config(config)  # before the model loads: a bad limits file fails fast
        self.metrics = Metrics(config.ops.metrics_max_adapters, config.scheduler.metrics_max_tenants)
        max_seq_len = _context_length(loaded, config.batching.max_seq_len)
        self.runner = ModelRunner(loaded.model, dtype=loaded.dtype, device=loaded.device)
        slots = DeviceSlots(
            self.runner.adapter_layers,
            self.runner.bottleneck_banks,
            config.adapters.max_adapters,
            config.adapters.max_lora_rank,
            loaded.dtype,
            loaded.device,
            max_bottleneck_size=config.adapters.max_bottleneck_size,
        )
        # The pool goes last, so that on CUDA its automatic size is what the weights and slots left.
        num_blocks = _kv_cache_blocks(config, self.runner, max_seq_len)
        self.runner.allocate_cache(num_blocks, config.kv.block_size)
        self.path_policy = AdapterPathPolicy(config.adapters.adapter_root)
        read_options = ReadOptions(
            allow_pickle=config.adapters.allow_pickle,
            max_bytes=config.adapters.max_adapter_bytes,
            roots=self.path_policy.roots,
            compute_dtype=loaded.dtype,
        )
        self.sources = [
            open_source(uri, config.adapters.adapter_download_timeout_s) for uri in config.adapters.adapter_source
        ]
        self.adapter_cache = (
            AdapterCache(
                # Default: a fresh directory per server, so servers on one machine (Ray replicas) never share one.
                config.adapters.adapter_cache_dir or tempfile.mkdtemp(prefix="deltaserve-adapters-"),
                config.adapters.adapter_cache_bytes,
            )
            if self.sources
            else None
        )
        # Files from a source (read in place, or from the cache) are confined to that directory, no link
        # followed; every other path to --adapter-root as before.
        confined = [s.root for s in self.sources if isinstance(s, FsSource) and s.kind == "dir"]
        confined += [self.adapter_cache.directory] if self.adapter_cache else []

        def options_for(path: str) -> ReadOptions:
            root = next((r for r in confined if within(path, [r]) is not None), None)
            return dataclasses.replace(read_options, roots=(root,)) if root else read_options

        self.registry = AdapterRegistry(
            self.runner.base_spec(),
            slots,
            max_host=config.adapters.max_cpu_adapters,
            loader=lambda path, spec: load_adapter(path, spec, options=options_for(path)),
            resolve_path=self.path_policy.resolve,
            digest=lambda path: content_digest(path, options_for(path)),
        )
        self.resolver = (
            AdapterResolver(
                self.sources,
                self.registry,
                self.adapter_cache,
                negative_ttl_s=config.adapters.adapter_negative_ttl_s,
                refresh_s=config.adapters.adapter_refresh_s,
                timeout_s=config.adapters.adapter_download_timeout_s,
                max_weights_bytes=config.adapters.max_adapter_bytes,
                metrics=self.metrics,
            )
            if self.adapter_cache is not None
            else None
        )
        engine_config = EngineConfig(
            config.batching.max_batch_size,
            max_seq_len,
            _eos_token_ids(loaded),
            config.batching.max_prefill_tokens,
            max_waiting=config.batching.max_waiting_requests,
            block_size=config.kv.block_size,
            num_blocks=num_blocks,
            prefix_caching=config.kv.prefix_caching,
            torch_threads=config.base.torch_threads or default_threads(),
            scheduling=scheduling,
        )
        self.engine = Engine(self.runner, loaded.tokenizer, self.registry, engine_config, self.metrics)
        self.merges = MergeController(self.engine, self.registry, self.runner, self.metrics)
        self.merge_policy: AutoMergePolicy | None = None
        if config.merge.merge_policy == "auto":  # MergeConfig has refused any other value than off
            self.merge_policy = AutoMergePolicy(self.merges, window=config.merge.merge_window_requests)
            self.engine.admission_observer = self.merge_policy.observe
        self.registry.on_resident = self.engine.wake
        self.registry.on_evict = self.metrics.adapter_evictions.inc
        self._bind_metrics(slots)
        self.health = health.aio.HealthServicer()
        self._health_services: tuple[str, ...] = ()
        self.engine_dead = asyncio.Event()  # set on the event loop when the engine thread dies
        self.grpc_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.core: FrontDoorCore | None = None  # set by start(); every front door generates through it
        self.generation: GenerationService | None = None  # set by start()
        self.adapters: AdaptersService | None = None
        self.http = None  # the OpenAIFrontDoor when --http-port is set
        self.http_port: int | None = None

    def _bind_metrics(self, slots: DeviceSlots) -> None:
        model = self.loaded.model
        self.metrics.bind(
            model_bytes=tensor_bytes((*model.parameters(), *model.buffers())),
            kv_cache_bytes=self.runner.kv_cache_bytes,
            adapter_bytes=lambda: slots.bytes_allocated,
            kv_usage=self.engine.kv_cache_usage,
            kv_blocks=self.engine.kv_blocks,
            resident=self.registry.resident,
            info={
                "model": self.loaded.name,
                "version": VERSION,
                "dtype": str(self.loaded.dtype).removeprefix("torch."),
                "device": str(self.loaded.device),
                "quantization": self.loaded.quantization,
            },
        )

    @classmethod
    def create(cls, config: ServerConfig) -> Server:
        loaded = load_model(
            config.base.model, dtype=config.base.dtype, device=config.base.device, quantize=config.base.quantize
        )
        return cls(config, loaded)

    def model_info(self) -> pb.ModelInfoResponse:
        loaded = self.loaded
        return pb.ModelInfoResponse(
            model_name=loaded.name,
            architecture=loaded.model.config.architectures[0] if loaded.model.config.architectures else "",
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            quantization=loaded.quantization,
            max_seq_len=self.engine.config.max_seq_len,
            max_batch_size=self.config.batching.max_batch_size,
            vocab_size=loaded.model.config.vocab_size,
            eos_token_ids=list(self.engine.config.eos_token_ids),
            max_adapters=self.config.adapters.max_adapters,
            max_lora_rank=self.config.adapters.max_lora_rank,
            adapter_kinds=served_kinds(),
            version=VERSION,
            default_max_new_tokens=self.config.batching.default_max_new_tokens,
            merged_adapter_id=self.merges.merged_adapter_id,
        )

    def warm_up(self) -> None:
        """One prefill and one decode step before reporting SERVING, so the first request is not slow."""
        import torch

        usable = self.runner.cache.num_blocks - 1
        table = [1 + i % usable for i in range(blocks_for(5, self.config.kv.block_size))]  # blocks nobody holds
        self.runner.prefill([PrefillChunk(table, 0, [0, 1, 2, 3])], NO_ADAPTERS)
        tables = self.runner.decode_tables([table], 4)
        self.runner.decode(torch.tensor([1]), torch.tensor([4]), tables, NO_ADAPTERS)

    async def start(self) -> int:
        """Start the engine and the gRPC server; returns the bound port. Health turns SERVING at the end."""
        loop = asyncio.get_running_loop()
        # Blocking calls off the loop (tokenizing, adapter files) run on threads that never compute with several
        # torch threads: that is the engine thread's alone (kernels/threads.py).
        loop.set_default_executor(single_threaded_executor("deltaserve-io"))
        self.engine.on_death = lambda err: loop.call_soon_threadsafe(asyncio.ensure_future, self._engine_died())
        self.engine.start()
        await asyncio.to_thread(self.engine.call, self.warm_up)  # on the engine thread, which serves the steps
        for adapter_id, path in [*self.config.adapters.preload, *adapters_under(self.config.adapters.adapter_dir)]:
            record = await asyncio.to_thread(self.registry.load, adapter_id, path)
            log.info("registered adapter %r (%s) from %s", adapter_id, record.state.value, path)
        token = BearerToken(self.config.security.admin_token)
        interceptors = [AdminTokenInterceptor(token)] if token.required else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", self.config.security.max_request_bytes)],
        )
        core = self.core = FrontDoorCore(
            self.engine,
            self.loaded.tokenizer,
            self.engine.config.max_seq_len,
            self.config.batching.default_max_new_tokens,
            max_n=self.config.batching.max_n,
            resolver=self.resolver,
        )
        generation = self.generation = GenerationService(core, self.model_info)
        adapters = self.adapters = AdaptersService(self.engine, self.metrics, self.merges)
        pb_grpc.add_GenerationServicer_to_server(generation, server)
        pb_grpc.add_AdaptersServicer_to_server(adapters, server)
        # TGIS's fmaas.GenerationService: a front door onto the same GenerationService (open like Generation)
        tgis_grpc.add_GenerationServiceServicer_to_server(TgisGenerationService(core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            pb.DESCRIPTOR.services_by_name["Generation"].full_name,
            pb.DESCRIPTOR.services_by_name["Adapters"].full_name,
            tgis_pb.DESCRIPTOR.services_by_name["GenerationService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        address = f"{self.config.doors.host}:{self.config.doors.port}"
        if self.config.security.tls_cert:
            self.port = server.add_secure_port(
                address, _tls_credentials(self.config.security.tls_cert, self.config.security.tls_key)
            )
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.doors.host}:{self.config.doors.port}")
        await server.start()
        self.grpc_server = server
        if self.config.doors.metrics_port is not None:
            self.metrics.serve(self.config.doors.metrics_port, self.config.doors.host)
        if self.config.doors.http_port is not None:
            await self._start_http(core, adapters, token)
        self._health_services = ("", *names[:3])
        for service in self._health_services:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("deltaserve serving %s on %s:%d", self.loaded.name, self.config.doors.host, self.port)
        return self.port

    async def _start_http(self, core: FrontDoorCore, adapters: AdaptersService, token: BearerToken) -> None:
        from deltaserve.server.frontends.openai.server import OpenAIFrontDoor  # FastAPI is imported only when used

        self.http = OpenAIFrontDoor(
            core,
            adapters,
            model_name=self.loaded.name,
            token=token,
            max_request_bytes=self.config.security.max_request_bytes,
            shutdown_grace_seconds=self.config.ops.shutdown_grace_seconds,
            tls_cert=self.config.security.tls_cert,
            tls_key=self.config.security.tls_key,
        )
        self.http_port = await self.http.start(self.config.doors.host, self.config.doors.http_port)
        scheme = "https" if self.config.security.tls_cert else "http"
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", scheme, self.config.doors.host, self.http_port)

    async def stop(self) -> None:
        """Graceful stop. Health turns NOT_SERVING and new work is refused (UNAVAILABLE) while the listeners stay
        open, so the drain is observable; in-flight requests finish (aborted once the grace is over); then the
        listeners close. A load still running (a hung file system) is not waited for."""
        await self.health.enter_graceful_shutdown()
        await asyncio.to_thread(self.engine.stop, self.config.ops.shutdown_grace_seconds)
        if self.grpc_server is not None:
            await self.grpc_server.stop(LISTENER_CLOSE_SECONDS)  # the last outputs are on their way
        if self.http is not None:
            await self.http.stop()
        self.registry.close()
        if self.resolver is not None:
            self.resolver.close()
            if not self.config.adapters.adapter_cache_dir:  # the server's own temporary cache
                shutil.rmtree(self.adapter_cache.directory, ignore_errors=True)

    async def _engine_died(self) -> None:
        """The engine thread is gone (its requests already failed with UNAVAILABLE): report NOT_SERVING on every
        service at once, and let `serve_until_signalled` end the process with a failure status."""
        self.engine_dead.set()
        for service in self._health_services:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serve_until_signalled(self) -> int:
        """Serve until SIGTERM/SIGINT (exit status 0) or until the engine dies (status 1, for a restart)."""
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_event.set)
        return await self.serve_until(stop_event)

    async def serve_until(self, stop_event: asyncio.Event) -> int:
        """Start, serve until `stop_event` is set (status 0) or the engine dies (status 1), then stop."""
        await self.start()
        signalled = asyncio.create_task(stop_event.wait())
        died = asyncio.create_task(self.engine_dead.wait())
        await asyncio.wait({signalled, died}, return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        died.cancel()
        if self.engine_dead.is_set():
            log.critical("the engine died: stopping with status 1 so that the process is restarted")
            await asyncio.sleep(DEATH_LINGER_SECONDS)
        log.info("shutting down: finishing in-flight requests (up to %.0f s)", self.config.ops.shutdown_grace_seconds)
        await self.stop()
        log.info("stopped")
        return 1 if self.engine_dead.is_set() else 0
