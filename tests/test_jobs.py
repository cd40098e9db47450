"""``shardconv convert --batch JOBS`` (jobs.py): every job tried, one summary, exit 1 if any failed;
in one process and across forked gloo ranks (each rank whole models)."""

import contextlib
import io
import json

from conftest import run_cli, tree_digest
from shardconv.cli import main
from shardconv.synth import write_checkpoint
from test_distributed import run_ranks

ARGS = ("--device", "cpu", "--scales", "max", "--no-progress", "--threads", "1")


def run_main(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue(), out.getvalue()


def output(path):
    return {k: v for k, v in tree_digest(path).items() if not k.startswith(".shardconv-journal")}


def make_jobs(tmp_path):
    small = write_checkpoint(tmp_path / "small", family="llama", num_layers=2, seed=1)
    big = write_checkpoint(tmp_path / "big", family="qwen3", num_layers=4, seed=2, shard_size=200_000)
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"src": str(small), "dst": str(tmp_path / "out" / "small")},
        {"src": str(tmp_path / "no-such-model"), "dst": str(tmp_path / "out" / "missing")},
        {"src": str(big), "dst": str(tmp_path / "out" / "big"), "max-shard-size": "100KB", "format": "compressed-tensors"},
    ]
    jobs.write_text("# three models, one missing\n" + "\n".join(json.dumps(j) for j in lines) + "\n")
    return small, big, jobs


def references(tmp_path, small, big):
    ref = tmp_path / "ref"
    assert run_cli("convert", small, ref / "small", *ARGS)[0] == 0
    assert run_cli("convert", big, ref / "big", *ARGS, "--max-shard-size", "100KB", "--format", "compressed-tensors")[0] == 0
    return output(ref / "small"), output(ref / "big")


def test_a_batch_converts_every_good_job_and_fails_with_one_summary(tmp_path):
    small, big, jobs = make_jobs(tmp_path)
    rc, err, out = run_main("convert", "--batch", jobs, *ARGS)
    assert rc == 1, err
    assert err.count("\n") == 1 and err.startswith("shardconv: error: job 2 (") and "no-such-model" in err, err
    assert "3 jobs, 2 finished, 1 failed" in out and out.count("FAILED") == 1, out
    ref_small, ref_big = references(tmp_path, small, big)
    assert output(tmp_path / "out" / "small") == ref_small
    assert output(tmp_path / "out" / "big") == ref_big
    assert not (tmp_path / "out" / "missing").exists()
    # the same command again: finished models are "already complete", the bad one still fails
    rc, err, out = run_main("convert", "--batch", jobs, *ARGS, "--json")
    report = json.loads(out)
    assert rc == 1 and not report["ok"]
    assert [j["ok"] for j in report["jobs"]] == [True, False, True]
    assert report["jobs"][0]["already_complete"] and report["jobs"][2]["already_complete"]


def test_a_batch_across_ranks_gives_each_rank_whole_models(tmp_path):
    small, big, jobs = make_jobs(tmp_path)
    results = run_ranks(tmp_path, 2, ["convert", "--batch", jobs, *ARGS, "--json"], stdout=True)
    assert [rc for rc, _, _ in results] == [1, 1], results
    assert results[1][1] == "" and results[1][2] == ""  # rank 0 alone reports
    report = json.loads(results[0][2])
    by_index = {j["index"]: j for j in report["jobs"]}
    # largest first onto the least-loaded rank: the big model to rank 0, the small one and the missing one to rank 1
    assert (by_index[3]["rank"], by_index[1]["rank"], by_index[2]["rank"]) == (0, 1, 1), report
    assert [by_index[i]["ok"] for i in (1, 2, 3)] == [True, False, True]
    ref_small, ref_big = references(tmp_path, small, big)
    assert output(tmp_path / "out" / "small") == ref_small
    assert output(tmp_path / "out" / "big") == ref_big


