"""teachers.py - Stage 1: one specialist teacher per task by single-task RL (paper Sec. 3, Sec. 6).

Each teacher is a LoRA adapter on the base, trained on ONE task's prompts and reward. Two
algorithms, the paper's, as two step functions under one loop (train):
  * GRPO-Guard (arXiv 2510.22319; grpo_step, guard_loss) = Flow-GRPO + RatioNorm + per-step 1/|dt|
    reweighting: SDE rollouts (Eq. 5-7) store log pi_old; group advantages; PPO-clip.
  * DiffusionNFT (arXiv 2509.16117; nft_step, nft_loss): CFG-free RL on the FORWARD process: an
    old policy's ODE samples, reward weights r in [0, 1], flow matching through an implicit
    positive and negative policy.

    python teachers.py --task aesthetic --algo grpo-guard --iters 120 --export ckpts/aesthetic

regenerates a teacher; the shipped ones' commands: README, "Regenerating everything". Runs write
runs/teacher-<task>/ and resume when re-run; `--minutes` stops a run when its budget is spent.
Table 1's multi-task RL baselines run this loop too: multitask.py.

Deliberate deviations from the papers (for a 2-core CPU budget; measured in docs/experiments.md,
"Recipes on the train prompts: a GPU sweep" and "The shipped teachers")
  1. Toy sizes: 4 prompts x 8 images per iteration, 10 rollout steps, LoRA r 32 / alpha 64.
  2. No KL-to-reference term (GRPO-Guard's configs use none; NFT's 1e-4 left out), no EMA.
  3. NFT: old-policy decay min(ramp * iteration, max); rollouts on the shared 10-step ODE grid;
     re-noising t ~ U[0.02, 0.98]; `--adv-scale batch` scales advantages by the batch's std.
  4. One rollout batch feeds `minibatches` optimizer steps, so PPO ratios leave 1 (Flow-GRPO).
  5. Learning rates and lengths are the CPU budget's, measured; `--train-fraction 0.5` trains a
     random half of the steps per minibatch (Flow-GRPO's timestep_fraction).
  6. GenEval's RL reward: `--rl-reward objects` (rewards.geneval_rl_reward) pays per object found,
     so a pair drawn in one colour earns little (the rules' fraction paid it 0.6 and a teacher
     stopped drawing green); `--prompt-mix spread` draws tags by their recent reward spread.
  7. `--sample-cfg`: the CFG a teacher is sampled at (its evaluations and Stage 2's queries) may
     differ from its rollouts'; the shipped GenEval teacher trains CFG-free and is sampled at the
     base's CFG 3, which a CFG-3 student can match exactly (the paper queries it at 1.0).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import rewards as R
import evaluate as E
import runs
from runs import arg
import sampler as S


@dataclasses.dataclass
class TeacherConfig:
    task: str = arg("ocr", "which task's prompts and reward (geneval|ocr|aesthetic); several tasks: multitask.py")
    algo: str = arg("grpo-guard", "the RL algorithm", "in grpo-guard|flow-grpo|nft")
    base: str = arg("base", "the base checkpoint the adapter sits on")
    out: str = arg("", "run folder (default runs/teacher-<task>, runs/teacher-joint|cascade-<algo>); re-running resumes it")
    init: str = arg("", "start the LoRA from this adapter checkpoint (same base, rank, alpha), not a fresh one")
    iters: int = arg(150, "RL iterations (one rollout batch each)", ">= 1")
    minutes: float = arg(0.0, "also stop after this many minutes of training (0: no limit)", ">= 0")
    prompts: int = arg(4, "distinct prompts per iteration", ">= 1")
    group: int = arg(8, "images per prompt (GRPO group; NFT uses the same)", ">= 2")
    steps: int = arg(10, "rollout grid steps (training); evaluation uses 40", ">= 1")
    noise_level: float = arg(0.7, "a of Eq. 5 for GRPO rollouts (Flow-GRPO's SD3 value)", "> 0")
    cfg: float = arg(-1.0, "rollout CFG; -1: the base's own (GRPO) / 1.0 (NFT, CFG-free)")
    sample_cfg: float = arg(-1.0, "the CFG the teacher is sampled at: its evaluations and Stage 2's queries "
                            "(opd.json cfg); -1: the rollout CFG. Training does not depend on it")
    lr: float = arg(1e-3, "AdamW learning rate of the LoRA weights", "> 0")
    rank: int = arg(32, "LoRA rank (paper: 32)", ">= 1")
    alpha: int = arg(64, "LoRA alpha (paper: 64)", ">= 1")
    clip: float = arg(2e-4, "PPO clip range epsilon on the (normalised) ratio", "> 0")
    minibatches: int = arg(2, "optimizer steps per rollout batch (GRPO)", ">= 1")
    train_fraction: float = arg(1.0, "GRPO: each minibatch trains a random fraction of the steps", "> 0")
    nft_strength: float = arg(1.0, "NFT's beta in v+- = (1 -+ beta) v_old +- beta v_theta", "> 0")
    nft_adv_clip: float = arg(5.0, "NFT's c in r = clip(0.5 + 0.5 clip(A, -c, c) / c, 0, 1)", "> 0")
    old_decay_max: float = arg(0.5, "NFT: old <- d old + (1 - d) theta, d = min(ramp * i, max)", ">= 0")
    old_decay_ramp: float = arg(0.01, "NFT: see old_decay_max", ">= 0")
    nft_times: int = arg(2, "NFT: re-noising times t drawn per clean sample", ">= 1")
    nft_t: str = arg("uniform", "NFT: re-noising times uniform in [0.02, 0.98], or drawn from the rollout grid's "
                     "times (grid)", "in uniform|grid")
    adv_scale: str = arg("group", "advantages (r - group mean) divided by the group's reward std (group, "
                         "Flow-GRPO) or the whole batch's (batch: the global_std of Flow-GRPO / NFT configs)",
                         "in group|batch")
    rl_reward: str = arg("rules", "GenEval's RL reward: rules = the fraction of GenEval's rules that hold (the "
                         "shipped teacher's); objects = 0.5 strict + 0.5 per-object credit, which a one-colour "
                         "picture cannot game (rewards.geneval_rl_reward; toy only)", "in rules|objects")
    prompt_mix: str = arg("uniform", "how an iteration draws its prompts: uniform over the task's train prompts; "
                          "tags: a tag first, uniform over the task's tags (GenEval: as its Overall weighs them), "
                          "then one of its prompts; spread: a tag in proportion to its share of groups with reward "
                          "spread over the last SPREAD_WINDOW iterations (at least SPREAD_FLOOR)", "in uniform|tags|spread")
    eval_every: int = arg(25, "small paired eval on train prompts every N iterations (0: never)", ">= 0")
    eval_small: int = arg(32, "images for the periodic eval", ">= 1")
    eval_n: int = arg(256, "images per task, final evaluation, primary table (0: none)", ">= 0")
    eval_heldout_n: int = arg(64, "images per task, final evaluation, held-out table", ">= 0")
    seed: int = arg(0, "seeds prompts, rollout noise and re-noising")
    fresh: bool = arg(False, "delete --out (a teachers run folder only) and start over")
    export: str = arg("", "after training, copy checkpoint/ here (e.g. ckpts/ocr)")


MULTITASK = ("joint", "cascade")      # opd.json "task" of an adapter trained on several tasks (role stays "teacher")


def trained_tasks(meta: dict) -> list[str]:
    """The tasks an adapter checkpoint was trained on, from its opd.json."""
    if meta.get("tasks"):
        return list(meta["tasks"])
    if meta.get("task") in R.TASKS:
        return [meta["task"]]
    return list(meta.get("teachers") or R.TASKS)               # a student: its teachers' tasks


def check_init(cfg) -> list[str]:
    """--init: an adapter checkpoint of ours on THIS run's base (resolved path and hash) with this
    run's LoRA shape; returns the tasks it was trained on. Anything else: CheckpointError."""
    p = Path(cfg.init)
    meta, adapter, base = runs.resolve_checkpoint(p) if p.is_dir() else ({}, None, "")   # its files checked
    if adapter is None:
        raise runs.CheckpointError(f"--init {p}: not an adapter checkpoint of ours (a teacher or student folder with "
                                f"{runs.META} and adapter_config.json)")
    where = lambda b: str(Path(b).resolve()) if Path(b).is_dir() else b
    theirs = (where(base), meta["base"].get("hash"))
    mine = (where(cfg.base), runs.content_hash(cfg.base) if Path(cfg.base).is_dir() else None)
    if theirs != mine:
        raise runs.CheckpointError(f"--init {p}: it sits on the base {theirs[0]} (hash {theirs[1]}), this run on --base "
                                f"{cfg.base} = {mine[0]} (hash {mine[1]}); start from an adapter of this run's base")
    ac = runs.check_adapter(p)                                 # its adapter_config.json
    if (ac.get("r"), ac.get("lora_alpha"), sorted(ac.get("target_modules") or [])) != \
            (cfg.rank, cfg.alpha, sorted(S.LORA_TARGETS)):
        raise runs.CheckpointError(f"--init {p}: a LoRA of rank {ac.get('r')}, alpha {ac.get('lora_alpha')}, this run's "
                                f"--rank {cfg.rank} --alpha {cfg.alpha}; pass the checkpoint's rank and alpha")
    return trained_tasks(meta)


