"""Every adapter kind through a real gRPC server: each alone against PEFT (or the AdapterHub definition for
bottlenecks), all of them mixed in one continuously batched run, stacks against their reference composition,
and the refusals."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread, make_tiny_llama
from deltaserve.testing.kinds import (
    BOTTLENECK_PRESETS,
    PEFT_KINDS,
    BottleneckReference,
    make_biased_lora,
    make_bottleneck,
    make_peft_adapter,
)
from safetensors.torch import load_file, save_file

from tests.references import (
    assert_logprobs_close,
    greedy_reference,
    load_reference_model,
    prompt_logits,
    reference_model,
    reference_table,
    soft_prompt_greedy,
    tokenizer_for,
)

MAX_NEW = 10
EXPECTED_KIND = {
    "dora": "dora",
    "adalora": "adalora",
    "ia3": "ia3",
    "prefix": "prefix_tuning",
    "prefix_projected": "prefix_tuning",
    "prompt": "prompt_tuning",
    "ptuning": "p_tuning",
    "lora16": "lora",
    "houlsby": "bottleneck",
    "pfeiffer": "bottleneck",
    "parallel": "bottleneck",
}


@pytest.fixture(scope="module")
def kind_dirs(tmp_path_factory, tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kinds")
    dirs = {name: make_peft_adapter(tiny_dir, str(root / name), name, seed=10 + i) for i, name in enumerate(PEFT_KINDS)}
    for i, preset in enumerate(BOTTLENECK_PRESETS):
        dirs[preset] = make_bottleneck(tiny_dir, str(root / preset), preset, seed=40 + i)
    return dirs


@pytest.fixture(scope="module")
def references(tiny_dir, kind_dirs):
    return reference_table(tiny_dir, kind_dirs, PROMPTS, MAX_NEW)


@pytest.fixture(scope="module")
def server(tiny_dir, kind_dirs):
    config = ServerConfig.of(
        model=tiny_dir, max_batch_size=8, max_seq_len=128, max_adapters=len(kind_dirs) + 3, max_lora_rank=16
    )
    with ServerThread(config) as running:
        with Client(running.target, timeout=120) as client:
            for name, path in kind_dirs.items():
                client.load_adapter(name, path)
        yield running


def _generate(target: str, prompt_index: int, **adapter):
    with Client(target, timeout=120) as client:
        return client.generate(PROMPTS[prompt_index], max_new_tokens=MAX_NEW, logprobs=True, **adapter)


def test_every_kind_changes_the_output(references, kind_dirs):
    """Guards the comparisons below against passing vacuously."""
    for name in kind_dirs:
        assert any(references[name, i].token_ids != references["", i].token_ids for i in range(len(PROMPTS))), name


def test_list_reports_each_kind(server, kind_dirs):
    with Client(server.target) as client:
        listed = {info.adapter_id: info for info in client.list_adapters()}
    for name in kind_dirs:
        assert listed[name].kind == EXPECTED_KIND[name]
    assert listed["prefix"].virtual_tokens == 5 and listed["prompt"].virtual_tokens == 6
    # AdaLoRA serves the ranks that survived pruning, as the saved rank_pattern lists them.
    pattern = json.loads((Path(kind_dirs["adalora"]) / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(map(sum, pattern.values())) < PEFT_KINDS["adalora"][1]["init_r"] * len(pattern)
    assert listed["adalora"].rank == max(map(sum, pattern.values()))
    assert listed["lora16"].mergeable and not listed["dora"].mergeable and not listed["ia3"].mergeable


@pytest.mark.parametrize("name", list(EXPECTED_KIND))
def test_each_kind_alone_equals_its_reference(server, references, name):
    for i in range(len(PROMPTS)):
        result = _generate(server.target, i, adapter_id=name)
        assert result.token_ids == references[name, i].token_ids, (name, i)
        assert_logprobs_close(result.logprobs, references[name, i].logprobs)


def test_every_kind_in_one_mixed_batch(server, references, kind_dirs):
    """All kinds and the base at once, more requests than rows: each row gets exactly what it gets alone."""
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in ["", *kind_dirs]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _generate(server.target, job[1], adapter_id=job[0]), jobs))
    for (name, i), result in zip(jobs, results, strict=True):
        assert result.token_ids == references[name, i].token_ids, (name, i)
        assert_logprobs_close(result.logprobs, references[name, i].logprobs, rtol=1e-4, atol=1e-5)


def test_prompt_logprobs_of_every_kind_equal_its_reference_forward(server, tiny_dir, kind_dirs):
    """Every kind scores its prompt exactly as its oracle's forward does (a soft prompt in front where it has
    one), in one mixed batch where half the rows also generate: each prompt token's log-probability, rank and
    top 3."""
    tokenizer = tokenizer_for(tiny_dir)
    names = ["", *kind_dirs]
    jobs = [(name, i, (i + len(name)) % 2 * 3) for i in range(2) for name in names]

    def score(job):
        name, i, generate = job
        with Client(server.target, timeout=120) as client:
            ids = tokenizer(PROMPTS[i])["input_ids"]
            return client.generate(
                prompt_token_ids=ids, adapter_id=name, max_new_tokens=generate, prompt_logprobs=3
            ), ids

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(score, jobs))
    models = {name: reference_model(tiny_dir, name, kind_dirs) for name in names}
    for (name, _, generate), (result, ids) in zip(jobs, results, strict=True):
        expected = prompt_logits(models[name], ids).log_softmax(-1)  # position p predicts token p + 1
        scored = result.prompt_logprobs
        assert [p.token_id for p in scored] == ids and scored[0].logprob is None
        assert len(result.token_ids) == generate
        chosen = [expected[p - 1, ids[p]].item() for p in range(1, len(ids))]
        assert_logprobs_close([p.logprob for p in scored[1:]], chosen)
        for p, position in enumerate(scored[1:], start=1):
            assert [t for t, _ in position.top] == expected[p - 1].topk(3).indices.tolist(), (name, p)
            # the rank counts more likely tokens: those within float noise of the chosen one may go either way
            row, value = expected[p - 1], expected[p - 1, ids[p]]
            assert int((row > value + 1e-4).sum()) + 1 <= position.rank <= int((row > value - 1e-4).sum()) + 1


# ---- stacks --------------------------------------------------------------------------------------------
STACKS = [("prefix", "lora16"), ("ia3", "lora16"), ("prefix", "ia3", "lora16"), ("prompt", "houlsby")]


def stack_reference_model(model_dir: str, dirs: dict[str, str], members: tuple[str, ...]):
    """The stated composition rule built from PEFT pieces: IA3 merged into the base (scales rescale the base
    projection only), PEFT's LoRA on top (deltas add), the bottleneck definition by hooks."""
    from peft import PeftModel

    model = load_reference_model(model_dir)
    if "ia3" in members:
        model = PeftModel.from_pretrained(model, dirs["ia3"]).merge_and_unload()
    if "houlsby" in members:
        model = BottleneckReference(model, dirs["houlsby"]).model
    if "lora16" in members:
        model = PeftModel.from_pretrained(model, dirs["lora16"])
    return model.eval()


