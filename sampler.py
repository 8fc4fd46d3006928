"""sampler.py - the paper's shared math and the policy (DiffusionOPD Sec. 3.1-3.2, Eq. 5-12).

Everything formula-shaped that two files need lives here and only here: the time grid,
the SDE/ODE transition kernel (mean and std), the Gaussian log-prob of a transition,
the per-step closed-form KL, the policy (load / encode / velocity with CFG / decode)
and the rollout. teachers.py, distill.py, the notebook and the tests import it.

    python sampler.py base/ --prompt 'a sign that says "K7"'   # 40-step ODE samples -> runs/sampler.png (~5 s)

=====================================================================================
CONVENTIONS (stated once, used everywhere)
  * Rectified flow, SD3 convention:  x_t = (1 - t) x_data + t eps.
    t = 1 IS PURE NOISE, t = 0 IS DATA.  The network predicts v = eps - x_data.
  * Sampling runs DOWN the grid 1 = t_0 > t_1 > ... > t_N = 0, so every step has
    dt_j = t_{j+1} - t_j < 0  (NEGATIVE).
  * "Step j" maps state x_j (at t_j) to x_{j+1} (at t_{j+1}). Beware: in this file x_0
    is the NOISE the rollout starts from (j = 0), never the data; data is `x_data`.
  * Log-probs and KLs are MEANS over the non-batch dimensions (C*H*W), not sums, as in
    the released code and Flow-GRPO: a PPO clip range and a learning rate then mean the
    same thing at 32x32 pixels and at 64x64x16 latents. sum = mean * D, say D = x[0].numel().
  * The network's timestep input is 1000 * t (diffusers' FlowMatchEulerDiscreteScheduler).

NOTATION (paper -> code)
  t_j, t_{j+1}, dt_j   t, t_next, dt = t_next - t (< 0)
  a                    a             global noise level (a = 0: ODE; Flow-GRPO SD3: 0.7)
  sigma_t              sqrt(sig2)    a * sqrt(t / (1 - t))                      Eq. 5
  mu(x_j)              mean          cx * x_j + cv * dt * v_j                   Eq. 7
  sbar_j               std           sigma_t * sqrt(-dt)                        Eq. 6
  KL_j                 step_kl       ||mu_S - mu_T||^2 / (2 sbar^2)  (a > 0)    Eq. 11
                                     ||mu_S - mu_T||^2 / 2           (a = 0)    Eq. 12
=====================================================================================

Deliberate deviations / choices
  1. t = 1 step: sigma_t = a sqrt(t / (1 - t)) is infinite at t = 1. We use the released
     (Flow-GRPO) substitution 1 - t -> 1 - t_1 inside sigma_t only. Then the first step has
     cx = 1 - a^2/2, cv = 1, sbar^2 = a^2 exactly (tested), and stays in the loss.
  2. Grid: shift(linspace(1, 0, N + 1)), which ends exactly at 0. diffusers' default grid
     instead ends with a tiny last step (it linspaces to sigma_min, which is already
     shifted at construction, shifts it again, then appends 0: 10 steps at shift 3 end
     .0089 -> 0). Ours equals diffusers' when the UNSHIFTED linspace(1, 0, N + 1)[:-1] is
     passed as `sigmas=` to set_timesteps (it shifts them once); tested.
  3. Eq. 11 is implemented as the paper writes it, with the (-dt) in sbar^2. The released
     code divides by 2 sigma_t^2 without it (a weight off by 1/|dt| per step).
  4. Base hash = sha256 of its transformer's safetensors (what adapters sit on); a hub id as is.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

META = "opd.json"            # the one metadata file of every checkpoint (README, "Checkpoints")
SD3_RES = 512                # px: the paper trains and evaluates SD3.5-M at 512 x 512 (Sec. 4)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


# ------------------------------------------------------------------------------------
# 1. time grid (Sec. 2)
# ------------------------------------------------------------------------------------
def time_grid(n_steps: int, shift: float = 1.0) -> torch.Tensor:
    """1 = t_0 > ... > t_N = 0 as float64, with SD3's time shift t -> s t / (1 + (s - 1) t)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    u = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


