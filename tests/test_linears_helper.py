"""Linear detection in a helper process (linears_helper.py) gives linears.find's answer exactly: the
same Linears for every family and for the cases the meta model catches that name rules miss (BERT's
embeddings, GPT-2's Conv1D, a tensor of the model in no shard), and is used only for the headers it
read."""

import sys

import pytest

from conftest import run_cli, tree_digest
from shardconv import linears, linears_helper, meta_model
from shardconv.errors import SourceError
from shardconv.source import open_source
from shardconv.synth import write_checkpoint
from test_hostile_linears import drop_tensor, family_sources, write_bert, write_gpt2

pytestmark = pytest.mark.usefixtures("models_decide")  # the model's path, not layouts.py's


def answer_of(src, trust=False):
    """(Linears or the SourceError's text) as linears.find gives it in this process."""
    try:
        return linears.find(open_source(str(src)), trust)
    except SourceError as e:
        return str(e)


def through_encoding(src, trust=False):
    """The same, through what the helper prints and the command reads back."""
    source = open_source(str(src))
    answer = linears_helper.encode(source, trust)
    assert answer["key"] == linears_helper.answer_key(source, trust)
    try:
        return linears_helper.decode(answer)
    except SourceError as e:
        return str(e)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("helper")
    out = family_sources(root)
    out["bert"] = write_bert(root / "bert")
    out["gpt2"] = write_gpt2(root / "gpt2")
    missing = write_checkpoint(root / "missing", family="llama", num_layers=2, shard_size=100_000)
    drop_tensor(missing, "model.layers.1.mlp.down_proj.weight")
    out["missing"] = missing
    unknown = write_checkpoint(root / "unknown", family="llama", num_layers=1)
    text = (unknown / "config.json").read_text().replace('"llama"', '"no_such_model_type"')
    (unknown / "config.json").write_text(text)
    out["unknown"] = unknown
    return out


def test_encoded_answer_is_finds_answer_for_every_case(cases):
    for name, src in cases.items():
        direct = answer_of(src)
        assert through_encoding(src) == direct, name
    assert "no shard" in answer_of(cases["missing"])  # the refusal travels, word for word
    assert answer_of(cases["bert"]).reason("bert.embeddings.position_embeddings.weight") == "embedding"
    assert answer_of(cases["unknown"]).method == "names"


def test_key_changes_with_anything_the_answer_depends_on(cases, tmp_path):
    source = open_source(str(cases["llama"]))
    key = linears_helper.answer_key(source, False)
    assert linears_helper.answer_key(source, True) != key
    other = open_source(str(cases["llama_tied"]))
    assert linears_helper.answer_key(other, False) != key
    source.config = dict(source.config, num_hidden_layers=3)
    assert linears_helper.answer_key(source, False) != key


class Canned:
    """A helper whose process already answered ``result``."""

    trust_remote_code = False

    def __init__(self, result):
        self.result, self.proc = result, None


def answered_by(answer, monkeypatch) -> list:
    """linears.find asks only a helper that answered ``answer``; returns the list of models it builds
    in this process instead (one entry per build)."""
    helper = Canned(answer)
    helper.answer = linears_helper.Helper.answer.__get__(helper)
    monkeypatch.setattr(linears, "HELPERS", [helper])
    built = []
    real = meta_model.build
    monkeypatch.setattr(meta_model, "build", lambda *a: (built.append(a), real(*a))[1])
    return built


def test_find_uses_a_helper_answer_only_for_the_same_headers(cases, monkeypatch):
    llama, tied = open_source(str(cases["llama"])), open_source(str(cases["llama_tied"]))
    want_llama, want_tied, want_trusted = answer_of(cases["llama"]), answer_of(cases["llama_tied"]), answer_of(
        cases["llama"], True)
    answer = linears_helper.encode(llama, False)
    built = answered_by(answer, monkeypatch)
    helper = linears.HELPERS[0]
    assert linears.find(llama) == linears_helper.decode(answer) == want_llama and built == []  # no model here
    assert linears.find(tied) == want_tied and len(built) == 1  # other headers: built here
    assert linears.find(llama, True) == want_trusted and len(built) == 2  # other trust_remote_code
    helper.result = dict(answer, linears={"nonsense": 1})  # an answer of another shape: not used
    assert linears.find(llama) == want_llama and len(built) == 3
    helper.result = {}  # the helper failed or died
    assert linears.find(llama) == want_llama and len(built) == 4


