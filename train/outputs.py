"""Run folders: where a run writes, checked before anything is written, and undone if the run fails early.

``output.dir`` is a job's folder. Each run of the job writes a new folder ``output.dir/run-N`` (N = 1, 2, ...)
and points ``output.dir/latest`` (a relative symlink) at it, so running the same command twice just makes a
second run beside the first; ``--resume`` continues ``latest`` (or ``output.dir`` itself when it is a run
folder); ``train.predict --run output.dir`` reads ``latest``. A finished run is never deleted, except by
``output.overwrite=true``, which replaces the latest run: the old folder is moved aside while the new run starts
and deleted only once the new run has written its first checkpoint.

:func:`plan` checks the output side of a run without writing (a folder that cannot be written, a resume target
that does not exist, whose ``config.yaml`` is damaged or differs); :meth:`Plan.create` then writes the run
folder, its ``config.yaml`` and the ``latest`` pointer. Until :meth:`RunFolder.commit` (called after the first
checkpoint), :meth:`RunFolder.abort` puts the job folder back as it was: the new run folder removed, a replaced
run moved back, ``latest`` pointing where it pointed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

from lora_jax.errors import ConfigError
from train import config as config_lib
from train.config import Config

LATEST = "latest"
CONFIG = "config.yaml"
_RUN = re.compile(r"run-(\d+)")


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a run folder (it holds the ``config.yaml`` a run writes first)."""
    return (Path(folder) / CONFIG).is_file()


