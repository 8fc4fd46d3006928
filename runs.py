"""runs.py - the plumbing every script shares: checkpoints, resume state, run folders, processes, flags.

Nothing here is the paper's math (that is sampler.py); this file only moves bytes safely:

  * checkpoints: a folder of standard weights plus one opd.json (docs/formats.md, "Checkpoints"):
    read_meta, resolve_base (its base by relative path + hash, or a hub id), settings (what a
    checkpoint samples with: CFG, shift), export_checkpoint (the one way into base/ and ckpts/);
  * atomic writes: write_json_atomic, replace_dir - a temporary name, then a rename;
  * resume state: save_state / load_state, safetensors for tensors, JSON for the rest, never a
    pickle, two slots so a kill at any moment leaves the last state whole;
  * run folders: open_run creates or reopens one under its config, holds it with a lock for one
    process at a time, and refuses anything it must not touch (docs/formats.md, "Run folders");
  * processes: layout reads torchrun's environment (one GPU per process, NCCL; gloo on CPUs);
  * flags: arg() declares a config field with its help text and check, config_parser turns a
    config dataclass into an argparse parser (one line and exit 2 on a bad value).
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

META = "opd.json"            # the one metadata file of every checkpoint (docs/formats.md, "Checkpoints")
SD3_CFG = 4.5                # the paper's CFG for SD3.5-M (Sec. 4): an SD3 checkpoint's default


# ------------------------------------------------------------------------------------
# 4. checkpoints: one folder, standard weights + opd.json (docs/formats.md, "Checkpoints")
# ------------------------------------------------------------------------------------
class CheckpointError(Exception):
    """A checkpoint folder that cannot be used. CLIs print str(e) on one line, exit 2."""


def read_meta(path: str | Path) -> dict:
    if not (p := Path(path) / META).is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {META} is not valid JSON ({e}); restore or re-export it") from None


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON to a temporary name, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def resume_log(path: str | Path, key: str, start: int) -> list[dict]:
    """A run's log.jsonl as its resume sees it: the records of steps (`key`: "iter" / "round") before
    `start`, the saved state's; the lines of steps past it (a run killed between two saves) are
    dropped, since those steps run again. Rewritten atomically; returns the records kept."""
    path = Path(path)
    lines = [l for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
    kept = [l for l in lines if json.loads(l)[key] < start]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    os.replace(tmp, path)
    return [json.loads(l) for l in kept]


def save_state(prefix: str | Path, tensors: dict[str, list[torch.Tensor]], opt: torch.optim.Optimizer | None,
               info: dict) -> None:
    """Resume state: tensors and optimizer moments in a safetensors file, the rest in prefix.json.
    Never a pickle. Two tensor files take turns (prefix-a / prefix-b); the JSON, renamed into
    place last, names the one that is complete - so a kill at any moment leaves the previous
    state whole, and a resume never mixes two saves."""
    from safetensors.torch import save_file
    flat = {f"{k}.{i}": t.detach().cpu().contiguous() for k, ts in tensors.items() for i, t in enumerate(ts)}
    groups = None
    if opt is not None:
        sd = opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                flat[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        groups = sd["param_groups"]
    prefix = Path(prefix)
    cur = json.loads(prefix.with_suffix(".json").read_text()).get("tensors") if prefix.with_suffix(".json").is_file() else None
    name = f"{prefix.name}-{'b' if cur == f'{prefix.name}-a.safetensors' else 'a'}.safetensors"
    tmp = prefix.with_name(name + ".tmp")
    save_file(flat, str(tmp))
    os.replace(tmp, prefix.with_name(name))                    # the slot NOT named by the current JSON
    write_json_atomic(prefix.with_suffix(".json"), {**info, "param_groups": groups, "tensors": name})   # commit


def load_state(prefix: str | Path, tensors: dict[str, list[torch.Tensor]], opt: torch.optim.Optimizer | None) -> dict:
    """Inverse of save_state: copies tensors in place, restores the optimizer, returns the info."""
    from safetensors.torch import load_file
    prefix = Path(prefix)
    info = json.loads(prefix.with_suffix(".json").read_text())
    flat = load_file(str(prefix.with_name(info["tensors"])))
    with torch.no_grad():
        for k, ts in tensors.items():
            for i, t in enumerate(ts):
                t.copy_(flat[f"{k}.{i}"])
    if opt is not None:
        state: dict[int, dict] = {}
        for key, v in flat.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info


def content_hash(model_dir: str | Path) -> str:
    files = sorted((Path(model_dir) / "transformer").glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no transformer/*.safetensors to hash; is it a model folder?")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            hashlib.file_digest(fh, lambda: h)                  # streams the file into h
    return h.hexdigest()[:16]


def resolve_base(ckpt: str | Path, meta: dict) -> str:
    """The base a teacher/student builds on: a path relative to the checkpoint, or a hub id."""
    base = meta.get("base", {}).get("path")
    if not base:
        raise CheckpointError(f"{ckpt}: {META} names no base (base.path); re-export the checkpoint")
    local = (Path(ckpt) / base).resolve()
    if local.is_dir():
        want = meta["base"].get("hash")
        if want and content_hash(local) != want:
            raise CheckpointError(f"{ckpt}: its base {local} has hash {content_hash(local)}, but it was "
                                  f"trained on {want}; use the base it was trained on")
        return str(local)
    if Path(base).is_absolute() or base.startswith("."):
        raise CheckpointError(f"{ckpt}: its base folder {local} does not exist; restore it next to the checkpoint")
    return base                                                # a hub id, e.g. stabilityai/stable-diffusion-3.5-medium


def export_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Ship a run's checkpoint/ (e.g. to base/ or ckpts/ocr/): copy, re-point the relative base
    path at the new location, and rename into place (the old dst is replaced only when complete)."""
    src, dst = Path(src), Path(dst)
    meta = read_meta(src)
    if not meta:
        raise CheckpointError(f"{src}: no {META}; only finished checkpoints can be exported")
    r = dst.resolve()
    if r == REPO or REPO.is_relative_to(r) or (dst.exists() and not read_meta(dst)) or dst.is_file():
        raise CheckpointError(f"--export {dst}: not a checkpoint folder (no {META}) or the repository itself; "
                              "export into a new folder or over a checkpoint (base, ckpts/<task>)")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.tmp"))
    if meta.get("base", {}).get("path") and (src / meta["base"]["path"]).is_dir():
        base = (src / meta["base"]["path"]).resolve()
        meta["base"]["path"] = os.path.relpath(base, dst.resolve())
        write_json_atomic(tmp / META, meta)
    replace_dir(tmp, dst)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move a complete folder tmp to dst; an existing dst is swapped out only at the end."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dst)