# ------------------------------------------------------------------------------------
# 2. the transition kernel p(x_{j+1} | x_j) = N(mu, sbar^2 I)  (Eq. 5-7)
# ------------------------------------------------------------------------------------
def kernel(t: float, t_next: float, a: float) -> tuple[float, float, float]:
    """Coefficients (cx, cv, std) with mean = cx * x + cv * dt * v and std = sbar."""
    t, t_next, a = float(t), float(t_next), float(a)
    dt = t_next - t                                            # < 0 (conventions)
    if not (0.0 < t <= 1.0 and 0.0 <= t_next < t):
        raise ValueError(f"need 1 >= t > t_next >= 0, got t={t}, t_next={t_next}")
    if not 0.0 <= a < math.inf:
        raise ValueError(f"need a finite noise level a >= 0, got a={a}")
    if a == 0.0:
        return 1.0, 1.0, 0.0                                   # Eq. 7 at a = 0: Euler ODE step
    one_minus_t = (1.0 - t) if t < 1.0 else (1.0 - t_next)     # deviation 1 (t = 1 step)
    sig2 = a * a * t / one_minus_t                             # Eq. 5: sigma_t^2
    cx = 1.0 + sig2 * dt / (2.0 * t)                           # Eq. 7: x-coefficient
    cv = 1.0 + sig2 * (1.0 - t) / (2.0 * t)                    # Eq. 7: v-coefficient (= 1 + a^2/2 for t < 1)
    std = math.sqrt(sig2 * (-dt))                              # Eq. 6: sbar_j
    return cx, cv, std


def step_mean(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, a: float) -> torch.Tensor:
    cx, cv, _ = kernel(t, t_next, a)
    return cx * x + cv * (t_next - t) * v                      # Eq. 7: mu(x_j)