def test_a_bad_jobs_file_converts_nothing(tmp_path):
    small = write_checkpoint(tmp_path / "small", family="llama", num_layers=2, seed=1)
    cases = {
        '{"src": "%s", "colour": "red"}' % small: "line 1: unknown option 'colour'",
        '{"dst": "x"}': "line 1: no src",
        '{"src": "%s", "dst": "a"}\n{"src": "%s", "dst": "./a"}' % (small, small): "line 2: DST",
        # the same folder through a link: still one DST for two jobs
        '{"src": "%s", "dst": "%s"}\n{"src": "%s", "dst": "%s"}' % (small, tmp_path / "real" / "a", small,
                                                                   tmp_path / "link" / "a"): "line 2: DST",
        '{"src": "~no-such-user-here/x", "dst": "%s"}' % (tmp_path / "b"): "line 1: cannot resolve its paths",
        "not json": "line 1: not a JSON object",
        # a string is not a flag: "false" would be taken as true (and trust_remote_code run model code)
        '{"src": "%s", "dst": "%s", "overwrite": "false"}' % (small, tmp_path / "b"): "line 1: overwrite must be true or false, not 'false'",
        '{"src": "%s", "dst": "%s", "trust-remote-code": "no"}' % (small, tmp_path / "b"): "line 1: trust_remote_code must be true or false",
        '{"src": "%s", "dst": "%s", "format": "nvfp5"}' % (small, tmp_path / "b"): "line 1: format must be one of modelopt, compressed-tensors",
        '{"src": "%s", "dst": "%s", "recipe": "fp8-everything"}' % (small, tmp_path / "b"): "line 1: recipe must be one of",
        '{"src": "%s", "dst": "%s", "format-for": [1]}' % (small, tmp_path / "b"): "line 1: format_for must be a pattern or a list of patterns",
        # numbers, sizes and paths of the wrong kind failed as "a shardconv bug" after DST was made
        '{"src": "%s", "dst": "%s", "readers": "4"}' % (small, tmp_path / "b"): "line 1: readers must be a positive whole number, not '4'",
        '{"src": "%s", "dst": "%s", "writers": -1}' % (small, tmp_path / "b"): "line 1: writers must be a positive whole number, not -1",
        '{"src": "%s", "dst": "%s", "threads": "x"}' % (small, tmp_path / "b"): "line 1: threads must be a positive whole number",
        '{"src": "%s", "dst": "%s", "host-buffer": "lots"}' % (small, tmp_path / "b"): "line 1: host_buffer: not a size: 'lots'",
        '{"src": "%s", "dst": "%s", "max-shard-size": true}' % (small, tmp_path / "b"): "line 1: max_shard_size must be a size",
        '{"src": "%s", "dst": "%s", "amax": 5}' % (small, tmp_path / "b"): "line 1: amax must be a string, not 5",
        "": "no jobs",
    }
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for text, needle in cases.items():
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text(text)
        rc, err = run_cli("convert", "--batch", jobs, *ARGS)
        assert rc == 2 and err.count("\n") == 1 and needle in err, (text, err)
    jobs.write_text('{"src": "%s", "dst": "%s"}' % (small, tmp_path / "j"))  # a good file: the refusal is SRC's
    rc, err = run_cli("convert", small, tmp_path / "o", "--batch", jobs)
    assert rc == 2 and "takes no SRC or DST" in err, err
    assert not (tmp_path / "j").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "o").exists()


def test_a_yaml_jobs_file(tmp_path):
    small = write_checkpoint(tmp_path / "small", family="llama", num_layers=2, seed=1)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"- src: {small}\n  dst: {tmp_path / 'o'}\n  exclude: 'model.layers.0.*'\n")
    rc, err, out = run_main("convert", "--batch", jobs, *ARGS)
    assert rc == 0, err
    assert "1 jobs, 1 finished, 0 failed" in out
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "model.layers.0.self_attn.k_proj" in json.dumps(config["quantization_config"])  # the job's exclude


def test_job_options_are_the_api_options_and_the_command_options_reach_every_job(tmp_path):
    """Every keyword of api.convert (but the run's own) is a job option and comes from the command
    line's options into each job: --recipe, --format-for and --strict-amax were once left out of
    --batch, which converted without them."""
    import inspect

    from shardconv import api
    from shardconv.jobs import OPTIONS

    own = {"src", "dst", "progress", "rank", "world_size"}
    assert set(OPTIONS) == set(inspect.signature(api.convert).parameters) - own
    from shardconv.jobs import PLAN_OPTIONS

    assert set(PLAN_OPTIONS) == set(inspect.signature(api.plan).parameters) - own  # the command's dry run
    src = write_checkpoint(tmp_path / "moe", family="qwen3_moe", num_layers=1, shard_size=200_000)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"src": str(src), "dst": str(tmp_path / "o")}) + "\n")
    # the recipe's FP8 layers need activation amax, which no file gives: refused, in the batch as alone
    alone = run_cli("convert", src, tmp_path / "alone", *ARGS, "--recipe", "nvfp4-experts-fp8")
    rc, err, _ = run_main("convert", "--batch", jobs, *ARGS, "--recipe", "nvfp4-experts-fp8")
    assert alone[0] == 2 and "FP8 layers" in alone[1]
    assert rc == 1 and "FP8 layers" in err, err
    jobs.write_text(json.dumps({"src": str(src), "dst": str(tmp_path / "o"), "format-for": "*.experts.*=keep"}))
    rc, err, _ = run_main("convert", "--batch", jobs, *ARGS)
    assert rc == 0, err
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "model.layers.0.mlp.experts.0.gate_proj" in config["quantization_config"]["ignore"]


def test_thread_counts_below_one_are_refused(tmp_path):
    """--readers 0 meant "auto" and --writers -5 one thread, silently: refused on the command line and
    in the API, as --threads 0 was."""
    import pytest

    from shardconv import api
    from shardconv.errors import OptionError

    small = write_checkpoint(tmp_path / "small", family="llama", num_layers=1, seed=1)
    for option, value in (("--readers", "0"), ("--writers", "-5"), ("--threads", "0"), ("--readers", "two")):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                main(["convert", str(small), str(tmp_path / "o"), "--device", "cpu", option, value])
            except SystemExit as e:
                assert e.code == 2
        assert option in err.getvalue(), err.getvalue()
    for bad in (0, -1, 1.5):
        with pytest.raises(OptionError, match="readers: must be a whole number of at least 1"):
            api.convert(small, tmp_path / "o", device="cpu", readers=bad)
    assert not (tmp_path / "o").exists()
