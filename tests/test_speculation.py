"""A conversion starts on the name rules' plan while the Linear-detection helper is still working
(speculation.py), and finishes only with the model's plan: the same files as a run that waited when
the two agree; converted again with the model's plan when they differ; refused, with nothing left in
DST, when the helper refuses the checkpoint."""

import json

import pytest

from conftest import tree_digest
from shardconv import api, linears, pipeline, speculation
from shardconv.errors import SourceError
from shardconv.linears import Linears
from shardconv.synth import write_checkpoint
from test_hostile_linears import drop_tensor

CPU = dict(device="cpu", scales="max")


class SlowHelper:
    """A helper still working until it is first asked (by the speculation's thread, not by the plan).
    ``answer``: a function of the tensors giving its Linears, or None (linears.find then builds the
    model in-process)."""

    trust_remote_code = False

    def __init__(self, answer=None, pending=True):
        self.asked, self._answer, self._pending = 0, answer, pending

    def pending(self, trust_remote_code):
        return self._pending and not self.asked

    def answer(self, source, trust_remote_code, tensors=None):
        self.asked += 1
        return None if self._answer is None else self._answer(source, tensors)


@pytest.fixture
def made(monkeypatch):
    """Every Speculation the runs make."""
    out = []
    real = speculation.Speculation.__init__

    def record(self, *a, **kw):
        out.append(self)
        real(self, *a, **kw)

    monkeypatch.setattr(speculation.Speculation, "__init__", record)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("spec") / "llama", family="llama", num_layers=2,
                            shard_size=100_000)


def waited(src, dst, helper, monkeypatch):
    """The run that waits for ``helper``'s answer before planning."""
    monkeypatch.setattr(linears, "HELPERS", [helper])
    helper._pending = False
    return api.convert(src, dst, **CPU)


def test_agreeing_plans_write_what_a_waiting_run_writes(llama, tmp_path, monkeypatch, made):
    pytest.importorskip("transformers")
    helper = SlowHelper()
    monkeypatch.setattr(linears, "HELPERS", [helper])
    result = api.convert(llama, tmp_path / "spec", **CPU)
    assert len(made) == 1 and made[0].confirmed is not None and helper.asked == 1
    assert result.quantized > 0
    waited(llama, tmp_path / "waited", SlowHelper(), monkeypatch)
    assert len(made) == 1  # the helper had answered: no speculation
    assert tree_digest(tmp_path / "spec") == tree_digest(tmp_path / "waited")


def test_no_speculation_into_a_folder_holding_something(llama, tmp_path, monkeypatch, made):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper()])
    with pytest.raises(Exception):
        api.convert(llama, tmp_path / "dst", **CPU)  # refused (not empty), after planning once
    assert made == [] and (tmp_path / "dst" / "keep.txt").read_text() == "x"


def not_a_linear(module):
    """Answers that ``module``'s weight is held by no Linear (so it is kept), the rest Linear."""
    def answer(source, tensors):
        classes = {n: "Linear" for n, t in (tensors or source.tensors).items()
                   if n.endswith(".weight") and len(t.shape) == 2 and "embed" not in n and "lm_head" not in n}
        classes[module + ".weight"] = "Conv1d"
        return Linears("model", "a test's model", classes=classes)
    return answer


def test_differing_plans_convert_again_with_the_models(llama, tmp_path, monkeypatch, made):
    module = "model.layers.1.mlp.down_proj"
    helper = SlowHelper(not_a_linear(module))
    monkeypatch.setattr(linears, "HELPERS", [helper])
    result = api.convert(llama, tmp_path / "spec", **CPU)
    assert len(made) == 1 and isinstance(made[0].error, speculation.Mismatch)
    assert "output tensors" in made[0].error.what
    waited(llama, tmp_path / "waited", SlowHelper(not_a_linear(module)), monkeypatch)
    assert tree_digest(tmp_path / "spec") == tree_digest(tmp_path / "waited")  # nothing of the first run left
    index = json.loads((tmp_path / "spec" / "model.safetensors.index.json").read_text())["weight_map"]
    assert module + ".weight" in index and module + ".weight_scale" not in index  # kept, as the model says
    assert "model.layers.0.mlp.down_proj.weight_scale" in index
    monkeypatch.setattr(linears, "HELPERS", [])
    assert result.quantized == len(api.plan(llama, scales="max").quantized) - 1  # the name rules quantize it


def test_a_refusal_by_the_helper_leaves_no_trace(tmp_path, monkeypatch, made):
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "missing", family="llama", num_layers=2, shard_size=100_000)
    drop_tensor(src, "model.layers.1.mlp.down_proj.weight")
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper()])  # answers None: the model is built in-process
    with pytest.raises(SourceError, match="model.layers.1.mlp.down_proj.weight"):
        api.convert(src, tmp_path / "dst", **CPU)
    assert len(made) == 1 and made[0].refuted
    assert not (tmp_path / "dst").exists()
    (tmp_path / "empty").mkdir()  # a DST folder that was there stays, empty
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper()])
    with pytest.raises(SourceError):
        api.convert(src, tmp_path / "empty", **CPU)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_refutation_stops_the_pipeline_before_the_next_group(llama, tmp_path, monkeypatch):
    """The pipeline asks between groups: a verdict already in writes nothing at all."""
    written = []
    real = pipeline.Converter._write_cpu
    monkeypatch.setattr(pipeline.Converter, "_write_cpu", lambda self, *a: (written.append(1), real(self, *a))[1])

    def refuse():
        raise SourceError("a test's refusal")

    plan = api.plan(llama, scales="max")
    from shardconv.conversion import convert
    from shardconv.formats import get_format

    spec = speculation.Speculation(plan, refuse, get_format("modelopt"))
    spec._thread.join()
    with pytest.raises(SourceError, match="a test's refusal"):
        convert(plan, tmp_path / "dst", fmt=get_format("modelopt"), device=__import__("torch").device("cpu"),
                speculation=spec)
    assert written == [] and not (tmp_path / "dst").exists()
