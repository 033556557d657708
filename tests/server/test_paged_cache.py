"""The paged KV cache on a real server: many more requests than the old 16 rows in a small pool, preemption
that does not change a token, the prefix cache (hits, and no sharing across adapters or adapter versions),
chunked prefill that keeps decoding streams going, and the start-up and config refusals."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from deltaserve.client import Client
from deltaserve.server.app import Server
from deltaserve.server.config import ServerConfig
from deltaserve.server.engine.kv_blocks import BlockManager, chain_hash, root_hash
from deltaserve.server.errors import ConfigError
from deltaserve.server.kernels.paged_attention import (
    GatherBuffers,
    flash_decode_attention,
    flash_unavailable,
    torch_decode_attention,
)
from deltaserve.testing.helpers import ServerThread, make_lora, make_tiny_llama
from deltaserve.testing.kinds import make_peft_adapter
from transformers import AutoTokenizer

from tests.references import assert_logprobs_close, greedy_reference, load_reference_model

WORDS = ["river", "stone", "lamp", "quiet", "orange", "seven", "window", "paper", "cloud", "north", "garden", "silver"]


def _value(server: ServerThread, name: str, **labels) -> float:
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


def _prompt(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] for i in range(words))


# ---- the block manager on its own --------------------------------------------------------------------
def test_blocks_are_allocated_released_cached_and_evicted_least_recently_released_first():
    manager = BlockManager(num_blocks=5, block_size=4, prefix_caching=True)  # 4 usable: block 0 is the null block
    assert manager.usable == 4 and manager.available == 4
    first = manager.allocate(2)
    assert first is not None and 0 not in first and manager.used_count == 2
    assert manager.allocate(3) is None and manager.available == 2  # all or nothing
    root = root_hash("adapter=0;merged=0")
    names = [chain_hash(root, [1, 2, 3, 4])]
    names.append(chain_hash(names[0], [5, 6, 7, 8]))
    for block, name in zip(first, names, strict=True):
        manager.register(block, name)
    assert manager.release(first) == []  # cached, not dropped
    assert manager.cached_count == 2 and manager.free_count == 2 and manager.used_count == 0
    hit = manager.take_cached(names)
    assert hit == first and manager.cached_count == 0
    assert manager.take_cached([chain_hash(root, [9, 9, 9, 9])]) == []  # an unknown chain hits nothing
    manager.release(hit)
    # Two free blocks are used first; then cached ones are evicted, the sequence's tail before its head.
    taken = manager.allocate(3)
    assert taken is not None and first[1] in taken and first[0] not in taken
    assert manager.take_cached(names) == [first[0]]  # the head survived; the chain stops at the evicted tail
    # A failed request's blocks are forgotten and handed back to be zeroed.
    assert sorted(manager.release([first[0]], keep_cached=False)) == [first[0]]
    assert manager.take_cached(names[:1]) == []


def test_the_prefix_cache_can_be_switched_off():
    manager = BlockManager(num_blocks=3, block_size=2, prefix_caching=False)
    blocks = manager.allocate(1)
    name = chain_hash(root_hash("x"), [1, 2])
    manager.register(blocks[0], name)
    manager.release(blocks)
    assert manager.take_cached([name]) == [] and manager.cached_count == 0 and manager.free_count == 2


# ---- configuration and start-up ----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["lots", "12XB", "-5", "nan", "inf", "0", "1.5.2GiB"])
def test_an_unparsable_kv_cache_memory_is_a_config_error_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--kv-cache-memory"):
        ServerConfig.of(kv_cache_memory=text)


def test_kv_cache_memory_reads_binary_units():
    assert ServerConfig.of(kv_cache_memory="512MiB").kv.kv_cache_bytes == 512 << 20
    assert ServerConfig.of(kv_cache_memory="2 GiB").kv.kv_cache_bytes == 2 << 30
    assert ServerConfig.of(kv_cache_memory="4096").kv.kv_cache_bytes == 4096
    assert ServerConfig.of().kv.kv_cache_bytes is None  # auto


def test_no_prefix_caching_flag_turns_it_off():
    from deltaserve.server.cli import serve_config

    assert serve_config([]).kv.prefix_caching is True
    assert serve_config(["--no-prefix-caching"]).kv.prefix_caching is False


def test_a_pool_too_small_for_one_maximal_request_is_refused_at_start_up(tiny_dir):
    with pytest.raises(ConfigError, match="cannot hold one request of --max-seq-len 512") as info:
        Server.create(ServerConfig.of(model=tiny_dir, max_seq_len=512, kv_cache_memory="64KiB"))
    assert "--kv-cache-memory" in str(info.value)


# ---- many requests, a small pool, preemption ---------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("paged-adapters")
    return {
        "lora": make_lora(tiny_dir, str(root / "lora"), seed=3, r=8, target_modules="all-linear"),
        "prefix": make_peft_adapter(tiny_dir, str(root / "prefix"), "prefix", seed=4),
        "lora_v2": make_lora(tiny_dir, str(root / "lora_v2"), seed=5, r=8, target_modules="all-linear"),
    }


def _solo_runs(tiny_dir, adapter_dirs, jobs) -> dict[int, tuple[list[int], list[float]]]:
    """Each job alone, one after another, on a server with a roomy pool and no prefix cache."""
    config = ServerConfig.of(model=tiny_dir, max_batch_size=1, max_seq_len=256, max_adapters=2, prefix_caching=False)
    with ServerThread(config) as server, Client(server.target, timeout=120) as client:
        for name in ("lora", "prefix"):
            client.load_adapter(name, adapter_dirs[name])
        outputs = {}
        for index, (prompt, adapter, new_tokens) in enumerate(jobs):
            result = client.generate(prompt, adapter_id=adapter, max_new_tokens=new_tokens, logprobs=True)
            outputs[index] = (result.token_ids, result.logprobs)
    return outputs


def test_64_concurrent_requests_in_a_small_pool_match_their_solo_runs_through_preemption(tiny_dir, adapter_dirs):
    adapters = ["", "lora", "prefix", ""]
    jobs = [(_prompt(i, 6 + (i * 5) % 30), adapters[i % 4], 20 + (i * 13) % 40) for i in range(64)]
    expected = _solo_runs(tiny_dir, adapter_dirs, jobs)
    # 4-token blocks, 160 usable: prompts are admitted by their blocks (more than 16 at once), and the pool
    # runs out as they grow, so the newest are preempted and recomputed.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # K and V, 2 layers, 4 positions, 2 KV heads, head_dim 16, fp32
    config = ServerConfig.of(
        model=tiny_dir,
        max_batch_size=64,
        max_seq_len=256,
        max_adapters=2,
        block_size=4,
        kv_cache_memory=str(161 * block_bytes),
        max_prefill_tokens=128,
    )
    with ServerThread(config) as server, Client(server.target, timeout=300) as client:
        assert server.server.engine.blocks.usable == 160  # the block arithmetic above holds for this model
        for name in ("lora", "prefix"):
            client.load_adapter(name, adapter_dirs[name])

        def run(index: int):
            prompt, adapter, new_tokens = jobs[index]
            return client.generate(prompt, adapter_id=adapter, max_new_tokens=new_tokens, logprobs=True)

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(run, range(64)))
        for index, result in enumerate(results):
            tokens, logprobs = expected[index]
            assert result.token_ids == tokens, f"request {index} ({jobs[index][1] or 'base'}) differs from its solo run"
            assert_logprobs_close(result.logprobs, logprobs)
        steps = _value(server, "deltaserve_batch_size_count")
        assert steps - _value(server, "deltaserve_batch_size_bucket", le="16.0") > 0, "never more than 16 decoded"
        assert _value(server, "deltaserve_preemptions_total") > 0
        assert _value(server, "deltaserve_kv_cache_blocks", state="used") == 0  # everything was given back
        free = _value(server, "deltaserve_kv_cache_blocks", state="free")
        assert free + _value(server, "deltaserve_kv_cache_blocks", state="cached") == 160


# ---- the prefix cache ----------------------------------------------------------------------------------
SHARED_WORDS = 1000


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, smol_dir) -> str:
    """The tiny test decoder with room for long prompts."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("long") / "model"), smol_dir, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def long_prompt(long_dir) -> str:
    """About 1,000 tokens of shared prefix, then a short question."""
    tokenizer = AutoTokenizer.from_pretrained(long_dir)
    prefix = " ".join(WORDS[(i * 5) % len(WORDS)] for i in range(SHARED_WORDS))
    assert 950 <= len(tokenizer(prefix)["input_ids"]) <= 1100
    return prefix + " and the question is"