def noised(x_data: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward (training) interpolation x_t = (1 - t) x_data + t eps, t of shape (B,)  [Sec. 2]."""
    tb = t.view(-1, *[1] * (x_data.dim() - 1))
    return (1 - tb) * x_data + tb * eps


def step_std(t: float, t_next: float, a: float) -> float:
    return kernel(t, t_next, a)[2]                             # Eq. 6: sbar_j


def gaussian_logprob(x_next: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x_next; mean, std^2 I), MEAN over non-batch dims -> (B,). No density at a = 0."""
    if std <= 0.0:
        raise ValueError("a = 0 (ODE) transitions are deterministic: they have no density")
    z2 = ((x_next - mean) / std) ** 2
    lp = -0.5 * z2 - math.log(std) - 0.5 * math.log(2.0 * math.pi)   # Eq. 6 kernel density
    return lp.flatten(1).mean(1)


# ------------------------------------------------------------------------------------
# 3. the per-step closed-form KL (Eq. 10-12)
# ------------------------------------------------------------------------------------
def step_kl(mean_s: torch.Tensor, mean_t: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mu_S, sbar^2) || N(mu_T, sbar^2)) per sample, MEAN over dims -> (B,).

    Shared covariance => no Monte Carlo and no sampled noise: the eps_j cancel exactly.
    std > 0: Eq. 11. std == 0 (ODE): pointwise transition matching, Eq. 12."""
    d2 = (mean_s - mean_t).pow(2).flatten(1).mean(1)
    if std > 0.0:
        return d2 / (2.0 * std * std)                          # Eq. 11
    return 0.5 * d2                                            # Eq. 12


def velocity_kl_weight(t: float, t_next: float, a: float) -> float:
    """w with step_kl = w * mean ||v_S - v_T||^2, since mu_S - mu_T = cv dt (v_S - v_T).

    a > 0: w = (1 + a^2/2)^2 (1 - t) |dt| / (2 a^2 t)  [Eq. 11; blows up as 1/a^2]
    a = 0: w = dt^2 / 2                                 [Eq. 12]"""
    _, cv, std = kernel(t, t_next, a)
    dt = t_next - t
    if std > 0.0:
        return (cv * dt) ** 2 / (2.0 * std * std)              # Eq. 11 in velocity form
    return 0.5 * dt * dt                                       # Eq. 12 in velocity form


# ------------------------------------------------------------------------------------
# 4. checkpoints: one folder, standard weights + opd.json (README, "Checkpoints")
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


def _check_safetensors(folder: Path) -> None:
    from safetensors import safe_open
    for f in folder.glob("*.safetensors"):
        try:
            with safe_open(str(f), "pt") as fh:
                fh.keys()
        except Exception as e:                                 # corrupt header / truncated file
            raise CheckpointError(f"{folder}: {f.name} is not a readable safetensors file ({e}); "
                                  "re-download or re-export it") from None


SD3_CFG = 4.5                                                 # the paper's CFG for SD3.5-M (Sec. 4)


def settings(path: str | Path) -> dict:
    """What a checkpoint samples with, read without loading weights: its base, its CFG (its own
    opd.json, else its base's, else 4.5 for an SD3 pipeline - the paper's - and 1.0 for others)
    and its base's shift (the toy base's opd.json; an SD3 pipeline's scheduler config, 3.0 for
    SD3.5-M). Policy uses the same."""
    meta = read_meta(path) if Path(path).is_dir() else {}
    base = resolve_base(path, meta) if meta.get("role") in ("teacher", "student") else str(path)
    bmeta = read_meta(base) if Path(base).is_dir() else {}
    sd3 = not bmeta and (not Path(base).exists() or (Path(base) / "model_index.json").is_file())
    shift = float(bmeta.get("shift", 1.0)) if not sd3 else _scheduler_shift(base)
    return {"base": base, "cfg": float(meta.get("cfg", bmeta.get("cfg", SD3_CFG if sd3 else 1.0))), "shift": shift,
            "kind": "sd3" if sd3 else "toy"}


def _scheduler_shift(base: str) -> float:
    """An SD3 pipeline's time shift, from scheduler/scheduler_config.json (a folder, or a hub id's
    file in the local hub cache)."""
    f = Path(base) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(base, "scheduler/scheduler_config.json")
        if not isinstance(hit, str):
            raise CheckpointError(f"{base}: its scheduler config is not available offline; download the model "
                                  "(huggingface-cli download) or pass a local folder")
        f = Path(hit)
    try:
        return float(json.loads(f.read_text()).get("shift", 1.0))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable scheduler config ({e})") from None


# ------------------------------------------------------------------------------------
# run folders and command lines (README, "Run folders"): shared by toy, teachers, distill
# ------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent
SHIPPED = ("base", "ckpts")                                    # only an export writes into these
RESUME_IGNORES = ("out", "fresh", "export", "processes")       # may differ between a run and its resume


def shipped(path: str | Path) -> bool:
    """Is path inside the repository's base/ or ckpts/ (the shipped checkpoints)?"""
    r = Path(path).resolve()
    return any(r == REPO / d or r.is_relative_to(REPO / d) for d in SHIPPED)


def open_run(out: str | Path, config: dict, fresh: bool, script: str) -> bool:
    """Create run folder `out` with its config.json, or reopen it; True if it already existed
    (the caller resumes or reports it). Refuses - CheckpointError, nothing touched - a folder
    this project did not create as a `script` run (no run config in it, and not empty), the
    repository or a folder holding it, anything in base/ or ckpts/, and a run folder whose
    config differs (naming the keys). --fresh deletes only a run folder of this script."""
    out, r = Path(out), Path(out).resolve()
    if r == REPO or REPO.is_relative_to(r):
        raise CheckpointError(f"--out {out}: that is the repository (or holds it); pass a run folder such as runs/{script}")
    if shipped(r):
        raise CheckpointError(f"--out {out}: base/ and ckpts/ hold the shipped checkpoints, which only an export "
                              f"writes; pass a run folder such as runs/{script}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: is a file; pass a run folder")
    config = json.loads(json.dumps(config | {"run": script}))  # as it will read back
    saved = None
    if out.is_dir() and any(out.iterdir()):
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or saved.get("run") != script:
            raise CheckpointError(f"--out {out}: not a {script}.py run folder (no run config in it), so it is left "
                                  "alone; pass another --out")
    if saved is not None and fresh:
        shutil.rmtree(out)
        saved = None
    if saved is not None:
        diff = sorted(k for k in set(saved) | set(config) if k not in RESUME_IGNORES and saved.get(k) != config.get(k))
        if diff:
            raise CheckpointError(f"--out {out}: this run was started with another config ({', '.join(diff)} differ); "
                                  "repeat its flags to resume, or pass --fresh or another --out")
        return True
    tmp = out.with_name(out.name + ".tmp")                     # folder and config appear together
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json_atomic(tmp / "config.json", config)
    if out.is_dir():
        out.rmdir()                                            # an empty folder: nothing to lose
    os.replace(tmp, out)
    return False