def load_init(policy, name: str, ckpt: str) -> None:
    """Copy a saved adapter's weights (PEFT format) into the fresh adapter `name`."""
    from safetensors.torch import load_file
    try:
        sd = load_file(str(Path(ckpt) / "adapter_model.safetensors"))
    except Exception as e:                                     # missing, truncated, corrupt
        raise runs.CheckpointError(f"--init {ckpt}: unreadable adapter_model.safetensors ({e})") from None
    mine = {k.replace(f".{name}.", "."): v for k, v in policy.adapter_params(name).items()}
    if set(mine) != set(sd) or any(sd[k].shape != v.shape for k, v in mine.items()):
        raise runs.CheckpointError(f"--init {ckpt}: its adapter does not fit this run's LoRA (other layers or shapes)")
    with torch.no_grad():
        for k, v in mine.items():
            v.copy_(sd[k])


LATER_FLAGS = {"init": "", "cascade": False, "nft_t": "uniform", "adv_scale": "group", "rl_reward": "rules",
               "prompt_mix": "uniform", "sample_cfg": -1.0}


def run_config(cfg, tasks: list[str]) -> dict:
    """The run's config as open_run compares it on a resume. Flags added after the first runs
    (LATER_FLAGS) are left out at their defaults, so run folders from before they existed still
    resume; --init is recorded with the hash of its weights."""
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if not (k in LATER_FLAGS and v == LATER_FLAGS[k])}
    if cfg.init:
        conf["init"] = {"path": cfg.init, "weights": E.weights_hash(cfg.init)}
    return conf | {"base": {"path": str(Path(cfg.base).resolve()) if Path(cfg.base).is_dir() else cfg.base,
                            "weights": E.weights_hash(cfg.base)}, "tasks": tasks}


