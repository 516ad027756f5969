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
finish regardless; the exit status is 1 when any member failed, and a re-run tries
the failed ones again. A member stopped by a signal (experiments.train saves a checkpoint
and exits 75, "preempted") is resumed at once while the sweep runs (its retry); one still
stopped at the end is recorded as ``preempted``, not failed, a re-run resumes it, and the
sweep exits 75 when members were preempted and none failed. Ctrl-C or SIGTERM
stops the sweep: no new attempt starts, running members get SIGTERM (they
checkpoint and exit), and the next invocation picks up where it stopped.

DIR also holds ``results.csv`` (one row per member: swept values, status, losses,
max logits, spikes, divergence, tokens, FLOPs, wall time; ``k2jax.sweeps.load``),
``status/NAME-HASH.json`` (each member's outcome), ``logs/NAME-HASH.K.log`` (the
output of attempt K) and ``sweep.jsonl`` (one line per invocation: the command and
its members). Nothing a finished member wrote is ever touched again; a
``results.csv`` listing members the current command does not have is kept as
``results.before-K.csv``. One sweep at a time may use DIR (an flock on ``DIR/.lock``,
which holds on one machine: on storage shared between machines, start one sweep per
directory).

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
import fcntl
import json
import os
import shlex
import signal
import sys

from experiments import sweep_member
from experiments import sweeps as studies
from experiments.sweep_member import Job, command, execute, has_checkpoint, read_status, stop_all
from experiments.sweep_ray import connect_ray, ray_options, run_ray
from experiments.train import load_config
from k2jax import atomic, sweeps
from k2jax.config import ConfigError

# ---------------------------------------------------------------------------
# the local engine: a thread per running member (Ray: experiments/sweep_ray.py)


def run_local(jobs: list[Job], workers: int, on_done) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(execute, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            on_done(futures[future], future.result())
    except KeyboardInterrupt:
        stop_all()  # queued members never start; running ones checkpoint and exit
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    args = ap.parse_intermixed_args(argv)
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
    if args.ray and args.workers != 1:
        raise ConfigError("--workers is for local runs; on Ray, --resources sets how many "
                          "members run at once")
    if args.resources and not args.ray:
        raise ConfigError("--resources needs --ray (locally, --workers N runs N at once)")
    ray_options(args.resources)
    studies.swept_keys(study.axes)  # a key set by two axes
    _check_keys(study)
    out = args.workdir or os.path.join("runs", "sweeps",
                                       args.study + ("-quick" if args.quick else ""))
    left = set(os.listdir(out)) - {".lock"} if os.path.isdir(out) else set()
    if (left or os.path.isfile(out)) and not os.path.isfile(os.path.join(out, "sweep.jsonl")):
        raise ConfigError(f"--workdir {atomic.occupied(out)} and is not a sweep directory "
                          "(no sweep.jsonl); choose a new directory")
    return study, os.path.abspath(out)


def _check_keys(study: studies.Study) -> None:
    """A bad base, or a swept key that is no config key, fails every member: say so now.
    (A bad *value* is one member's failure, recorded when it runs.)"""
    load_config(study.config, list(study.base))
    for point in (axis[0] for axis in study.axes if axis):
        for key, value in point.items():
            try:
                load_config(study.config, [*study.base, f"{key}={value}"])
            except ConfigError as e:
                if "unknown config key" in str(e) or "has no sub-keys" in str(e):
                    raise


def lock(sweep_dir: str):
    """Hold ``DIR/.lock`` for this process's life: two sweeps in one directory would
    move each other's live runs aside. (An flock: it keeps out sweeps on this machine;
    on storage shared between machines, start one sweep per directory.)"""
    os.makedirs(sweep_dir, exist_ok=True)
    handle = open(os.path.join(sweep_dir, ".lock"), "w")  # noqa: SIM115  (held until exit)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"{sweep_dir} is in use by another sweep (it holds "
                          f"{sweep_dir}/.lock); wait for it or choose another --workdir") from None
    except OSError as e:  # e.g. no locks on this filesystem
        handle.close()
        raise ConfigError(f"{sweep_dir}/.lock: cannot lock ({e})") from None
    return handle


