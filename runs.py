"""runs.py - the plumbing every script shares: checkpoints, resume state, run folders, processes, flags.

Nothing here is the paper's math (that is sampler.py); this file only moves bytes safely:

  * checkpoints: a folder of standard weights plus one opd.json (docs/formats.md, "Checkpoints"):
    save_adapter writes a teacher or student; read_meta, resolve_checkpoint (its adapter and its
    base: by relative path + hash, or a hub id), check_adapter / check_model (each file there and
    readable, named when not), settings (what a checkpoint samples with: CFG, shift),
    export_checkpoint (the one way into base/ and ckpts/);
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
    """A checkpoint folder's opd.json ({} where there is none)."""
    return json_file(path, META) if (Path(path) / META).exists() else {}


def json_file(folder: str | Path, name: str) -> dict:
    """folder/name, a JSON object; missing, unreadable, empty or not an object: CheckpointError naming it."""
    try:
        data = (Path(folder) / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: {name} is missing; restore or re-export it") from None
    except OSError as e:                                       # a folder of that name, no permission, ...
        raise CheckpointError(f"{folder}: {name} cannot be read ({e.strerror}); restore or re-export it") from None
    if not data.strip():
        raise CheckpointError(f"{folder}: {name} is empty; restore or re-export it")
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder}: {name} is not valid JSON ({e}); restore or re-export it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{folder}: {name} is not a JSON object; restore or re-export it")
    return obj


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


def _opts(opt) -> list:
    return [] if opt is None else list(opt) if isinstance(opt, (list, tuple)) else [opt]


def save_state(prefix: str | Path, tensors: dict[str, list[torch.Tensor]], opt, info: dict) -> None:
    """Resume state: tensors and optimizer moments in a safetensors file, the rest in prefix.json.
    Never a pickle. opt: an optimizer, a list of them (the first's keys "opt.", the n-th's
    "opt<n>."), or None. Two tensor files take turns (prefix-a / prefix-b); the JSON, renamed into
    place last, names the one that is complete - so a kill at any moment leaves the previous
    state whole, and a resume never mixes two saves."""
    from safetensors.torch import save_file
    flat = {f"{k}.{i}": t.detach().cpu().contiguous() for k, ts in tensors.items() for i, t in enumerate(ts)}
    groups = {}
    for n, o in enumerate(_opts(opt)):
        sd = o.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                flat[f"opt{n or ''}.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        groups[f"param_groups{n or ''}"] = sd["param_groups"]
    groups.setdefault("param_groups", None)
    prefix = Path(prefix)
    cur = json.loads(prefix.with_suffix(".json").read_text()).get("tensors") if prefix.with_suffix(".json").is_file() else None
    name = f"{prefix.name}-{'b' if cur == f'{prefix.name}-a.safetensors' else 'a'}.safetensors"
    tmp = prefix.with_name(name + ".tmp")
    save_file(flat, str(tmp))
    os.replace(tmp, prefix.with_name(name))                    # the slot NOT named by the current JSON
    write_json_atomic(prefix.with_suffix(".json"), {**info, **groups, "tensors": name})   # commit


def load_state(prefix: str | Path, tensors: dict[str, list[torch.Tensor]], opt) -> dict:
    """Inverse of save_state: copies tensors in place, restores the optimizer(s), returns the info."""
    from safetensors.torch import load_file
    prefix = Path(prefix)
    info = json.loads(prefix.with_suffix(".json").read_text())
    flat = load_file(str(prefix.with_name(info["tensors"])))
    with torch.no_grad():
        for k, ts in tensors.items():
            for i, t in enumerate(ts):
                t.copy_(flat[f"{k}.{i}"])
    for n, o in enumerate(_opts(opt)):
        state: dict[int, dict] = {}
        for key, v in flat.items():
            if key.startswith(f"opt{n or ''}."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        o.load_state_dict({"state": state, "param_groups": info[f"param_groups{n or ''}"]})
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


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")   # PEFT's LoRA format: teachers, students



def refuse_adapter_as_base(base: str | Path, what_to_do: str) -> None:
    """--base names a base (a model folder or hub id): a teacher, student or bare LoRA folder given
    there is refused by name, before anything else complains about it."""
    role = read_meta(base).get("role") if Path(base).is_dir() else None
    if role in ("teacher", "student") or any((Path(base) / f).exists() for f in ADAPTER_FILES):
        role = role if role in ("teacher", "student") else "LoRA adapter"
        raise CheckpointError(f"--base {base}: a {role} checkpoint, not a base; {what_to_do}")

def check_adapter(path: str | Path) -> dict:
    """A LoRA adapter folder (PEFT's two files, docs/formats.md, "Checkpoints") before it loads: each
    there, the config a JSON object, the weights' safetensors header readable. Returns the config."""
    for f in ADAPTER_FILES:
        if not (Path(path) / f).exists():
            raise CheckpointError(f"{path}: {f} is missing (a LoRA checkpoint is {' + '.join(ADAPTER_FILES)}); "
                                  "restore or re-export it")
    config = json_file(path, ADAPTER_FILES[0])
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: {ADAPTER_FILES[0]} is not a LoRA config (peft_type "
                              f"{config.get('peft_type')!r}); restore or re-export it")
    check_safetensors(Path(path))
    return config


def resolve_checkpoint(path: str | Path) -> tuple[dict, str | None, str]:
    """What a checkpoint argument is: (its opd.json, its adapter folder or None, its base). A teacher or
    student is an adapter (check_adapter) on the base its opd.json names (resolve_base); anything else
    is a base itself, a folder or a hub id. An adapter folder without a teacher's or student's opd.json
    is refused: nothing names its base."""
    meta = read_meta(path) if Path(path).is_dir() else {}
    if meta.get("role") in ("teacher", "student"):
        check_adapter(path)
        return meta, str(path), resolve_base(path, meta)
    if any((Path(path) / f).exists() for f in ADAPTER_FILES):
        problem = f"{META} is missing (a teacher's or student's names its base)" if not meta else \
            f"a LoRA adapter whose {META} says role {meta.get('role')!r}, not teacher or student"
        raise CheckpointError(f"{path}: {problem}; restore or re-export it")
    return meta, None, str(path)


MODEL_PARTS = ("transformer", "text_encoder", "tokenizer")             # a toy base's folders


def check_model(path: str | Path) -> None:
    """A base's folder before its weights load: the toy's MODEL_PARTS, or every component an SD3
    pipeline's model_index.json lists (transformers 5 silently builds an empty-vocabulary tokenizer
    for a missing tokenizer folder: every prompt -> <unk>); each *.safetensors header readable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; pass a checkpoint folder (docs/formats.md, 'Checkpoints')")
    if (path / "model_index.json").is_file():
        index = json_file(path, "model_index.json")
        parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
        for f in parts:
            if not (path / f).is_dir():
                raise CheckpointError(f"{path}: SD3 pipeline folder is missing {f}/ (model_index.json lists it)")
    else:
        for part in MODEL_PARTS:
            if not (path / part).is_dir():
                raise CheckpointError(f"{path}: missing {part}/; a model folder needs transformer/, "
                                      "text_encoder/ and tokenizer/ (or model_index.json for SD3)")
        parts = MODEL_PARTS[:2]                                # the tokenizer has no weights
    for f in parts:
        check_safetensors(path / f)


def save_adapter(policy, name: str, out_dir: str | Path, meta: dict) -> None:
    """Write a policy's (sampler.Policy) adapter `name` as a checkpoint folder: PEFT's two files and
    opd.json = meta + its base (a path relative to out_dir and content_hash, or a hub id), atomically
    (tmp + rename)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = get_peft_model_state_dict(policy.net, adapter_name=name)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()},
              str(tmp / "adapter_model.safetensors"))
    cfg = policy.net.peft_config[name].to_dict()
    cfg["base_model_name_or_path"] = None                      # PEFT would write an absolute path here
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    base = Path(policy.base_path)                              # relative path + hash, or a hub id
    meta = dict(meta, base={"path": os.path.relpath(base.resolve(), out_dir.resolve()), "hash": content_hash(base)}
                if base.is_dir() else {"path": policy.base_path, "hash": None})
    write_json_atomic(tmp / META, meta)
    replace_dir(tmp, out_dir)