def lora_config(cfg):
    from peft import LoraConfig
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=S.LORA_TARGETS, lora_dropout=0.0)


def group_advantages(r: np.ndarray, group: int, scale: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """GRPO: A_i = (r_i - mean_group) / (std + 1e-4), std the group's own (scale "group") or the whole
    batch's ("batch": a 0.60-vs-0.55 group stays a small advantage); groups with zero spread are dropped."""
    rg = r.reshape(-1, group)
    std = rg.std(1, keepdims=True) if scale == "group" else np.full((len(rg), 1), r.std())
    adv = (rg - rg.mean(1, keepdims=True)) / (std + 1e-4)
    keep = np.repeat(rg.std(1) > 1e-6, group)
    return adv.reshape(-1), keep


SPREAD_WINDOW = 50     # --prompt-mix spread: iterations whose groups weigh the tags
SPREAD_FLOOR = 0.2     # ... and the least weight of a tag (one whose groups all lost their spread)


def draw_prompts(task, k: int, mix: str, rng: np.random.Generator, weights: dict | None = None) -> list[str]:
    """k of the task's train prompts: uniform over them, or (mix "tags" / "spread", a task with tags:
    GenEval) a tag first - uniformly, or in proportion to `weights` {tag: w} (tag_weights) - then one
    of that tag's prompts."""
    if mix == "uniform" or task.tag is None:
        return [task.train[i] for i in rng.integers(len(task.train), size=k)]
    g = R.by_tag(task, task.train)
    if weights is None:
        ts = rng.integers(len(g), size=k)
    else:
        w = np.array([weights[task.tag(ps[0])] for ps in g])
        ts = rng.choice(len(g), size=k, p=w / w.sum())
    return [g[t][rng.integers(len(g[t]))] for t in ts]


def tag_weights(history: list[dict], tags: list[str]) -> dict:
    """--prompt-mix spread: a tag's weight is the share of its groups WITH reward spread over the
    last SPREAD_WINDOW iterations' {tag: [groups with spread, groups]}, at least SPREAD_FLOOR; 1
    before it has been drawn. A group whose images all earn the same reward has advantages 0
    (group_advantages): once a tag is mastered (or hopeless) its draws teach nothing, and the
    draws move to the tags that still give a signal - the tag-level form of DAPO's dynamic sampling."""
    n = {t: [0, 0] for t in tags}
    for rec in history[-SPREAD_WINDOW:]:
        for t, (s, m) in rec.items():
            if t in n:
                n[t][0] += s; n[t][1] += m
    return {t: max(s / m, SPREAD_FLOOR) if m else 1.0 for t, (s, m) in n.items()}


def rl_reward(task, cfg):
    """The reward RL trains on: the task's reward with partial credit (strict=False), or for
    GenEval with --rl-reward objects rewards.geneval_rl_reward. Evaluation is always strict."""
    if task.name == "geneval" and cfg.rl_reward == "objects":
        return R.geneval_rl_reward
    return lambda imgs, prompts: task.reward(imgs, prompts, strict=False)


def guard_log_ratio(x_next, mean_new, mean_old, logp_old, std, ratio_norm: bool):
    """log rho per sample. Plain Flow-GRPO: Delta = log p_theta(x') - log p_old(x') (means over
    dims). GRPO-Guard's RatioNorm adds back the bias b = ||mu_theta - mu_old||^2 / (2 s^2)
    (= step_kl, PER SAMPLE) and rescales by s, which equals the per-sample dot product
    eps . (mu_theta - mu_old) (mean over dims): zero-mean, no 1/s blow-up."""
    delta = S.gaussian_logprob(x_next, mean_new, std) - logp_old
    if not ratio_norm:
        return delta
    return std * (delta + S.step_kl(mean_new, mean_old, std))


def guard_loss(x_next, mean_new, mean_old, logp_old, std, dt, adv, clip, guard: bool = True):
    """One step j's policy loss and its log-ratio. GRPO-Guard (guard=True): the RatioNorm ratio
    (guard_log_ratio) in PPO-clip, divided by |dt_j| - the Guard's per-step reweighting, which
    evens out the steps' gradient scales. guard=False: plain Flow-GRPO (density ratio, no reweighting)."""
    log_rho = guard_log_ratio(x_next, mean_new, mean_old, logp_old, std, ratio_norm=guard)
    loss = ppo_clip_loss(log_rho, adv, clip)
    return (loss / abs(dt) if guard else loss), log_rho


def ppo_clip_loss(log_rho, adv, clip):
    rho = log_rho.exp()
    return torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip, 1 + clip)).mean()


