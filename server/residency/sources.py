"""Adapter sources: a request names an adapter that is not loaded, and the server finds it in a store.

`--adapter-source URI` (repeatable, tried in order) names where adapters live; sources are operator
configuration, never request input. Kinds:
- a local or network directory (`/srv/adapters`, `file:///srv/adapters`): adapters are read in place,
  confined under the directory with no link followed (deltaserve.adapters.directory);
- any fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://...`) through fsspec and its backend (s3fs
  for S3). Credentials come from the backend's own chain (environment, profile, instance role); an
  S3-compatible store's endpoint from AWS_ENDPOINT_URL. Files are downloaded into the local cache;
- `hf-cache:///path/to/hub`: a Hugging Face hub cache (`models--org--name/refs/main`,
  `snapshots/<commit>/`), whose links are resolved only into the repo's own `blobs/`, then copied.

Layout under a directory or URL: `<name>/adapter_config.json` + `<name>/adapter_model.safetensors` (one
version, identified by content), or `<name>/<revision>/...` (revision folders; the newest is the one whose
config was written last, ties broken by name). An id is `name` or `name@revision`; `name` may have up to
three `/`-separated parts of `[A-Za-z0-9._-]` (no `.`/`..` part, no scheme, no absolute path).

Resolution (AdapterResolver): a miss in every source is NOT_FOUND and is remembered for
`--adapter-negative-ttl-s`; a source that fails or is slow makes UNAVAILABLE / DEADLINE_EXCEEDED for the
requests of that adapter only. Concurrent first requests for one id share one resolution (single flight),
which runs on the resolver's own threads, never on the event loop or the engine thread. Only the two PEFT
files are fetched, each size-checked from the listing before any byte is read; the registry then checks
the content (digest, config, shapes, finite values) before a slot is touched. A bare name is re-checked at
most every `--adapter-refresh-s`, in the background: a new version replaces the name for new requests while
running ones finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deltaserve.adapters import AdapterError, AdapterLimitError
from deltaserve.adapters.peft_files import CONFIG_MAX_BYTES, CONFIG_NAME, WEIGHTS_NAME
from deltaserve.server.errors import (
    AdapterNotFoundError,
    AdapterSourceTimeoutError,
    AdapterSourceUnavailableError,
    ConfigError,
)
from deltaserve.server.kernels.threads import one_thread_here

log = logging.getLogger(__name__)

FILES = (CONFIG_NAME, WEIGHTS_NAME)  # all that is ever fetched from a source
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME_PARTS = 3
MAX_ID_CHARS = 256


@dataclass(frozen=True)
class AdapterName:
    name: str  # "org/name" or "name"
    revision: str | None  # None: the newest

    @property
    def parts(self) -> list[str]:
        return self.name.split("/")


def parse_adapter_id(adapter_id: str) -> AdapterName:
    """The name and pinned revision of a request's adapter id, or NOT_FOUND for an id that could not name
    anything inside a source (so no path outside one can be formed from it)."""
    if len(adapter_id) > MAX_ID_CHARS:
        raise AdapterNotFoundError(f"adapter id of {len(adapter_id)} characters is longer than {MAX_ID_CHARS}")
    name, at, revision = adapter_id.partition("@")
    parts = name.split("/")
    ok = 0 < len(parts) <= MAX_NAME_PARTS and all(_PART.fullmatch(p) and p not in (".", "..") for p in parts)
    if not ok or (at and not _REVISION.fullmatch(revision)) or revision in (".", ".."):
        raise AdapterNotFoundError(
            f"adapter {adapter_id!r} is not loaded, and is not a valid source name (name or name@revision; "
            f"up to {MAX_NAME_PARTS} '/'-separated parts of letters, digits, '.', '_' or '-')"
        )
    return AdapterName(name, revision if at else None)


@dataclass(frozen=True)
class Version:
    """One resolvable version of an adapter in a source."""

    revision: str  # the revision folder or hub commit; "" for an unversioned folder
    location: str  # where its two files are, in the source's own terms (a path or URL)
    stamp: str  # changes whenever the files may have changed (etag / mtime + size): the cache key
    sizes: dict[str, int]  # file name -> bytes (from the listing)


class Source:
    """One --adapter-source. `newest` / `pinned` find a version (AdapterNotFoundError when there is none,
    AdapterSourceUnavailableError when the store fails); `fetch` copies its files into a directory, or
    `in_place` gives the directory to load from without copying."""

    uri: str
    kind: str

    def find(self, name: AdapterName) -> Version:
        raise NotImplementedError

    def in_place(self, version: Version) -> str | None:
        return None

    def fetch(self, version: Version, into: str) -> int:
        raise NotImplementedError


class FsSource(Source):
    """A directory tree on an fsspec filesystem (local disk included)."""

    def __init__(self, uri: str, fs: Any, root: str, kind: str) -> None:
        self.uri, self.fs, self.root, self.kind = uri, fs, root.rstrip("/"), kind

    def _info(self, path: str) -> dict[str, Any] | None:
        try:
            return self.fs.info(path)
        except FileNotFoundError:
            return None
        except Exception as err:  # a store's own errors (connection refused, 5xx, auth): the store is at fault
            raise _unavailable(self.uri, err) from err

    def _version(self, folder: str, revision: str) -> Version | None:
        infos = {}
        for name in FILES:
            info = self._info(f"{folder}/{name}")
            if info is None:
                return None
            if info.get("type") != "file" or info.get("islink"):
                raise AdapterNotFoundError(f"{name} of {revision or 'the adapter'} is not a regular file")
            infos[name] = info
        stamp = "|".join(
            f"{n}:{i.get('size')}:{i.get('ETag') or i.get('etag') or i.get('mtime') or i.get('LastModified')}"
            for n, i in infos.items()
        )
        return Version(revision, folder, stamp, {n: int(i.get("size") or 0) for n, i in infos.items()})

    def find(self, name: AdapterName) -> Version:
        folder = f"{self.root}/{name.name}"
        if name.revision is not None:
            found = self._version(f"{folder}/{name.revision}", name.revision)
        else:
            found = self._version(folder, "") or self._newest_revision(folder)
        if found is None:
            raise AdapterNotFoundError(f"adapter {name.name!r} is not in {self.uri}")
        return found

    def _newest_revision(self, folder: str) -> Version | None:
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return None
        except Exception as err:
            raise _unavailable(self.uri, err) from err
        candidates = []
        for entry in entries:
            revision = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" and not entry.get("islink") and _REVISION.fullmatch(revision):
                config = self._info(f"{folder}/{revision}/{CONFIG_NAME}")
                if config is not None:
                    written = config.get("mtime") or config.get("LastModified") or 0
                    candidates.append((_as_seconds(written), revision))
        for _, revision in sorted(candidates, reverse=True):
            version = self._version(f"{folder}/{revision}", revision)
            if version is not None:
                return version
        return None

    def in_place(self, version: Version) -> str | None:
        return version.location if self.kind == "dir" else None

    def fetch(self, version: Version, into: str) -> int:
        total = 0
        for name in FILES:
            target = os.path.join(into, name)
            try:
                self.fs.get_file(f"{version.location}/{name}", target)
            except FileNotFoundError:
                raise AdapterNotFoundError(f"{name} vanished from {self.uri} while it was downloaded") from None
            except Exception as err:
                raise _unavailable(self.uri, err) from err
            size = os.lstat(target).st_size
            if size != version.sizes[name]:  # changed while downloading: the listing's size check no longer holds
                raise AdapterSourceUnavailableError(f"{name} changed in {self.uri} while it was downloaded; retry")
            total += size
        return total


class HubCacheSource(Source):
    """A Hugging Face hub cache directory: `models--org--name/{refs/<ref>, snapshots/<commit>/, blobs/}`."""

    kind = "hub"

    def __init__(self, uri: str, root: str) -> None:
        self.uri, self.root = uri, os.path.realpath(root)

    def _repo(self, name: AdapterName) -> str:
        return os.path.join(self.root, "models--" + "--".join(name.parts))

    def find(self, name: AdapterName) -> Version:
        repo = self._repo(name)
        ref = name.revision or "main"
        commit = ref
        ref_file = os.path.join(repo, "refs", ref)
        if os.path.isfile(ref_file) and not os.path.islink(ref_file):
            with open(ref_file, encoding="utf-8") as handle:
                commit = handle.read(200).strip()
        if not _REVISION.fullmatch(commit):
            raise AdapterNotFoundError(f"adapter {name.name!r} has a malformed ref {ref!r} in {self.uri}")
        snapshot = os.path.join(repo, "snapshots", commit)
        blobs, sizes, stamp = os.path.join(repo, "blobs"), {}, []
        for file in FILES:
            blob = self._blob(os.path.join(snapshot, file), blobs)
            if blob is None:
                raise AdapterNotFoundError(f"adapter {name.name}@{commit} is not in {self.uri}")
            sizes[file] = os.stat(blob).st_size
            stamp.append(os.path.basename(blob))
        return Version(commit, snapshot, "|".join(stamp), sizes)

    @staticmethod
    def _blob(path: str, blobs: str) -> str | None:
        """The regular file a snapshot entry stands for, only inside the repo's blobs/ (else None)."""
        if not os.path.lexists(path):
            return None
        real = os.path.realpath(path)
        if os.path.commonpath([real, blobs]) != blobs or not stat.S_ISREG(os.lstat(real).st_mode):
            raise AdapterNotFoundError(f"{os.path.basename(path)} links outside the hub cache's blobs/")
        return real

    def fetch(self, version: Version, into: str) -> int:
        blobs = os.path.join(os.path.dirname(os.path.dirname(version.location)), "blobs")
        total = 0
        for file in FILES:
            blob = self._blob(os.path.join(version.location, file), blobs)
            if blob is None:
                raise AdapterNotFoundError(f"{file} vanished from {self.uri}")
            shutil.copyfile(blob, os.path.join(into, file), follow_symlinks=False)
            total += os.lstat(os.path.join(into, file)).st_size
        return total