def settings(path: str | Path) -> dict:
    """What a checkpoint samples with, read without loading weights: its base, its CFG (its own
    opd.json, else its base's, else 4.5 for an SD3 pipeline - the paper's - and 1.0 for others),
    its base's shift and sigma_min (the toy base's opd.json: sigma_min 0; an SD3 pipeline's
    scheduler config: shift 3.0 for SD3.5-M, sigma_min = shift(1 / num_train_timesteps)), which
    sampler.time_grid turns into the grid. Policy uses the same."""
    meta, _, base = resolve_checkpoint(path)
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


# The cross-process reductions of a data-parallel run (torchrun): each does nothing with one process.
def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_mean(value: float, device: torch.device) -> float:
    """The mean of a per-process value over the processes (a task's loss on the global batch)."""
    v = torch.tensor(value, dtype=torch.float64, device=device)
    if _world() > 1:
        torch.distributed.all_reduce(v)
        v /= _world()
    return float(v)


def process_mean_grads(params: list[torch.Tensor]) -> None:
    """Average the parameters' .grad over the processes, in place (all-reduce, / world)."""
    if _world() > 1:
        for p in params:
            torch.distributed.all_reduce(p.grad)
            p.grad /= _world()


def from_rank0(flag: bool, device: torch.device) -> bool:
    """Rank 0's answer (a finished run, a spent time budget), the same on every process."""
    if _world() == 1:
        return bool(flag)
    t = torch.tensor(float(flag), device=device)
    torch.distributed.broadcast(t, 0)
    return bool(t)


def barrier() -> None:
    """Wait for every process (rank 0 has written what the others read)."""
    if _world() > 1:
        torch.distributed.barrier()


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