def nft_loss(v_theta, v_old, x_t, t, x_data, r, strength):
    """DiffusionNFT: implicit positive / negative policies and their x0-prediction losses,
    each normalised by its detached mean absolute error (adaptive weight), divided by beta."""
    tb = t.view(-1, *[1] * (x_t.dim() - 1))
    v_pos = (1 - strength) * v_old + strength * v_theta
    v_neg = (1 + strength) * v_old - strength * v_theta
    err_pos = (x_t - tb * v_pos) - x_data                      # x0_hat(v) = x_t - t v
    err_neg = (x_t - tb * v_neg) - x_data
    w_pos = err_pos.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
    w_neg = err_neg.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
    l_pos = err_pos.pow(2).flatten(1).mean(1) / w_pos
    l_neg = err_neg.pow(2).flatten(1).mean(1) / w_neg
    return ((r * l_pos + (1 - r) * l_neg) / strength).mean()


class Learner(NamedTuple):
    """What a step function updates: the policy (adapter "teacher" active), its optimizer and
    trained parameters, NFT's old-policy copy, the rollout grid and the rollout CFG."""
    policy: S.Policy
    opt: torch.optim.Optimizer
    params: list
    old: list
    grid: torch.Tensor
    g: float


def grpo_step(L: Learner, cfg: TeacherConfig, task, prompts: list[str], cond: dict, x1: torch.Tensor,
              rng: np.random.Generator, gen: torch.Generator, it: int) -> dict:
    """One GRPO-Guard (or Flow-GRPO) iteration: rollout, rewards, advantages, PPO-clip updates."""
    policy, grid = L.policy, L.grid
    # ---- 1. SDE rollout of the current policy, storing log pi_old (Eq. 5-7) ----
    ro = S.rollout(policy, cond, x1, grid, cfg.noise_level, L.g, gen)
    imgs = policy.decode(ro["states"][-1])
    # ---- 2. rewards -> group-normalised advantages (zero-std groups dropped) ----
    r = rl_reward(task, cfg)(imgs, prompts)
    adv, keep = group_advantages(r, cfg.group, cfg.adv_scale)
    rec = {"reward": float(r.mean()), "spread": keep[::cfg.group].tolist()}
    idx = np.flatnonzero(keep)
    rng.shuffle(idx)
    # ---- 3. PPO-clip over the steps j (all, or a random train_fraction per minibatch), `minibatches` optimizer steps ----
    clipped, n_terms = 0.0, 0
    n_train = max(1, round(cfg.train_fraction * cfg.steps))            # Flow-GRPO's timestep_fraction
    for mb in np.array_split(idx, cfg.minibatches) if len(idx) else []:
        mbt = torch.as_tensor(mb)
        sub = {k: v[mbt] for k, v in cond.items()}
        a_t = torch.as_tensor(adv[mb], dtype=torch.float32).to(policy.device)
        L.opt.zero_grad(set_to_none=True)
        for j in sorted(rng.choice(cfg.steps, n_train, replace=False)):
            t, t_next = float(grid[j]), float(grid[j + 1])
            x_j, x_next = ro["states"][j][mbt], ro["states"][j + 1][mbt]
            v = policy.velocity(x_j, t, sub, L.g)
            mean_new = S.step_mean(x_j, v, t, t_next, cfg.noise_level)              # Eq. 7, with grad
            loss, log_rho = guard_loss(x_next, mean_new, ro["means"][j][mbt], ro["logprobs"][j][mbt],
                                       float(ro["stds"][j]), t_next - t, a_t, cfg.clip, guard=cfg.algo == "grpo-guard")
            (loss / n_train).backward()
            clipped += float(((log_rho.exp() - 1).abs() > cfg.clip).float().mean()); n_terms += 1
        torch.nn.utils.clip_grad_norm_(L.params, 1.0)
        L.opt.step()
    return rec | {"clip_frac": clipped / max(n_terms, 1)}


