"""The bad-input catalogue of ``experiments.train`` (issue 16): each row is one wrong
command line, config file, data set, mesh or workdir. Every one must be refused with one
``error: ...`` line on stderr and exit status 2 before anything is written: every file
under the case's folder (workdir, data, config files) keeps its bytes, no file or
directory appears, none goes.

A row is a :class:`Case`. Its arguments follow ``--workdir``; ``{data}`` is a folder of
ready inputs (good and broken corpora and shards, a plain file; :func:`make_inputs`),
``{tmp}`` the case's own folder, ``{workdir}`` the run directory. ``prepare(tmp,
workdir)`` adds to them first: a config file (:func:`config_file`), a workdir's content,
a finished tiny run to resume (:func:`finished_run`). Cases run in-process with the
training loop replaced by a failure, so input that passes every check fails its row
without training; :data:`SUBPROCESS` rows also run as a real ``python -m``.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from tiny_runs import BASE, snapshot

from experiments import train as train_cli
from k2jax import config, preflight, presets, sharding, workdir_lock
from k2jax.config import ConfigError
from k2jax.data import write_shard
from k2jax.data.shards import HEADER_INTS

TINY = ("--config", "tiny", *BASE)  # 8 x 32 tokens a step, eval_batches=2
TEXT = (*TINY, "data.source=text")
SHARDS = (*TINY, "data.source=shards")
NO_EVAL = "train.eval_batches=0"


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: an input, the exit status and a substring of the one line it must give."""

    name: str
    args: tuple[str, ...]  # after --workdir; {data}, {tmp} and {workdir} are filled in
    message: str  # a substring of the one stderr line
    code: int = 2
    workdir: str = "{tmp}/run"
    prepare: Callable[[Path, Path], None] | None = None  # (tmp, workdir) before the run
    skip_as_root: bool = False  # a file permission, which root does not obey


def config_file(mutate: Callable[[dict], None] | None = None, text: str | bytes | None = None):
    """A ``prepare`` writing ``{tmp}/cfg.json``: the tiny run's config changed by
    ``mutate``, or exactly ``text``."""

    def prepare(tmp: Path, workdir: Path) -> None:
        if text is not None:
            body = text.encode() if isinstance(text, str) else text
        else:
            values = config.to_dict(presets.load("tiny", BASE))
            mutate(values)
            body = json.dumps(values).encode()
        (tmp / "cfg.json").write_bytes(body)

    return prepare


def in_workdir(name: str, text: str):
    """A ``prepare`` putting file ``name`` into the workdir."""

    def prepare(tmp: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)

    return prepare


def resumable_config(tmp: Path, workdir: Path) -> None:
    """A workdir holding only the tiny run's config.json (resolve's view of a run)."""
    in_workdir("config.json", json.dumps(config.to_dict(presets.load("tiny", BASE))))(
        tmp, workdir)


_FINISHED: dict[str, Path] = {}


