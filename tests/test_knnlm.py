"""kNN-LM (lm/knnlm.py): the interpolation math, key capture, datastore build/resume, perplexity, tuning,
generation, bad input; the real SmolLM2 in one slow test."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lm.knnlm import KNNLM, KNNParams, capture_keys, datastore_spec, interpolate, knn_probs, text_id
from lm.model import tiny_llama
from memsvc.contract import InvalidInput, MemorySpec
from memsvc.store import Memory

TEXT = ("The csv module implements classes to read and write tabular data in CSV format. It allows "
        "programmers to say, write this data in the format preferred by Excel, without knowing the precise "
        "details of the CSV format used by Excel. ") * 3
OTHER = "The json module exposes an API familiar to users of the standard library marshal and pickle modules."


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def datastore(model, name: str = "ds", **extra) -> Memory:
    return Memory(MemorySpec(**{**datastore_spec(name, model), **extra}))


def knnlm(tiny, memory=None, **kwargs) -> KNNLM:
    model, tok = tiny
    return KNNLM(model, tok, memory if memory is not None else datastore(model), window=32, batch_size=3,
                 progress=False, **kwargs)


# --- the math, against a worked example -----------------------------------------------------------

def test_knn_probs_and_interpolation_match_a_hand_computed_case():
    # Neighbours at squared distances 1, 2, 4 with tokens 5, 7, 5; temperature 2:
    # weights e^-0.5, e^-1, e^-2 = 0.60653, 0.36788, 0.13534 (sum 1.10975)
    # p_kNN(5) = (0.60653 + 0.13534) / 1.10975 = 0.66850, p_kNN(7) = 0.33150, every other token 0.
    d = torch.tensor([[1.0, 2.0, 4.0]])
    t = torch.tensor([[5, 7, 5]])
    p = knn_probs(d, t, temperature=2.0, vocab_size=10)
    assert p[0, 5].item() == pytest.approx(0.66850, abs=1e-5)
    assert p[0, 7].item() == pytest.approx(0.33150, abs=1e-5)
    assert p[0].sum().item() == pytest.approx(1.0) and (p[0, [0, 1, 2, 3, 4, 6, 8, 9]] == 0).all()
    # λ = 0.25 with a uniform p_LM = 0.1:
    # p(5) = 0.25*0.66850 + 0.75*0.1 = 0.24213, p(7) = 0.15787, every other token 0.075
    mixed = interpolate(torch.full((1, 10), math.log(0.1)), p.log(), 0.25).exp()
    assert mixed[0, 5].item() == pytest.approx(0.24213, abs=1e-5)
    assert mixed[0, 7].item() == pytest.approx(0.15787, abs=1e-5)
    assert mixed[0, 0].item() == pytest.approx(0.075, abs=1e-6)
    assert mixed.sum().item() == pytest.approx(1.0)


def test_missing_neighbours_carry_no_weight():
    d = torch.tensor([[0.0, math.inf], [math.inf, math.inf]])
    t = torch.tensor([[3, -1], [-1, -1]])
    p = knn_probs(d, t, 1.0, 5)
    assert p[0, 3] == 1.0 and p[0].sum() == 1.0
    assert (p[1] == 0).all()  # no neighbour at all: p_kNN is zero, so the mixture is (1-λ)·p_LM


def test_lambda_zero_and_one_give_either_distribution():
    lm = torch.log_softmax(torch.randn(4, 10), -1)
    knn = torch.log_softmax(torch.randn(4, 10), -1)
    torch.testing.assert_close(interpolate(lm, knn, 0.0), lm)
    torch.testing.assert_close(interpolate(lm, knn, 1.0), knn)


# --- keys --------------------------------------------------------------------------------------------

def test_captured_keys_are_the_lm_head_and_last_mlp_inputs(tiny):
    model, _ = tiny
    seen = {}
    decoder = model.get_decoder()
    h1 = model.lm_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0]))
    h2 = decoder.layers[-1].post_attention_layernorm.register_forward_hook(
        lambda m, a, out: seen.__setitem__("mlp", out))
    try:
        with torch.inference_mode(), capture_keys(model, ("final-norm", "mlp-input")) as captured:
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(captured["final-norm"], seen["head"])
    torch.testing.assert_close(captured["mlp-input"], seen["mlp"])
    assert not model.get_decoder().norm._forward_hooks  # hooks are gone after the block


# --- build, resume, perplexity, tuning, generation ---------------------------------------------------

def test_datastore_lowers_perplexity_on_text_it_holds(tiny):
    knn = knnlm(tiny)
    n = knn.build([TEXT, OTHER])
    assert n == len(knn.memory) and knn.memory.spec.metadata["knnlm"]["key"] == "mlp-input"
    result = knn.perplexity([TEXT], lam=0.5, temp=1.0, k=8)
    assert result.tokens == len(tiny[1](TEXT).input_ids) - 1
    assert result.knnlm_ppl < result.base_ppl / 10  # a random model knows nothing; exact neighbours do
    assert knn.build([TEXT]) == 0  # already there: skipped


def test_a_non_default_key_is_recorded_and_enforced(tiny):
    mem = datastore(tiny[0])
    knnlm(tiny, mem, key="final-norm").build([OTHER])
    assert KNNLM(tiny[0], tiny[1], mem).key == "final-norm"
    with pytest.raises(InvalidInput, match="built with key 'final-norm'"):
        KNNLM(tiny[0], tiny[1], mem, key="mlp-input")


class CrashingMemory:
    """A Memory whose add fails after `adds` calls: a build killed mid-document."""

    def __init__(self, memory: Memory, adds: int):
        self.memory, self.adds = memory, adds
        self.spec = memory.spec

    def add(self, *args, **kwargs):
        if self.adds == 0:
            raise RuntimeError("killed")
        self.adds -= 1
        return self.memory.add(*args, **kwargs)

    def set_metadata(self, metadata):
        self.memory.set_metadata(metadata)
        self.spec = self.memory.spec

    def __getattr__(self, name):
        return getattr(self.memory, name)


def test_interrupted_build_resumes_to_the_same_datastore(tiny, tmp_path):
    fresh = knnlm(tiny)
    fresh.build([OTHER, TEXT], add_batch=10)
    mem = Memory.create(MemorySpec(**datastore_spec("ds", tiny[0])), tmp_path / "ds")
    with pytest.raises(RuntimeError, match="killed"):
        knnlm(tiny, CrashingMemory(mem, adds=5)).build([OTHER, TEXT], add_batch=10)
    assert 0 < len(mem) < len(fresh.memory)
    mem.close()
    mem = Memory.open(tmp_path / "ds")  # a restart
    knnlm(tiny, mem).build([OTHER, TEXT], add_batch=10)
    ids = np.arange(len(fresh.memory))
    assert len(mem) == len(fresh.memory)
    np.testing.assert_array_equal(mem.get(ids).values, fresh.memory.get(ids).values)
    np.testing.assert_allclose(mem.get(ids).keys, fresh.memory.get(ids).keys, atol=1e-5)
    with pytest.raises(InvalidInput, match="unfinished build"):  # a half document the texts do not hold
        crashed = Memory(MemorySpec(**datastore_spec("ds2", tiny[0])))
        with pytest.raises(RuntimeError):
            knnlm(tiny, CrashingMemory(crashed, adds=2)).build([TEXT], add_batch=10)
        knnlm(tiny, crashed).build([OTHER])


class CountingMemory(CrashingMemory):
    """A Memory that counts its metadata writes (and never crashes)."""

    def __init__(self, memory: Memory):
        super().__init__(memory, adds=-1)
        self.writes = 0

    def set_metadata(self, metadata):
        self.writes += 1
        super().set_metadata(metadata)


def test_a_build_writes_its_state_once_per_document(tiny):
    mem = CountingMemory(datastore(tiny[0]))
    knnlm(tiny, mem).build([OTHER, TEXT, OTHER + TEXT])
    assert mem.writes == 1 + 3  # the build's settings, then one write per finished document
    state = mem.spec.metadata["knnlm"]
    assert state["sources"] == [text_id(OTHER), text_id(TEXT), text_id(OTHER + TEXT)]
    assert state["entries"] == len(mem.memory) and state.get("building") is None


def test_a_datastore_with_the_old_free_form_state_reads_as_before(tiny):
    """Metadata as builds wrote it before the typed state: the key is enforced, tuned settings are the
    defaults, finished documents are skipped, an unknown key survives the next write."""
    mem = datastore(tiny[0])
    knnlm(tiny, mem, key="final-norm").build([OTHER])
    mem.set_metadata({"owner": "me", "knnlm": {
        "key": "final-norm", "window": 32, "sources": [text_id(OTHER)], "entries": len(mem), "building": None,
        "lam": 0.5, "temp": 3.0, "k": 8, "tuned_on_tokens": 20, "tuned_base_ppl": 1e5, "tuned_knnlm_ppl": 9.5,
        "tuned_continuous": False, "note": "kept"}})
    with pytest.raises(InvalidInput, match="built with key 'final-norm'"):
        knnlm(tiny, mem, key="mlp-input")
    knn = knnlm(tiny, mem)
    assert knn.key == "final-norm" and knn.params() == KNNParams(lam=0.5, temp=3.0, k=8)
    assert knn.build([OTHER]) == 0
    assert knn.build([TEXT]) == len(tiny[1](TEXT).input_ids) - 1
    state = mem.spec.metadata["knnlm"]
    assert state["sources"] == [text_id(OTHER), text_id(TEXT)] and state["entries"] == len(mem)
    assert (state["lam"], state["note"], mem.spec.metadata["owner"]) == (0.5, "kept", "me")


def test_metadata_that_is_not_a_datastore_state_is_rejected(tiny):
    mem = datastore(tiny[0])
    mem.set_metadata({"knnlm": {"sources": "not a list"}})
    with pytest.raises(InvalidInput, match="not a kNN-LM datastore's") as err:
        knnlm(tiny, mem)
    assert err.value.field == "memory"


def test_continuous_cache_reads_the_document_itself_and_leaves_nothing(tiny):
    knn = knnlm(tiny)
    knn.build([OTHER])
    before = knn.memory.stats().count
    plain = knn.perplexity([TEXT], lam=0.5, temp=1.0, k=8)
    cached = knn.perplexity([TEXT], lam=0.5, temp=1.0, k=8, continuous=True)
    assert cached.knnlm_ppl < plain.knnlm_ppl / 2  # TEXT repeats itself across windows
    assert cached.base_ppl == pytest.approx(plain.base_ppl)
    assert knn.memory.stats().count == before
    assert [p.name for p in knn.memory.stats().partitions] == [None]


def test_tune_stores_settings_that_become_the_defaults(tiny):
    knn = knnlm(tiny)
    knn.build([TEXT])
    default = knn.perplexity([TEXT])
    tuned, ppl = knn.tune([TEXT], k=16)
    stored = knn.memory.spec.metadata["knnlm"]
    assert (stored["lam"], stored["temp"], stored["k"]) == (tuned.lam, tuned.temp, 16)
    again = knnlm(tiny, knn.memory).perplexity([TEXT])
    assert (again.lam, again.temp, again.k) == (tuned.lam, tuned.temp, 16)
    assert again.knnlm_ppl == pytest.approx(ppl, rel=1e-4)
    assert again.knnlm_ppl <= default.knnlm_ppl


def test_pure_knn_generation_replays_the_stored_text(tiny):
    tok = tiny[1]
    ids = tok(TEXT).input_ids
    prompt = tok.decode(ids[:12])
    assert tok(prompt).input_ids == ids[:12]
    knn = knnlm(tiny)
    knn.build([TEXT])
    out = "".join(knn.generate(prompt, lam=1.0, k=4, temp=1.0, max_new_tokens=10))
    assert out == tok.decode(ids[12:22])
    base = "".join(knn.generate(prompt, lam=0.0, max_new_tokens=10))
    assert base != out


def hf_generate(knn, prompt, processor, max_new_tokens=10, **options):
    """`model.generate` with the kNN-LM logits processor: the continuation's text."""
    from lm.generate import encode_prompt

    ids = encode_prompt(knn.tokenizer, prompt)
    with torch.inference_mode():
        out = knn.model.generate(ids, logits_processor=[processor], max_new_tokens=max_new_tokens, do_sample=False,
                                 **options)
    return knn.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("lam", [0.3, 0.7, 1.0])