def nft_step(L: Learner, cfg: TeacherConfig, task, prompts: list[str], cond: dict, x1: torch.Tensor,
             rng: np.random.Generator, gen: torch.Generator, it: int) -> dict:
    """One DiffusionNFT iteration: old-policy samples, rewards, optimality weights, the forward-process loss."""
    policy = L.policy
    # ---- 1. clean samples from the OLD policy, deterministic ODE, CFG-free ----
    policy.use("old")
    x_data = S.rollout(policy, cond, x1, L.grid, 0.0, L.g)["states"][-1]
    policy.use("teacher")
    imgs = policy.decode(x_data)
    # ---- 2. rewards -> advantages -> optimality weight r in [0, 1] ----
    r = rl_reward(task, cfg)(imgs, prompts)
    adv, keep = group_advantages(r, cfg.group, cfg.adv_scale)
    c = cfg.nft_adv_clip
    w = torch.as_tensor(np.clip(0.5 + 0.5 * np.clip(adv, -c, c) / c, 0, 1), dtype=torch.float32).to(policy.device)
    # ---- 3. forward-process loss on re-noised samples ----
    L.opt.zero_grad(set_to_none=True)
    for _ in range(cfg.nft_times):
        if cfg.nft_t == "grid":                                               # the times rollouts visit
            t = L.grid[:-1][torch.randint(len(L.grid) - 1, (len(prompts),), generator=gen)].float()
        else:
            t = torch.rand(len(prompts), generator=gen).clamp(0.02, 0.98)
        t = t.to(policy.device)
        eps = torch.randn(x_data.shape, generator=gen).to(policy.device)
        x_t = S.noised(x_data, eps, t)                                         # Sec. 2: x_t
        with torch.no_grad():
            policy.use("old")
            v_old = policy.velocity(x_t, t, cond, L.g)
            policy.use("teacher")
        v_theta = policy.velocity(x_t, t, cond, L.g)
        loss = nft_loss(v_theta, v_old, x_t, t, x_data, w, cfg.nft_strength) / cfg.nft_times
        loss.backward()
    torch.nn.utils.clip_grad_norm_(L.params, 1.0)
    L.opt.step()
    # ---- 4. soft update of the old policy ----
    d = min(cfg.old_decay_ramp * it, cfg.old_decay_max)
    with torch.no_grad():
        for o, p in zip(L.old, L.params):
            o.lerp_(p, 1 - d)
    return {"reward": float(r.mean()), "spread": keep[::cfg.group].tolist()}