@pytest.mark.parametrize("members", STACKS, ids="+".join)
def test_stack_equals_the_reference_composition(server, tiny_dir, kind_dirs, references, members):
    tokenizer = tokenizer_for(tiny_dir)
    model = stack_reference_model(tiny_dir, kind_dirs, members)
    soft = next((m for m in members if m in ("prefix", "prompt")), None)
    soft_model = load_reference_model(tiny_dir, kind_dirs[soft]) if soft else None
    differs = set()
    for i in range(2):
        ids = tokenizer(PROMPTS[i])["input_ids"]
        if soft_model is not None:
            expected_ids, expected_logprobs = soft_prompt_greedy(model, soft_model, ids, MAX_NEW)
        else:
            expected = greedy_reference(model, tokenizer, ids, MAX_NEW)
            expected_ids, expected_logprobs = expected.token_ids, expected.logprobs
        result = _generate(server.target, i, adapter_stack=list(members))
        assert result.token_ids == expected_ids, (members, i)
        assert_logprobs_close(result.logprobs, expected_logprobs)
        differs |= {member for member in members if result.token_ids != references[member, i].token_ids}
    assert differs == set(members)  # not vacuous: the stack is none of its members alone
    with Client(server.target) as client:
        listed = {info.adapter_id: info for info in client.list_adapters()}
    assert listed["stack|" + "|".join(members)].kind == "stack"


# ---- refusals ------------------------------------------------------------------------------------------
def _error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(DeltaserveError) as info:
        call()
    return info.value.code, info.value.message


def _copy_with(src: str, dst: Path, config_changes: dict | None = None, tensor_change=None) -> str:
    path = shutil.copytree(src, dst)
    if config_changes:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    if tensor_change:
        weights = path / "adapter_model.safetensors"
        save_file(tensor_change(load_file(weights)), weights)
    return str(path)


