"""A conversion starts on the name rules' plan while the Linear-detection helper is still working
(speculation.py), and finishes only with the model's plan: the same files as a run that waited when
the two agree; converted again with the model's plan when they differ; refused, with nothing left in
DST, when the helper refuses the checkpoint."""

import json
import threading

import pytest

from conftest import tree_digest
from shardconv import api, linears, meta_model, pipeline, speculation
from shardconv.errors import DestinationError, SourceError
from shardconv.linears import Linears
from shardconv.source import open_source
from shardconv.synth import write_checkpoint
from test_hostile_linears import drop_tensor

pytestmark = pytest.mark.usefixtures("models_decide")  # the model's path, not layouts.py's

CPU = dict(device="cpu", scales="max")


class SlowHelper:
    """A helper still working until it is first asked (by the speculation's thread, not by the plan).
    ``answers``: per ask, a function of the tensors giving its Linears, or None (no answer: the model
    is then built in-process, by Speculation.confirm on the main thread); the last one repeats."""

    trust_remote_code = False

    def __init__(self, *answers, pending=True):
        self.asked, self._answers, self._pending = 0, list(answers) or [None], pending
        self.threads = []

    def pending(self, trust_remote_code):
        return self._pending and not self.asked

    def answer(self, source, trust_remote_code, tensors=None):
        self.threads.append(threading.current_thread())
        answer = self._answers[min(self.asked, len(self._answers) - 1)]
        self.asked += 1
        return None if answer is None else answer(source, tensors)


def the_models_answer(src):
    """What linears.find answers in-process for ``src`` (transformers needed)."""
    found = linears.find(open_source(str(src)))
    assert found.method == "model"
    return lambda source, tensors: found


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
    helper = SlowHelper(the_models_answer(llama))
    monkeypatch.setattr(linears, "HELPERS", [helper])
    result = api.convert(llama, tmp_path / "spec", **CPU)
    assert len(made) == 1 and made[0].confirmed is not None and helper.asked == 1
    assert helper.threads[0] is not threading.main_thread()  # judged beside the pipeline
    assert result.quantized > 0
    waited(llama, tmp_path / "waited", SlowHelper(the_models_answer(llama)), monkeypatch)
    assert len(made) == 1  # the helper had answered: no speculation
    assert tree_digest(tmp_path / "spec") == tree_digest(tmp_path / "waited")


def test_without_a_helper_answer_the_model_is_built_on_the_main_thread_after_the_pipeline(
        llama, tmp_path, monkeypatch, made):
    """transformers changes process-wide state (default dtype, warning filters) while it builds a
    model: never on a thread beside the pipeline."""
    pytest.importorskip("transformers")
    built = []
    real = meta_model.build
    monkeypatch.setattr(meta_model, "build", lambda *a: (built.append(threading.current_thread()), real(*a))[1])
    monkeypatch.setattr(meta_model, "BUILT", {})
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper()])  # it dies: no answer
    api.convert(llama, tmp_path / "spec", **CPU)
    assert made[0].confirmed is not None and built == [threading.main_thread()]
    assert (tmp_path / "spec" / "model.safetensors.index.json").is_file()


def test_no_speculation_into_a_folder_holding_something(llama, tmp_path, monkeypatch, made):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper()])
    with pytest.raises(DestinationError, match="not empty"):
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
    assert any("converted again" in n for n in result.notes)
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

    def refuse(build_model=True):
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