def check_safetensors(folder: Path) -> None:
    from safetensors import safe_open
    for f in folder.glob("*.safetensors"):
        try:
            with safe_open(str(f), "pt") as fh:
                fh.keys()
        except Exception as e:                                 # corrupt header / truncated file
            raise CheckpointError(f"{folder}: {f.name} is not a readable safetensors file ({e}); "
                                  "re-download or re-export it") from None



def settings(path: str | Path) -> dict:
    """What a checkpoint samples with, read without loading weights: its base, its CFG (its own
    opd.json, else its base's, else 4.5 for an SD3 pipeline - the paper's - and 1.0 for others),
    its base's shift and sigma_min (the toy base's opd.json: sigma_min 0; an SD3 pipeline's
    scheduler config: shift 3.0 for SD3.5-M, sigma_min = shift(1 / num_train_timesteps)), which
    sampler.time_grid turns into the grid. Policy uses the same."""
    meta = read_meta(path) if Path(path).is_dir() else {}
    base = resolve_base(path, meta) if meta.get("role") in ("teacher", "student") else str(path)
    bmeta = read_meta(base) if Path(base).is_dir() else {}
    sd3 = not bmeta and (not Path(base).exists() or (Path(base) / "model_index.json").is_file())
    shift, sigma_min = _scheduler(base) if sd3 else (float(bmeta.get("shift", 1.0)), 0.0)
    return {"base": base, "cfg": float(meta.get("cfg", bmeta.get("cfg", SD3_CFG if sd3 else 1.0))), "shift": shift,
            "sigma_min": sigma_min, "kind": "sd3" if sd3 else "toy"}