def test_refusals_name_the_problem_and_leave_nothing_behind(server, kind_dirs, tmp_path):
    with Client(server.target, timeout=60) as client:
        before = sorted(info.adapter_id for info in client.list_adapters())

        loha = _copy_with(kind_dirs["lora16"], tmp_path / "loha", {"peft_type": "LOHA"})
        code, message = _error(lambda: client.load_adapter("loha", loha))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'LOHA' is not served" in message
        assert all(kind in message for kind in ("dora", "ia3", "prefix_tuning", "prompt_tuning", "bottleneck"))

        def poison(tensors):
            key = sorted(tensors)[0]
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("nan")
            return tensors

        nan = _copy_with(kind_dirs["ia3"], tmp_path / "nan", tensor_change=poison)
        code, message = _error(lambda: client.load_adapter("nan", nan))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in message and "ia3_l" in message

        rows = _copy_with(
            kind_dirs["prompt"], tmp_path / "rows", tensor_change=lambda t: {k: v[:-1] for k, v in t.items()}
        )
        code, message = _error(lambda: client.load_adapter("rows", rows))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_embeddings" in message

        flat = _copy_with(
            kind_dirs["ia3"], tmp_path / "flat", tensor_change=lambda t: {k: v.repeat(2, 2) for k, v in t.items()}
        )
        code, message = _error(lambda: client.load_adapter("flat", flat))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "ia3_l" in message and "vector" in message

        # A prompt that fits the 128-token context alone, but not after the prefix adapter's 5 entries.
        long_prompt = next(
            p for p in (" ".join(["word"] * n) for n in range(100, 200)) if len(client.tokenize(p).token_ids) >= 124
        )
        assert len(client.tokenize(long_prompt).token_ids) < 128
        code, message = _error(lambda: client.generate(long_prompt, adapter_id="prefix", max_new_tokens=1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "5 prefix/virtual tokens" in message
        code, message = _error(lambda: client.generate(PROMPTS[0], adapter_id="prompt", max_new_tokens=125))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not fit" in message

        code, message = _error(lambda: client.generate(PROMPTS[0], adapter_stack=["houlsby", "pfeiffer"]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "at most one bottleneck" in message
        code, message = _error(lambda: client.generate(PROMPTS[0], adapter_stack=["prefix", "missing"]))
        assert code == grpc.StatusCode.NOT_FOUND and "missing" in message
        code, message = _error(lambda: client.generate(PROMPTS[0], adapter_stack=["prefix", "prefix"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "twice" in message
        code, message = _error(lambda: client.generate(PROMPTS[0], adapter_id="ia3", adapter_stack=["prefix"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter_stack" in message
        code, message = _error(lambda: client.generate(PROMPTS[0], adapter_mix={"ia3": 1.0, "lora16": 1.0}))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cannot be mixed" in message
        code, message = _error(lambda: client.merge_adapter("dora"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cannot be merged" in message

        after = sorted(info.adapter_id for info in client.list_adapters() if "|" not in info.adapter_id)
        assert after == [name for name in before if "|" not in name]  # nothing half-loaded, nothing lost
        assert client.model_info().merged_adapter_id == ""
        assert client.generate(PROMPTS[0], adapter_id="prefix", max_new_tokens=2).generated_tokens == 2


# ---- other bases ---------------------------------------------------------------------------------------
def _serve_and_compare(model_dir: str, dirs: dict[str, str], prompts: list[str], max_new: int, **config) -> None:
    """Every adapter (and the base) on every prompt, all submitted at once to one server: each row must equal
    its reference computed alone; each adapter must change the output somewhere."""
    expected = reference_table(model_dir, dirs, prompts, max_new)
    for name in dirs:
        assert any(expected[name, i].token_ids != expected["", i].token_ids for i in range(len(prompts))), name
    server_config = ServerConfig.of(model=model_dir, max_batch_size=8, max_adapters=len(dirs) + 1, **config)
    with ServerThread(server_config) as running, Client(running.target, timeout=300) as client:
        for name, path in dirs.items():
            client.load_adapter(name, path)
        jobs = [(name, i) for i in range(len(prompts)) for name in ["", *dirs]]

        def run(job):
            return client.generate(prompts[job[1]], adapter_id=job[0], max_new_tokens=max_new, logprobs=True)

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
    for job, result in zip(jobs, results, strict=True):
        assert result.token_ids == expected[job].token_ids, job
        assert_logprobs_close(result.logprobs, expected[job].logprobs)


def test_trained_biases_and_dora_on_a_base_with_biases(tmp_path_factory, smol_dir):
    """Qwen2 has q/k/v biases: BitFit-style trained biases, lora_bias, DoRA's bias correction and IA3 scaling a
    biased output all meet them."""
    root = tmp_path_factory.mktemp("qwen")
    model_dir = make_tiny_llama(str(root / "model"), smol_dir, family="Qwen2")
    dirs = {
        "biased": make_biased_lora(model_dir, str(root / "biased"), seed=3),
        "dora": make_peft_adapter(model_dir, str(root / "dora"), "dora", seed=4),
        "ia3": make_peft_adapter(model_dir, str(root / "ia3"), "ia3", seed=5),
    }
    saved = load_file(f"{dirs['biased']}/adapter_model.safetensors")
    assert any(key.endswith("k_proj.bias") for key in saved) and any("lora_B.bias" in key for key in saved)
    _serve_and_compare(model_dir, dirs, PROMPTS[:2], MAX_NEW, max_seq_len=128, max_lora_rank=8)


LOUD = ("adalora", "ia3")


def test_every_kind_on_the_embedded_model(tmp_path_factory, smol_dir):
    root = tmp_path_factory.mktemp("smol_kinds")
    dirs = {
        # Scaling vectors near 1 and AdaLoRA's product of three random factors need larger noise to show.
        name: make_peft_adapter(smol_dir, str(root / name), name, seed=20 + i, scale=0.3 if name in LOUD else 0.05)
        for i, name in enumerate(["dora", "adalora", "ia3", "prefix", "ptuning"])
    }
    # Random virtual tokens barely steer a trained model; start them from a real instruction, as users do.
    dirs["prompt"] = make_peft_adapter(
        smol_dir,
        str(root / "prompt"),
        "prompt",
        seed=30,
        scale=0.01,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Answer only in French, with exclamation marks!",
        tokenizer_name_or_path=smol_dir,
    )
    for i, preset in enumerate(BOTTLENECK_PRESETS):
        # SmolLM2's residual stream is large: a parallel adapter reading it needs small weights not to overflow.
        dirs[preset] = make_bottleneck(
            smol_dir, str(root / preset), preset, seed=50 + i, reduction_factor=16, scale=0.02
        )
    _serve_and_compare(smol_dir, dirs, PROMPTS[:2], 8, max_seq_len=256, max_lora_rank=8)


def test_an_overflowing_adapter_does_not_poison_later_rows(server, kind_dirs, references, tmp_path):
    """Finite weights can still overflow (here bottleneck biases near the float32 maximum, added twice per
    layer): that request fails alone (FAILED_PRECONDITION), and its cache row is left full of inf/NaN. The
    row's next occupant, decoding beside a longer request, must not see any of it through the masked
    positions of its attention."""
    huge = shutil.copytree(kind_dirs["houlsby"], tmp_path / "huge")
    tensors = load_file(huge / "adapter.safetensors")
    tensors = {k: torch.full_like(v, 3e38) if k.endswith("adapter_up.bias") else v for k, v in tensors.items()}
    save_file(tensors, huge / "adapter.safetensors")
    long_prompt = PROMPTS[1] * 6
    with Client(server.target, timeout=120) as client:
        client.load_adapter("overflow", str(huge))
        try:
            code, message = _error(lambda: client.generate(long_prompt, adapter_id="overflow", max_new_tokens=MAX_NEW))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "not finite" in message  # it really overflows
            with ThreadPoolExecutor(2) as pool:
                short = pool.submit(_generate, server.target, 0)  # sorted first: it takes the poisoned row
                pool.submit(lambda: client.generate(long_prompt, max_new_tokens=MAX_NEW)).result()
                result = short.result()
        finally:
            client.unload_adapter("overflow")
    assert result.token_ids == references["", 0].token_ids
    assert_logprobs_close(result.logprobs, references["", 0].logprobs)


def test_every_kind_while_a_lora_is_merged(server, references, kind_dirs):
    """With lora16 folded into the base weights, every other kind still sees the original base (the merged
    delta is subtracted for its rows), and an adapter loaded meanwhile (DoRA, whose norms read the base
    weights) is computed against the original weights, not the merged ones."""
    with Client(server.target, timeout=120) as client:
        client.merge_adapter("lora16")
        try:
            client.load_adapter("dora_late", kind_dirs["dora"])
            jobs = [(name, i) for i in range(2) for name in ["", "lora16", *EXPECTED_KIND]]
            with ThreadPoolExecutor(len(jobs)) as pool:
                results = list(pool.map(lambda job: _generate(server.target, job[1], adapter_id=job[0]), jobs))
            late = _generate(server.target, 0, adapter_id="dora_late")
        finally:
            client.unmerge_adapter()
            client.unload_adapter("dora_late")
    for job, result in zip(jobs, results, strict=True):
        assert result.token_ids == references[job].token_ids, job
        assert_logprobs_close(result.logprobs, references[job].logprobs, rtol=1e-4, atol=1e-4)
    assert late.token_ids == references["dora", 0].token_ids
    assert_logprobs_close(late.logprobs, references["dora", 0].logprobs, rtol=1e-4, atol=1e-4)