def test_a_repeated_long_prefix_is_served_from_the_cache_and_never_across_adapters(long_dir, adapter_dirs, long_prompt):
    tokenizer = AutoTokenizer.from_pretrained(long_dir)
    prompt_ids = tokenizer(long_prompt)["input_ids"]
    base_model = load_reference_model(long_dir)
    base_ref = greedy_reference(base_model, tokenizer, prompt_ids, 8)
    lora_ref = greedy_reference(load_reference_model(long_dir, adapter_dirs["lora"]), tokenizer, prompt_ids, 8)
    v2_ref = greedy_reference(load_reference_model(long_dir, adapter_dirs["lora_v2"]), tokenizer, prompt_ids, 8)
    prefix_ref = greedy_reference(load_reference_model(long_dir, adapter_dirs["prefix"]), tokenizer, prompt_ids, 8)
    config = ServerConfig.of(model=long_dir, max_batch_size=4, max_seq_len=1200, max_adapters=3)
    with ServerThread(config) as server, Client(server.target, timeout=120) as client:
        client.load_adapter("lora", adapter_dirs["lora"])
        client.load_adapter("prefix", adapter_dirs["prefix"])

        def generate(adapter: str = "") -> tuple[list[int], list[float], float]:
            hits = _value(server, "deltaserve_prefix_cache_hits_total")
            result = client.generate(long_prompt, adapter_id=adapter, max_new_tokens=8, logprobs=True)
            return result.token_ids, result.logprobs, _value(server, "deltaserve_prefix_cache_hits_total") - hits

        for adapter, reference in (("", base_ref), ("lora", lora_ref), ("prefix", prefix_ref)):
            tokens, logprobs, hits = generate(adapter)  # the first time: computed
            assert hits == 0, f"{adapter or 'base'}: another adapter's blocks were shared"
            assert tokens == reference.token_ids
            assert_logprobs_close(logprobs, reference.logprobs)
            tokens, logprobs, hits = generate(adapter)  # again: the prefix comes from the cache
            assert hits >= len(prompt_ids) - 16, f"{adapter or 'base'}: only {hits} cached positions"
            assert tokens == reference.token_ids
            assert_logprobs_close(logprobs, reference.logprobs)
        # The same id replaced by another adapter: its old blocks must not be found.
        client.load_adapter("lora", adapter_dirs["lora_v2"], replace=True)
        tokens, logprobs, hits = generate("lora")
        assert hits == 0 and tokens == v2_ref.token_ids
        assert_logprobs_close(logprobs, v2_ref.logprobs)
        queries = _value(server, "deltaserve_prefix_cache_queries_total")
        assert queries >= 7 * len(prompt_ids)