def download_hint(hub_id: str) -> str:
    return f"download it first (hf download {hub_id}, with network access) or pass a local folder"


def _scheduler(base: str) -> tuple[float, float]:
    """An SD3 pipeline's (shift, sigma_min) from scheduler/scheduler_config.json (a folder, or a hub
    id's file in the local hub cache). sigma_min is what FlowMatchEulerDiscreteScheduler computes at
    construction (sigma_min_of)."""
    f = Path(base) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(base, "scheduler/scheduler_config.json")
        if not isinstance(hit, str):
            raise CheckpointError(f"{base}: not in the local hub cache; {download_hint(base)}")
        f = Path(hit)
    try:
        conf = json.loads(f.read_text())
        shift, n = float(conf.get("shift", 1.0)), int(conf.get("num_train_timesteps", 1000))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable scheduler config ({e})") from None
    if conf.get("use_dynamic_shifting"):
        raise CheckpointError(f"{f}: use_dynamic_shifting is not supported (SD3.5-M uses a fixed shift)")
    return shift, sigma_min_of(shift, n)


def sigma_min_of(shift: float, num_train_timesteps: int = 1000) -> float:
    """FlowMatchEulerDiscreteScheduler's sigma_min: its last training sigma 1 / n, shifted."""
    u = 1.0 / num_train_timesteps
    return shift * u / (1.0 + (shift - 1.0) * u)


# ------------------------------------------------------------------------------------
# run folders and command lines (docs/formats.md, "Run folders"): shared by toy, teachers, distill
# ------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent
SHIPPED = ("base", "ckpts")                                    # only an export writes into these
RESUME_IGNORES = ("out", "fresh", "export", "processes")       # may differ between a run and its resume


def shipped(path: str | Path) -> bool:
    """Is path inside the repository's base/ or ckpts/ (the shipped checkpoints)?"""
    r = Path(path).resolve()
    return any(r == REPO / d or r.is_relative_to(REPO / d) for d in SHIPPED)


_HELD: dict[str, tuple[int, int]] = {}                         # run folder -> (lock fd, its inode): this process's


def _hold(out: Path) -> None:
    """Hold run folder `out` for this process: an exclusive flock on out/.lock, released by the OS
    when the process ends (a crash included). Another process holding it: CheckpointError."""
    key, f = str(out.resolve()), out / ".lock"
    held = _HELD.get(key)
    if held and f.is_file() and os.fstat(held[0]).st_ino == f.stat().st_ino:
        return                                                 # this process holds it already (a resume in-process)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"--out {out}: another process is running in this run folder; wait for it to end, "
                              "or pass another --out") from None
    if held:
        os.close(held[0])
    _HELD[key] = (fd, os.fstat(fd).st_ino)


