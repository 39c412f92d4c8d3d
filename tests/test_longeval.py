"""eval-long: stream evaluation, the CLI, gate training; on SmolLM2, the StreamingLLM failure and memory's recovery."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lm.gate import Gate
from lm.gate_training import plot_curve, train_gate
from lm.generate import encode_prompt
from lm.longeval import (
    PASSCODE_NEEDLE,
    PASSCODE_QUESTION,
    answer,
    evaluate_files,
    evaluate_stream,
    needle_prompt,
    read_tokens,
)
from lm.memory_attention import KnnConfig
from lm.model import load_tokenizer, tiny_llama
from lm.policies import Full, Window
from memsvc.contract import InvalidInput, NotFound

DOCS = "/usr/share/doc/python3.11/html/_sources/library"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(num_layers=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 2000, (1, 80), generator=torch.Generator().manual_seed(3))


def test_full_policy_losses_are_the_models_own(tiny, ids):
    model, _ = tiny
    result = evaluate_stream(model, ids, Full())
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    assert torch.allclose(torch.from_numpy(result.nll), expected, atol=1e-5)
    assert result.perplexity(skip=10) == pytest.approx(math.exp(expected[10:].mean().item()), rel=1e-5)
    assert result.peak_cache_entries == ids.shape[1] - 1


def test_window_losses_are_those_of_token_by_token_decoding(tiny, ids):
    from lm.cache import BoundedCache

    model, _ = tiny
    policy = Window(8, 2)
    result = evaluate_stream(model, ids, policy, knn=KnnConfig(blocks=0, k=4))
    assert result.peak_cache_entries == policy.budget
    losses = []
    cache = BoundedCache(model, policy)
    from lm.attention import attach

    with attach(model, cache, KnnConfig(blocks=0, k=4)), torch.inference_mode():
        for i in range(ids.shape[1] - 1):
            logits = model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits[0, -1]
            losses.append(torch.nn.functional.cross_entropy(logits, ids[0, i + 1]))
    assert torch.allclose(torch.from_numpy(result.nll), torch.stack(losses), atol=1e-5)


def test_evaluate_files_pools_files_and_checks_them_first(tiny, tmp_path):
    model, tokenizer = tiny
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    b.write_text("import os\nprint(os.getcwd())\n" * 10)
    result = evaluate_files(model, tokenizer, [a, b], Window(8, 2), max_tokens=50, skip=10)
    assert result["tokens"] == 2 * (49 - 10)
    assert result["peak_cache_entries"] == 10 and result["tokens_per_s"] > 0
    assert [f["tokens"] for f in result["files"]] == [49, 49]
    assert math.isfinite(result["perplexity"])
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    for bad, error in [([a, tmp_path / "missing.txt"], NotFound), ([a, tmp_path / "bin"], InvalidInput), ([], InvalidInput)]:
        with pytest.raises(error):
            evaluate_files(model, tokenizer, bad, Window(8, 2))
    with pytest.raises(InvalidInput):
        evaluate_files(model, tokenizer, [a], Window(8, 2), max_tokens=1)


def test_evaluate_files_refuses_a_run_that_scores_no_token(tiny, tmp_path):
    """A run whose streams all end within `skip` would print perplexity NaN over 0 tokens: refused first."""
    model, tokenizer = tiny
    a = tmp_path / "a.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    n = len(tokenizer(a.read_text()).input_ids)
    assert evaluate_files(model, tokenizer, [a], Window(8, 2), max_tokens=50, skip=48)["tokens"] == 1
    no_room = "max_tokens {} leaves no token to score past the first {} (skip): give max_tokens of at least {}, or " \
        "a smaller skip"
    too_short = "no token to score past the first {} (skip): the longest file has {} tokens; give a smaller skip or " \
        "longer files"
    for max_tokens, skip, message in [(50, 49, no_room.format(50, 49, 51)), (2, 256, no_room.format(2, 256, 258)),
                                      (None, n - 1, too_short.format(n - 1, n)),
                                      (None, 10_000, too_short.format(10_000, n))]:
        with pytest.raises(InvalidInput) as err:
            evaluate_files(model, tokenizer, [a], Window(8, 2), max_tokens=max_tokens, skip=skip)
        assert err.value.message == message, (max_tokens, skip)


def test_gate_training_moves_the_gate_and_records_a_curve(tiny, ids, tmp_path):
    model, _ = tiny
    initial = Gate.initial(model)
    gate, curve = train_gate(model, [ids], window=8, sinks=2, k=4, positions="absolute", epochs=2, lr=0.1)
    blocks = len(curve) // 2  # every 10-token block of the 79 streamed has tokens past the window
    assert blocks == 8 and [c["epoch"] for c in curve] == [0] * blocks + [1] * blocks
    assert all(math.isfinite(point["loss"]) for point in curve) and len(gate.meta["epoch_loss"]) == 2
    assert not torch.equal(gate.bias, initial.bias) and not torch.equal(gate.log_scale, initial.log_scale)
    assert not any(p.requires_grad for p in model.parameters())
    plot_curve(curve, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model saved as a local Hugging Face directory, for the CLI's --model."""
    path = tmp_path_factory.mktemp("tiny")
    tiny[0].save_pretrained(path)
    tiny[1].save_pretrained(path)
    return path


