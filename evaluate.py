"""evaluate.py - the evaluation protocol (Table 1): what is sampled, how it is paired, the Average and its SEs.

Per task, n images: prompt i = split[i % len] (a short list repeats with fresh noise), image i
starts from the noise of seed EVAL_SEED + i in EVERY checkpoint (paired comparisons), 40-step
first-order ODE, each checkpoint's own CFG and its base's shift, strict (0/1) GenEval. Two
tables: the primary one on the `train` prompts (the prompts RL and distillation use), a held-out
one on `test` (docs/formats.md, "Evaluation protocol"). Differences between checkpoints come with paired standard
errors (paired); the paper's Average is the min-max rule over the rows shown (minmax_average),
and average_difference bootstraps the difference of two rows' Averages.

Then the score cache (per-image scores in a scores.json next to each checkpoint, keyed by
cache_key = the protocol + weights_hash + reward_version) and the results tables, and the
command line that prints both tables:

    python evaluate.py base ckpts/*                         # both tables, paired to the first folder
    python evaluate.py base ckpts/* --export-scores         # also store them in the folders' scores.json
    python evaluate.py base ckpts/geneval --geneval-diagnostics    # + GenEval per tag and per colour
    python evaluate.py --geneval-prompts DIR --exclude prompts/geneval/test_metadata.jsonl   # GenEval training prompts
"""
import hashlib
import inspect
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

import rewards
import runs
import sampler as S
import toy
from rewards import SPLITS, TASKS
from real_rewards import tasks_for, write_geneval_prompts


# ---------------------------------------------------------------------------------
# the protocol (the docstring above; docs/formats.md, "Evaluation protocol")
# ---------------------------------------------------------------------------------
EVAL_SEED = 10_000
EVAL_STEPS = 40
HELDOUT_N = 64              # images per task in the held-out table (primary: 256)
REWARD_PACKAGES = ("numpy", "opencv-python", "rapidocr-onnxruntime", "onnxruntime", "pillow")