class _Parser(argparse.ArgumentParser):
    def error(self, message):                                  # one line, exit 2 (README, "Errors")
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def config_parser(cls, description: str, skip: tuple = ()) -> argparse.ArgumentParser:
    """An argparse parser for a config dataclass whose help is each field's own comment, with its
    default; a comment ending in [>= X], [> X] or [in a|b] is also checked at parse time."""
    docs = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+?)\s*$", inspect.getsource(cls), re.M))
    ap = _Parser(description=description)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        doc = docs.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"default": default, "help": doc + ("" if default == [] else f" (default: {default!r})")}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["nargs"] = "+"
        else:
            rule = re.search(r"\[(>=|>|in) ([^\]]+)\]$", doc)
            kw["type"] = checked(type(default), rule.groups() if rule else None)
        ap.add_argument("--" + f.name.replace("_", "-"), **kw)
    return ap


def checked(typ, rule: tuple | None):
    """An argparse type: typ(v), checked against rule = (">=" | ">" | "in", bound) if given."""
    def parse(v: str):
        try:
            x = typ(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a {typ.__name__}") from None
        if rule and typ is not str and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{v!r} is not finite")
        op, arg = rule or (None, None)
        if (op == ">=" and not x >= float(arg)) or (op == ">" and not x > float(arg)) \
                or (op == "in" and x not in arg.split("|")):
            raise argparse.ArgumentTypeError(f"{v!r} is not {op} {arg}")
        return x
    parse.__name__ = typ.__name__
    return parse


# ------------------------------------------------------------------------------------
# 5. the policy: encode(prompts), velocity(x, t, cond, guidance) with CFG, decode(x)
# ------------------------------------------------------------------------------------
class Policy:
    """A flow-matching text-to-image model, with PEFT LoRA adapters switchable by name.

    Two model kinds, one interface:
      * toy (pixel space): transformer/ (SD3Transformer2DModel, in_channels 3), text_encoder/
        (CLIPTextModelWithProjection), tokenizer/; decode maps [-1, 1] pixels to uint8.
      * SD3 (latent space): a diffusers StableDiffusion3Pipeline folder or hub id; three text
        encoders via the pipeline's encode_prompt; decode through the VAE.
    Teachers and students are adapters on the transformer. All teachers of a distillation run
    sit on ONE backbone (as in the paper's released code); `use(name)` switches, use(None) is
    the plain base."""

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        # the device is detected: a GPU when there is one (real scale), else the CPU (toy scale)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        meta = read_meta(path) if Path(path).is_dir() else {}
        adapter = None
        if meta.get("role") in ("teacher", "student"):
            adapter, path = path, resolve_base(path, meta)
        self.base_path, self.base_meta = str(path), (read_meta(path) if Path(path).is_dir() else {})
        self.pipe = None
        if not Path(path).exists():
            if str(path).startswith((".", "/")) or str(path).count("/") != 1:
                raise CheckpointError(f"{path}: no such folder (and not a hub id like owner/name)")
            self._load_sd3(str(path))                          # a hub id: real scale
        elif (Path(path) / "model_index.json").is_file():
            self._load_sd3(str(path))
        else:
            self._load_toy(Path(path))
        self.net = self.transformer                            # becomes a PeftModel once adapters exist
        self.active: str | None = None
        self.adapters: dict[str, dict] = {}                    # name -> metadata
        st = settings(adapter or path)                        # the checkpoint's own CFG, its base's shift
        self.guidance, self.shift, self.meta = st["cfg"], st["shift"], self.base_meta
        if adapter is not None:
            name = meta.get("task") or meta["role"]
            self.add_adapter(name, adapter)
            self.use(name)
            self.meta = meta

    @classmethod
    def from_transformer(cls, transformer, shift: float = 3.0, guidance: float = SD3_CFG,
                         device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> "Policy":
        """A Policy around a bare SD3Transformer2DModel: no text encoders, no VAE, no folder.
        velocity (with CFG), adapters and use() are the usual ones; encode() is NOT available
        (pass the conditioning dict {"emb", "pooled", "uemb", "upooled"} yourself) and decode()
        treats states as pixels. For benchmarks and tests (bench_distill.py builds SD3.5-M from
        its published config with random weights). Defaults: SD3.5-M's shift 3, the paper's CFG 4.5.
        The transformer is moved to device/dtype in place, frozen and put in eval mode."""
        self = cls.__new__(cls)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.base_path, self.base_meta, self.meta = None, {}, {}            # no folder: save_adapter is unavailable
        self.pipe = self.vae = self.text_encoder = self.tokenizer = None
        self.transformer = transformer.to(self.device, dtype).requires_grad_(False).eval()
        self.net, self.active, self.adapters = self.transformer, None, {}
        self.guidance, self.shift = float(guidance), float(shift)
        return self

    # -- loading ------------------------------------------------------------------
    def _load_toy(self, path: Path) -> None:
        from diffusers import SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder; pass a checkpoint folder (README, 'Checkpoints')")
        for part in ("transformer", "text_encoder", "tokenizer"):
            if not (path / part).is_dir():
                raise CheckpointError(f"{path}: missing {part}/; a model folder needs transformer/, "
                                      "text_encoder/ and tokenizer/ (or model_index.json for SD3)")
        for part in ("transformer", "text_encoder"):
            _check_safetensors(path / part)
        try:
            self.transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", use_safetensors=True,
                                                                     dtype=self.dtype)
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder", use_safetensors=True,
                                                                            dtype=self.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
        self.transformer.to(self.device).requires_grad_(False).eval()
        self.text_encoder.to(self.device).requires_grad_(False).eval()
        self.vae = None

    def _load_sd3(self, path: str) -> None:
        from diffusers import StableDiffusion3Pipeline
        if Path(path).is_dir():
            # every component model_index.json lists must be there: transformers 5 silently builds an
            # empty-vocabulary tokenizer for a missing tokenizer folder (every prompt -> <unk>)
            try:
                index = json.loads((Path(path) / "model_index.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: model_index.json is not valid JSON ({e})") from None
            parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
            for f in parts:
                if not (Path(path) / f).is_dir():
                    raise CheckpointError(f"{path}: SD3 pipeline folder is missing {f}/ (model_index.json lists it)")
                _check_safetensors(Path(path) / f)
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot load an SD3 pipeline ({str(e).splitlines()[0]})") from None
        pipe.to(self.device)
        for m in filter(None, (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)):
            m.requires_grad_(False).eval()
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae

    # -- adapters -----------------------------------------------------------------
    def add_adapter(self, name: str, ckpt: str | Path | None = None, config=None) -> None:
        """Load a saved adapter (ckpt) or create a fresh trainable one (config: peft.LoraConfig)."""
        from peft import PeftModel, get_peft_model
        if name in self.adapters:
            raise CheckpointError(f"{ckpt}: an adapter named {name!r} is already loaded (two teachers for one task?)")
        if ckpt is not None:
            ckpt = Path(ckpt)
            if not (ckpt / "adapter_config.json").is_file() or not (ckpt / "adapter_model.safetensors").is_file():
                raise CheckpointError(f"{ckpt}: not a LoRA checkpoint (needs adapter_config.json and "
                                      "adapter_model.safetensors)")
            _check_safetensors(ckpt)
            try:
                if self.net is self.transformer:
                    self.net = PeftModel.from_pretrained(self.transformer, str(ckpt), adapter_name=name)
                else:
                    self.net.load_adapter(str(ckpt), adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as e:   # shape mismatch, wrong targets
                raise CheckpointError(f"{ckpt}: adapter does not fit this base ({str(e).splitlines()[0][:200]})") from None
            self.adapters[name] = read_meta(ckpt)
        else:
            if self.net is self.transformer:
                self.net = get_peft_model(self.transformer, config, adapter_name=name)
            else:
                self.net.add_adapter(name, config)
            self.adapters[name] = {}
        self.net.requires_grad_(False)                         # frozen; training unfreezes its own adapter

    def use(self, name: str | None) -> None:
        """Switch the active adapter; None = the plain base (adapters disabled)."""
        if name is not None:
            if name not in self.adapters:
                raise KeyError(f"no adapter {name!r}; loaded: {sorted(self.adapters)}")
            flags = {k: p.requires_grad for k, p in self.net.named_parameters()}
            self.net.set_adapter(name)                         # PEFT also flips requires_grad here:
            for k, p in self.net.named_parameters():           # keep the caller's choice instead
                p.requires_grad_(flags[k])
        self.active = name

    def adapter_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.net.named_parameters() if f".{name}." in k and "lora_" in k}

    def save_adapter(self, name: str, out_dir: str | Path, meta: dict) -> None:
        """Write adapter `name` in PEFT format + opd.json into out_dir, atomically (tmp + rename)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sd = get_peft_model_state_dict(self.net, adapter_name=name)
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()},
                  str(tmp / "adapter_model.safetensors"))
        cfg = self.net.peft_config[name].to_dict()
        cfg["base_model_name_or_path"] = None                  # PEFT would write an absolute path here
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        base = Path(self.base_path)                           # relative path + hash, or a hub id
        meta = dict(meta, base={"path": os.path.relpath(base.resolve(), out_dir.resolve()), "hash": content_hash(base)}
                    if base.is_dir() else {"path": self.base_path, "hash": None})
        write_json_atomic(tmp / META, meta)
        replace_dir(tmp, out_dir)

    # -- the three calls ------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        """Text conditioning for prompts and for the empty prompt (the CFG 'uncond' branch)."""
        if self.pipe is not None:
            e, ne, p, np_ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                     do_classifier_free_guidance=True,
                                                     negative_prompt=[""] * len(prompts))
            return {"emb": e, "pooled": p, "uemb": ne, "upooled": np_}
        def enc(texts):
            tok = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                                 max_length=self.tokenizer.model_max_length)
            out = self.text_encoder(input_ids=tok.input_ids.to(self.device))
            return out.last_hidden_state.to(self.dtype), out.text_embeds.to(self.dtype)
        e, p = enc(list(prompts))
        ue, up = enc([""])
        return {"emb": e, "pooled": p, "uemb": ue.expand_as(e), "upooled": up.expand_as(p)}

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor, cond: dict, guidance: float | None = None) -> torch.Tensor:
        """v(x, t | prompt), CFG v_u + g (v_c - v_u) when g != 1; differentiable outside no_grad."""
        g = self.guidance if guidance is None else float(guidance)
        B = x.shape[0]
        tt = torch.as_tensor(t, dtype=self.dtype, device=x.device).expand(B) * 1000.0   # diffusers timestep
        kw = lambda xx, e, p, ts: dict(hidden_states=xx.to(self.dtype), encoder_hidden_states=e,
                                       pooled_projections=p, timestep=ts, return_dict=False)
        if g == 1.0:
            args = kw(x, cond["emb"], cond["pooled"], tt)
        else:                                                  # one batched pass: [uncond; cond]
            args = kw(torch.cat([x, x]), torch.cat([cond["uemb"], cond["emb"]]),
                      torch.cat([cond["upooled"], cond["pooled"]]), torch.cat([tt, tt]))
        plain = self.active is None and self.net is not self.transformer       # use(None): adapters off
        with self.net.disable_adapter() if plain else contextlib.nullcontext():
            out = self.net(**args)[0]
        out = out.to(x.dtype)
        if g == 1.0:
            return out
        vu, vc = out.chunk(2)
        return vu + g * (vc - vu)                              # classifier-free guidance

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> "np.ndarray":
        """States at t = 0 -> uint8 images (B, H, W, 3)."""
        if self.vae is not None:                               # SD3 latents -> pixels
            z = x.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
            x = self.vae.decode(z, return_dict=False)[0]
        img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of a state; pixel space (toy) has no VAE, so f = 1. Default resolution: the
        toy's own; SD3: the paper's 512 px (SD3_RES), or the base's own size if smaller."""
        f = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        own = self.transformer.config.sample_size * f
        r = (resolution or (own if self.vae is None else min(SD3_RES, own))) // f
        return (self.transformer.config.in_channels, r, r)


# ------------------------------------------------------------------------------------
# 6. noise and the rollout (Alg. 1, "roll out the current student")
# ------------------------------------------------------------------------------------
def initial_noise(shape: tuple, seeds: list[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """x_0 ~ N(0, I) at t = 1, one generator per image: image i's noise depends only on
    seeds[i], so two checkpoints evaluated with the same seeds are paired image by image."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds]).to(device, dtype)


def rollout(policy: Policy, cond: dict, x: torch.Tensor, grid: torch.Tensor, a: float = 0.0,
            guidance: float | None = None, generator: torch.Generator | None = None) -> dict:
    """Run the policy down the grid at noise level a, without gradients.

    Returns states (N+1, B, ...) with states[j] = x_j at t_j, means (N, B, ...) = mu(x_j),
    stds (N,) = sbar_j, noises (N, B, ...) = eps_j, and for a > 0 logprobs (N, B) of the
    sampled x_{j+1} under the kernel (what GRPO stores as log pi_old)."""
    states, means, noises, logps, stds = [x], [], [], [], []
    with torch.no_grad():
        for j in range(len(grid) - 1):
            t, t_next = float(grid[j]), float(grid[j + 1])
            v = policy.velocity(x, t, cond, guidance).to(torch.float32 if x.dtype != torch.float64 else x.dtype)
            mean = step_mean(x.to(v.dtype), v, t, t_next, a)   # Eq. 7
            std = step_std(t, t_next, a)                       # Eq. 6
            eps = (torch.randn(x.shape, generator=generator, dtype=mean.dtype).to(mean.device)
                   if std > 0 else torch.zeros_like(mean))
            x = (mean + std * eps).to(x.dtype)                 # x_{j+1} = mu + sbar eps
            if std > 0:
                logps.append(gaussian_logprob(x.to(mean.dtype), mean, std))
            states.append(x); means.append(mean); noises.append(eps); stds.append(std)
    return {"states": torch.stack(states), "means": torch.stack(means), "noises": torch.stack(noises),
            "stds": torch.tensor(stds, dtype=torch.float64), "grid": grid} | ({"logprobs": torch.stack(logps)} if logps else {})


def sample(policy: Policy, prompts: list[str], seeds: list[int], n_steps: int = 40, shift: float = 1.0,
           guidance: float | None = None, batch: int = 64) -> "np.ndarray":
    """Evaluation sampler: first-order ODE (a = 0), 40 steps as in the paper; uint8 images."""
    import numpy as np
    grid, out = time_grid(n_steps, shift), []
    for i in range(0, len(prompts), batch):
        cond = policy.encode(prompts[i:i + batch])
        x = initial_noise(policy.latent_shape(), seeds[i:i + batch], policy.device, policy.dtype)
        out.append(policy.decode(rollout(policy, cond, x, grid, 0.0, guidance)["states"][-1]))
    return np.concatenate(out)


def main(argv=None):                                          # python sampler.py CKPT --prompt P [--prompt Q]
    import numpy as np
    from PIL import Image
    ap = _Parser(description="Sample a checkpoint with the 40-step ODE sampler into a PNG grid.")
    ap.add_argument("ckpt", help="a checkpoint folder (base/, ckpts/ocr, runs/distill/checkpoint) or a hub id")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for more rows (required)")
    ap.add_argument("--n", type=int, default=8, help="images per prompt (default: 8)")
    ap.add_argument("--out", default="runs/sampler.png", help="the PNG to write (default: runs/sampler.png)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance (default: the checkpoint's own)")
    args = ap.parse_args(argv)
    try:
        pol = Policy(args.ckpt)
    except CheckpointError as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
    img = np.concatenate([np.concatenate(list(sample(pol, [p] * args.n, list(range(args.n)), shift=pol.shift,
                                                      guidance=args.cfg)), 1) for p in args.prompt], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp.png")
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