def test_without_prefix_caching_nothing_is_reused(long_dir, long_prompt):
    config = ServerConfig.of(model=long_dir, max_batch_size=2, max_seq_len=1200, prefix_caching=False)
    with ServerThread(config) as server, Client(server.target, timeout=120) as client:
        first = client.generate(long_prompt, max_new_tokens=4)
        second = client.generate(long_prompt, max_new_tokens=4)
        assert first.token_ids == second.token_ids
        assert _value(server, "deltaserve_prefix_cache_hits_total") == 0
        assert _value(server, "deltaserve_kv_cache_blocks", state="cached") == 0


# ---- chunked prefill -----------------------------------------------------------------------------------
def test_a_long_prompt_is_prefilled_in_chunks_while_streams_keep_decoding(long_dir):
    """The bound: between two tokens of a decoding stream the engine runs at most one prefill forward of at
    most --max-prefill-tokens tokens and one decode forward. Counted in forwards, not seconds (no timing)."""
    budget = 128
    config = ServerConfig.of(model=long_dir, max_batch_size=16, max_seq_len=2300, max_prefill_tokens=budget)
    tokenizer = AutoTokenizer.from_pretrained(long_dir)
    long_prompt = " ".join(WORDS[(i * 3) % len(WORDS)] for i in range(2000))
    long_ids = tokenizer(long_prompt)["input_ids"]
    assert len(long_ids) >= 2000
    with ServerThread(config) as server, Client(server.target, timeout=300) as client:
        runner = server.server.runner
        events: list[tuple[str, int]] = []  # ("prefill", tokens) or ("decode", rows), in engine order
        prefill, decode = runner.prefill, runner.decode

        def recording_prefill(chunks, batch):
            events.append(("prefill", sum(len(c.token_ids) for c in chunks)))
            return prefill(chunks, batch)

        def recording_decode(input_ids, positions, tables, batch):
            events.append(("decode", int(input_ids.shape[0])))
            return decode(input_ids, positions, tables, batch)

        runner.prefill, runner.decode = recording_prefill, recording_decode
        streams_started = threading.Barrier(9)
        stream_tokens: list[int] = []

        def stream(index: int) -> int:
            count = 0
            for chunk in client.generate_stream(_prompt(index, 8), max_new_tokens=120, min_new_tokens=120):
                count += len(chunk.token_ids)
                if count == 1:
                    streams_started.wait()
            return count

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream, i) for i in range(8)]
            streams_started.wait()  # all 8 decode before the long prompt arrives
            long_result = client.generate(long_prompt, max_new_tokens=2)
            stream_tokens = [f.result() for f in futures]
        assert stream_tokens == [120] * 8 and long_result.generated_tokens == 2
        assert all(tokens <= budget for kind, tokens in events if kind == "prefill")
        # While the long prompt was prefilled (its chunks), every prefill forward was followed by a decode step
        # of the 8 streams before the next one: no stream waited for more than one chunk.
        long_chunks = [i for i, (kind, tokens) in enumerate(events) if kind == "prefill" and tokens == budget]
        assert len(long_chunks) >= len(long_ids) // budget - 1
        for before, after in itertools.pairwise(long_chunks):
            assert any(kind == "decode" and rows >= 8 for kind, rows in events[before + 1 : after])