def finished_run(tmp: Path, workdir: Path) -> None:
    """A ``prepare`` copying a finished tiny run (1 step, a final checkpoint) into the
    workdir. Trained once per test session, the first time a row asks for it."""
    if "run" not in _FINISHED:
        root = Path(tempfile.mkdtemp(prefix="k2jax-finished-run-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        args = ["--workdir", str(root / "run"), "--no-progress", "--config", "tiny", *BASE,
                "model.num_hidden_layers=1", "data.seq_len=8", "train.steps=1", NO_EVAL]
        # this process compiles without the persistent cache the CLI turns on (conftest)
        with mock.patch.object(train_cli.loop, "enable_compilation_cache", lambda: None):
            assert train_cli.main(args) == 0
        _FINISHED["run"] = root / "run"
    shutil.copytree(_FINISHED["run"], workdir)


_HELD = []  # workdir locks held by this process for a row (flock: per open file)


def busy(tmp: Path, workdir: Path) -> None:
    """A ``prepare``: a finished run whose workdir another run (this process) holds."""
    finished_run(tmp, workdir)
    _HELD.append(workdir_lock.hold(workdir))
    _HELD[-1].__enter__()


def other_model(tmp: Path, workdir: Path) -> None:
    """A ``prepare``: a finished run whose config.json no longer fits its checkpoint."""
    finished_run(tmp, workdir)
    values = json.loads((workdir / "config.json").read_text())
    values["model"]["intermediate_size"] += 8
    (workdir / "config.json").write_text(json.dumps(values))


def _chmod_parent(tmp: Path, workdir: Path) -> None:
    workdir.parent.mkdir()
    workdir.parent.chmod(0o500)


def _config_field(section: str, **values):
    return config_file(lambda d: d[section].update(values))


CASES = [
    # the command line
    Case("unknown key", (*TINY, "model.hiden_size=3"), "did you mean 'model.hidden_size'"),
    Case("unknown section", ("--config", "tiny", "modle.hidden_size=3"),
         "unknown config key 'modle'; did you mean 'model'"),
    Case("retired key", (*TINY, "optimizer.adam_lr=0.1"), "'optimizer.adam_lr' is gone"),
    Case("renamed value", (*TINY, "optimizer.name=muonclip"),
         "now spelled optimizer.name=muon optimizer.qk_clip=true"),
    Case("override without =", (*TINY, "train.steps"), "'train.steps': expected key=value"),
    Case("sub-key of a number", (*TINY, "model.hidden_size.x=3"),
         "model.hidden_size has no sub-keys"),
    Case("float not a number", (*TINY, "optimizer.lr=fast"),
         "optimizer.lr='fast': expected float"),
    Case("int written as a float", (*TINY, "train.steps=1e3"), "train.steps='1e3': expected int"),
    Case("bool not a bool", (*TINY, "model.qk_norm=maybe"), "qk_norm='maybe': expected bool"),
    Case("unknown choice", (*TINY, "optimizer.schedule=linear"),
         "optimizer.schedule='linear': must be one of"),
    Case("negative size", (*TINY, "model.hidden_size=-64"), "hidden_size=-64: must be positive"),
    Case("zero steps", (*TINY, "train.steps=0"), "train.steps=0: must be positive"),
    Case("infinite lr", (*TINY, "optimizer.lr=inf"), "optimizer.lr=inf: must be finite"),
    Case("nan lr", (*TINY, "optimizer.lr=nan"), "optimizer.lr=nan: must be finite"),
    Case("float overflow", (*TINY, "train.z_loss=1e999"), "train.z_loss=inf: must be finite"),
    Case("b1 of one", (*TINY, "optimizer.b1=1"), "optimizer.b1=1.0: must be in [0, 1)"),
    Case("rope_scaling not JSON", (*TINY, "model.rope_scaling=abc"),
         "model.rope_scaling='abc': expected a JSON object"),
    Case("rope_scaling a list", (*TINY, "model.rope_scaling=[8]"),
         "model.rope_scaling='[8]': expected a JSON object"),
    Case("a section set to a number", (*TINY, "model=3"), "model='3': expected a JSON object"),
    Case("rope factor below one", (*TINY, "model.rope_scaling.factor=0.5"),
         "rope_scaling.factor=0.5: must be >= 1"),
    Case("heads do not divide hidden", (*TINY, "model.attention=mha",
                                        "model.num_attention_heads=3"),
         "num_attention_heads=3: must divide hidden_size=64"),
    Case("groups do not divide experts", (*TINY, "model.n_group=3"),
         "n_group=3: must divide n_routed_experts=8"),
    Case("top-k beyond experts", (*TINY, "model.num_experts_per_tok=9"),
         "num_experts_per_tok=9: must be <= n_routed_experts=8"),
    Case("odd rope head dim", (*TINY, "model.qk_rope_head_dim=7"), "must be even"),
    Case("micro-batches do not divide the batch", (*TINY, "train.micro_batches=3"),
         "train.micro_batches=3: must divide data.global_batch_size=8"),
    Case("mesh size zero", (*TINY, "mesh.fsdp=0"), "sizes must be > 0 or -1"),
    Case("two mesh sizes -1", (*TINY, "mesh.data=-1"), "at most one mesh axis may be -1"),
    Case("val_fraction above one", (*TINY, "data.val_fraction=1.5"),
         "data.val_fraction=1.5: must be in (0, 1)"),
    Case("text without paths", TEXT, "source='text' needs paths"),
    Case("unknown preset", ("--config", "tinny"), "did you mean 'tiny'"),
    Case("no --config", BASE, "--config is required"),
    Case("empty workdir", TINY, "--workdir must not be empty", workdir=""),
    # a --config file
    Case("config file: not JSON", ("--config", "{tmp}/cfg.json"), "not a readable JSON file",
         prepare=config_file(text="{")),
    Case("config file: not an object", ("--config", "{tmp}/cfg.json"),
         "expected a JSON object", prepare=config_file(text="[1]")),
    Case("config file: not UTF-8", ("--config", "{tmp}/cfg.json"), "not a readable JSON file",
         prepare=config_file(text=b"\xff{}")),
    Case("config file: string for an int", ("--config", "{tmp}/cfg.json"),
         "hidden_size='big': must be an integer", prepare=_config_field("model",
                                                                        hidden_size="big")),
    Case("config file: string for a bool", ("--config", "{tmp}/cfg.json"),
         "qk_norm='yes': must be true or false", prepare=_config_field("model", qk_norm="yes")),
    Case("config file: number for a section", ("--config", "{tmp}/cfg.json"),
         "model=5: expected an object of ModelConfig fields",
         prepare=config_file(lambda d: d.update(model=5))),
    Case("config file: null section", ("--config", "{tmp}/cfg.json"),
         "data=None: expected an object of DataConfig fields",
         prepare=config_file(lambda d: d.update(data=None))),
    Case("config file: string for a list", ("--config", "{tmp}/cfg.json"),
         "data.paths='x.txt': must be a list of strings",
         prepare=_config_field("data", source="text", paths="x.txt")),
    Case("config file: Infinity", ("--config", "{tmp}/cfg.json"),
         "optimizer.lr=inf: must be finite", prepare=_config_field("optimizer",
                                                                   lr=float("inf"))),
    Case("config file: unknown key", ("--config", "{tmp}/cfg.json"),
         "unknown config key 'model.hiden_size'", prepare=_config_field("model", hiden_size=3)),
    Case("config: a directory that is no checkpoint", ("--config", "{data}/notes"),
         "no config.json"),
    # data
    Case("text file missing", (*TEXT, "data.paths={data}/missing.txt"),
         "missing.txt: no such file"),
    Case("glob matching nothing", (*TEXT, "data.paths={data}/*.md"), "glob matched no files"),
    Case("a directory as a text file", (*TEXT, "data.paths={data}/notes"),
         "notes: is a directory"),
    Case("empty text corpus", (*TEXT, "data.paths={data}/empty.txt", NO_EVAL),
         "smaller than one sequence of seq_len=32 + 1"),
    Case("non-UTF-8 text corpus", (*TEXT, "data.paths={data}/latin1.txt", NO_EVAL),
         "latin1.txt: not UTF-8 text"),
    Case("corpus smaller than a batch", (*TEXT, "data.paths={data}/small.txt", NO_EVAL),
         "fewer than one global batch of 8"),
    Case("one-file corpus has no validation split", (*TEXT, "data.paths={data}/one.txt"),
         "no files in the validation split"),
    Case("shard with a bad magic", (*SHARDS, "data.paths={data}/bad_magic.bin",
                                    "data.val_paths={data}/val.bin"), "bad magic 1234"),
    Case("truncated shard", (*SHARDS, "data.paths={data}/truncated.bin",
                             "data.val_paths={data}/val.bin"), "truncated or corrupted"),
    Case("shard shorter than its header", (*SHARDS, "data.paths={data}/stub.bin",
                                           "data.val_paths={data}/val.bin"),
         "shorter than the 1024-byte header"),
    Case("corrupt validation shard", (*SHARDS, "data.paths={data}/train.bin",
                                      "data.val_paths={data}/truncated.bin"),
         "truncated.bin: header says"),
    Case("shards without val_paths", (*SHARDS, "data.paths={data}/train.bin"),
         "data.val_paths: shards need validation shards"),
    Case("missing val_paths glob", (*SHARDS, "data.paths={data}/train.bin",
                                    "data.val_paths={data}/val-*.bin"), "glob matched no files"),
    Case("train token ids past the vocab", (*SHARDS, "data.paths={data}/big_ids.bin",
                                            "data.val_paths={data}/val.bin"),
         "big_ids.bin: token id 600 >= model.vocab_size=512"),
    Case("validation token ids past the vocab", (*SHARDS, "data.paths={data}/train.bin",
                                                 "data.val_paths={data}/big_ids.bin"),
         "big_ids.bin: token id 600 >= model.vocab_size=512"),
    Case("vocab smaller than the tokenizer", (*TEXT, "data.paths={data}/one.txt", NO_EVAL,
                                              "model.vocab_size=200"),
         "model.vocab_size=200 is smaller than the byte tokenizer's 258"),
    Case("seq_len beyond positions", (*TINY, "data.seq_len=8192"),
         "data.seq_len=8192 is longer than model.max_position_embeddings=4096"),
    # the mesh
    Case("mesh larger than the devices", (*TINY, "mesh.fsdp=16"), "needs 16 devices, have 8"),
    Case("mesh -1 not dividing the devices", (*TINY, "mesh.data=3"),
         "needs a device count divisible by 3, have 8"),
    Case("batch not splitting over data", (*TINY, "data.global_batch_size=3", "mesh.data=2"),
         "data.global_batch_size=3: 3 rows per micro-batch (train.micro_batches=1) do not "
         "split over mesh.data=2"),
    Case("micro-batch not splitting over data", (*TINY, "train.micro_batches=2", "mesh.data=8",
                                                 "mesh.fsdp=1"),
         "4 rows per micro-batch (train.micro_batches=2) do not split over mesh.data=8"),
    # the workdir
    Case("workdir under a file", TINY, "afile is a file, not a directory",
         workdir="{data}/afile/run"),
    Case("workdir is a file", TINY, "exists and is not a directory", workdir="{data}/afile"),
    Case("workdir not empty", TINY, "is not empty", prepare=in_workdir("keep.txt", "mine")),
    Case("workdir parent not writable", TINY, "permission denied", workdir="{tmp}/ro/run",
         prepare=_chmod_parent, skip_as_root=True),
    # resuming
    Case("resume with nothing to resume", ("--resume",), "nothing to resume"),
    Case("resume changing the model", ("--resume", "model.hidden_size=32"),
         "'model.hidden_size' cannot change on resume", prepare=resumable_config),
    Case("resume of a broken config.json", ("--resume",), "not a readable JSON file",
         prepare=in_workdir("config.json", "{")),
    Case("resume with zero steps", ("--resume", "train.steps=0"),
         "train.steps=0: must be positive", prepare=finished_run),
    Case("resume with --config", ("--resume", "--config", "tiny"),
         "--config cannot be used with it", prepare=finished_run),
    Case("resume with init_from", ("--resume", "train.init_from={data}/nohf"),
         "'train.init_from' cannot change on resume", prepare=finished_run),
    Case("resume changing the seed", ("--resume", "train.seed=3"),
         "'train.seed' cannot change on resume", prepare=finished_run),
    Case("resume of a busy workdir", ("--resume",), f"is in use by pid {os.getpid()}",
         prepare=busy),
    Case("resume into another model", ("--resume",), "in the checkpoint but float32",
         prepare=other_model),
    # Hugging Face checkpoints
    Case("checkpoint of another shape", ("--config", "tests/fixtures/hf_tiny_k2",
                                         "model.n_routed_experts=16"),
         "model.n_routed_experts=16 (checkpoint: 8)"),
    Case("init_from a missing checkpoint", (*TINY, "train.init_from={data}/nohf"),
         "train.init_from:"),
]

# Rows also run as `python -m experiments.train`: the real exit status and stderr.
SUBPROCESS = ["mesh larger than the devices", "config file: number for a section",
              "one-file corpus has no validation split"]


def make_inputs(folder: Path) -> None:
    """Text corpora and llm.c shards, good and broken, and a plain file."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta"]
    text = lambda n: " ".join(rng.choice(words, n)) + "\n"  # noqa: E731
    (folder / "corpus").mkdir()
    for i in range(8):
        (folder / "corpus" / f"doc{i}.txt").write_text(text(400))
    (folder / "one.txt").write_text(text(800))
    (folder / "small.txt").write_text(text(20))
    (folder / "empty.txt").write_text("")
    (folder / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 200)
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text(text(10))
    (folder / "afile").write_text("a file, not a directory")
    for name in ("train", "val"):
        write_shard(folder / f"{name}.bin", rng.integers(0, 512, 4000))
    write_shard(folder / "big_ids.bin", np.r_[rng.integers(0, 512, 4000), 600])
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = (1234, 1, 4000)
    (folder / "bad_magic.bin").write_bytes(header.tobytes() + bytes(8000))
    write_shard(folder / "truncated.bin", rng.integers(0, 512, 4000))
    with open(folder / "truncated.bin", "r+b") as f:
        f.truncate(os.path.getsize(folder / "truncated.bin") - 10)
    (folder / "stub.bin").write_bytes(bytes(100))


def _setup(case: Case, tmp: Path) -> list[str]:
    """The case's folder made ready; its command line."""
    if case.skip_as_root and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    make_inputs(tmp / "data")
    workdir = case.workdir.replace("{data}", str(tmp / "data")).replace("{tmp}", str(tmp))
    fill = lambda s: (s.replace("{data}", str(tmp / "data")).replace("{tmp}", str(tmp))  # noqa
                      .replace("{workdir}", workdir))
    if case.prepare is not None:
        case.prepare(tmp, Path(workdir))
    return ["--workdir", workdir, "--no-progress", *map(fill, case.args)]


def _one_line(err: str, case: Case) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and case.message in lines[0], lines[0]


def _accepted(*args, **kwargs):
    raise AssertionError("the input passed every check: training was about to start")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    argv = _setup(case, tmp_path)
    before = snapshot(tmp_path)
    for name in ("run", "train_loop"):  # whichever starts the steps
        if hasattr(train_cli.loop, name):
            monkeypatch.setattr(train_cli.loop, name, _accepted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        train_cli.main(argv)
    _one_line(capsys.readouterr().err, case)
    assert exited.value.code == case.code
    after = snapshot(tmp_path)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_input_end_to_end(name, tmp_path):
    case = next(c for c in CASES if c.name == name)
    argv = _setup(case, tmp_path)
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "experiments.train", *argv], capture_output=True,
                       text=True, timeout=300)
    _one_line(r.stderr, case)
    assert r.returncode == case.code
    assert snapshot(tmp_path) == before