class Results:
    """results.csv, rewritten (atomically) each time a member ends, in plan order. One
    that lists members this plan lacks is first kept as ``results.before-K.csv``."""

    def __init__(self, sweep_dir: str, members: list[studies.Member], keys: list[str]):
        self.path, self.keys = os.path.join(sweep_dir, sweeps.RESULTS), keys
        self.sweep_dir, self.members = sweep_dir, members
        self.rows: dict[str, dict] = {}
        if os.path.isfile(self.path):
            try:
                listed = set(sweeps.load(sweep_dir)["member"])
            except (ValueError, KeyError, OSError):  # unreadable: keep it too
                listed = {None}
            if listed - {m.name for m in members}:
                k = 1
                while os.path.exists(old := os.path.join(sweep_dir, f"results.before-{k}.csv")):
                    k += 1
                os.replace(self.path, old)
                print(f"kept the previous results.csv (other members) as {old}")

    def add(self, member: studies.Member, status: dict) -> None:
        row = {"member": member.name, **member.values, **status,
               "overrides": shlex.join(member.overrides)}
        try:
            row.update(sweeps.run_summary(os.path.join(self.sweep_dir, member.name)))
        except (ConfigError, OSError, ValueError) as e:
            row["error"] = row.get("error") or f"summary: {e}"
        self.rows[member.name] = row

    def write(self) -> None:
        rows = [self.rows.get(m.name, {"member": m.name, **m.values, "status": "pending",
                                       "overrides": shlex.join(m.overrides)})
                for m in self.members]
        sweeps.write_results(self.path, rows, self.keys)


def _log_invocation(sweep_dir: str, argv, members: list[studies.Member]) -> None:
    line = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "experiments.sweep", *argv]),
            "members": [{"name": m.name, "overrides": list(m.overrides)} for m in members]}
    with open(os.path.join(sweep_dir, "sweep.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def _dry_run(jobs: list[Job], todo: list[Job]) -> int:
    for job in todo:
        print(shlex.join(command(job, resume=has_checkpoint(job))))
    print(f"# {len(todo)} of {len(jobs)} members to run; {len(jobs) - len(todo)} finished",
          file=sys.stderr)
    return 0


def _run(args, study, out: str, jobs: list[Job], todo: list[Job], ray) -> int:
    """Run ``todo`` and write results.csv as members end; then the study's analysis."""
    results = Results(out, [j.member for j in jobs], studies.swept_keys(study.axes))
    for job in jobs:
        if job not in todo:
            results.add(job.member, read_status(job))
    print(f"sweep {out}: {len(jobs)} members, {len(jobs) - len(todo)} finished before, "
          f"running {len(todo)}", flush=True)

    def on_done(job: Job, status: dict) -> None:
        print(f"  {status['status']:<6} {job.member.name}  {status.get('error', '')}",
              flush=True)
        try:
            results.add(job.member, status)
            results.write()
        except Exception as e:  # noqa: BLE001  (the next member's end writes it again)
            print(f"  (results.csv not written: {type(e).__name__}: {e})", file=sys.stderr)

    results.write()
    try:
        if ray is not None:
            run_ray(ray, todo, ray_options(args.resources), on_done)
        else:
            run_local(todo, args.workers, on_done)
    except KeyboardInterrupt:
        for job in todo:  # what ended before the interrupt, from the status records
            if job.member.name not in results.rows and read_status(job):
                results.add(job.member, read_status(job))
        results.write()
        print("interrupted: re-run the same command to continue", file=sys.stderr)
        return 130
    failed = [r for r in results.rows.values() if r.get("status") not in ("ok", "preempted")]
    preempted = [r for r in results.rows.values() if r.get("status") == "preempted"]
    status = 1 if failed else sweep_member.PREEMPTED if preempted else 0
    if study.analyze is not None:
        try:
            study.analyze(sweeps.load(out), out)
        except Exception as e:  # noqa: BLE001  (the runs are done; say what failed)
            print(f"error: analysis failed: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
    ok = len(jobs) - len(failed) - len(preempted)
    print(f"sweep: {len(jobs)} members, {ok} ok, {len(failed)} failed, {len(preempted)} "
          f"preempted (re-run to resume them); results in {results.path}")
    return status


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _args(argv)
    held = None
    try:
        study, out = resolve(args)
        ray = connect_ray(args.ray, ray_options(args.resources)) if args.ray and \
            not args.dry_run else None
        held = None if args.dry_run else lock(out)  # before reading what finished
        members = studies.plan(study.config, list(study.base), study.axes,
                               studies.known_members(out))
        jobs = [Job(m, study.config, out, os.getcwd()) for m in members]
        todo = [j for j in jobs if read_status(j).get("status") != "ok"]
        if args.dry_run:
            return _dry_run(jobs, todo)
    except ConfigError as e:
        if held is not None:
            held.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    # a scheduler's SIGTERM stops the sweep as Ctrl-C does (members checkpoint and exit)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with held:
        _log_invocation(out, argv, members)
        return _run(args, study, out, jobs, todo, ray)


if __name__ == "__main__":
    sys.exit(main())