# ---- decode attention kernels ---------------------------------------------------------------------------
def _paged_case(device: str, dtype: torch.dtype, block_size: int, rows: int = 5, heads: int = 8, kv_heads: int = 2):
    """Random pools, block tables of distinct shuffled blocks (block 0 left as padding) and row lengths."""
    generator = torch.Generator().manual_seed(7)
    head_dim, per_row = 64, 3
    num_blocks = 1 + rows * per_row
    pools = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator) for _ in range(2)]
    blocks = (torch.randperm(num_blocks - 1, generator=generator) + 1).view(rows, per_row)
    positions = torch.randint(0, per_row * block_size, (rows,), generator=generator)
    q = torch.randn(rows, heads, 1, head_dim, generator=generator)
    to = {"device": device, "dtype": dtype}
    return q.to(**to), pools[0].to(**to), pools[1].to(**to), blocks.to(device), positions.to(device)


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (None, 2.0), (5, 1.5)])
def test_torch_paged_decode_attention_equals_attention_over_each_rows_own_entries(window, softcap):
    """Each row attends over its own entries up to its position, inside its sliding window, with softcapped
    scores: the definition, computed row by row."""
    q, keys, values, tables, positions = _paged_case("cpu", torch.float32, block_size=4)
    out = torch_decode_attention(tables, positions, 4)(q, keys, values, 0.125, window, softcap)
    for row in range(q.shape[0]):
        length = int(positions[row]) + 1
        first = 0 if window is None else max(0, length - window)
        row_keys = keys[tables[row]].reshape(-1, keys.shape[2], keys.shape[3])[first:length].transpose(0, 1)
        row_values = values[tables[row]].reshape(-1, keys.shape[2], keys.shape[3])[first:length].transpose(0, 1)
        groups = q.shape[1] // keys.shape[2]
        scores = q[row] @ row_keys.repeat_interleave(groups, 0).transpose(1, 2) * 0.125  # [heads, 1, n]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        expected = scores.softmax(-1) @ row_values.repeat_interleave(groups, 0)
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-6)


def test_gather_buffers_kept_across_forwards_give_what_fresh_copies_give():
    q, keys, values, tables, positions = _paged_case("cpu", torch.float32, block_size=4)
    buffers = GatherBuffers(torch.float32, torch.device("cpu"))
    for rows, width in ((5, 3), (2, 2), (5, 3)):  # larger, then smaller (a view of the same buffer), then larger
        part_tables, part_positions = tables[:rows, :width], positions[:rows].clamp(max=width * 4 - 1)
        fresh = torch_decode_attention(part_tables, part_positions, 4)(q[:rows], keys, values, 0.125, None, None)
        kept = torch_decode_attention(part_tables, part_positions, 4, buffers)(
            q[:rows], keys, values, 0.125, None, None
        )
        torch.testing.assert_close(kept, fresh, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (300, None), (None, 30.0)])
def test_flash_attn_paged_decode_matches_the_torch_path(window, softcap):
    reason = flash_unavailable(256, torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    q, keys, values, tables, positions = _paged_case("cuda", torch.bfloat16, block_size=256)
    expected = torch_decode_attention(tables, positions, 256)(q, keys, values, 0.125, window, softcap)
    actual = flash_decode_attention(tables, positions, 256)(q, keys, values, 0.125, window, softcap)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