def test_logits_processor_gives_the_tokens_of_knnlm_generate(tiny, lam):
    knn = knnlm(tiny)
    knn.build([TEXT])
    expected = "".join(knn.generate("The csv module implements", lam=lam, temp=1.0, k=8, max_new_tokens=10))
    with knn.logits_processor(lam=lam, temp=1.0, k=8) as processor:
        assert hf_generate(knn, "The csv module implements", processor) == expected
    assert expected != "".join(knn.generate("The csv module implements", lam=0.0, max_new_tokens=10))
    decoder = tiny[0].get_decoder()
    assert not decoder.norm._forward_hooks and not decoder.layers[-1].mlp._forward_pre_hooks  # closed: unhooked


def test_logits_processor_with_a_bounded_cache_gives_the_own_loop_tokens(tiny):
    from lm.cache import BoundedCache
    from lm.hf import bounded_cache
    from lm.policies import Window

    knn = knnlm(tiny)
    knn.build([TEXT])
    prompt = TEXT[:300]
    expected = "".join(knn.generate(prompt, lam=0.5, temp=1.0, k=8, max_new_tokens=10,
                                    cache=BoundedCache(tiny[0], Window(16, 2))))
    with knn.logits_processor(lam=0.5, temp=1.0, k=8) as processor, bounded_cache(tiny[0], Window(16, 2)):
        assert hf_generate(knn, prompt, processor) == expected