def _as_seconds(value: Any) -> float:
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _unavailable(uri: str, err: BaseException) -> AdapterSourceUnavailableError:
    log.warning("adapter source %s failed: %s: %s", uri, type(err).__name__, err)
    return AdapterSourceUnavailableError(f"the adapter source {uri} is unavailable ({type(err).__name__}); retry later")


def open_source(uri: str, timeout_s: float = 10.0) -> Source:
    """A Source for an --adapter-source URI (ConfigError when it cannot be one)."""
    if uri.startswith("hf-cache://"):
        root = uri.removeprefix("hf-cache://")
        if not os.path.isdir(root):
            raise ConfigError(f"--adapter-source {uri}: {root!r} is not a directory", "adapter_source")
        return HubCacheSource(uri, root)
    if "://" not in uri or uri.startswith("file://"):
        root = os.path.realpath(uri.removeprefix("file://"))
        if not os.path.isdir(root):
            raise ConfigError(f"--adapter-source {uri}: {root!r} is not a directory", "adapter_source")
        import fsspec

        return FsSource(uri, fsspec.filesystem("file"), root, "dir")
    import fsspec.core

    protocol = uri.split("://", 1)[0]
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        # Fail fast on a store that is down (the request gets UNAVAILABLE) instead of retrying for minutes.
        options = {
            "config_kwargs": {
                "connect_timeout": timeout_s,
                "read_timeout": timeout_s,
                "retries": {"max_attempts": 2, "mode": "standard"},
            },
            "skip_instance_cache": True,
            "use_listings_cache": False,  # a re-check must see a new version
        }
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"--adapter-source {uri}: {err}", "adapter_source") from None
    if hasattr(fs, "retries"):
        fs.retries = 2  # s3fs retries five times with back-off by default
    return FsSource(uri, fs, root, "fsspec")