def resolve_run(folder: str | Path, what: str = "folder") -> Path:
    """The run folder ``folder`` stands for: itself if it is a run, else the run its ``latest`` points to.
    Raises ``ConfigError`` (naming ``what``) when it is neither."""
    folder = Path(folder)
    if not folder.exists():
        raise ConfigError(f"{what} {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"{what} {str(folder)!r} is not a folder")
    if is_run(folder):
        return folder
    latest = folder / LATEST
    if latest.is_symlink() or latest.exists():
        try:
            target = latest.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # a dangling link, a link loop
            raise ConfigError(f"{what} {str(folder)!r}: {LATEST} does not lead to a run folder ({e})") from None
        if not is_run(target):
            raise ConfigError(
                f"{what} {str(folder)!r}: {LATEST} points to {str(target)!r}, which holds no run ({CONFIG} missing)"
            )
        return target
    runs = sorted(p.name for p in folder.iterdir() if _RUN.fullmatch(p.name))
    hint = f" (it has {', '.join(runs[:3])}: name one)" if runs else ""
    raise ConfigError(f"{what} {str(folder)!r} holds no run: no {CONFIG} and no {LATEST}{hint}")


def _comparable(d: dict) -> dict:
    """The part of a config that must not change when a run is resumed (its length, evaluation, checkpoint and
    output options may)."""
    d = dict(d)
    d["train"] = {k: v for k, v in dict(d.get("train") or {}).items() if k not in ("steps", "time_budget_s")}
    for name in ("output", "eval", "checkpoint"):
        d.pop(name, None)
    return d


def saved_config(folder: Path, what: str) -> Config:
    """The validated ``config.yaml`` of a run folder (one line naming it if damaged): built and checked as a
    command line's config is (:func:`train.config.validate`: combinations, regexes compiled by RE2), since the
    file may have been edited or come from elsewhere."""
    path = folder / CONFIG
    try:
        cfg = config_lib._build(Config, config_lib.read_file(path), "")
        config_lib.validate(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{what}: {path} is damaged or from another version ({e})") from None


def _writable_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def _next_run(job: Path) -> int:
    numbers = [
        int(m.group(1))
        for p in (job.iterdir() if job.is_dir() else ())
        if (m := _RUN.fullmatch(p.name.split(".replaced-")[0].lstrip(".")))
    ]
    return max(numbers, default=0) + 1


@dataclasses.dataclass
class Plan:
    """Where a run will write. ``folder``: the run folder (existing when resuming); ``replaces``: a run folder
    that ``output.overwrite`` replaces. The run that ``latest`` points to is replaced by a new ``run-N`` beside it:
    it stays where it is, and ``latest`` keeps pointing at it, until the new run's first checkpoint
    (:meth:`RunFolder.commit`), so a run killed before then hides nothing. A run folder named by ``output.dir``
    itself is moved aside by :meth:`create` and put back by :meth:`RunFolder.abort`, or by the next :func:`plan`
    when the process was killed (:func:`recover`)."""

    job: Path
    folder: Path
    resume: bool
    replaces: Path | None = None

    def create(self, cfg: Config, primary: bool = True) -> RunFolder:
        """Write the run folder, its ``config.yaml`` and the ``latest`` pointer (on the primary process)."""
        rf = RunFolder(self, primary)
        if self.resume or not primary:
            return rf
        job_existed = self.job.exists()
        latest = self.job / LATEST
        rf.previous_latest = os.readlink(latest) if latest.is_symlink() else None
        rf.job_created = not job_existed
        if self.replaces is not None and self.replaces == self.folder:
            aside = self.replaces.parent / f".{self.replaces.name}.replaced-{int(time.time())}-{os.getpid()}"
            os.rename(self.replaces, aside)
            rf.aside = aside
        try:
            self.folder.mkdir(parents=True, exist_ok=False)
            (self.folder / CONFIG).write_text(config_lib.dump(cfg))
            if self.folder.parent == self.job and self.folder != self.job and self.replaces is None:
                _point(latest, self.folder.name)  # (a replacement takes latest over at its first checkpoint)
        except BaseException:
            rf.abort()
            raise
        return rf


class RunFolder:
    """A run folder being written; :meth:`abort` undoes :meth:`Plan.create` until :meth:`commit`."""

    def __init__(self, plan: Plan, primary: bool = True):
        self.plan = plan
        self.folder = plan.folder
        self.aside: Path | None = None
        self.previous_latest: str | None = None
        self.job_created = False
        self.committed = plan.resume or not primary  # only process 0 creates, and so only it undoes

    def commit(self) -> None:
        """The run has a checkpoint: from now on its folder stays, and a run it replaced is deleted."""
        if self.committed:
            return
        self.committed = True
        replaced = self.plan.replaces
        if replaced is not None and replaced != self.folder:  # latest moves to the new run, then the old one goes
            _point(self.plan.job / LATEST, self.folder.name)
            shutil.rmtree(replaced, ignore_errors=True)
        if self.aside is not None and self.aside.exists():
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def abort(self) -> None:
        """Put the job folder back as :meth:`Plan.create` found it (a no-op after :meth:`commit`)."""
        if self.committed:
            return
        self.committed = True
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.aside is not None and self.aside.exists():
            os.rename(self.aside, self.plan.replaces)
        latest = self.plan.job / LATEST
        if self.folder.parent == self.plan.job and self.folder != self.plan.job:
            if self.previous_latest is not None:
                _point(latest, self.previous_latest)
            elif latest.is_symlink():
                latest.unlink()
        if self.job_created and self.plan.job.is_dir() and not any(self.plan.job.iterdir()):
            self.plan.job.rmdir()


def _point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` (relative), replacing it atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def recover(folder: Path) -> Path | None:
    """Put back a run folder that a replacement moved aside (``.NAME.replaced-TIME-PID``) when that replacement
    was killed before its first checkpoint (its process is gone, ``folder`` holds no checkpoint); returns the
    folder put back, or None."""
    asides = sorted(folder.parent.glob(f".{folder.name}.replaced-*")) if folder.parent.is_dir() else []
    for aside in reversed(asides):
        pid = aside.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        ckpts = folder / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            continue  # the replacement had checkpointed: the aside is the leftover, not the run
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(aside, folder)
        return folder
    return None


def plan(cfg: Config, resume: bool) -> Plan:
    """Check where ``cfg``'s run will write, without writing anything (except putting back a run that a killed
    replacement had moved aside, :func:`recover`)."""
    job = Path(cfg.output.dir)
    recover(job)
    for aside in sorted(job.glob(".run-*.replaced-*")) if job.is_dir() else []:  # (left by an older version)
        recover(job / aside.name[1:].split(".replaced-")[0])
    if job.exists() and not job.is_dir():
        raise ConfigError(f"output.dir={str(job)!r} is a file, expected a folder")
    anc = _writable_ancestor(job)
    if not anc.is_dir():
        raise ConfigError(f"output.dir={str(job)!r}: {str(anc)!r} is a file, so the folder cannot be created")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir={str(job)!r}: {str(anc)!r} is not writable")
    if resume:
        try:
            folder = resolve_run(job, "--resume: output.dir")
        except ConfigError as e:
            raise ConfigError(f"{e}; there is nothing to resume (run without --resume to start)") from None
        saved = saved_config(folder, "--resume")
        if _comparable(saved.to_dict()) != _comparable(cfg.to_dict()):
            diff = _first_difference(_comparable(saved.to_dict()), _comparable(cfg.to_dict()))
            raise ConfigError(
                f"--resume: {folder} holds a run with a different config ({diff}); resume with the "
                f"config saved in {folder / CONFIG} (train.steps, eval.*, checkpoint.* and output.* "
                "may differ)"
            )
        ckpts = folder / "checkpoints"
        if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
            raise ConfigError(
                f"--resume: {folder} has no checkpoint (the run stopped before its first one); start "
                "a new run without --resume"
            )
        return Plan(job, folder, True)
    if is_run(job):  # output.dir names a run folder (e.g. runs/x/run-3, or a run written before run folders)
        if not cfg.output.overwrite:
            raise ConfigError(
                f"output.dir={str(job)!r} is itself a run folder ({CONFIG} is there): pass --resume to "
                "continue it, set output.overwrite=true to replace it, or give its parent (each run "
                "then gets its own run-N folder)"
            )
        return Plan(job, job, False, replaces=job)
    latest = job / LATEST
    if cfg.output.overwrite and (latest.is_symlink() or latest.exists()):
        try:
            target = latest.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"output.overwrite: {latest} does not lead to a run folder ({e}); remove it") from None
        if target.parent == job.resolve() and is_run(target):
            return Plan(job, job / f"run-{_next_run(job)}", False, replaces=job / target.name)
    return Plan(job, job / f"run-{_next_run(job)}", False)


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            d = _first_difference(x, y, f"{prefix}{k}.")
            if d:
                return d
        elif x != y:
            return f"{prefix}{k}: saved {config_lib._yaml_repr(x)}, now {config_lib._yaml_repr(y)}"
    return ""


def agree(p: Plan) -> Plan:
    """In a multi-process run, every process writes to the run folder that process 0 chose (another process may
    have looked at the job folder after process 0 created ``run-N``)."""
    import jax

    if jax.process_count() == 1 or p.resume or p.replaces == p.folder:
        return p
    import numpy as np
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(int(p.folder.name.split("-")[1]))))
    folder = p.job / f"run-{n}"
    return dataclasses.replace(p, folder=folder)


def barrier() -> None:
    """Wait until process 0 has created the run folder (multi-process runs)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lora_jax: run folder created")


def describe(p: Plan) -> str:
    if p.resume:
        return f"the run to resume ({p.folder})"
    if p.replaces is not None:
        return (
            f"the output folder ({p.folder}, replacing the run there)"
            if p.replaces == p.folder
            else f"the output folder (a new run would go to {p.folder} and replace {p.replaces} at its first "
            "checkpoint)"
        )
    return f"the output folder (a new run would go to {p.folder})"