def test_a_closed_logits_processor_is_refused(tiny):
    knn = knnlm(tiny)
    knn.build([OTHER])
    processor = knn.logits_processor()
    processor.close()
    with pytest.raises(InvalidInput, match="saw no forward"):
        hf_generate(knn, "The json", processor, max_new_tokens=2)


# --- bad input: clear errors before any work, nothing stored --------------------------------------

def test_memory_that_does_not_fit_the_model_is_rejected(tiny):
    model, tok = tiny
    with pytest.raises(InvalidInput, match="hidden size is 64"):
        KNNLM(model, tok, Memory(MemorySpec(name="m", dim=576, value_kind="token")))
    with pytest.raises(InvalidInput, match="value_kind 'token'"):
        KNNLM(model, tok, Memory(MemorySpec(name="m", dim=64)))
    with pytest.raises(InvalidInput, match="key must be one of"):
        knnlm(tiny, key="attention")


@pytest.mark.parametrize("params, field", [({"lam": 1.5}, "lam"), ({"lam": -0.1}, "lam"), ({"k": 0}, "k"),
                                           ({"k": -3}, "k"), ({"temp": 0.0}, "temp")])
def test_bad_settings_are_rejected_before_any_work(tiny, params, field):
    knn = knnlm(tiny)
    knn.build([OTHER])
    with pytest.raises(InvalidInput) as err:
        knn.perplexity([TEXT], **params)
    assert err.value.field == field
    with pytest.raises(InvalidInput):
        list(knn.generate("abc", **params))