def train(cfg: TeacherConfig, tasks: list[str] | None = None) -> Path:
    """The RL loop. `tasks` (default: [cfg.task]) rotates round-robin, one task per iteration: a
    batch holds one task's prompts, so its rewards and group advantages are that task's (several
    tasks: joint multi-task RL, multitask.py). Each iteration: prompts (each repeated for its
    group), initial noise, then grpo_step or nft_step - rollouts, rewards, group advantages and the
    update. Returns the exported checkpoint folder."""
    r = start(cfg, tasks)                        # checks, run folder, the teacher's LoRA, resume (or a finished run)
    if isinstance(r, Path):
        return r
    for it in iterations(r):                     # --iters, or fewer if --minutes is spent first
        task = R.TASKS[r.tasks[it % len(r.tasks)]]
        rng = np.random.default_rng([cfg.seed, it])
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + it)
        rec = {"iter": it, "task": task.name}
        weights = None
        if cfg.prompt_mix == "spread" and task.tag is not None:   # tags with reward spread drawn more (deviation 6)
            weights = tag_weights(r.spread.get(task.name, []), [task.tag(g[0]) for g in R.by_tag(task, task.train)])
            rec["tag_weights"] = {t: round(w, 3) for t, w in weights.items()}
        prompts = [p for p in draw_prompts(task, cfg.prompts, cfg.prompt_mix, rng, weights) for _ in range(cfg.group)]
        cond = r.policy.encode(prompts)
        x1 = torch.randn((len(prompts), *r.shape), generator=gen).to(r.policy.device)
        rec |= (nft_step if r.nft else grpo_step)(r.learner, cfg, task, prompts, cond, x1, rng, gen, it)
        count_spread(r, task, prompts, rec)
        end_iteration(r, it, rec)                # evaluation and resume state every --eval-every, log line
    return export(r)


@dataclasses.dataclass
class Training:
    """What the RL loop works with (built by start)."""
    cfg: TeacherConfig
    tasks: list
    init_tasks: list               # the tasks of an --init checkpoint (a cascade stage)
    out: Path
    conf: dict
    policy: S.Policy
    nft: bool
    g: float                       # the rollouts' CFG
    g_eval: float                  # the CFG it is sampled at (evaluations, opd.json)
    learner: "Learner"
    state: dict                    # the tensors a resume restores
    shape: tuple
    start: int
    before: float                  # seconds trained before a resume
    spread: dict                   # task -> its iterations' {tag: [groups with spread, groups]}
    log: object = None
    watch: bool = False            # GenEval diagnostics (toy)
    base_diag: dict | None = None  # the base's, at the sampling CFG
    kept: list = dataclasses.field(default_factory=list)   # GenEval iterations' "kept" since the last evaluation
    t0: float = 0.0
    done: int = 0                  # iterations reached


