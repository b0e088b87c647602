"""Config sweeps: many points, few compiled programs, a resumable results store.

A `[sweep]` table lists axes (`conservation._experiments.config.AXES`). Member axes (`seed`,
`init_scale`, and for discrete optimizers `lr`, `weight_decay`, `momentum`) are batched: the
points become members of one ensemble whose optimizer hyperparameters are per-member arrays, so
a whole group runs as ONE compiled program. Call axes (a flow's `rtol`, `atol`, `t1`,
`weight_decay`, `lr`, `momentum`) are traced scalars of the solve: one call of the same compiled
program per value.
Static axes (`widths`, `solver`, `loss`, `group`, `samples`, `n`, `noise`) group the points;
each group is built and compiled once. Chunks share the compiled program (the last chunk is
padded to the same size). Every point is validated like a hand-written config.

Store (one folder per sweep): `sweep.json` (resolved config, axes, points), `points/<i>.npz`
written atomically as each chunk finishes, `summary.json` / `summary.csv` (one row per point).
Re-running the same sweep skips finished points and never rewrites them. Independent workers
(`run_sweep(..., worker=True)` / `shard=(i, n)`, the CLI's `--worker` / `--shard`) share one
folder through per-point claims (`claims/`, see `store.Claims`). The ensemble axis can
be sharded over a device mesh (`devices`); see `shard_ensemble`. A flow's `solver = "auto"` is
resolved once per call of the solve, from its first point (not per chunk), and every point
records the solver it ran with (`solver` in its npz and in the summary) and the lanes it ran in
(`batch_size` in its npz: it follows its chunk's size, see `gradient_flow`).
"""

import contextlib
import csv
import dataclasses
import io
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .._dynamics.monitor import STATUS_NAMES, below_accuracy
from .._models.base import Ensemble
from .._text import text_table
from .config import AXES, FLOW_KINDS, Config, ConfigError, sweep_point_dicts
from .store import (
    CLAIM_TTL,
    CLAIMS,
    Claims,
    CorruptFile,
    UserError,
    atomic_write,
    check_interrupted,
    fingerprint,
    folder_lock,
    identity,
    identity_array,
    jsonable,
    load_npz,
    prepare_output,
    read_json,
    remove_orphans,
    save_npz,
    strict_json,
    write_json,
)

_HYPERPARAMS = {"lr": "learning_rate", "weight_decay": "weight_decay", "momentum": "momentum"}


def axis_role(name: str, run) -> str:
    """How a sweep axis runs: "member" (a per-member value of one compiled program), "call"
    (a traced scalar of a flow: one call of the same compiled solve per value) or "static"
    (a new build: one compile per group of equal static values)."""
    role = AXES[name][1]
    if role == "member" and name in _HYPERPARAMS and run.kind in FLOW_KINDS:
        return "call"  # flows take lr / weight decay / momentum as traced scalars
    return role


def sweep_points(config: Config) -> list[dict]:
    """Every point of the sweep (cartesian product of the axes, in a fixed order)."""
    return sweep_point_dicts(config.sweep.axes)


def shard_ensemble(tree, devices: int, *, local: bool = False):
    """Place every array of `tree` (leading axis = ensemble member) on a 1-D device mesh,
    split along that axis. jit then runs each device's members there (GSPMD); results are
    the same numbers as unsharded. Works for CPU devices forced with
    XLA_FLAGS=--xla_force_host_platform_device_count=N, GPUs and TPUs alike. `local=True`
    (multi-host sweeps) builds the mesh from this process's own devices
    (`jax.local_devices()`), so every array stays on this host."""
    pool = jax.local_devices() if local else jax.devices()
    if devices > len(pool):
        raise ValueError(f"`devices` = {devices} but JAX sees {len(pool)}; on CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}.")
    mesh = jax.make_mesh((devices,), ("ensemble",), devices=pool[:devices],
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ensemble"))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array) and x.ndim else x,
        tree)


@dataclasses.dataclass
class _Group:
    static: dict  # the static axes' values shared by the group's points
    batches: list[list[int]]  # point indices sharing every "call" value (flows), in order

    @property
    def indices(self) -> list[int]:
        return [i for batch in self.batches for i in batch]

    @property
    def widths(self):
        return tuple(self.static["widths"]) if "widths" in self.static else None