@pytest.mark.parametrize("texts", [[], [""], [OTHER, "x"[:0]]])
def test_empty_texts_are_rejected_and_nothing_is_stored(tiny, texts):
    knn = knnlm(tiny)
    with pytest.raises(InvalidInput, match="no texts|nothing to predict"):
        knn.build(texts)
    assert len(knn.memory) == 0 and "sources" not in knn.memory.spec.metadata.get("knnlm", {})


def test_evaluating_an_empty_datastore_is_an_error(tiny):
    with pytest.raises(InvalidInput, match="empty"):
        knnlm(tiny).perplexity([TEXT])


def test_params_validation_names_the_field():
    assert KNNParams.check(lam=None, k=3).k == 3
    with pytest.raises(InvalidInput, match="lam") as err:
        KNNParams.check(lam=2)
    assert err.value.field == "lam"


# --- in-process and remote memories behave the same -------------------------------------------------

def test_in_process_and_remote_datastores_give_the_same_results(tiny, server):
    from memsvc.client import MemoryClient

    local = knnlm(tiny)
    with MemoryClient(server.url) as client:
        remote = knnlm(tiny, client.create_memory(**datastore_spec("knnlm-equality", tiny[0])))
        for knn in (local, remote):
            knn.build([TEXT, OTHER], add_batch=50)
        ids = np.arange(len(local.memory))
        assert remote.memory.stats().count == len(ids)
        np.testing.assert_array_equal(remote.memory.get(ids).values, local.memory.get(ids).values)
        results = [knn.perplexity([TEXT], lam=0.4, temp=2.0, k=8, continuous=True) for knn in (local, remote)]
        assert results[0] == results[1]
        tuned = [knn.tune([OTHER], k=8) for knn in (local, remote)]
        assert tuned[0] == tuned[1]
        assert client.memory("knnlm-equality").spec.metadata["knnlm"]["lam"] == tuned[0][0].lam
        texts = ["".join(knn.generate("The csv", max_new_tokens=8, temperature=0.8, seed=1))
                 for knn in (local, remote)]
        assert texts[0] == texts[1]
        greedy = "".join(local.generate("The csv", max_new_tokens=8))
        with remote.logits_processor() as served:  # model.generate over the served datastore
            assert hf_generate(remote, "The csv", served, max_new_tokens=8) == greedy