def start(cfg: TeacherConfig, tasks: list[str] | None) -> Training | Path:
    """Everything before the first iteration: the checks, the run folder (a finished run: its
    checkpoint instead), the teacher's LoRA (NFT: and its old copy), the optimizer, the resume."""
    tasks = tasks or [cfg.task]
    for t in tasks:
        if t not in R.TASKS:
            raise runs.CheckpointError(f"unknown task {t!r}; choose one of {sorted(R.TASKS)}")
    runs.refuse_adapter_as_base(cfg.base, "pass the base it sits on (e.g. base/) and, to start from it, --init")
    init_tasks = check_init(cfg) if cfg.init else []           # before anything is written
    if cfg.rl_reward == "objects" and runs.settings(cfg.base)["kind"] != "toy":
        raise runs.CheckpointError("--rl-reward objects reads the toy's scenes; at real scale GenEval trains on "
                                   "the rules (--rl-reward rules)")
    out = Path(cfg.out or (f"runs/teacher-{tasks[0]}" if len(tasks) == 1 else f"runs/teacher-joint-{cfg.algo}"))
    ckpt = out / "checkpoint"
    conf = run_config(cfg, tasks)
    if runs.open_run(out, conf, cfg.fresh, "teachers") and (ckpt / runs.META).is_file():
        print(f"{out} is finished, with this config: {ckpt} (--fresh starts over)")
        return ckpt
    torch.manual_seed(cfg.seed)
    policy = S.Policy(cfg.base)
    nft = cfg.algo == "nft"
    g = (1.0 if nft else policy.guidance) if cfg.cfg < 0 else cfg.cfg   # one CFG for every task of a joint run
    g_eval = g if cfg.sample_cfg < 0 else cfg.sample_cfg       # evaluations and opd.json: the CFG it is sampled at
    policy.add_adapter("teacher", config=lora_config(cfg))
    if cfg.init:                                               # a cascade stage / --init: not a fresh LoRA
        load_init(policy, "teacher", cfg.init)
    params = list(policy.adapter_params("teacher").values())
    old_params = []
    if nft:                                                    # the old policy: a second adapter
        policy.add_adapter("old", config=lora_config(cfg))
        old_params = list(policy.adapter_params("old").values())
        with torch.no_grad():
            for o, p in zip(old_params, params):
                o.copy_(p)
    for p in params:                                           # only the teacher's LoRA trains
        p.requires_grad_(True)
    policy.use("teacher")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    grid = S.time_grid(cfg.steps, policy.shift, policy.sigma_min)
    start, before = 0, 0.0
    state = {"params": params} | ({"old": old_params} if nft else {})
    if (out / "state.json").is_file():
        info = runs.load_state(out / "state", state, opt)
        start, before = info["iter"], info.get("elapsed_s", 0.0)
        print(f"resuming {out} at iteration {start}")
    print(json.dumps(conf | {"rollout_cfg": g, "sample_cfg": g_eval, "grid": [round(float(x), 5) for x in grid],
                             "lora_params": sum(p.numel() for p in params)}))
    spread = {}
    for rec in runs.resume_log(out / "log.jsonl", "iter", start):   # a resumed run's history, for tag_weights
        if "spread_tags" in rec:
            spread.setdefault(rec["task"], []).append(rec["spread_tags"])
    r = Training(cfg, tasks, init_tasks, out, conf, policy, nft, g, g_eval, Learner(policy, opt, params, old_params, grid, g),
                 state, policy.latent_shape(), start, before, spread, open(out / "log.jsonl", "a"))
    r.watch = "geneval" in tasks and runs.settings(cfg.base)["kind"] == "toy"
    if r.watch:                                                # the base (adapters off) at the sampling CFG
        policy.use(None)
        r.base_diag = E.geneval_diagnostics(policy, cfg.eval_small, g_eval)
        policy.use("teacher")
    r.t0 = time.time()
    return r


def iterations(r: Training):
    """The iterations this run trains, with a progress bar: from the resume's to --iters, or until
    --minutes of training (resumes counted) are spent; r.done counts the iterations reached."""
    from tqdm import tqdm
    cfg = r.cfg
    r.done = r.start
    for it in tqdm(range(r.start, cfg.iters), initial=r.start, total=cfg.iters, desc=f"{cfg.algo}:{cfg.task}"):
        if cfg.minutes and r.before + time.time() - r.t0 > 60 * cfg.minutes:
            break                                              # the time budget is spent
        r.done = it + 1
        yield it


def count_spread(r: Training, task, prompts: list[str], rec: dict) -> None:
    """Which groups had reward spread (the others' advantages are all 0: nothing to learn from):
    'kept', the share of images in such groups, and per tag for the log and tag_weights."""
    has_spread = rec.pop("spread")                             # per group: did its rewards differ?
    rec["kept"] = float(np.mean(has_spread))
    if task.tag is not None:
        rec["spread_tags"] = {}
        for p, s in zip(prompts[::r.cfg.group], has_spread):
            c = rec["spread_tags"].setdefault(task.tag(p), [0, 0])
            c[0] += int(s); c[1] += 1
        r.spread.setdefault(task.name, []).append(rec["spread_tags"])
    if task.name == "geneval":
        r.kept.append(rec["kept"])


def end_iteration(r: Training, it: int, rec: dict) -> None:
    """Every --eval-every iterations: a small evaluation of every task (GenEval's with its per-tag
    and per-colour view) and the resume state; then the log line."""
    cfg, policy = r.cfg, r.policy
    rec["time_s"] = round(time.time() - r.t0, 1)
    if cfg.eval_every and (it + 1) % cfg.eval_every == 0:
        for name in r.tasks:                                   # every task of a joint run
            if name == "geneval" and r.watch:                  # the same images, with their per-tag / colour view
                rec |= geneval_record(E.geneval_diagnostics(policy, cfg.eval_small, r.g_eval), r.base_diag, r.kept)
                r.kept = []
            else:
                rec[f"eval_{name}"] = float(E.evaluate(policy, name, cfg.eval_small, guidance=r.g_eval).mean())
        runs.save_state(r.out / "state", r.state, r.learner.opt, {"iter": it + 1, "elapsed_s": r.before + time.time() - r.t0})
    r.log.write(json.dumps(rec) + "\n"); r.log.flush()