def test_the_helper_process_answers_as_find_does(cases):
    """Real helper processes (each imports torch and transformers: seconds)."""
    helpers = {name: linears_helper.Helper(str(cases[name]), False) for name in ("llama", "missing")}
    try:
        for name, helper in helpers.items():
            source = open_source(str(cases[name]))
            try:
                got = helper.answer(source, False)
                assert got is not None, name
            except SourceError as e:
                got = str(e)
            assert got == answer_of(cases[name]), name
    finally:
        for helper in helpers.values():
            helper.close()


def test_cli_output_is_the_same_with_the_helper(cases, tmp_path, monkeypatch):
    src = cases["qwen3_moe"]
    args = ("--device", "cpu", "--scales", "max", "--no-progress")
    started = []
    real = linears_helper.start
    monkeypatch.setattr(linears_helper, "start", lambda *a: started.append(real(*a)) or started[-1])
    monkeypatch.setenv("SHARDCONV_LINEARS_HELPER", "1")  # even with transformers imported here
    assert run_cli("convert", src, tmp_path / "helper", *args)[0] == 0
    helper = started[-1]
    assert helper is not None and helper.result and "key" in helper.result  # its answer was read
    assert helper.proc.poll() is not None and linears.HELPERS == []
    monkeypatch.setenv("SHARDCONV_LINEARS_HELPER", "0")
    assert run_cli("convert", src, tmp_path / "inproc", *args)[0] == 0
    assert started[-1] is None
    assert tree_digest(tmp_path / "helper") == tree_digest(tmp_path / "inproc")
    # the refusal of a checkpoint missing a tensor comes through the helper too
    monkeypatch.setenv("SHARDCONV_LINEARS_HELPER", "1")
    rc, err = run_cli("convert", cases["missing"], tmp_path / "missing", *args)
    assert rc == 2 and "model.layers.1.mlp.down_proj.weight" in err and "no shard" in err
    assert started[-1].result.get("error")


def test_no_helper_where_it_cannot_help(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARDCONV_LINEARS_HELPER", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", sys.modules.get("transformers"))
    assert linears_helper.start(None, False) is None  # the built-in sample
    assert linears_helper.start("meta-llama/Llama-3.1-8B", False) is None  # a hub id
    (tmp_path / "m").mkdir()
    assert linears_helper.start(str(tmp_path / "m"), False) is None  # transformers already imported here
    monkeypatch.delitem(sys.modules, "transformers")
    monkeypatch.setattr(linears_helper, "_cores", lambda: linears_helper.MIN_CORES - 1)
    assert linears_helper.start(str(tmp_path / "m"), False) is None  # no spare core
    monkeypatch.setattr(linears_helper, "_cores", lambda: linears_helper.MIN_CORES)
    monkeypatch.setenv("SHARDCONV_LINEARS_HELPER", "0")
    assert linears_helper.start(str(tmp_path / "m"), False) is None  # turned off
    monkeypatch.delenv("SHARDCONV_LINEARS_HELPER")
    helper = linears_helper.start(str(tmp_path / "m"), False)
    assert helper is not None
    helper.close()


def test_an_fp8_source_is_answered_for_the_plans_plain_view(tmp_path, monkeypatch):
    """The plan asks about an encoded source's plain view (weights under their plain names, scales
    left out): the helper answers for that view, so the plan does not build the model itself."""
    pytest.importorskip("transformers")
    from test_fp8 import make_fp8

    from shardconv.formats import get_format
    from shardconv.planning import build_plan

    bf16 = write_checkpoint(tmp_path / "bf16", family="deepseek_v3", num_layers=2, hidden_size=256,
                            intermediate_size=320, moe_intermediate_size=64, num_experts=4, vocab_size=256,
                            shard_size=300_000)
    fp8, _ = make_fp8(bf16, tmp_path / "fp8")
    source = open_source(str(fp8))
    plain = linears_helper.plain_view(source)
    assert plain != source.tensors and not any(n.endswith("_scale_inv") for n in plain)
    answer = linears_helper.encode(source, False, plain)  # what the helper process prints
    built = answered_by(answer, monkeypatch)
    plan = build_plan(source, get_format("modelopt"), scales="max")
    assert built == [] and plan.linears == linears_helper.decode(answer) and plan.linears.method == "model"
    assert linears.find(source) is not None and len(built) == 1  # the source's own tensors: another question