# --- the CLI -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(tiny, tmp_path_factory):
    """Run `memsvc knnlm ...` (or `generate`) with the tiny model saved as a local HF directory."""
    import typer
    from typer.testing import CliRunner

    from memsvc.cli.longctx import eval_long
    from memsvc.cli.model import generate, knnlm_app

    model_dir = tmp_path_factory.mktemp("tiny-model")
    tiny[0].save_pretrained(model_dir)
    tiny[1].save_pretrained(model_dir)
    app = typer.Typer()
    app.add_typer(knnlm_app, name="knnlm")
    app.command("generate")(generate)
    app.command("eval-long")(eval_long)
    data_dir = tmp_path_factory.mktemp("cli-data")

    def run(*args: str):
        args = [*map(str, args), "--model", str(model_dir), *(("--data-dir", str(data_dir)) if args[0] != "eval-long"
                                                              else ())]
        return CliRunner().invoke(app, args)

    run.data_dir = data_dir
    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "csv.txt").write_text(TEXT)
    (root / "json.txt").write_text(OTHER)
    (root / "empty.txt").write_text(" \n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    return root


def test_cli_build_tune_eval_json(cli, corpus):
    built = cli("knnlm", "build", "--memory", "cli-ds", corpus / "csv.txt", corpus / "json.txt")
    assert built.exit_code == 0, built.output
    out = cli("knnlm", "eval", "--memory", "cli-ds", corpus / "csv.txt", "--json", "--lam", "0.5",
              "--temp", "1")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert set(result) == {"tokens", "base_ppl", "knnlm_ppl", "lam", "temp", "k"}
    assert result["knnlm_ppl"] < result["base_ppl"] and result["lam"] == 0.5
    tuned = cli("knnlm", "tune", "--memory", "cli-ds", corpus / "json.txt", "--k", "16")
    assert tuned.exit_code == 0, tuned.output
    after = json.loads(cli("knnlm", "eval", "--memory", "cli-ds", corpus / "csv.txt", "--json").stdout)
    assert after["k"] == 16 and f"λ={after['lam']:g}" in tuned.stdout
    again = cli("knnlm", "build", "--memory", "cli-ds", corpus / "csv.txt")
    assert again.exit_code == 0 and "added 0 entries" in again.output
    gen = cli("generate", "The csv module", "--knn-memory", "cli-ds", "--no-chat", "--max-new-tokens", "5")
    assert gen.exit_code == 0 and gen.stdout.strip()


def test_cli_json_is_clean_and_eval_long_url_leaves_nothing_on_the_server(cli, corpus, server, tmp_path):
    """knnlm build/tune --json print one JSON object on stdout (progress goes to stderr); eval-long --url
    --knn-memory deletes the memory it made for the run (before: an empty `knn-attention` and its log stayed)."""
    from memsvc.client import MemoryClient

    built = cli("knnlm", "build", "--memory", "cli-json", corpus / "csv.txt", "--json")
    assert built.exit_code == 0, built.output
    result = json.loads(built.stdout)
    assert (result["memory"], result["added"], result["count"]) == ("cli-json", result["count"], result["count"])
    assert result["count"] > 100 and "kNN-LM encode" in built.stderr
    tuned = json.loads(cli("knnlm", "tune", "--memory", "cli-json", corpus / "json.txt", "--k", "8", "--json").stdout)
    assert set(tuned) == {"memory", "lam", "temp", "k", "validation_perplexity"} and tuned["k"] == 8

    with MemoryClient(server.url) as client:
        before = [spec.name for spec in client.list_memories()]
        run = cli("eval-long", corpus / "csv.txt", "--window", 8, "--sinks", 2, "--knn-memory", "--k", 4,
                  "--layers", "1", "--max-tokens", 64, "--skip", 10, "--url", server.url, "--json")
        assert run.exit_code == 0, run.output
        assert json.loads(run.stdout)["tokens"] == 53  # 63 predicted, the first 10 not scored
        assert "tok/s" in run.stderr  # the progress bar
        assert [spec.name for spec in client.list_memories()] == before
        assert "knn-attention" not in before


def test_cli_generate_long_prompt_file_through_a_bounded_cache(cli, tiny, tmp_path):
    """--prompt-file, --cache and --memory-attention decode what the same calls give in-process."""
    from lm.attention import attach
    from lm.cache import BoundedCache
    from lm.generate import generate
    from lm.memory_attention import KnnConfig
    from lm.policies import Window

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT * 2)  # far more tokens than the window
    common = ("generate", "--prompt-file", prompt, "--no-chat", "--max-new-tokens", "8", "--cache", "window:16,sinks:2")
    for extra, knn in (((), None), (("--memory-attention",), KnnConfig())):
        result = cli(*common, *extra)
        assert result.exit_code == 0, result.output
        cache = BoundedCache(tiny[0], Window(16, 2))
        with attach(tiny[0], cache, knn):
            expected = "".join(generate(*tiny, TEXT * 2, max_new_tokens=8, cache=cache))
        assert result.stdout == expected + "\n"
        assert "prefill" in result.stderr and "tok/s" in result.stderr  # the prompt file's prefill bar