# ---- the local cache of downloaded adapters ---------------------------------------------------------------
_ENTRY = re.compile(r"ds-[0-9a-f]{32}")


class AdapterCache:
    """Downloaded adapter folders under one directory, at most `max_bytes` together, least recently used
    dropped first. An entry is immutable once published (downloaded to a temporary folder, then renamed), so
    its content never changes under a loaded record. `in_use(path)` says whether an entry may not be dropped
    yet (its adapter is serving requests); `on_drop(path)` lets the owner forget what points at it."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = os.path.realpath(directory)
        self.max_bytes = max_bytes
        os.makedirs(self.directory, exist_ok=True)
        self._entries: OrderedDict[str, int] = OrderedDict()  # key -> bytes, oldest use first
        self._lock = threading.Lock()
        self.in_use: Callable[[str], bool] = lambda path: False
        self.on_drop: Callable[[str], None] = lambda path: None
        self.hits = 0
        self.misses = 0
        for entry in os.listdir(self.directory):  # what an earlier run left: only our own entries
            if _ENTRY.fullmatch(entry) or entry.startswith("tmp-"):
                shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)

    @staticmethod
    def key(source: str, name: str, version: Version) -> str:
        digest = hashlib.sha256(f"{source}\0{name}\0{version.revision}\0{version.stamp}".encode()).hexdigest()
        return "ds-" + digest[:32]

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self.path(key)
            self.misses += 1
            return None

    def put(self, key: str, size: int, download: Callable[[str], int]) -> str:
        """Run `download(tmp_dir)` and publish the folder as `key`; AdapterLimitError if `size` can never fit."""
        if size > self.max_bytes:
            raise AdapterLimitError(
                f"the adapter is {size} bytes; the adapter cache holds {self.max_bytes} (--adapter-cache-bytes)"
            )
        tmp = os.path.join(self.directory, f"tmp-{uuid.uuid4().hex}")
        os.mkdir(tmp)
        try:
            size = download(tmp)
            target = self.path(key)
            with self._lock:
                if key in self._entries:  # published meanwhile (another flight for an equal version)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return target
                self._make_room(size)
                os.rename(tmp, target)
                self._entries[key] = size
            return target
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _make_room(self, size: int) -> None:
        """Drop least recently used idle entries until `size` more fits (lock held). Entries in use stay, so
        the cache may run over its bound while every entry is serving."""
        for key in list(self._entries):
            if sum(self._entries.values()) + size <= self.max_bytes:
                return
            path = self.path(key)
            if self.in_use(path):
                continue
            self.on_drop(path)
            del self._entries[key]
            shutil.rmtree(path, ignore_errors=True)


# ---- resolution -------------------------------------------------------------------------------------------
@dataclass
class Tracked:
    """A name the resolver loaded: where from, which version, and when the source was last asked."""

    source: Source
    name: AdapterName
    version: Version
    path: str
    checked_at: float


class SourceMetrics:
    """What the resolver reports (server/metrics.py binds these to Prometheus); a no-op by default."""

    def download(self, source: str, outcome: str, size: int, seconds: float) -> None: ...

    def load(self, source: str, outcome: str, seconds: float) -> None: ...

    def cache(self, size_bytes: int, entries: int, hit: bool | None) -> None: ...


class AdapterResolver:
    """Finds, fetches and registers adapters named by requests (see the module docstring)."""

    def __init__(
        self,
        sources: list[Source],
        registry: Any,  # AdapterRegistry (typed loosely: the registry module imports nothing from here)
        cache: AdapterCache,
        *,
        negative_ttl_s: float = 10.0,
        refresh_s: float = 30.0,
        timeout_s: float = 60.0,
        max_weights_bytes: int | None = None,
        workers: int = 4,
        metrics: SourceMetrics | None = None,
    ) -> None:
        self.sources = sources
        self.registry = registry
        self.cache = cache
        self.negative_ttl_s = negative_ttl_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.max_weights_bytes = max_weights_bytes
        self.metrics = metrics or SourceMetrics()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="deltaserve-sources", initializer=one_thread_here
        )
        self._lock = threading.Lock()
        self._tracked: dict[str, Tracked] = {}
        self._misses: dict[str, float] = {}  # id -> monotonic time its NOT_FOUND expires
        self._flights: dict[str, asyncio.Future[bool]] = {}  # event-loop only
        cache.in_use = self._in_use
        cache.on_drop = self._forget_path

    # ---- on the event loop ------------------------------------------------------------------------------
    async def ensure(self, adapter_id: str) -> bool:
        """Make `adapter_id` loaded from the sources. True when this call waited for a load (a cold start).
        NOT_FOUND (fast, remembered) when no source has it; UNAVAILABLE / DEADLINE_EXCEEDED when a store
        failed or was slow. Callers for one id share one flight."""
        expires = self._misses.get(adapter_id)
        if expires is not None:
            if time.monotonic() < expires:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in any adapter source (checked recently)")
            self._misses.pop(adapter_id, None)
        parse_adapter_id(adapter_id)  # refuses ids that cannot name anything, before any thread or store
        flight = self._flights.get(adapter_id)
        if flight is None:
            loop = asyncio.get_running_loop()
            flight = loop.run_in_executor(self._pool, self._load_blocking, adapter_id)
            self._flights[adapter_id] = flight
            flight.add_done_callback(lambda _: self._flights.pop(adapter_id, None))
        await asyncio.shield(flight)
        return True

    def refresh_if_due(self, adapter_id: str) -> None:
        """Start a background re-check of a bare name loaded from a source, at most every refresh_s."""
        tracked = self._tracked.get(adapter_id)
        if tracked is None or tracked.name.revision is not None or adapter_id in self._flights:
            return
        if time.monotonic() - tracked.checked_at < self.refresh_s:
            return
        tracked.checked_at = time.monotonic()  # one re-check per period, even if it fails
        flight = asyncio.get_running_loop().run_in_executor(self._pool, self._refresh_blocking, adapter_id, tracked)
        self._flights[adapter_id] = flight
        flight.add_done_callback(lambda f: (self._flights.pop(adapter_id, None), f.exception()))

    def is_tracked(self, adapter_id: str) -> bool:
        return adapter_id in self._tracked

    # ---- on the resolver's threads ----------------------------------------------------------------------
    def _load_blocking(self, adapter_id: str) -> bool:
        name = parse_adapter_id(adapter_id)
        source, version = self._find(adapter_id, name)
        self._install(adapter_id, name, source, version)
        return True

    def _refresh_blocking(self, adapter_id: str, tracked: Tracked) -> bool:
        try:
            version = self._bounded(tracked.source.find, tracked.name)
        except Exception as err:  # the loaded version keeps serving; the next period tries again
            log.warning("re-checking adapter %r in %s failed: %s", adapter_id, tracked.source.uri, err)
            return False
        if version.stamp == tracked.version.stamp and version.revision == tracked.version.revision:
            return False
        log.info(
            "adapter %r has a new version %r in %s", adapter_id, version.revision or version.stamp, tracked.source.uri
        )
        self._install(adapter_id, tracked.name, tracked.source, version)
        return True

    def _bounded(self, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` on a helper thread, given up after timeout_s (DEADLINE_EXCEEDED for the request)."""
        box: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                box.set_result(call(*args))
            except BaseException as err:
                box.set_exception(err)

        threading.Thread(target=run, name="deltaserve-source-call", daemon=True).start()
        try:
            return box.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise AdapterSourceTimeoutError(
                f"the adapter source took longer than {self.timeout_s:g} s (--adapter-download-timeout-s)"
            ) from None

    def _find(self, adapter_id: str, name: AdapterName) -> tuple[Source, Version]:
        """The first source holding the name; NOT_FOUND (remembered) if none does, the store's failure if a
        source that might hold it failed."""
        failure: Exception | None = None
        for source in self.sources:
            try:
                return source, self._bounded(source.find, name)
            except AdapterNotFoundError:
                continue
            except (AdapterSourceUnavailableError, AdapterSourceTimeoutError) as err:
                failure = failure or err
        if failure is not None:
            raise failure
        with self._lock:
            self._misses[adapter_id] = time.monotonic() + self.negative_ttl_s
        for source in self.sources:
            self.metrics.download(source.uri, "not_found", 0, 0.0)
        raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded and is not in any adapter source")

    def _install(self, adapter_id: str, name: AdapterName, source: Source, version: Version) -> None:
        self._check_sizes(adapter_id, version)
        path = source.in_place(version)
        if path is None:
            path = self._download(adapter_id, name, source, version)
        started = time.perf_counter()
        try:
            self.registry.load(
                adapter_id,
                path,
                replace=True,
                resolved=True,
                version=version.revision or version.stamp,
                source=source.uri,
            )
        except AdapterError as err:  # the message names the local path; the caller knows the id and source
            self.metrics.load(source.uri, "error", time.perf_counter() - started)
            message = str(err).replace(path, name.name)
            raise type(err)(f"adapter {adapter_id!r} from {source.uri}: {message}") from None
        except Exception:
            self.metrics.load(source.uri, "error", time.perf_counter() - started)
            raise
        self.metrics.load(source.uri, "ok", time.perf_counter() - started)
        with self._lock:
            self._tracked[adapter_id] = Tracked(source, name, version, path, time.monotonic())

    def _check_sizes(self, adapter_id: str, version: Version) -> None:
        """Refuse oversized files from the listing, before a byte is fetched."""
        if version.sizes.get(CONFIG_NAME, 0) > CONFIG_MAX_BYTES:
            raise AdapterLimitError(f"adapter {adapter_id!r}: {CONFIG_NAME} is over {CONFIG_MAX_BYTES} bytes")
        weights = version.sizes.get(WEIGHTS_NAME, 0)
        if self.max_weights_bytes is not None and weights > self.max_weights_bytes:
            raise AdapterLimitError(
                f"adapter {adapter_id!r}: {WEIGHTS_NAME} is {weights} bytes; the server accepts up to "
                f"{self.max_weights_bytes} (--max-adapter-bytes)"
            )

    def _download(self, adapter_id: str, name: AdapterName, source: Source, version: Version) -> str:
        key = AdapterCache.key(source.uri, name.name, version)
        cached = self.cache.get(key)
        if cached is not None:
            self.metrics.cache(self.cache.size_bytes, len(self.cache), True)
            return cached
        started = time.perf_counter()
        try:
            path = self._bounded(
                self.cache.put, key, sum(version.sizes.values()), lambda into: source.fetch(version, into)
            )
        except AdapterNotFoundError:
            raise
        except Exception:
            self.metrics.download(source.uri, "error", 0, time.perf_counter() - started)
            raise
        self.metrics.download(source.uri, "ok", sum(version.sizes.values()), time.perf_counter() - started)
        self.metrics.cache(self.cache.size_bytes, len(self.cache), False)
        return path

    # ---- the cache's questions --------------------------------------------------------------------------
    def _in_use(self, path: str) -> bool:
        """Whether a cache entry still backs an adapter that is serving requests."""
        with self._lock:
            names = [adapter_id for adapter_id, t in self._tracked.items() if t.path == path]
        records = [self.registry.find(adapter_id) for adapter_id in names]
        return any(record is not None and record.active_requests > 0 for record in records)

    def _forget_path(self, path: str) -> None:
        """An entry is dropped: its names are unloaded, so the next request resolves them again."""
        with self._lock:
            names = [adapter_id for adapter_id, t in self._tracked.items() if t.path == path]
            for adapter_id in names:
                del self._tracked[adapter_id]
        for adapter_id in names:
            try:
                self.registry.unload(adapter_id)
            except Exception as err:  # already unloaded, or merged (stays: its host copy is on the device)
                log.info("adapter %r stays registered after its cache entry was dropped: %s", adapter_id, err)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_source_uris(uris: list[str]) -> None:
    """ConfigError for a URI that is not one an operator could mean (checked when the config is built)."""
    for uri in uris:
        if not uri or any(c.isspace() for c in uri):
            raise ConfigError(f"--adapter-source must be a directory or a URL, got {uri!r}", "adapter_source")


__all__ = [
    "AdapterCache",
    "AdapterName",
    "AdapterResolver",
    "FsSource",
    "HubCacheSource",
    "Source",
    "SourceMetrics",
    "Version",
    "open_source",
    "parse_adapter_id",
]