def export(r: Training) -> Path:
    """The adapter as a teacher checkpoint, then measured on every task. Trained on one task: a
    teacher of that task; on several: task "joint" (this run) or "cascade" (--init from another
    task's adapter), which distill.py refuses as a teacher."""
    cfg, policy, ckpt = r.cfg, r.policy, r.out / "checkpoint"
    seen = list(dict.fromkeys(r.init_tasks + r.tasks))
    label = seen[0] if len(seen) == 1 else "joint" if len(r.tasks) > 1 else "cascade"
    meta = {"role": "teacher", "task": label} | ({"tasks": seen} if label in MULTITASK else {}) | {"cfg": r.g_eval,
            "trained": {"algorithm": cfg.algo, "minutes": round((r.before + time.time() - r.t0) / 60, 2),
                        "iterations": r.done,
                        "config": {k: v for k, v in r.conf.items() if k not in ("out", "export", "base", "fresh", "run")}
                        | {"rollout_cfg": r.g}}}
    if r.watch:                                                # the summary a mean would hide
        recs = [json.loads(l) for l in (r.out / "log.jsonl").read_text().splitlines() if l.strip()]
        every = [x["kept"] for x in recs if x.get("task") == "geneval" and "kept" in x]      # the whole run's
        meta["geneval_diagnostics"] = geneval_record(E.geneval_diagnostics(policy, cfg.eval_small, r.g_eval), r.base_diag,
                                                     every) | {"base": r.base_diag, "n": len(E.eval_prompts("geneval", "train", cfg.eval_small))}
    runs.save_adapter(policy, "teacher", ckpt, meta)
    final_eval(cfg, ckpt, meta, f"teacher {label} ({cfg.algo})")
    return ckpt


def geneval_record(diag: dict, base: dict, kept: list[float]) -> dict:
    """A GenEval evaluation's log entries: the strict mean (eval_geneval), per-tag accuracies,
    per-colour found-rates, the share of images in groups with no reward spread over the iterations
    `kept` summarises (their advantages are all 0: nothing to learn from) and a warning per colour
    whose found-rate fell under half the base's (printed too)."""
    warn = R.colour_warnings(diag, base)
    for w in warn:
        print(w, file=sys.stderr)
    return {"eval_geneval": diag["strict"], "geneval_tags": diag["tags"], "geneval_colours": diag["colours"],
            "zero_spread": round(1 - float(np.mean(kept)), 4) if kept else None} | ({"warnings": warn} if warn else {})


def final_eval(cfg, ckpt: Path, meta: dict, what: str) -> None:
    """--eval-n > 0: the protocol on every task (both tables), the primary means into opd.json."""
    if cfg.eval_n > 0:
        per = E.evaluate_checkpoint(str(ckpt), cfg.eval_n, cfg.eval_heldout_n)
        meta["scores"] = {k: float(np.mean(v)) for k, v in per["train"].items()} | {"n": cfg.eval_n}
        runs.write_json_atomic(ckpt / runs.META, meta | {"base": runs.read_meta(ckpt)["base"]})
    print(f"{what} in {meta['trained']['minutes']} min: {meta.get('scores', 'not evaluated (--eval-n 0)')}")


def main(argv=None):
    ap = runs.config_parser(TeacherConfig, __doc__.split("\n")[0])
    cfg = TeacherConfig(**vars(ap.parse_args(argv)))
    if cfg.task not in R.TASKS:
        ap.error(f"argument --task: {cfg.task!r} is not one task ({'|'.join(R.TASKS)}); "
                 "the multi-task RL baselines run with multitask.py")   # one line, exit 2
    train_and_export(train, cfg)


def train_and_export(train_fn, cfg) -> None:
    """The command lines' end (this file's and multitask.py's): train_fn(cfg), then --export; a
    CheckpointError is one line, exit 2."""
    try:
        ckpt = train_fn(cfg)
        if cfg.export:
            runs.export_checkpoint(ckpt, cfg.export)
            print(f"exported {ckpt} -> {cfg.export}")
    except runs.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr); sys.exit(2)


if __name__ == "__main__":
    main()