@pytest.mark.parametrize("args, message", [
    (("generate", "--no-chat"), "either PROMPT or --prompt-file"),
    (("generate", "text", "--prompt-file", "{csv}"), "either PROMPT or --prompt-file"),
    (("generate", "--prompt-file", "{missing}"), "no such file"),
    (("generate", "text", "--memory-attention"), "needs a bounded --cache"),
    (("generate", "text", "--cache", "window:8,foo:2"), "bad cache spec"),
    (("generate", "text", "--device", "tpu"), "unknown device 'tpu'"),
])
def test_cli_generate_bad_prompt_or_cache_exits_non_zero(cli, corpus, args, message):
    paths = {"csv": corpus / "csv.txt", "missing": corpus / "missing.txt"}
    result = cli(*[a.format(**paths) for a in args])
    assert result.exit_code != 0
    assert message in result.stderr


@pytest.mark.parametrize("args, message", [
    (("eval", "--memory", "no-such", "{csv}"), "not found"),
    (("eval", "--memory", "cli-bad", "{csv}", "--lam", "1.5"), "lam"),
    (("eval", "--memory", "cli-bad", "{csv}", "--k", "0"), "k:"),
    (("tune", "--memory", "cli-bad", "{csv}", "--k", "-1"), "k:"),
    (("build", "--memory", "cli-bad", "{empty}"), "empty file"),
    (("build", "--memory", "cli-bad", "{binary}"), "not UTF-8"),
    (("build", "--memory", "cli-bad", "{csv}", "{missing}"), "no such file"),
    (("build", "--memory", "cli-bad", "{csv}", "--device", "cuda:x"), "unknown device 'cuda:x'"),
])
def test_cli_bad_input_exits_non_zero_and_stores_nothing(cli, corpus, args, message):
    paths = {"csv": corpus / "csv.txt", "empty": corpus / "empty.txt", "binary": corpus / "binary.txt",
             "missing": corpus / "missing.txt"}
    result = cli("knnlm", *[a.format(**paths) for a in args])
    assert result.exit_code != 0
    assert message in result.stderr
    from memsvc.config import Settings
    from memsvc.service import Service

    with Service(Settings(data_dir=cli.data_dir)) as service:
        assert "cli-bad" not in [spec.name for spec in service.list_memories()]


def test_cli_memory_of_the_wrong_dim_is_rejected(cli, corpus):
    from memsvc.config import Settings
    from memsvc.service import Service

    with Service(Settings(data_dir=cli.data_dir)) as service:
        service.create_memory("cli-576", dim=576, value_kind="token")
    result = cli("knnlm", "build", "--memory", "cli-576", corpus / "csv.txt")
    assert result.exit_code != 0 and "hidden size is 64" in result.stderr
    with Service(Settings(data_dir=cli.data_dir)) as service:
        assert service.memory("cli-576").stats().count == 0


@pytest.mark.slow
def test_smollm2_datastore_lowers_perplexity_on_text_it_holds():
    from pathlib import Path

    from lm.model import load_model

    source = Path("/usr/share/doc/python3.11/html/_sources/library/json.rst.txt")
    if not source.exists():
        pytest.skip("needs Debian's python3.11-doc")
    text = source.read_text()[:2500]
    model, tok = load_model("smollm2")
    knn = KNNLM(model, tok, datastore(model), progress=False)
    assert knn.build([text]) == len(tok(text).input_ids) - 1
    result = knn.perplexity([text], lam=0.25, temp=10.0, k=16)
    assert 1 < result.base_ppl < 100  # the real model reads this text well already
    assert result.knnlm_ppl < 0.8 * result.base_ppl
