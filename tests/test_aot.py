"""experiments.aot: the real train step compiled for a TPU topology on this CPU machine.

One compile of ``tiny`` on v5e:2x2 (fsdp=4) is checked field by field; a step the TPU
compiler refuses for HBM exits 1 with one line and still writes its JSON; bad input
exits 2 before anything compiles."""

import json

import pytest

from experiments import aot
from k2jax import compiled

KEYS = ("topology", "chips", "hbm_bytes_per_chip", "hbm_capacity_bytes", "flops_per_chip",
        "optimizer_flops_per_chip", "collectives", "compile_seconds", "mfu_estimate", "fits",
        "memory", "mesh", "preset", "overrides", "commit", "roofline_estimate")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "tiny.json"
    rc = aot.main(["--config", "tiny", "--topology", "v5e:2x2", "--json", str(path),
                   "mesh.fsdp=4", "data.global_batch_size=8", "data.seq_len=64"])
    return rc, json.loads(path.read_text())


def test_tiny_on_v5e(tiny_report):
    rc, rep = tiny_report
    assert rc == 0
    assert set(KEYS) <= set(rep)
    assert (rep["topology"], rep["chips"], rep["device_kind"]) == ("v5e:2x2", 4, "TPU v5 lite")
    assert rep["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    assert rep["moe_impl"] == "ragged"  # what auto picks on a TPU
    assert rep["fits"] and 0 < rep["hbm_bytes_per_chip"] <= rep["hbm_capacity_bytes"] == 16 * 2**30
    m = rep["memory"]
    assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m[
        "generated_code"] == rep["hbm_bytes_per_chip"]
    # the state is sharded 4 ways: arguments well under one copy of params + optimizer state
    assert 0 < m["arguments"] < 178_112 * 4 * 3
    assert rep["flops_per_chip"] > rep["model_flops_per_chip"] / 2 > 0
    assert 0 < rep["optimizer_flops_per_chip"] < rep["flops_per_chip"]
    assert 0 < rep["optimizer_share"] < 1
    assert rep["compile_seconds"] > 0 and 0 < rep["mfu_estimate"] < 1


def test_tiny_collectives(tiny_report):
    """fsdp=4 shards 22 of tiny's 31 parameter leaves: each is gathered for the forward
    (and again for the backward, unless kept), and the gradients are reduced."""
    _, rep = tiny_report
    c = rep["collectives"]
    assert set(c) <= set(compiled.KINDS)
    assert 11 <= c["all-gather"]["count"] <= 200
    assert c["all-gather"]["bytes"] > 0
    assert c.get("all-reduce", {}).get("count", 0) + c.get("reduce-scatter", {}).get(
        "count", 0) >= 1
    assert all(v["count"] >= 1 and v["bytes"] >= 0 for v in c.values())


def test_shortfall_line(tiny_report):
    _, rep = tiny_report
    line = aot.shortfall({**rep, "hbm_capacity_bytes": 2**20})
    assert line.startswith("tiny on v5e:2x2 needs ") and "MiB per chip, 1.0 MiB" in line
    assert "\n" not in line and "short by" in line


def test_out_of_memory_exits_1_with_one_line_and_writes_json(tmp_path, capsys):
    """The TPU compiler itself refuses this step (its temporaries alone pass v5e's HBM)."""
    path = tmp_path / "oom.json"
    rc = aot.main(["--config", "tiny", "--topology", "v5e:2x2", "--json", str(path),
                   "mesh.fsdp=4", "model.vocab_size=32768", "data.seq_len=1024",
                   "data.global_batch_size=512"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: tiny on v5e:2x2 needs ")
    assert "available (short by" in err[0]
    rep = json.loads(path.read_text())
    assert rep["fits"] is False and rep["hbm_bytes_per_chip"] > 16 * 2**30


def test_hbm_gib_below_the_step_exits_1(tmp_path, capsys):
    """A step the compiler accepts but that passes ``--hbm-gib``: exit 1, one line, the
    JSON says so; the optimizer is not compiled for a step that does not fit."""
    path = tmp_path / "small.json"
    rc = aot.main(["--config", "tiny", "--topology", "v5e:2x2", "--hbm-gib", "0.001",
                   "--json", str(path), "data.global_batch_size=4", "data.seq_len=32",
                   "model.num_hidden_layers=1", "model.first_k_dense_replace=1"])
    out, err = capsys.readouterr()
    assert rc == 1 and "DOES NOT FIT" in out
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tiny on v5e:2x2 needs ")
    assert "MiB per chip, 1.0 MiB available (short by " in err[0]
    rep = json.loads(path.read_text())
    assert rep["fits"] is False and rep["hbm_capacity_bytes"] == int(0.001 * 2**30)
    assert rep["hbm_bytes_per_chip"] > rep["hbm_capacity_bytes"]
    assert rep["optimizer_flops_per_chip"] is None and rep["flops_per_chip"] > 0


def test_compiler_oom_messages_parsed():
    e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                     "for HLO temporaries (111.87G) exceeds available HBM (95.74G).")
    oom = aot._oom(e, 3)
    assert oom.needed == pytest.approx(111.87 * 2**30) and oom.available == pytest.approx(
        95.74 * 2**30)
    older = aot._oom(RuntimeError("RESOURCE_EXHAUSTED: ... Used 49.34G of 15.48G hbm."), 3)
    assert older.needed == pytest.approx(49.34 * 2**30)
    assert aot._oom(RuntimeError("INVALID_ARGUMENT: no"), 3) is None


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v5x:2x2"], "--topology 'v5x:2x2': expected GENERATION:SHAPE"),
    (["--topology", "v5e:3x3"], "--topology 'v5e:3x3': INVALID_ARGUMENT"),
    (["--topology", "v5e:2x2", "mesh.fsdp=8"], "needs 8 devices, have 4"),
    (["--topology", "v5e:2x2", "mesh.fsdp=3"], "uses 3 of --topology v5e:2x2's 4 chips"),
    (["--topology", "v5e:2x2", "data.global_batch_size=6"], "must be a multiple of mesh"),
    (["--topology", "v5e:2x2", "model.hiden_size=8"], "hidden_size"),
    (["--topology", "v5e:2x2", "--fit-layers", "1,2"], "first_k_dense_replace=1 < A < B"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        aot.main(["--config", "tiny", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unknown_preset_and_existing_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        aot.main(["--config", "kimi-k3", "--topology", "v5e:2x2"])
    assert e.value.code == 2 and "kimi-k2" in capsys.readouterr().err  # the suggestion
    path = tmp_path / "r.json"
    path.write_text("{}")
    with pytest.raises(SystemExit) as e:
        aot.main(["--config", "tiny", "--topology", "v5e:2x2", "--json", str(path)])
    assert e.value.code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert path.read_text() == "{}"


def test_lerp_extrapolates_nested_figures():
    a = {"memory": {"temporaries": 10, "arguments": 4}, "flops": 1.0, "c": {"x": {"count": 2}},
         "opt": None}
    b = {"memory": {"temporaries": 16, "arguments": 6}, "flops": 3.0,
         "c": {"x": {"count": 4}, "y": {"count": 1}}, "opt": 1.0}
    got = aot._lerp(a, b, (61 - 3) / (5 - 3))  # 3 and 5 layers -> 61
    assert got["memory"] == {"temporaries": 10 + 29 * 6, "arguments": 4 + 29 * 2}
    assert got["flops"] == pytest.approx(1 + 29 * 2)
    assert got["c"] == {"x": {"count": 2 + 29 * 2}, "y": {"count": 29}}
    assert got["opt"] is None


def test_fit_layers_matches_a_full_depth_compile(tmp_path):
    """--fit-layers 2,3 extrapolated to 5 layers gives the FLOPs of compiling all 5 (each
    MoE layer adds the same), and the optimizer's figures are its full-depth compile's."""
    args = ["--config", "tiny", "--topology", "v5e:2x2", "model.num_hidden_layers=5",
            "mesh.fsdp=4", "data.global_batch_size=8", "data.seq_len=64"]
    reps = []
    for extra in ([], ["--fit-layers", "2,3"]):
        path = tmp_path / f"{len(extra)}.json"
        assert aot.main([*args, *extra, "--json", str(path)]) == 0
        reps.append(json.loads(path.read_text()))
    full, fit = reps
    assert fit["optimizer_flops_per_chip"] == full["optimizer_flops_per_chip"]
    assert fit["flops_per_chip"] == pytest.approx(full["flops_per_chip"], rel=0.02)
    assert fit["extrapolated_from"]["layers"] == [2, 3]