def test_the_catalogue_is_unique_and_large():
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names) >= 45
    assert set(SUBPROCESS) <= set(names)


@pytest.mark.parametrize("extra", [
    ("data.source=text", "data.paths={data}/corpus/*.txt", "data.val_fraction=0.5"),
    ("data.source=shards", "data.paths={data}/train.bin", "data.val_paths={data}/val.bin"),
    ("data.source=text", "data.paths={data}/one.txt", NO_EVAL, "mesh.data=2",
     "train.micro_batches=2"),
])
def test_good_input_passes_every_check(extra, tmp_path):
    """The checks refuse what the rows refuse and nothing more."""
    make_inputs(tmp_path / "data")
    extra = [e.replace("{data}", str(tmp_path / "data")) for e in extra]
    cfg = presets.load("tiny", [*BASE, *extra])
    preflight.check(cfg, str(tmp_path / "run"), resume=False)
    assert not (tmp_path / "run").exists()


def test_an_unwritable_workdir_is_refused(tmp_path, monkeypatch):
    """The catalogue's permission row is skipped as root; os.access says no here."""
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=f"cannot create it in {tmp_path} .permission"):
        preflight.check_workdir(str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="run: not writable"):
        (tmp_path / "run").mkdir()
        preflight.check_workdir(str(tmp_path / "run"))