def open_run(out: str | Path, config: dict, fresh: bool, script: str) -> bool:
    """Create run folder `out` with its config.json, or reopen it; True if it already existed
    (the caller resumes or reports it). One process at a time: the folder is held (_hold) until
    the process ends, and a second process is refused. Refuses - CheckpointError, nothing touched -
    a folder this project did not create as a `script` run (no run config in it, and not empty),
    the repository or a folder holding it, anything in base/ or ckpts/, and a run folder whose
    config differs (naming the keys). --fresh deletes only a run folder of this script."""
    out, r = Path(out), Path(out).resolve()
    if r == REPO or REPO.is_relative_to(r):
        raise CheckpointError(f"--out {out}: that is the repository (or holds it); pass a run folder such as runs/{script}")
    if shipped(r):
        raise CheckpointError(f"--out {out}: base/ and ckpts/ hold the shipped checkpoints, which only an export "
                              f"writes; pass a run folder such as runs/{script}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: is a file; pass a run folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    parent = os.open(out.parent, os.O_RDONLY)                  # creating, reopening or deleting a run folder:
    try:                                                       # one process at a time in this parent folder
        fcntl.flock(parent, fcntl.LOCK_EX)
        return _open_run(out, json.loads(json.dumps(config | {"run": script})), fresh, script)
    finally:
        os.close(parent)                                       # closing the descriptor releases its lock


def _open_run(out: Path, config: dict, fresh: bool, script: str) -> bool:
    saved = None
    if out.is_dir() and any(out.iterdir()):
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or saved.get("run") != script:
            raise CheckpointError(f"--out {out}: not a {script}.py run folder (no run config in it), so it is left "
                                  "alone; pass another --out")
        _hold(out)                                             # before anything is deleted or resumed
    if saved is not None and fresh:
        shutil.rmtree(out)
        saved = None
    if saved is not None:
        diff = sorted(k for k in set(saved) | set(config) if k not in RESUME_IGNORES and saved.get(k) != config.get(k))
        if diff:
            raise CheckpointError(f"--out {out}: this run was started with another config ({', '.join(diff)} differ); "
                                  "repeat its flags to resume, or pass --fresh or another --out")
        return True
    tmp = out.with_name(out.name + ".tmp")                     # folder, config and lock appear together
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json_atomic(tmp / "config.json", config)
    if out.is_dir():
        out.rmdir()                                            # an empty folder: nothing to lose
    os.replace(tmp, out)
    _hold(out)
    return False


def layout(env, cuda: bool) -> dict:
    """Processes from torchrun's environment: WORLD_SIZE, RANK (global), LOCAL_RANK (this node's
    GPU). One GPU per process, NCCL between GPUs; gloo between CPU processes."""
    world, rank, local = (int(env.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return {"world": world, "rank": rank, "device": device, "backend": "nccl" if cuda else "gloo"}


def output_file(path: str | Path, flag: str) -> Path:
    """An output file's path with its folder created; a path that is a folder, or whose folder
    cannot be made, is refused in one line (CheckpointError)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{flag} {path}: is a folder; pass a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{flag} {path}: cannot create its folder ({e.strerror}); pass another path") from None
    return path


# ------------------------------------------------------------------------------------
# flags: one config dataclass per script; each field says its help and its check
# ------------------------------------------------------------------------------------
def arg(default, help: str, check: str = ""):
    """A config field: its default, its --help line, and a check applied at parse time:
    ">= X", "> X" or "in a|b|c" (empty: none). The same metadata convention as transformers'
    HfArgumentParser (field(metadata={"help": ...}))."""
    kw = {"default_factory": list} if default == [] else {"default": default}
    return dataclasses.field(**kw, metadata={"help": help, "check": check})


class Parser(argparse.ArgumentParser):
    def error(self, message):                                  # one line, exit 2 (docs/formats.md, "Errors")
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def config_parser(cls, description: str, skip: tuple = ()) -> argparse.ArgumentParser:
    """An argparse parser for a config dataclass of arg() fields: --field-name, the field's help with
    its default, bools as --x / --no-x, lists as one or more values, checks at parse time."""
    ap = Parser(description=description)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"default": default, "help": f.metadata["help"] + ("" if default == [] else f" (default: {default!r})")}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["nargs"] = "+"
        else:
            kw["type"] = checked(type(default), f.metadata["check"])
        ap.add_argument("--" + f.name.replace("_", "-"), **kw)
    return ap


def checked(typ, rule: str = ""):
    """An argparse type: typ(v), checked against rule (">= X", "> X", "in a|b") if given."""
    op, _, bound = rule.partition(" ")

    def parse(v: str):
        try:
            x = typ(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a {typ.__name__}") from None
        if rule and typ is not str and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{v!r} is not finite")
        if (op == ">=" and not x >= float(bound)) or (op == ">" and not x > float(bound)) \
                or (op == "in" and x not in bound.split("|")):
            raise argparse.ArgumentTypeError(f"{v!r} is not {op} {bound}")
        return x
    parse.__name__ = typ.__name__
    return parse