def _key(point: dict, names) -> str:
    return json.dumps({k: point[k] for k in names}, sort_keys=True)


def _groups(points, run=None) -> list[_Group]:
    """Points grouped by their static values (one build and compile each), and within a group
    by their flow "call" values (one call of the compiled program each)."""
    if not points:
        return []
    roles = {name: axis_role(name, run) if run is not None else
             ("static" if name == "widths" else "member") for name in points[0]}
    static = [n for n, r in roles.items() if r == "static"]
    call = [n for n, r in roles.items() if r == "call"]
    groups: dict = {}
    for i, point in enumerate(points):
        batches = groups.setdefault(_key(point, static), {})
        batches.setdefault(_key(point, call), []).append(i)
    out = []
    for batches in groups.values():
        first = next(iter(batches.values()))[0]
        out.append(_Group({k: points[first][k] for k in static}, list(batches.values())))
    return out


def _processes() -> tuple[int, int]:
    """(this process's index, number of processes) of JAX's distributed runtime; (0, 1)
    unless `jax.distributed.initialize` was called with more than one process."""
    return jax.process_index(), jax.process_count()


def _agree(ok: bool) -> bool:
    """A barrier of all processes that also tells each whether every process got there
    without an error (so none waits forever for a failed peer). Host-local values only:
    `process_allgather` of one integer per process."""
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(ok)], dtype=np.int32))
    return bool(np.all(flags))


def _mine(items: list, dealt: int, rank: int, world: int) -> list:
    """Round-robin deal: the `n`-th item of the whole sweep (counted from `dealt`) goes to
    process `n % world`; the same on every process, as `done` is the same everywhere."""
    return [x for n, x in enumerate(items, start=dealt) if n % world == rank]


# With `--worker`/`--shard` (no `sweep.chunk`), a group's call batch is split into chunks of
# ceil(points / WORKER_CHUNKS) points (rounded up to whole devices): up to this many workers
# share one batch, each compiling the group's program once, and a dead worker loses at most
# one chunk.
WORKER_CHUNKS = 16


def parse_shard(text: str) -> tuple[int, int]:
    """`"I/N"` as (I, N) with 0 ≤ I < N. **Raises:** `ArgumentError` naming the value."""
    from .._validation import fail

    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise fail("--shard", text, "must be I/N (this job's index I in 0 … N-1 of N jobs), "
                   "e.g. 3/16") from None
    if count < 1 or not 0 <= index < count:
        raise fail("--shard", text, "must be I/N with N ≥ 1 and 0 ≤ I < N")
    return index, count