def listing(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else None


def test_a_late_verdict_finds_only_shards_and_is_obeyed(llama, tmp_path, monkeypatch, made):
    """The verdict comes after the pipeline (no helper answer beside it): DST then holds shards and the
    journal only, no config file or index; a differing plan removes them and converts again, a
    refusal leaves nothing."""
    module = "model.layers.1.mlp.down_proj"
    seen = []
    real = speculation.Speculation.confirm
    monkeypatch.setattr(speculation.Speculation, "confirm",
                        lambda self: (seen.append(listing(self.dst_seen)), real(self))[1])
    monkeypatch.setattr(speculation.Speculation, "dst_seen", tmp_path / "late", raising=False)
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper(None, not_a_linear(module))])
    api.convert(llama, tmp_path / "late", **CPU)
    assert isinstance(made[0].error, speculation.Mismatch)
    assert seen[0] and all(n.endswith(".safetensors") or n.startswith(".shardconv") for n in seen[0]), seen
    assert "config.json" not in seen[0] and "model.safetensors.index.json" not in seen[0]
    waited(llama, tmp_path / "waited", SlowHelper(not_a_linear(module)), monkeypatch)
    assert tree_digest(tmp_path / "late") == tree_digest(tmp_path / "waited")

    def refuse(source, tensors):
        raise SourceError("late refusal")

    monkeypatch.setattr(speculation.Speculation, "dst_seen", tmp_path / "refused", raising=False)
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper(None, refuse)])
    with pytest.raises(SourceError, match="late refusal"):
        api.convert(llama, tmp_path / "refused", **CPU)
    assert any(n.endswith(".safetensors") for n in seen[-1]) and not (tmp_path / "refused").exists()


def test_an_interrupt_before_the_verdict_keeps_nothing_and_the_same_command_converts(llama, tmp_path, monkeypatch):
    """A resume plans with the model, whose plan could differ from the name rules' one: shards of an
    unconfirmed plan are not kept for it."""
    from shardconv import output_shards

    real = output_shards.Shards._done

    def interrupt_after_a_shard(self, shard, n):
        real(self, shard, n)
        if self.remaining[shard] == 0:
            raise KeyboardInterrupt("test")

    monkeypatch.setattr(output_shards.Shards, "_done", interrupt_after_a_shard)
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper(None, not_a_linear("model.layers.1.mlp.down_proj"))])
    with pytest.raises(KeyboardInterrupt):
        api.convert(llama, tmp_path / "dst", **CPU)
    assert not (tmp_path / "dst").exists()
    monkeypatch.setattr(output_shards.Shards, "_done", real)
    api.convert(llama, tmp_path / "dst", **CPU)  # the same command: a fresh run, not a refusal
    waited(llama, tmp_path / "waited", SlowHelper(not_a_linear("model.layers.1.mlp.down_proj")), monkeypatch)
    assert tree_digest(tmp_path / "dst") == tree_digest(tmp_path / "waited")


def test_a_run_that_appeared_in_dst_before_the_lock_is_not_touched_on_an_unconfirmed_plan(
        llama, tmp_path, monkeypatch):
    """DST was empty when the run decided to speculate, and held a finished run of the same name-rules
    plan by the time it locked DST: the verdict is waited for before anything there is touched."""
    from shardconv.conversion import convert
    from shardconv.formats import get_format

    monkeypatch.setattr(linears, "HELPERS", [])
    api.convert(llama, tmp_path / "dst", **CPU)  # the earlier run, finished
    before = tree_digest(tmp_path / "dst")
    plan = api.plan(llama, scales="max")
    other = api.plan(llama, scales="max")
    other.units = [u for u in other.units if not u.members or u.members[0].module != "model.layers.1.mlp.down_proj"]
    spec = speculation.Speculation(plan, lambda build_model=True: (_ for _ in ()).throw(
        speculation.Mismatch(other, "a test's")), get_format("modelopt"))
    with pytest.raises(speculation.Mismatch):
        convert(plan, tmp_path / "dst", fmt=get_format("modelopt"), device=__import__("torch").device("cpu"),
                speculation=spec)
    assert tree_digest(tmp_path / "dst") == before


def test_overwrite_into_an_empty_folder_still_converts_before_the_verdict(llama, tmp_path, monkeypatch, made):
    seen = []
    real = speculation.Speculation.confirm
    monkeypatch.setattr(speculation.Speculation, "confirm",
                        lambda self: (seen.append(listing(tmp_path / "dst")), real(self))[1])
    (tmp_path / "dst").mkdir()
    monkeypatch.setattr(linears, "HELPERS", [SlowHelper(None, lambda source, tensors: made[0].plan.linears)])
    api.convert(llama, tmp_path / "dst", overwrite=True, **CPU)
    assert made[0].confirmed is not None
    assert any(n.endswith(".safetensors") for n in seen[0])  # the first verdict was asked for after the shards