def cli(*args):
    import typer

    from memsvc.cli.longctx import eval_long, train_gate

    app = typer.Typer()
    app.command("eval-long")(eval_long)
    app.command("train-gate")(train_gate)
    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_long_cli_prints_one_json_object(tiny_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("def f(x):\n    return x + 1\n" * 20)
    run = cli("eval-long", doc, "--policy", "sinks", "--window", 8, "--sinks", 2, "--knn-memory", "--k", 4, "--layers", "1",
              "--skip", 10, "--model", tiny_dir, "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert {"perplexity", "tokens", "peak_cache_entries", "tokens_per_s"} <= set(result)
    assert result["peak_cache_entries"] == 10 and result["knn_memory"]["layers"] == [1]


@pytest.mark.parametrize("args, message", [
    (["--window", 0], "window must be a positive integer"),
    (["--window", 8, "--sinks", 9], "must not exceed the window"),
    (["--policy", "lru"], "valid policies: full, window, sinks"),
    (["--policy", "window", "--sinks", 4], "no sinks"),
    (["--knn-memory", "--layers", "0,7"], "unknown layer index 7"),
    (["--knn-memory", "--layers", "x"], "comma-separated integers"),
    (["--max-tokens", 1], "max_tokens must be at least 2"),
    (["--max-tokens", 40], "max_tokens 40 leaves no token to score past the first 256 (skip)"),
    (["--max-tokens", 11, "--skip", 10], "max_tokens 11 leaves no token to score past the first 10 (skip)"),
    (["--skip", 500], "no token to score past the first 500 (skip): the longest file has"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_eval_long_cli_rejects_bad_input(tiny_dir, tmp_path, args, message):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world " * 200)  # more tokens than the default skip (256)
    run = cli("eval-long", doc, "--model", tiny_dir, *args)
    assert run.exit_code == 2 and message in run.stderr


def test_train_gate_cli_writes_loadable_parameters_and_a_curve(tiny_dir, tmp_path):
    from lm.gate import Gate

    doc = tmp_path / "doc.txt"
    doc.write_text("class A:\n    def f(self):\n        return 1\n" * 12)
    run = cli("train-gate", doc, "--out", tmp_path / "gate.json", "--epochs", 1, "--window", 8, "--sinks", 2,
              "--k", 4, "--curve", tmp_path / "curve.png", "--model", tiny_dir)
    assert run.exit_code == 0, run.output
    gate = Gate.load(tmp_path / "gate.json")
    assert gate.bias.shape == (2, 4) and len(gate.meta["curve"]) == gate.meta["steps"] > 0
    assert (tmp_path / "curve.png").stat().st_size > 0
    bad = cli("train-gate", doc, "--out", tmp_path / "g2.json", "--window", 4, "--sinks", 8, "--model", tiny_dir)
    assert bad.exit_code == 2 and "must not exceed the window" in bad.stderr and not (tmp_path / "g2.json").exists()


def test_train_gate_cli_fits_block_memorys_bias_and_eval_long_uses_it(tiny_dir, tmp_path):
    from lm.gate import MemoryBias

    doc = tmp_path / "doc.txt"
    doc.write_text("class A:\n    def f(self):\n        return 1\n" * 12)
    run = cli("train-gate", doc, "--out", tmp_path / "bias.json", "--epochs", 1, "--window", 8, "--sinks", 2,
              "--memory-blocks", 4, "--model", tiny_dir)
    assert run.exit_code == 0, run.output
    bias = MemoryBias.load(tmp_path / "bias.json")
    assert bias.bias.shape == (2, 4) and bias.bias.abs().min() > 0  # lr 0.1: every head moved from 0
    assert bias.meta["memory_blocks"] == 4 and len(bias.meta["curve"]) == bias.meta["steps"] > 0
    common = [doc, "--window", 8, "--sinks", 2, "--knn-memory", "--memory-blocks", 4, "--skip", 10, "--model",
              tiny_dir, "--json"]
    joint = json.loads(cli("eval-long", *common).stdout)
    gated = cli("eval-long", *common, "--memory-mode", "gated", "--gate", tmp_path / "bias.json")
    assert gated.exit_code == 0, gated.output
    gated = json.loads(gated.stdout)
    assert gated["knn_memory"]["mode"] == "gated" and gated["knn_memory"]["blocks"] == 4
    assert gated["perplexity"] != joint["perplexity"]


# --- SmolLM2 on a real Python docs page ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from lm.model import load_model

    return load_model()


@pytest.mark.slow
def test_window_without_sinks_fails_the_streamingllm_way_and_memory_recovers(smollm2):
    """On 1K tokens of real docs: window alone is worst, sinks fix most of it, kNN memory recovers part of the rest.
    (Perplexities past token 128 at 1K: full 10.0, window 27.2, sinks 12.0, memory 10.2.)"""
    model, tokenizer = smollm2
    ids = read_tokens(tokenizer, f"{DOCS}/heapq.rst.txt", 1024)
    ppl = {name: evaluate_stream(model, ids, policy, knn=knn).perplexity(skip=128) for name, policy, knn in [
        ("full", Full(), None), ("window", Window(128), None), ("sinks", Window(128, 4), None),
        ("memory", Window(128, 4), KnnConfig(blocks=0, k=32))]}
    assert ppl["window"] > 1.2 * ppl["sinks"]  # the StreamingLLM failure
    assert ppl["full"] < ppl["memory"] < ppl["sinks"]
    assert (ppl["sinks"] - ppl["memory"]) / (ppl["sinks"] - ppl["full"]) > 0.5


@pytest.mark.slow
def test_needle_is_found_through_memory_but_not_by_the_window_alone(smollm2):
    """A passphrase planted 60% into 1.2K tokens of a docs page, asked at the end, some 500 tokens after it;
    window 256 + 4 sinks alone cannot see it, kNN memory brings it back (prefill in exact blocks, then the one
    decoding loop). bench/bench_longctx.py needle runs the longer haystacks (3K, 8K, 12K)."""
    model, tokenizer = smollm2
    haystack = Path(DOCS, "heapq.rst.txt").read_text()
    prompt = needle_prompt(tokenizer, haystack, 1200, 0.6, "tangerine-47")
    assert prompt.shape[1] > 1200
    assert "tangerine" in tokenizer.decode(prompt[0, :-500]) and "tangerine" not in tokenizer.decode(prompt[0, -500:])
    assert "tangerine-47" not in answer(model, tokenizer, prompt, Window(256, 4))
    assert "tangerine-47" in answer(model, tokenizer, prompt, Window(256, 4), knn=KnnConfig(blocks=0, k=32))


@pytest.fixture
def bench_longctx(monkeypatch, tmp_path):
    """bench/bench_longctx.py as a module, its model loader refusing (bad options must fail before the model loads)
    and its results folder in tmp_path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_longctx", Path(__file__).parents[1] / "bench/bench_longctx.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_longctx", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


@pytest.mark.parametrize("args, message", [
    (["--kind", "passcodes"], "unknown kind 'passcodes'; known: passphrase, passcode"),
    (["--depths", "0.5,1.5"], "depths must be in [0, 1], got 0.5,1.5"),
    (["--depths", "-0.1"], "depths must be in [0, 1], got -0.1"),
    (["--depths", "half"], "depths must be in [0, 1], got half"),
    (["--lengths", "16000,16K"], "lengths must be whole numbers of tokens > 0, got 16000,16K"),
    (["--lengths", "0"], "lengths must be whole numbers of tokens > 0, got 0"),
    (["--page", "no-such-page"], "no docs page 'no-such-page'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--kind", "passcode", "--merge", "--out", "saved"], "saved.json holds trials of another kind than 'passcode'"),
])
def test_bench_needle_rejects_bad_options_before_loading_the_model(bench_longctx, tmp_path, args, message):
    (tmp_path / "saved.json").write_text(json.dumps({"page": "multiprocessing", "rows": [
        {"setting": "memory", "length": 1000, "depth": 0.1, "word": "tangerine-47", "correct": True}]}))
    result = CliRunner().invoke(bench_longctx.app, ["needle", "--settings", "memory", "--lengths", "1000", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize("lengths", ["1024,4K", "-1024", ""])
def test_bench_decode_rejects_bad_lengths_before_loading_the_model(bench_longctx, lengths):
    result = CliRunner().invoke(bench_longctx.app, ["decode", "--settings", "sinks", "--lengths", lengths])
    assert result.exit_code == 2, result.output
    assert f"lengths must be whole numbers of tokens > 0, got {lengths}" in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--kind", "passcodes"], "unknown kind 'passcodes'; known: passphrase, passcode"),
    (["--page", "no-such-page"], "no docs page 'no-such-page'"),
    (["--depth", "1.5"], "Invalid value for '--depth': Input should be less than or equal to 1"),
    (["--length", "0"], "Invalid value for '--length': Input should be greater than or equal to 1"),
])
def test_bench_prompt_rejects_bad_options_before_loading_the_tokenizer(bench_longctx, monkeypatch, tmp_path, args,
                                                                       message):
    monkeypatch.setattr(bench_longctx, "load_tokenizer", bench_longctx.load_model)  # refuses
    result = CliRunner().invoke(bench_longctx.app, ["prompt", str(tmp_path / "p.txt"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "p.txt").exists()


@pytest.mark.parametrize("depth, word", [(0.3, "2956"), (0.9, "1529")])
def test_bench_prompt_writes_the_needle_trial_that_memsvc_generate_runs(bench_longctx, tmp_path, depth, word):
    """The text file, wrapped by the chat template as `memsvc generate --prompt-file` does, is token for token the
    prompt `bench_longctx.py needle --kind passcode` answers."""
    out = tmp_path / "needle.txt"
    result = CliRunner().invoke(bench_longctx.app, ["prompt", str(out), "--length", "1500", "--depth", str(depth)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert f"The secret passcode is {word}." in text and text.endswith(PASSCODE_QUESTION)
    lines = text.split("\n")
    assert abs(lines.index(f"The secret passcode is {word}.") / len(lines) - depth) < 0.02
    tokenizer = load_tokenizer()
    haystack = Path(DOCS, "multiprocessing.rst.txt").read_text()
    expected = needle_prompt(tokenizer, haystack, 1500, depth, word, PASSCODE_NEEDLE, PASSCODE_QUESTION)
    assert torch.equal(encode_prompt(tokenizer, text, chat=True), expected)


@pytest.fixture
def needle_diag(bench_longctx, monkeypatch):
    """bench/needle_diag.py as a module, its model loader refusing (bench_longctx's)."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "bench.bench_longctx", bench_longctx)
    spec = importlib.util.spec_from_file_location("needle_diag", Path(__file__).parents[1] / "bench/needle_diag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "load_model", bench_longctx.load_model)
    return module


@pytest.mark.parametrize("sentence, word, expected", [
    ("The secret passcode is 7342.", "7342", ["7", "3", "4", "2"]),
    ("The secret passphrase is copper-falcon.", "copper-falcon", [" copper", "-", "fal", "con"]),
    ("Text before. The secret passphrase is amber-300.", "amber-300", [" amber", "-", "3", "0", "0"]),
    ("The copper kettle. The secret passphrase is copper-falcon.", "copper-falcon", [" copper", "-", "fal", "con"]),
])
def test_needle_diag_finds_the_needles_tokens_of_either_kind(needle_diag, sentence, word, expected):
    tokenizer = load_tokenizer()
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    start, size = needle_diag.word_span(tokenizer, ids, word)
    assert [tokenizer.decode(i) for i in ids[start:start + size]] == expected
    with pytest.raises(ValueError, match="'falcon-copper' is not in"):
        needle_diag.word_span(tokenizer, ids, "falcon-copper")


@pytest.mark.parametrize("before, after, expected", [
    (0, 0, [[0.0, 5.0, 1.0, 2.0, 9.0]]),
    (0, 1, [[0.0, 5.0, 5.0, 2.0, 9.0]]),  # the block after a found one scores as it
    (1, 0, [[5.0, 5.0, 2.0, 9.0, 9.0]]),
    (1, 1, [[5.0, 5.0, 5.0, 9.0, 9.0]]),
    (0, 2, [[0.0, 5.0, 5.0, 5.0, 9.0]]),
])
def test_needle_diag_spreads_a_blocks_score_to_its_neighbours(needle_diag, before, after, expected):
    scores = torch.tensor([[0.0, 5.0, 1.0, 2.0, 9.0]])
    assert needle_diag.spread(scores, before, after).tolist() == expected


@pytest.mark.parametrize("args, message", [
    (["--kind", "passwort"], "unknown kind 'passwort'"),
    (["--page", "no-such-page"], "no docs page 'no-such-page'"),
    (["--variants", "rerank192,oracel"], "unknown variant 'oracel'; known: exact, rerank32"),
    (["--depth", "1.5"], "Invalid value for '--depth': Input should be less than or equal to 1"),
    (["--prefill-variant", "alll"], "unknown variant 'alll'; known: exact, rerank32"),
    (["--precision", "float64"], "block memory precision must be 'float16' or"),
    (["--top-blocks", "0"], "retrieved blocks must be a positive integer, got 0"),
])
def test_needle_diag_rejects_bad_options_before_loading_the_model(needle_diag, args, message):
    """bench/needle_diag.py prefills minutes of tokens before it decodes: a bad kind, page, variant or depth fails
    first."""
    result = CliRunner().invoke(needle_diag.app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
