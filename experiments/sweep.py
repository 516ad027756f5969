"""Run a sweep of training runs: resumable, failure-isolated, locally or on a Ray cluster.

    python -m experiments.sweep --config tiny --workdir DIR \\
        --grid optimizer.lr=0.003,0.03 --grid optimizer.name=adamw,muon train.steps=20
    python -m experiments.sweep STUDY [--quick]      # a study in experiments/sweeps/
        [--workers N] [--dry-run] [--ray auto|HOST:PORT [--resources TPU=4]]

Every member is an ordinary ``experiments.train`` run in ``DIR/NAME-HASH/``: NAME
reads the swept values (``lr=0.003_name=adamw``), HASH is of the member's resolved
config, so re-running the command skips what finished and a changed config is a
new member (marin's executor keys its steps the same way). A member that fails (a
bad override, a crash, a divergence stop) is recorded with its one-line error and
retried once: from its last checkpoint if it has one, else afresh with the failed
attempt's directory kept beside it as ``NAME-HASH.failed-K``. The other members
finish regardless; the exit status is 1 when any member failed.

DIR also holds ``results.csv`` (one row per member: swept values, status, losses,
max logits, spikes, divergence, tokens, FLOPs, wall time; ``k2jax.sweeps.load``),
``status/NAME-HASH.json`` (each member's outcome), ``logs/NAME-HASH.K.log`` (the
output of attempt K) and ``sweep.jsonl`` (one line per invocation: the command and
its members). Nothing a finished member wrote is ever touched again.

``--ray`` sends members as Ray tasks (``--resources`` per member, default 1 CPU) to
the cluster at ADDRESS (``auto``: the one this machine belongs to). The workers
run the same code on the same paths, so DIR must be on a filesystem they share
(as on TPU VMs with a shared disk or gcsfuse), and this repository must be
importable there at the same path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

from experiments import sweeps as studies
from experiments.train import load_config
from k2jax import atomic, sweeps
from k2jax.config import ConfigError, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIES = 1


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of the sweep: its directory name, swept values and full override list."""

    name: str
    values: dict[str, str]
    overrides: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs to run a member (plain data, so Ray can ship it)."""

    member: Member
    config: str  # preset name, config file or checkpoint directory
    sweep_dir: str  # absolute
    cwd: str  # where the sweep was started: relative paths in overrides mean the same


# ---------------------------------------------------------------------------
# planning


def config_hash(config: str, overrides: list[str]) -> str:
    """10 hex digits of the resolved config (or, for one that does not resolve, of the
    command's text: that member fails, but keeps a stable name)."""
    try:
        text = json.dumps(to_dict(load_config(config, overrides)), sort_keys=True)
    except ConfigError:
        text = "\n".join(["unresolved", config, *overrides])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def readable(values: dict[str, str]) -> str:
    """``lr=0.003_name=adamw``: each swept key by its last part (whole where two share
    it), values with anything unsafe in a path replaced, each cut to 24 characters."""
    leaves = [k.rsplit(".", 1)[-1] for k in values]
    parts = []
    for key, leaf in zip(values, leaves):
        label = leaf if leaves.count(leaf) == 1 else key
        parts.append(f"{label}={re.sub(r'[^A-Za-z0-9.+-]', '-', values[key])[:24]}")
    return "_".join(parts) or "run"


def plan(config: str, base: list[str], axes, known: dict[str, str] | None = None) -> list[Member]:
    """The members, in axis order; identical resolved configs are one member. ``known``
    maps the hashes of members already in the sweep directory to their names, so a
    value spelled differently (3e-3 for 0.003) still finds its finished member."""
    members: dict[str, Member] = {}
    for values in studies.points(axes):
        overrides = [*base, *(f"{k}={v}" for k, v in values.items())]
        digest = config_hash(config, overrides)
        name = (known or {}).get(digest, f"{readable(values)}-{digest}")
        members.setdefault(digest, Member(name, values, tuple(overrides)))
    return list(members.values())


def known_members(sweep_dir: str) -> dict[str, str]:
    """{config hash: member name} of the members with a status in ``sweep_dir``."""
    status = os.path.join(sweep_dir, "status")
    names = [n.removesuffix(".json") for n in os.listdir(status)] if os.path.isdir(status) else []
    return {n.rsplit("-", 1)[-1]: n for n in names}


# ---------------------------------------------------------------------------
# running one member (on this machine or a Ray worker)


def _paths(job: Job) -> tuple[str, str, str]:
    d, n = job.sweep_dir, job.member.name
    return (os.path.join(d, n), os.path.join(d, "status", f"{n}.json"),
            os.path.join(d, "logs"))


def read_status(job: Job) -> dict:
    path = _paths(job)[1]
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def command(job: Job, *, resume: bool, python: str = "python") -> list[str]:
    run_dir = _paths(job)[0]
    if resume:  # config.json in run_dir holds everything else
        return [python, "-m", "experiments.train", "--workdir", run_dir, "--resume",
                "--no-progress"]
    return [python, "-m", "experiments.train", "--config", job.config, "--workdir", run_dir,
            "--no-progress", *job.member.overrides]


def _has_checkpoint(run_dir: str) -> bool:
    ckpt = os.path.join(run_dir, "checkpoints")
    return (os.path.isfile(os.path.join(run_dir, "config.json")) and os.path.isdir(ckpt)
            and any(n.isdigit() for n in os.listdir(ckpt)))


def _prepare(run_dir: str) -> bool:
    """Before an attempt: True to resume from a checkpoint; otherwise a leftover
    directory of an earlier attempt is moved aside (kept), never deleted."""
    if _has_checkpoint(run_dir):
        return True
    if atomic.occupied(run_dir) is not None:
        k = 1
        while os.path.exists(f"{run_dir}.failed-{k}"):
            k += 1
        os.replace(run_dir, f"{run_dir}.failed-{k}")
    return False


def _error_line(log_path: str, rc: int) -> str:
    """The attempt's one-line error: the CLI's ``error:`` line, else the log's last line."""
    if rc < 0:
        return f"killed by signal {-rc}"
    with open(log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit {rc}: {last.removeprefix('error: ')}"


def _env() -> dict[str, str]:
    """This environment, with this repository importable from any working directory."""
    path = [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def execute(job: Job) -> dict:
    """Run the member with one retry; write and return its status record."""
    run_dir, status_path, logs = _paths(job)
    os.makedirs(logs, exist_ok=True)
    before = read_status(job)
    attempts, t0, error = int(before.get("attempts", 0)), time.time(), ""
    for _ in range(1 + RETRIES):
        attempts += 1
        cmd = command(job, resume=_prepare(run_dir), python=sys.executable)
        log_path = os.path.join(logs, f"{job.member.name}.{attempts}.log")
        with open(log_path, "x") as log:
            log.write(shlex.join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, cwd=job.cwd, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc == 0:
            error = ""
            break
        error = _error_line(log_path, rc)
    status = {"status": "failed" if error else "ok", "error": error, "attempts": attempts,
              "wall_s": round(float(before.get("wall_s", 0.0)) + time.time() - t0, 2),
              "overrides": list(job.member.overrides)}
    os.makedirs(os.path.dirname(status_path), exist_ok=True)
    atomic.write_text(status_path, json.dumps(status, indent=2))
    return status


# ---------------------------------------------------------------------------
# engines: a thread per running member here, or Ray tasks on a cluster


def run_local(jobs: list[Job], workers: int, on_done) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(execute, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            on_done(futures[future], future.result())


def ray_options(resources: list[str]) -> dict:
    """``["TPU=4", "CPU=2"]`` -> ray.remote options (default: one CPU per member)."""
    opts: dict = {"num_cpus": 1}
    for item in (r for text in resources for r in text.split(",") if r.strip()):
        key, sep, value = item.partition("=")
        amount = float(value) if re.fullmatch(r"\d+(\.\d*)?(e\d+)?", value.strip()) else -1.0
        if not sep or amount < 0:
            raise ConfigError(f"--resources {item!r}: expected NAME=AMOUNT, e.g. TPU=4")
        name = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}.get(key.strip())
        if name:
            opts[name] = amount
        else:
            opts.setdefault("resources", {})[key.strip()] = amount
    return opts


def run_ray(jobs: list[Job], address: str, options: dict, on_done) -> None:
    import ray  # noqa: PLC0415  (optional: only --ray needs it)

    try:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
                 log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--ray {address}: cannot connect ({str(e).splitlines()[0]})") from None
    try:
        remote = ray.remote(execute).options(**options)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # noqa: BLE001  (a lost task is one failed member)
                    outcome = {"status": "failed", "error": f"ray: {str(e).splitlines()[0]}"}
                on_done(job, outcome)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------
# the command


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", nargs="?", help=f"a study in experiments/sweeps/ "
                    f"({', '.join(studies.available())})")
    ap.add_argument("--config", help="preset, config file or checkpoint directory "
                    "(default: the study's)")
    ap.add_argument("--workdir", help="sweep directory (default for a study: "
                    "runs/sweeps/STUDY[-quick])")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="an axis; several are crossed")
    ap.add_argument("--quick", action="store_true", help="the study's minutes-long version")
    ap.add_argument("--workers", type=int, default=1, help="members run at once (local)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print one command per unfinished member and run nothing")
    ap.add_argument("--ray", metavar="auto|HOST:PORT", help="run members as Ray tasks there")
    ap.add_argument("--resources", action="append", default=[], metavar="NAME=AMOUNT",
                    help="Ray resources per member, e.g. TPU=4 (default CPU=1)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted config overrides applied to every member")
    args = ap.parse_args(argv)
    if args.study and "=" in args.study:  # no study name: argparse took the first override
        args.overrides.insert(0, args.study)
        args.study = None
    return args


def resolve(args) -> tuple[studies.Study, str]:
    """(the study to run, its directory); every argument problem is a ConfigError here,
    before anything is written."""
    if args.study:
        study = studies.load(args.study)
        study = study.quick_version() if args.quick else study
    elif args.quick:
        raise ConfigError("--quick needs a study name")
    else:
        if not args.config or not args.workdir:
            raise ConfigError("without a study name, --config and --workdir are required")
        study = studies.Study("command-line sweep", args.config)
    axes = tuple(studies.parse_axis(g) for g in args.grid)
    study = dataclasses.replace(study, config=args.config or study.config,
                                base=(*study.base, *args.overrides), axes=(*study.axes, *axes))
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be >= 1")
    if args.ray:
        ray_options(args.resources)
    load_config(study.config, list(study.base))  # a bad base fails every member: say so now
    out = args.workdir or os.path.join("runs", "sweeps",
                                       args.study + ("-quick" if args.quick else ""))
    if atomic.occupied(out) and not os.path.isfile(os.path.join(out, "sweep.jsonl")):
        raise ConfigError(f"--workdir {atomic.occupied(out)} and is not a sweep directory "
                          "(no sweep.jsonl); choose a new directory")
    return study, os.path.abspath(out)


class Results:
    """results.csv, rewritten (atomically) each time a member ends, in plan order."""

    def __init__(self, sweep_dir: str, members: list[Member], keys: list[str]):
        self.path, self.keys = os.path.join(sweep_dir, sweeps.RESULTS), keys
        self.sweep_dir, self.members = sweep_dir, members
        self.rows: dict[str, dict] = {}

    def add(self, member: Member, status: dict) -> None:
        row = {"member": member.name, **member.values, **status}
        try:
            row.update(sweeps.run_summary(os.path.join(self.sweep_dir, member.name)))
        except (ConfigError, OSError, ValueError) as e:
            row["error"] = row.get("error") or f"summary: {e}"
        self.rows[member.name] = row

    def write(self) -> None:
        rows = [self.rows.get(m.name, {"member": m.name, **m.values, "status": "pending"})
                for m in self.members]
        sweeps.write_results(self.path, rows, self.keys)


def _log_invocation(sweep_dir: str, argv, members: list[Member]) -> None:
    os.makedirs(sweep_dir, exist_ok=True)
    line = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "experiments.sweep", *argv]),
            "members": [{"name": m.name, "overrides": list(m.overrides)} for m in members]}
    with open(os.path.join(sweep_dir, "sweep.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _args(argv)
    try:
        study, out = resolve(args)
        members = plan(study.config, list(study.base), study.axes, known_members(out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = [Job(m, study.config, out, os.getcwd()) for m in members]
    todo = [j for j in jobs if read_status(j).get("status") != "ok"]
    if args.dry_run:
        for job in todo:
            print(shlex.join(command(job, resume=_has_checkpoint(_paths(job)[0]))))
        print(f"# {len(todo)} of {len(jobs)} members to run; {len(jobs) - len(todo)} finished",
              file=sys.stderr)
        return 0
    _log_invocation(out, argv, members)
    results = Results(out, members, studies.swept_keys(study.axes))
    for job in jobs:
        if job not in todo:
            results.add(job.member, read_status(job))
    print(f"sweep {out}: {len(jobs)} members, {len(jobs) - len(todo)} finished before, "
          f"running {len(todo)}", flush=True)

    def on_done(job: Job, status: dict) -> None:
        results.add(job.member, status)
        results.write()
        print(f"  {status['status']:<6} {job.member.name}  {status.get('error', '')}",
              flush=True)

    results.write()
    try:
        if args.ray:
            run_ray(todo, args.ray, ray_options(args.resources), on_done)
        else:
            run_local(todo, args.workers, on_done)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results.rows.values() if r.get("status") != "ok"]
    if study.analyze is not None:
        study.analyze(sweeps.load(out), out)
    print(f"sweep: {len(jobs)} members, {len(jobs) - len(failed)} ok, {len(failed)} failed; "
          f"results in {results.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