def slurm_shard(environ=None) -> tuple[int, int]:
    """(I, N) of this job in its SLURM array: `SLURM_ARRAY_TASK_ID` counted from
    `SLURM_ARRAY_TASK_MIN` in steps of `SLURM_ARRAY_TASK_STEP`, out of
    `SLURM_ARRAY_TASK_COUNT` (or (MAX − MIN) / STEP + 1). **Raises:** `UserError` outside an
    array, or for an array whose task ids are not evenly spaced (give `--shard I/N`)."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        raise UserError("`--shard` without I/N reads SLURM_ARRAY_TASK_ID, which is not set "
                        "(not a SLURM array job); give `--shard I/N`.")
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        low = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            count = (int(env["SLURM_ARRAY_TASK_MAX"]) - low) // step + 1
    except (KeyError, ValueError):
        raise UserError("SLURM's array variables (SLURM_ARRAY_TASK_ID, _MIN, _MAX, _STEP, "
                        "_COUNT) are incomplete or not integers; give `--shard I/N`.") from None
    index, rest = divmod(task - low, step)
    if rest or not 0 <= index < count:
        raise UserError(f"SLURM array task {task} is not task {low} + k·{step} of {count} "
                        "evenly spaced tasks (e.g. `--array=1,5,9-11`); give `--shard I/N`.")
    return index, count


def run_sweep(config: Config, *, out_dir=None, progress: bool = True, log=print,
              force: bool = False, worker: bool = False, shard: tuple[int, int] | None = None,
              claim_ttl: float = CLAIM_TTL) -> dict:
    """Run (or resume) the sweep of `config`; returns the summary (also written to disk).

    Points whose file is missing, cannot be read back or records another point
    (`points/<i>.npz` stores its index, axis values and the sweep's fingerprint) are
    (re)computed. A folder holding a different sweep (or a damaged `sweep.json`) is refused
    unless `force`, which replaces its results; files named like ours in a folder without
    `sweep.json` are never overwritten unless `force` (then with a log line each).
    `summary["computed"]` counts the points this call computed (`summary["computed_points"]`
    lists them).

    **One process** (default): the folder is locked for the whole call (a second such process
    waits, then finds the points done); each call batch of a group runs as one chunk (or
    chunks of `sweep.chunk`); the summary is written at the end.

    **Independent workers** (`worker=True`, or `shard=(i, n)`): any number of processes, on
    any machines sharing the folder, started at any time. Each claims the pending points it
    computes (`Claims`: an `O_EXCL` file per point in `claims/`, released once the point's
    file is written), so no two compute the same point; the folder lock is held only to
    prepare the folder and to write the summary. A killed worker loses only its claimed
    points (at most one chunk): a claim of a dead worker is taken over at once on the same
    machine, after `claim_ttl` seconds without heartbeat from another. Chunks hold
    ceil(batch / `WORKER_CHUNKS`) points unless `sweep.chunk` is set. `shard=(i, n)` computes
    only points i, i + n, i + 2n, …, with the same claims (shards and workers mix). A worker
    returns when no pending point of its share is left unclaimed; the one that finds every
    point finished writes the summary (`summary["summary_written"]`; otherwise the summary
    holds only `points` and `finished`). A one-process run on the folder claims its points
    too, and leaves points claimed by live workers to them.

    **Multi-host.** When JAX's distributed runtime runs several processes
    (`jax.distributed.initialize()` before this call; `jax.process_count() > 1`), every
    process must call `run_sweep` with the same config and folder (a shared file system).
    Process 0 holds the folder lock for the group, writes `sweep.json` and removes leftovers;
    the pending points are dealt round-robin (ensemble members are independent: a flow in
    lanes steps each member with its own controller, so a point's numbers do not depend on
    its batch companions; a chunk of one member runs diffrax's solve, a larger one lanes,
    which agree to round-off, or to ≤ rtol where a flow's steps sit at a stability limit, so
    the number of processes, or a worker's chunk size, can move a stiff point's numbers
    within its tolerance). Each process computes its share on its local devices only (no
    global arrays, no collectives in the computation), writes its
    own points (atomic files), and process 0 writes the summary and report after all are
    done. `devices = N` then shards each process's chunks over N of its local devices."""
    if config.sweep is None:
        raise ConfigError("this config has no [sweep] table; use `conservation run`.")
    if shard is not None:
        shard = parse_shard(f"{shard[0]}/{shard[1]}") if isinstance(shard, tuple | list) \
            else parse_shard(shard)
    rank, world = _processes()
    if world > 1 and (worker or shard is not None):
        raise UserError("`--worker` / `--shard` run independent processes; they do not "
                        "combine with JAX's distributed runtime (`--distributed`): use one "
                        "or the other.")
    devices = config.sweep.devices
    visible = len(jax.local_devices()) if world > 1 else len(jax.devices())
    if devices > visible:
        where = " local to each process (multi-host runs shard over local devices only)" \
            if world > 1 else ""
        raise ConfigError(f"field `sweep.devices` = {devices} but JAX sees {visible} "
                          f"device(s){where}; on CPU set XLA_FLAGS="
                          f"--xla_force_host_platform_device_count={devices}, or set devices = 0.")
    out = prepare_output(out_dir or config.output)
    points = sweep_points(config)
    manifest = {"config": _config_dict(config), "points": points}
    manifest = json.loads(strict_json(manifest))
    if world > 1:
        return _run_distributed(config, out, points, manifest, progress=progress, log=log,
                                force=force, rank=rank, world=world)
    return _run_independent(config, out, points, manifest, progress=progress, log=log,
                            force=force, worker=worker or shard is not None, shard=shard,
                            ttl=claim_ttl)


def _config_dict(config):
    from .runner import config_dict

    return config_dict(config)


def _run_independent(config, out, points, manifest, *, progress, log, force, worker, shard,
                     ttl) -> dict:
    """One process, or one of many independent workers (see `run_sweep`)."""
    claims = Claims(out, ttl=ttl)
    share = list(range(len(points)))
    if shard is not None:
        share = share[shard[0]::shard[1]]

    def prepare():
        # Another live worker may be writing a temporary right now: spare recent ones.
        _prepare(out, manifest, log, force=force,
                 min_age=ttl if claims.others_alive() else 0.0)
        claims.register()
        for note in config.ignored("sweep"):
            log(f"note: {note}")

    if not worker:
        with folder_lock(out, log=log):
            prepare()
            try:
                computed, busy = _compute(config, out, manifest, points, share, claims,
                                          small=False, progress=progress, log=log)
            finally:
                claims.close()
                claims.tidy()
            if busy:
                log(f"note: {len(busy)} point(s) are being computed by other workers (claims "
                    f"in {out / CLAIMS}); the last of them writes the summary")
            summary = _report(out)
        return summary | {"computed": len(computed), "computed_points": computed}
    with folder_lock(out, log=log):
        prepare()
    try:
        computed, busy = _compute(config, out, manifest, points, share, claims, small=True,
                                  progress=progress, log=log)
    finally:
        claims.close()
    with folder_lock(out, log=log):
        claims.tidy()
        finished = len(points) - len(_missing(out, range(len(points))))
        if finished == len(points):  # the last worker: every point is there
            summary = _report(out) | {"summary_written": True}
        else:
            summary = {"points": len(points), "finished": finished, "summary_written": False}
    if busy:
        log(f"{len(busy)} point(s) of this worker's share are claimed by other workers; the "
            "last worker to finish writes the summary")
    return summary | {"computed": len(computed), "computed_points": computed}


def _missing(out: pathlib.Path, indices) -> list[int]:
    """The points of `indices` without a file (one listing of the folder)."""
    try:
        names = set(os.listdir(out / "points"))
    except FileNotFoundError:
        names = set()
    return [i for i in indices if f"{i}.npz" not in names]


def _claim_chunk(claims: Claims, out: pathlib.Path, candidates: list[int], size: int
                 ) -> tuple[list[int], list[int]]:
    """Claim up to `size` pending points of `candidates` (in order): unclaimed ones first,
    then those of dead workers. Returns (claimed, pending points held by live workers)."""
    pending = _missing(out, candidates)
    held = claims.claimed()
    batch, taken = [], []
    for i in pending:
        if len(batch) == size:
            break
        if str(i) in held:
            taken.append(i)
        elif claims.claim(str(i)):
            batch.append(i)
    for i in taken:
        if len(batch) == size:
            break
        if claims.is_stale(str(i)) and claims.take_over(str(i)):
            batch.append(i)
    # A point finished (and its claim released) between the listing and the claim.
    done = set(batch) - set(_missing(out, batch))
    for i in done:
        claims.release(str(i))
    batch = [i for i in batch if i not in done]
    busy = [i for i in taken if i not in batch]
    return batch, busy


def _compute(config, out, manifest, points, share, claims, *, small, progress, log
             ) -> tuple[list[int], list[int]]:
    """Compute the pending points of `share` (indices into `points`), claiming each chunk
    before computing it. Returns (points computed, pending points left to live workers).
    `small`: chunks of ceil(batch / WORKER_CHUNKS) points (workers), else whole batches."""
    from .runner import SHARED, build, execute_with, model_factory, result_arrays

    run = config.dynamics[0]
    devices = config.sweep.devices
    mine = set(share)
    total = len(share)
    bar = tqdm(total=total, initial=total - len(_missing(out, share)),
               desc="sweep", unit="point", disable=not progress, smoothing=0.0,
               dynamic_ncols=True)
    computed, busy = [], set()
    try:
        for group in _groups(points, run):
            batches = [[i for i in b if i in mine] for b in group.batches]
            if not any(_missing(out, b) for b in batches):
                continue
            longest = max(len(b) for b in group.batches)
            size = config.sweep.chunk or (-(-longest // WORKER_CHUNKS) if small else longest)
            if devices:
                size = -(-size // devices) * devices  # whole members per device
            built = None
            for indices, candidates in zip(group.batches, batches, strict=True):
                point_run = None
                while True:
                    batch, left = _claim_chunk(claims, out, candidates, size)
                    busy.update(left)
                    if not batch:
                        break
                    try:
                        if built is None:  # built once a chunk of the group is claimed
                            built = _build_group(config, group, size, build, model_factory)
                        group_config, objective, laws, make = built
                        if point_run is None:
                            point_run = _call_run(points, indices, run, group_config,
                                                  objective, make)
                        _run_chunk(config, out, manifest, points, batch, size, point_run,
                                   objective, laws, make, group_config, devices=devices,
                                   local=False, shared=SHARED, execute_with=execute_with,
                                   result_arrays=result_arrays)
                    finally:
                        for i in batch:  # written, or unfinished: the next worker takes it
                            claims.release(str(i))
                    computed += batch
                    busy.difference_update(batch)
                    if small:
                        log(f"computed point(s) {', '.join(map(str, batch))}")
                    bar.n = total - len(_missing(out, share))
                    bar.refresh()
                    check_interrupted()  # a Ctrl-C swallowed during the batch
    finally:
        bar.close()
    return computed, sorted(set(_missing(out, busy)))


def _build_group(config, group, size, build, model_factory):
    """(config, objective, laws, model factory) of `group` for chunks of `size` members."""
    # Every point was validated in full when the config was parsed; `at` substitutes the
    # group's static values (a new shape, loss, group or data set) into the config.
    group_config = config.at(group.static) if group.static else config
    # `[ensemble]` is ignored (each point is one member): build no ensemble of it.
    group_config = group_config.model_copy(update={"ensemble": type(config.ensemble)()})
    _, objectives, laws = build(group_config, members=size)
    objective = objectives.get("augmented", objectives.get(""))
    return group_config, objective, laws, model_factory(group_config.model)


def _run_chunk(config, out, manifest, points, batch, size, point_run, objective, laws, make,
               group_config, *, devices, local, shared, execute_with, result_arrays):
    """Compute the points `batch` as one ensemble of `size` members (the last point repeated:
    no recompile for a short chunk) and write each one's file."""
    run = config.dynamics[0]
    padded = batch + [batch[-1]] * (size - len(batch))
    members = [_member(make, points[i], group_config) for i in padded]
    ensemble = Ensemble.stack(members)
    hyperparams = {
        _HYPERPARAMS[name]: jnp.asarray([points[i][name] for i in padded])
        for name in _HYPERPARAMS if name in config.sweep.axes
        and axis_role(name, run) == "member"}
    if devices:
        ensemble, hyperparams = shard_ensemble((ensemble, hyperparams), devices, local=local)
    from .runner import observables_from_config
    result = jax.block_until_ready(execute_with(
        point_run, objective, ensemble, laws=laws, hyperparams=hyperparams,
        key=jax.random.PRNGKey(config.seed),
        observables=observables_from_config(config, objective)))
    arrays = result_arrays(result, laws)
    for j, i in enumerate(batch):
        member = {k: (v if k in shared or k.startswith("relative/") else v[j])
                  for k, v in arrays.items()}
        member["identity"] = identity_array(_point_identity(manifest, i))
        save_npz(out / "points" / f"{i}.npz", member)


def _run_distributed(config, out, points, manifest, *, progress, log, force, rank, world
                     ) -> dict:
    """The processes of one JAX distributed run (see `run_sweep`, Multi-host)."""
    from .runner import SHARED, build, execute_with, model_factory, result_arrays

    devices = config.sweep.devices
    manifest_path = out / "sweep.json"
    tag = f"[process {rank}/{world}] "
    log = (lambda message, _log=log: _log(tag + message))
    # Independent processes exclude each other with the lock; the processes of one
    # distributed run cooperate under process 0's lock (the others would deadlock on it).
    lock = folder_lock(out, log=log) if rank == 0 else contextlib.nullcontext()
    with lock:
        error = None
        if rank == 0:
            try:
                _prepare(out, manifest, log, force=force)
            except Exception as e:  # noqa: BLE001 — told to the peers, then raised
                error = e
        if not _agree(error is None):
            if error is None:
                raise UserError(f"process 0 could not prepare {out}; see its error.")
        if error is not None:
            raise error
        if read_json(manifest_path) != manifest:
            error = UserError(f"process {rank} runs a different config than process 0 "
                              f"(whose sweep.json is in {out}); give every process the same "
                              "config.")
        if not _agree(error is None):
            raise error or UserError(f"another process disagrees on the sweep in {out}; see "
                                     "its error.")
        run = config.dynamics[0]
        chunk = config.sweep.chunk
        if rank == 0:
            for note in config.ignored("sweep"):
                log(f"note: {note}")
        done = {i for i in range(len(points))
                if (out / "points" / f"{i}.npz").exists()}  # checked readable by process 0
        plan, dealt = [], 0  # (group, size, [(call batch, [chunk, ...])]) this process runs
        for group in _groups(points, run):
            if all(i in done for i in group.indices):
                continue
            longest = max(len(b) for b in group.batches)
            size = chunk or -(-longest // world)  # one chunk per process by default
            if devices:
                size = -(-size // devices) * devices  # whole members per device
            work = []
            for indices in group.batches:
                pending = [i for i in indices if i not in done]
                mine = _mine(pending, dealt, rank, world)
                dealt += len(pending)
                mine = [mine[s:s + size] for s in range(0, len(mine), size)]
                if mine:
                    work.append((indices, mine))
            if work:
                plan.append((group, size, work))
        # One update per finished chunk, ETA from the average rate since start (smoothing=0):
        # an exponential average over chunky updates would swing.
        share = sum(len(b) for _, _, work in plan for _, chunks in work for b in chunks)
        bar = tqdm(total=share, initial=0, desc=f"sweep [{rank}/{world}]", unit="point",
                   disable=not progress, smoothing=0.0, dynamic_ncols=True)
        computed = []
        failure = None
        try:
            for group, size, work in plan:
                group_config, objective, laws, make = _build_group(config, group, size, build,
                                                                   model_factory)
                for indices, chunks in work:
                    point_run = _call_run(points, indices, run, group_config, objective, make)
                    for batch in chunks:
                        _run_chunk(config, out, manifest, points, batch, size, point_run,
                                   objective, laws, make, group_config, devices=devices,
                                   local=True, shared=SHARED, execute_with=execute_with,
                                   result_arrays=result_arrays)
                        computed += batch
                        bar.update(len(batch))
                        check_interrupted()  # a Ctrl-C swallowed during the batch
        except BaseException as e:  # a multi-host peer must not wait for us forever
            failure = e
        finally:
            bar.close()
        if not _agree(failure is None):
            if failure is not None:
                raise failure
            raise UserError("another process of this multi-host sweep failed (see its "
                            f"error); finished points are kept in {out}/, rerun to resume.")
        summary, error = None, None
        if rank == 0:
            try:
                summary = _report(out)
            except Exception as e:  # noqa: BLE001 — told to the peers, then raised
                error = e
        if not _agree(error is None):
            raise error or UserError(f"process 0 could not write the summary of {out}; "
                                     "see its error.")
        if summary is None:
            summary = read_json(out / "summary.json")
    return summary | {"computed": len(computed), "computed_points": computed}


def _call_run(points, indices, run, group_config, objective, make):
    """The dynamics table of one call batch (its points share the "call" axes' values), with
    `solver="auto"` resolved once for the whole batch."""
    call = {k: v for k, v in points[indices[0]].items() if axis_role(k, run) == "call"}
    point_run = group_config.dynamics[0].model_copy(update=call)
    if point_run.kind in FLOW_KINDS and point_run.solver == "auto":
        point_run = _resolve_auto(point_run, objective, make, points, indices, group_config)
    return point_run


def _resolve_auto(run, objective, make, points, indices, config):
    """`run` with `solver = "auto"` resolved once for the points `indices` (one call of the
    solve), probing their first point's member: the choice then does not depend on how the
    points are chunked, dealt to processes or resumed, as a per-chunk probe would."""
    from .._dynamics.solvers import choose_solver
    from .runner import _flow_field

    choice = choose_solver(objective, _member(make, points[indices[0]], config), run.t1,
                           max_steps=run.max_steps, field=_flow_field(run))
    return run.model_copy(update={"solver": choice.name})


def _member(make, point, config):
    """The initial model of `point` (its seed and init scale, else the config's)."""
    return make(jax.random.PRNGKey(point.get("seed", config.seed)),
                point.get("init_scale", config.model.init_scale))


_OUR_FILES = ("sweep.json", "summary.json", "summary.csv", "report.png")
_REPLACE = "pass `--force` to replace the sweep in that folder, or choose another `--out`"


def _point_identity(manifest: dict, index: int) -> dict:
    """What a point file records about itself: the sweep's fingerprint (its resolved config),
    the point's index and its axis values (JSON, as in sweep.json)."""
    return {"sweep": fingerprint(manifest["config"]), "point": index,
            "values": manifest["points"][index]}


def _point_problem(arrays: dict, manifest: dict, index: int) -> str | None:
    """Why the stored `arrays` are not point `index` of this sweep (None: they are)."""
    recorded = identity(arrays)
    if recorded == _point_identity(manifest, index):
        return None
    if recorded is None:
        return "records no point (written by an older version)"
    other = "this" if recorded.get("sweep") == fingerprint(manifest["config"]) else "another"
    values = ", ".join(f"{k} = {v}" for k, v in (recorded.get("values") or {}).items())
    return f"holds point {recorded.get('point')} ({values}) of {other} sweep"


def _point_files(out: pathlib.Path) -> list[pathlib.Path]:
    folder = out / "points"
    return sorted(folder.glob("*.npz")) if folder.is_dir() else []


def _prepare(out: pathlib.Path, manifest: dict, log, *, force: bool = False,
             min_age: float = 0.0) -> None:
    """Under the folder lock, before any point is computed: remove leftovers of killed
    writes (older than `min_age` seconds: live workers write too), write or check
    `sweep.json` (a different or damaged one: refused unless `force`), refuse files named
    like ours that no sweep.json accounts for (unless `force`), and delete point files that
    cannot be read back or record another point (a file copied over it)."""
    for orphan in remove_orphans(out, min_age=min_age):
        log(f"removed {orphan.name}, left by an interrupted write")
    manifest_path = out / "sweep.json"
    previous = None
    if manifest_path.exists():
        try:
            previous = read_json(manifest_path, fix=_REPLACE)
            if not isinstance(previous.get("points"), list):
                raise CorruptFile(manifest_path, "not a sweep manifest", fix=_REPLACE)
        except CorruptFile as e:
            if not force:
                raise
            log(f"--force: {manifest_path} is corrupted ({e.reason}); replacing the sweep in "
                f"{out}")
            previous = {"points": []}
        if previous != manifest:
            if not force:
                raise UserError(f"{out} holds a different sweep; choose another `--out` folder, "
                                "or pass `--force` to replace it.")
            log(f"--force: replacing the sweep in {out}")
            # Ours: the files the old sweep.json accounts for (never any other file).
            for i in range(len(previous["points"])):
                (out / "points" / f"{i}.npz").unlink(missing_ok=True)
            for name in _OUR_FILES:
                (out / name).unlink(missing_ok=True)
            previous = None
    elif (out / "run.json").exists():
        raise UserError(f"{out} holds the results of `conservation run`; choose another "
                        "`--out` folder.")
    count = len(manifest["points"])
    if previous is None:
        # A new sweep: any file with our names is someone else's.
        foreign = [out / n for n in _OUR_FILES if (out / n).exists()] + [
            p for p in _point_files(out) if p.stem.isdigit() and int(p.stem) < count]
        if foreign and not force:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise UserError(f"{foreign[0]}{more} was not written by this sweep ({out} has no "
                            "sweep.json); choose another `--out`, or pass `--force` to "
                            "replace it.")
        for path in foreign:
            log(f"--force: replacing {path}, which conservation did not write")
            path.unlink()
        (out / "points").mkdir(exist_ok=True)
        write_json(manifest_path, manifest)
    (out / "points").mkdir(exist_ok=True)
    for i in range(count):
        path = out / "points" / f"{i}.npz"
        if not path.exists():
            continue
        try:
            problem = _point_problem(load_npz(path), manifest, i)
        except CorruptFile as e:
            log(f"{path} is corrupted ({e.reason}); recomputing it")
            path.unlink()
            continue
        if problem is not None:
            log(f"warning: {path} {problem}, not point {i}; recomputing it")
            path.unlink()


def write_report(out) -> dict:
    """Summary table of a sweep folder (json + csv) and `report.png`, from the stored points
    (waits for a sweep running in the folder). **Raises:** `UserError` if `out` holds no
    sweep."""
    out = pathlib.Path(out)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; give a folder written by `conservation "
                        "sweep`.")
    if not (out / "sweep.json").is_file():
        raise UserError(f"{out} holds no sweep (no sweep.json); run `conservation sweep "
                        f"CONFIG --out {out}` first.")
    with folder_lock(out, log=lambda message: print(message, file=sys.stderr)):
        return _report(out)


def _report(out: pathlib.Path) -> dict:
    from .plot import plot_sweep

    manifest = read_json(out / "sweep.json", fix="rerun `conservation sweep` with its config "
                         "and `--force` to replace the sweep, or choose another `--out`")
    rows, relative, corrupted = [], {}, []
    for i, point in enumerate(manifest["points"]):
        path = out / "points" / f"{i}.npz"
        if not path.exists():
            rows.append({"point": i, **_flat(point), "status": "missing"})
            continue
        try:
            arrays = load_npz(path)
            if _point_problem(arrays, manifest, i) is not None:  # another point's file
                raise CorruptFile(path, _point_problem(arrays, manifest, i))
        except CorruptFile:
            corrupted.append(path)
            rows.append({"point": i, **_flat(point), "status": "corrupted"})
            continue
        drifts = {k.split("/", 1)[1]: float(arrays[k]) for k in arrays
                  if k.startswith("max_drift/")}
        relative |= {k.split("/", 1)[1]: bool(arrays[k]) for k in arrays
                     if k.startswith("relative/")}
        solver = {"solver": str(arrays["solver"])} if "solver" in arrays else {}
        rows.append({"point": i, **_flat(point), **solver,
                     "status": STATUS_NAMES[int(arrays["status"])],
                     "final_loss": float(arrays["loss"][-1]),
                     # beyond float64's guaranteed accuracy: digits are noise (`below_accuracy`)
                     **({"below_accuracy": True} if below_accuracy(arrays["loss"]) else {}),
                     **{f"max_drift[{k}]": v for k, v in drifts.items()}})
    finished = sum(r["status"] not in ("missing", "corrupted") for r in rows)
    summary = {"points": len(rows), "finished": finished,
               "corrupted": [str(p) for p in corrupted], "relative_drift": relative,
               "rows": jsonable(rows)}
    write_json(out / "summary.json", summary)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode()
    atomic_write(out / "summary.csv", lambda f: f.write(data))
    if finished:
        atomic_write(out / "report.png",
                     lambda f: plot_sweep(rows, manifest, f, relative=relative))
    return summary


def format_sweep_summary(summary: dict) -> str:
    """The summary table of a sweep (one row per point: axes, status, final loss and each
    law's worst drift, "rel"ative or "abs"olute)."""
    rows = summary["rows"]
    relative = summary.get("relative_drift", {})
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def header(key):
        if key.startswith("max_drift["):
            law = key[len("max_drift["):-1]
            return f"{law} {'rel' if relative.get(law, True) else 'abs'}"
        return key.replace("_", " ")

    def cell(key, value):
        if value is None:
            return "-"
        if isinstance(value, float):  # results in scientific notation, axis values as given
            return f"{value:.3e}" if key == "final_loss" or "[" in key else f"{value:g}"
        return str(value)

    table = [tuple(header(c) for c in columns)]
    table += [tuple(cell(c, r.get(c)) for c in columns) for r in rows]
    return text_table(table)


def _flat(point):
    return {k: ("-".join(map(str, v)) if isinstance(v, list) else v) for k, v in point.items()}