def test_batch_must_split_over_processes():
    """Two processes each feed half the rows: a batch replicated over the mesh (tensor
    parallelism only) would claim both halves are the same rows."""
    cfg = presets.load("tiny", [*BASE, "mesh.fsdp=1", "mesh.tensor=8"])
    mesh = preflight.make_mesh(cfg)
    preflight.check_batch(cfg, mesh, processes=1)
    with pytest.raises(ConfigError, match="splits 1 ways .* not over the 2 processes"):
        preflight.check_batch(cfg, mesh, processes=2)
    fsdp = presets.load("tiny", BASE)
    preflight.check_batch(fsdp, preflight.make_mesh(fsdp), processes=2)


def test_an_axis_that_does_not_divide_warns_once_naming_the_parameter():
    """mesh.expert=2 with 3 experts leaves every expert stack whole on each device: a
    ShardingWarning names each such parameter once; size-1 axes and dividing ones are
    quiet."""
    from flax import nnx

    from k2jax.model import Transformer

    def abstract_params(**changes):
        cfg = presets.preset("tiny", *(f"{k}={v}" for k, v in changes.items()))
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        return nnx.split(model, nnx.Param, ...)[1]

    odd = abstract_params(n_routed_experts=3)
    mesh = sharding.make_mesh(data=1, fsdp=4, expert=2, tensor=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        sharding.variable_shardings(odd, mesh)
        sharding.variable_shardings(odd, mesh)
    messages = [str(w.message) for w in caught if w.category is sharding.ShardingWarning]
    assert len(messages) == len(set(messages)) > 0
    w_gate = [m for m in messages if "w_gate" in m and "'expert' dimension of 3" in m]
    assert len(w_gate) == 1 and "mesh.expert=2" in w_gate[0], messages
    assert all("mesh.fsdp" not in m for m in messages)  # embed = 64 splits over 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.variable_shardings(abstract_params(), mesh)  # 8 experts split over 2
        sharding.variable_shardings(odd, sharding.make_mesh(data=1, fsdp=1, expert=1,
                                                            tensor=1))