def eval_prompts(task: str, split: str, n: int, table: dict | None = None) -> list[str]:
    """The protocol's prompts: prompt i = split[i % len(split)], so a short list repeats with
    fresh noise (image i always starts from seed EVAL_SEED + i). table: the base's task table
    (tasks_for; default the toy one). A task with tags (GenEval) draws per tag, as GenEval does:
    the T tags of the split take turns (image i is of tag i % T, its (i // T)-th image, cycling
    through that tag's prompts in list order), ceil(n / T) images each - T * ceil(n / T) images,
    the same number per tag, so the plain mean of the scores is GenEval's Overall (the mean of the
    per-tag accuracies) and paired differences stay plain paired differences."""
    t = (table or TASKS)[task]
    ps = t.train if split == "train" else t.test
    if not ps:
        raise ValueError(f"task {task!r} has an empty {split} prompt set")
    if t.tag is None:
        return [ps[i % len(ps)] for i in range(n)]
    g = rewards.by_tag(t, ps)
    return [g[i % len(g)][(i // len(g)) % len(g[i % len(g)])] for i in range(len(g) * -(-n // len(g)))]


def tag_accuracies(task: str, split: str, scores, table: dict | None = None) -> dict:
    """A tagged task's (GenEval's) per-tag means of the protocol's per-image scores: {tag: [mean, n]}
    ({} for a task without tags)."""
    t = (table or TASKS)[task]
    if t.tag is None:
        return {}
    by: dict = {}
    for p, s in zip(eval_prompts(task, split, len(scores), table), scores):
        by.setdefault(t.tag(p), []).append(float(s))
    return {k: [float(np.mean(v)), len(v)] for k, v in by.items()}


def evaluate(policy, task: str, n: int = 256, guidance: float | None = None, batch: int = 0,
             split: str = "train", table: dict | None = None) -> np.ndarray:
    """Per-image scores of the policy's ACTIVE adapter on n prompts of `task`'s `split` (table:
    the base's task table, default tasks_for(the policy's base); batch 0: 64 toy, 8 SD3 images).
    With several processes (torchrun) every process calls this: process r samples and scores
    images r, r + W, ... and all of them get every score (one process gives the same numbers).
    On a GPU the transformer passes run under bf16 autocast, as Stage 2's."""
    from tqdm import tqdm
    g = policy.guidance if guidance is None else guidance
    table = table or tasks_for(policy.base_path)
    batch = batch or (8 if policy.vae is not None else 64)
    ps = eval_prompts(task, split, n, table)
    n = len(ps)                                                # a tagged task: rounded up to equal tags
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if dist else (1, 0)
    mine = list(range(rank, n, world))
    out = np.zeros(n, np.float64)
    for b in tqdm(range(0, len(mine), batch), desc=f"eval {task} ({split})", leave=False,
                  disable=len(mine) <= batch or rank > 0):
        idx = mine[b:b + batch]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=policy.device.type == "cuda"):
            imgs = S.sample(policy, [ps[i] for i in idx], [EVAL_SEED + i for i in idx], EVAL_STEPS, policy.shift, g, batch)
        out[idx] = table[task].reward(imgs, [ps[i] for i in idx], strict=True)
    if world > 1:                                              # every process gets every image's score
        got = [None] * world
        torch.distributed.all_gather_object(got, out)
        out = np.sum(got, axis=0)                              # each image is non-zero in one process only
    return out


def geneval_diagnostics(policy, n: int, guidance: float | None = None, split: str = "train") -> dict:
    """The protocol's GenEval images for n (the same images evaluate() scores: "strict" is their
    mean score, GenEval's Overall) -> rewards.geneval_diagnostics: strict accuracy per tag and the
    found-rate of each colour. Toy scale, one process."""
    g = policy.guidance if guidance is None else guidance
    ps = eval_prompts("geneval", split, n)
    imgs = S.sample(policy, ps, [EVAL_SEED + i for i in range(len(ps))], EVAL_STEPS, policy.shift, g, 64)
    return rewards.geneval_diagnostics(imgs, ps)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b and its paired standard error (same prompts, same initial noise)."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def minmax_average(means: np.ndarray) -> np.ndarray:
    """The paper's Average (Table 1): means (..., rows, metrics) -> (..., rows), the mean over the
    metric columns of (score - column min) / (column max - column min) over the rows given; a column
    whose rows are all equal contributes 0 (no columns: 0)."""
    if 0 in means.shape[-2:]:
        return np.zeros(means.shape[:-1])
    lo, hi = means.min(-2, keepdims=True), means.max(-2, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (means - lo) / np.where(span > 0, span, 1.0), 0.0).mean(-1)


def average_difference(per_image: dict, names: list[str], a: str, b: str, split: str = "train",
                       draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Average(a) - Average(b) over the rows `names` and its paired bootstrap standard error.
    per_image {name: {split: {task: (n,)}}}. The rows share prompts and initial noise, so one draw
    resamples each task's images with the same indices for every row (tasks independently), then
    recomputes every row's means, the columns' min-max and the two Averages: the column ends move
    with the draw, as they would in a rerun."""
    cols = [t for t in toy.TASK_NAMES if all(t in per_image[k][split] for k in names)]
    ia, ib = names.index(a), names.index(b)
    rng = np.random.default_rng(seed)
    full, boot = [], []
    for c in cols:
        m = np.stack([np.asarray(per_image[k][split][c], dtype=np.float64) for k in names])   # (rows, n)
        full.append(m.mean(-1))
        idx = rng.integers(0, m.shape[1], size=(draws, m.shape[1]))
        boot.append(m[:, idx].mean(-1).T)                                                     # (draws, rows)
    point = minmax_average(np.stack(full, -1))
    dist = minmax_average(np.stack(boot, -1))
    return float(point[ia] - point[ib]), float(np.std(dist[:, ia] - dist[:, ib], ddof=1))


# ---------------------------------------------------------------------------------
# the score cache: per-image scores next to each checkpoint, keyed by everything that changes them
# ---------------------------------------------------------------------------------
def _stable(v) -> str:
    """A repr that is the same in every process (no object addresses)."""
    if isinstance(v, np.ndarray):
        return f"ndarray{v.shape}{v.dtype}:" + hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
    if isinstance(v, dict):
        return "{" + ",".join(f"{_stable(k)}:{_stable(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_stable(x) for x in v) + "]"
    if isinstance(v, (set, frozenset)):
        return "{" + ",".join(sorted(_stable(x) for x in v)) + "}"
    if isinstance(v, (int, float, str, bool, type(None))):
        return repr(v)
    return type(v).__name__


def _reads(fn, seen: set, out: list) -> None:
    """Append the source of fn, of every function of this project it calls (recursively), and
    the current value of every module-level constant they read (ours or toy.py's)."""
    fn = getattr(fn, "__wrapped__", fn)                        # functools.lru_cache
    if not isinstance(fn, types.FunctionType) or fn in seen:
        return
    seen.add(fn)
    out.append(inspect.getsource(fn))
    codes, names = [fn.__code__], set()
    while codes:                                              # nested code: lambdas, comprehensions
        c = codes.pop()
        names |= set(c.co_names)
        codes += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    ours = ("rewards", "real_rewards", "toy", "sampler", "__main__")
    scopes = [fn.__globals__] + [vars(m) for m in fn.__globals__.values()
                                 if isinstance(m, types.ModuleType) and m.__name__ in ours]
    for name in sorted(names):
        for scope in scopes:
            if name not in scope or isinstance(scope[name], (types.ModuleType, type)):
                continue
            v = scope[name]
            if callable(v):
                if getattr(v, "__module__", None) in ours:
                    _reads(v, seen, out)
            else:
                out.append(f"{name}={_stable(v)}")


def reward_version(task: str, table: dict | None = None) -> str:
    """A version of a task's reward code: a hash of the scoring function's source, of every helper
    it calls, of the values of the constants they read, and of the reward packages' versions.
    Any edit to any of them - a patched threshold too - is a new version (a cache miss)."""
    from importlib.metadata import PackageNotFoundError, version
    out: list[str] = []
    _reads((table or TASKS)[task].reward, set(), out)
    for p in REWARD_PACKAGES:
        try:
            out.append(f"{p}=={version(p)}")
        except PackageNotFoundError:
            out.append(f"{p} missing")
    return hashlib.sha256("\n".join(out).encode()).hexdigest()[:16]


_HASHES: dict = {}


def weights_hash(path: str | Path, base: str | None = None) -> str:
    """The weights every component of a checkpoint uses: its adapter files (teacher / student)
    and every file of its base's model folders (transformer, text encoder(s), tokenizer(s), VAE);
    a hub id by name. base: the base of an adapter folder without opd.json (a published teacher).
    Memoised on the files' sizes and modification times."""
    path = Path(path)
    meta = runs.read_meta(path) if path.is_dir() else {}
    if (path / "adapter_config.json").is_file():               # teacher / student, opd.json or not
        files = [path / "adapter_config.json", path / "adapter_model.safetensors"]
        base = runs.resolve_base(path, meta) if meta.get("base") else base
        extra = weights_hash(base) if base else ""
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.parent != path
                       or f.name == "model_index.json")
        extra = ""
    else:
        return f"hub:{path}"
    stamp = (str(path.resolve()), extra, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _HASHES:
        h = hashlib.sha256(extra.encode())
        for f in files:
            h.update(str(f.relative_to(path)).encode())
            with open(f, "rb") as fh:
                hashlib.file_digest(fh, lambda: h)
        _HASHES[stamp] = h.hexdigest()[:16]
    return _HASHES[stamp]


def protocol(task: str, split: str, n: int, cfg: float, shift: float, resolution, table: dict | None = None,
             sigma_min: float = 0.0) -> dict:
    """Everything that changes a score of one (task, split) evaluation, except the weights
    (sigma_min: the SD3 scheduler's grid, sampler.time_grid; absent for the toy's)."""
    ps = eval_prompts(task, split, n, table)
    proto = {"task": task, "split": split, "n": n, "prompts_sha": hashlib.sha256("\n".join(ps).encode()).hexdigest()[:16],
             "seed": EVAL_SEED, "steps": EVAL_STEPS, "shift": float(shift), "resolution": resolution,
             "cfg": float(cfg), "strict": True, "reward_version": reward_version(task, table)}
    if sigma_min:
        proto["sigma_min"] = float(sigma_min)
    if (table or TASKS)[task].source:                          # real scale: the prompt files (GenEval metadata)
        proto["prompt_files"] = (table or TASKS)[task].source
    return proto


def cache_key(proto: dict, weights: str) -> str:
    return hashlib.sha256(json.dumps([proto, weights], sort_keys=True).encode()).hexdigest()[:16]


def _cache_files(path: Path) -> tuple[Path, Path]:
    """(where cached scores are read first, where misses are written). A shipped checkpoint
    (base/, ckpts/) is never written by an evaluation: its misses go to runs/scores/."""
    if not path.is_dir():                                      # a hub id: runs/scores/hub__owner__name.json
        f = runs.REPO / "runs" / "scores" / ("hub__" + str(path).replace("/", "__") + ".json")
        return f, f
    own = path / "scores.json"
    if not runs.shipped(path):
        return own, own
    return own, runs.REPO / "runs" / "scores" / (str(path.resolve().relative_to(runs.REPO)).replace(os.sep, "__") + ".json")


def _load_json(f: Path) -> dict:
    try:
        cache = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        cache = {}
    return cache if isinstance(cache, dict) else {}            # a damaged cache is only a cache: recomputed


def evaluate_checkpoint(path: str, n: int = 256, heldout_n: int = HELDOUT_N, tasks=toy.TASK_NAMES,
                        policy=None, export: bool = False, prompt_dir=None,
                        st: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-image scores {split: {task: (n,)}} of a checkpoint on both tables, from its cache
    where the key matches, else computed. policy: an already loaded one, with the checkpoint's
    adapter ACTIVE (use(None) for a base); st: its settings (runs.settings) where its folder
    cannot tell them - a published teacher without opd.json on the base st["base"], at its task's
    CFG. With several processes every process calls this; rank 0's cache decides and is written.
    export=True (evaluate.py --export-scores) writes exactly these entries into the checkpoint's
    own scores.json (and their means into its opd.json), the one way scores enter base/ or ckpts/."""
    path = Path(path)
    st = st or runs.settings(path)
    table = tasks_for(st["base"], prompt_dir)
    weights = weights_hash(path, base=st["base"] if str(st["base"]) != str(path) else None)
    res = _resolution(st["base"])
    read_f, write_f = _cache_files(path)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    cache = [_load_json(read_f) | _load_json(write_f) if rank == 0 else None]
    if dist:
        torch.distributed.broadcast_object_list(cache)         # every process decides with rank 0's cache
    cache = cache[0]
    out, used, dirty = {}, {}, False
    for split, k in zip(SPLITS, (n, heldout_n)):
        if k <= 0:
            continue
        out[split] = {}
        for task in tasks:
            proto = protocol(task, split, k, st["cfg"], st["shift"], res, table, st.get("sigma_min", 0.0))
            key = cache_key(proto, weights)
            if key not in cache:
                if policy is None:
                    policy = S.Policy(str(path))
                sc = np.round(evaluate(policy, task, k, st["cfg"], split=split, table=table), 6)
                cache[key] = {"protocol": proto, "weights": weights, "mean": float(sc.mean()),
                              "scores": [float(x) for x in sc]}
                dirty = True
            out[split][task] = np.array(cache[key]["scores"], dtype=np.float64)
            used[key] = cache[key]
    if rank > 0:
        return out
    if export:                                                 # the scores and opd.json's summary of them
        runs.write_json_atomic(read_f, used)
        if "train" in out and (path / runs.META).is_file():
            runs.write_json_atomic(path / runs.META, runs.read_meta(path) | {"scores": {
                t: round(float(v.mean()), 4) for t, v in out["train"].items()} | {"n": n, "prompts": "train"}})
    elif dirty:
        try:
            write_f.parent.mkdir(parents=True, exist_ok=True)
            runs.write_json_atomic(write_f, _load_json(write_f) | {k: v for k, v in cache.items() if k in used})
        except OSError:
            pass                                               # a read-only folder: the cache is only a cache
    return out


def _resolution(base: str):
    """The image size the protocol samples at (Policy.latent_shape's default): the toy's sample size;
    an SD3 folder's min(512, its own); a hub id: its name plus 512."""
    f, v = Path(base) / "transformer" / "config.json", Path(base) / "vae" / "config.json"
    if not f.is_file():
        return f"{base}@{S.SD3_RES}"
    own = json.loads(f.read_text()).get("sample_size")
    if not v.is_file():
        return own
    return min(S.SD3_RES, own * 2 ** (len(json.loads(v.read_text())["block_out_channels"]) - 1))


# ---------------------------------------------------------------------------------
# the results JSON, its tables, and the command line
# ---------------------------------------------------------------------------------
def results(rows: list[dict], proto: dict, per_image: dict | None = None, tasks: dict | None = None) -> dict:
    """The results JSON. rows: {name, path, scores: {task: mean}, heldout: {task: mean}}; the
    paper's Average per table: the mean over the metric columns of (score - column min) /
    (column max - column min) over THESE rows; a column whose rows are all equal contributes 0.
    per_image {name: {split: {task: (n,)}}}: each row also gets its paired difference to the
    first row (the base) with its standard error, per task and table, and a tagged task's (GenEval's)
    per-tag accuracies ("tags" / "tags_heldout": {task: {tag: [accuracy, n]}}; tasks: the task table)."""
    for r in rows:
        for key, split in (("tags", "train"), ("tags_heldout", "test")):
            got = {c: tag_accuracies(c, split, v, tasks) for c, v in (per_image or {}).get(r["name"], {}).get(split, {}).items()}
            if any(got.values()):
                r[key] = {c: v for c, v in got.items() if v}
    for table, split in (("scores", "train"), ("heldout", "test")):
        have = [r for r in rows if r.get(table)]
        cols = [t for t in toy.TASK_NAMES if have and all(t in r[table] for r in have)]
        avg = minmax_average(np.array([[r[table][c] for c in cols] for r in have]).reshape(len(have), len(cols)))
        for r, a in zip(have, avg):
            r["average" if table == "scores" else "average_heldout"] = float(a)
            if per_image and r is not rows[0] and split in per_image.get(r["name"], {}):
                ref, mine = per_image[rows[0]["name"]][split], per_image[r["name"]][split]
                r["vs_base" if table == "scores" else "vs_base_heldout"] = {
                    c: list(paired(mine[c], ref[c])) for c in cols if c in ref}
    return {"protocol": proto, "rows": rows}


def render_table(res: dict, table: str = "scores") -> str:
    """A results JSON's table ("scores": primary, "heldout"): each cell is the mean and, when the
    JSON has them, the paired difference to the first row (the base) +- its standard error."""
    rows = [r for r in res["rows"] if r.get(table)]
    cols = [t for t in toy.TASK_NAMES if rows and all(t in r[table] for r in rows)]
    vs = "vs_base" if table == "scores" else "vs_base_heldout"
    avg = "average" if table == "scores" else "average_heldout"
    head = ["Model"] + [res["protocol"].get("metrics", {}).get(c, TASKS[c].metric) for c in cols] + ["Average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"]]
        for c in cols:
            d = r.get(vs, {}).get(c)
            cells.append(f"{r[table][c]:.3f}" + (f" ({d[0]:+.3f} ± {d[1]:.3f})" if d else ""))
        lines.append("| " + " | ".join(cells + [f"{r[avg]:.3f}"]) + " |")
    return "\n".join(lines)


def render_tags(res: dict, table: str = "scores") -> str:
    """A table's per-tag accuracies of its tagged task (GenEval): one row per model ('' if none)."""
    key = "tags" if table == "scores" else "tags_heldout"
    rows = [r for r in res["rows"] if r.get(key)]
    if not rows:
        return ""
    task = next(iter(rows[0][key]))
    tags = list(rows[0][key][task])
    n = sorted({v[1] for r in rows for v in r[key][task].values()})
    lines = [f"{res['protocol'].get('metrics', {}).get(task, TASKS[task].metric)} per tag (strict accuracy; its "
             f"Overall, the column above, is their mean; n = {'-'.join(map(str, n))} per tag)", "",
             "| Model | " + " | ".join(tags) + " |", "|" + "---|" * (len(tags) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[key][task][t][0]:.3f}" if t in r[key][task] else "-"
                                                     for t in tags) + " |")
    return "\n".join(lines)


def render_results(res: dict) -> str:
    """Both tables with their captions and GenEval's per-tag accuracies, as the scripts print them
    and the README shows them."""
    p = res["protocol"]
    out = [f"Primary table: the tasks' train prompts (the prompts RL and distillation use), n = {p['n']} per task "
           "(GenEval: rounded up to the same number per tag); (paired difference to the base +- SE)", "",
           render_table(res, "scores")]
    if render_tags(res, "scores"):
        out += ["", render_tags(res, "scores")]
    if any(r.get("heldout") for r in res["rows"]):
        out += ["", f"Generalisation to unseen prompts: the held-out test prompts, n = {p['heldout_n']} per task",
                "", render_table(res, "heldout")]
        if render_tags(res, "heldout"):
            out += ["", render_tags(res, "heldout")]
    return "\n".join(out)


def render_diagnostics(diags: dict) -> str:
    """{name: rewards.geneval_diagnostics} -> one table: GenEval's Overall, per-tag accuracy and
    per-colour found-rate (of the objects asked for in a colour, the share detected in it)."""
    tags = list(dict.fromkeys(t for d in diags.values() for t in d["tags"]))
    cols = list(dict.fromkeys(c for d in diags.values() for c in d["colours"]))
    lines = ["| Model | Overall | " + " | ".join(tags + [f"{c} found" for c in cols]) + " |",
             "|" + "---|" * (2 + len(tags) + len(cols))]
    for name, d in diags.items():
        lines.append(f"| {name} | {d['strict']:.3f} | " + " | ".join(
            [f"{d['tags'][t][0]:.2f}" if t in d["tags"] else "-" for t in tags]
            + [f"{d['colours'][c][0]:.2f}" if c in d["colours"] else "-" for c in cols]) + " |")
    return "\n".join(lines)


def row_name(path: str) -> str:
    """A results row's name from a checkpoint's metadata: base, teacher <task>, student."""
    meta = runs.read_meta(path) if Path(path).is_dir() else {}
    name = meta.get("role", "base") + (f" {meta['task']}" if meta.get("task") else "")
    if meta.get("task") in ("joint", "cascade"):                # multi-task RL: say which algorithm
        name += f" ({meta.get('trained', {}).get('algorithm', '?')})"
    if meta.get("role") == "student" and not meta.get("trained", {}).get("config", {}).get("balance", True):
        name += " (--no-balance)"
    return name


def main(argv=None):
    ap = runs.Parser(description="Evaluate checkpoints with the protocol (docs/formats.md, 'Evaluation protocol'): both "
                                             "tables, paired to the first checkpoint given.")
    ap.add_argument("ckpts", nargs="*", help="checkpoint folders (base/, ckpts/*, runs/.../checkpoint); the first is "
                                             "the reference of the paired differences")
    ap.add_argument("--n", type=runs.checked(int, ">= 1"), default=256, help="images per task, primary table (default: 256)")
    ap.add_argument("--heldout-n", type=runs.checked(int, ">= 0"), default=HELDOUT_N,
                    help=f"images per task, held-out table; 0 skips it (default: {HELDOUT_N})")
    ap.add_argument("--json", default="", help="also write the results JSON to this file (default: none)")
    ap.add_argument("--export-scores", action="store_true",
                    help="write these per-image scores into each checkpoint's own scores.json - the one way "
                         "scores enter base/ or ckpts/ (default: off; misses of shipped checkpoints go to runs/scores/)")
    ap.add_argument("--geneval-diagnostics", action="store_true",
                    help="also print each checkpoint's GenEval per-tag accuracies and per-colour found-rates on the "
                         "primary table's GenEval images (toy bases; samples them again; default: off)")
    ap.add_argument("--prompt-dir", default="", help="SD3 bases: the prompt folder (README, 'Real scale'; "
                                                     "default: the example set in prompts/)")
    ap.add_argument("--geneval-prompts", default="", metavar="DIR",
                    help="instead of evaluating: write DIR/geneval/train_metadata.jsonl from GenEval's templates "
                         "(default: off)")
    ap.add_argument("--count", type=runs.checked(int, ">= 1"), default=5000,
                    help="--geneval-prompts: how many prompts (default: 5000)")
    ap.add_argument("--exclude", nargs="*", default=[], help="--geneval-prompts: GenEval metadata files whose "
                                                             "prompts are left out, e.g. a test set (default: none)")
    ap.add_argument("--seed", type=int, default=0, help="--geneval-prompts: the draw's seed (default: 0)")
    args = ap.parse_args(argv)
    rows, per = [], {}
    try:
        if args.geneval_prompts:
            print(f"wrote {write_geneval_prompts(args.geneval_prompts, args.count, args.seed, tuple(args.exclude))}")
            return
        if not args.ckpts:
            raise runs.CheckpointError("no checkpoints given; pass folders to evaluate (or --geneval-prompts DIR)")
        if args.geneval_diagnostics and any(Path(c).is_dir() and runs.settings(c)["kind"] != "toy" or not Path(c).is_dir()
                                            for c in args.ckpts):
            raise runs.CheckpointError("--geneval-diagnostics reads the toy's scenes; at real scale the tables' "
                                       "GenEval per tag is what there is")
        if args.json:
            runs.output_file(args.json, "--json")              # its folder made (or refused) before the work
        for c in args.ckpts:
            if not Path(c).is_dir() and (c.startswith((".", "/")) or c.count("/") != 1):
                raise runs.CheckpointError(f"{c}: no such checkpoint folder (and not a hub id like owner/name)")
            name = row_name(c)
            while name in per:
                name += "'"
            per[name] = evaluate_checkpoint(c, args.n, args.heldout_n, export=args.export_scores,
                                            prompt_dir=args.prompt_dir or None)
            rows.append({"name": name, "path": c, "scores": {k: float(v.mean()) for k, v in per[name]["train"].items()},
                         "heldout": {k: float(v.mean()) for k, v in per[name].get("test", {}).items()}})
    except runs.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = tasks_for(runs.settings(args.ckpts[0])["base"], args.prompt_dir or None)
    res = results(rows, {"n": args.n, "heldout_n": args.heldout_n, "seed": EVAL_SEED, "steps": EVAL_STEPS,
                         "sampler": "ODE (a = 0)", "metrics": {t: v.metric for t, v in table.items()}}, per, table)
    print(render_results(res))
    if args.geneval_diagnostics:                               # the same images as the GenEval column's
        res["geneval_diagnostics"] = {r["name"]: geneval_diagnostics(S.Policy(r["path"]), args.n, runs.settings(
            r["path"])["cfg"]) for r in rows}
        print(f"\nGenEval's diagnostics (primary table, n = {len(eval_prompts('geneval', 'train', args.n))}):\n\n"
              + render_diagnostics(res["geneval_diagnostics"]))
    if args.json:
        runs.write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
