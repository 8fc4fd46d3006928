"""distill.py - Stage 2 of DiffusionOPD: Algorithm 1, on-policy distillation of all teachers into one student.

The student (a fresh LoRA on the teachers' common base) rolls out its OWN denoising chain; at
every visited state x_j the teacher of that prompt's task gives its transition mean; the loss is
the closed-form per-step KL between the two Gaussian kernels, which share their covariance
(sampler.step_kl): Eq. 12 for the default ODE rollouts (a = 0), Eq. 11 for a > 0. The gradient
flows through the student's one-step mean only (Eq. 15). The derivation: kl_proof.ipynb.
The loop itself is `run`; ablations.py runs it with other per-task steps.

    python distill.py --teachers ckpts/*        # the main job (README, "Quickstart") -> runs/distill/
    torchrun --nproc_per_node 2 distill.py      # data parallel: one process per GPU (NCCL) or CPU process (gloo)

Outputs in --out (docs/formats.md, "Run folders"): config.json, log.jsonl, grid_<task>.png,
curves.png, results.json, checkpoint/ (the student) and state* (resume). Re-running the same
command resumes an unfinished run; other flags on the same --out are refused (--fresh starts over).

Deliberate deviations from the paper (Sec. 4 and the released code; measured effects in
docs/experiments.md, "The GenEval teacher at the student's CFG, and the student's rank")
  1. Fused schedule: the student's gradient-carrying mean is taken DURING its rollout (its states
     do not depend on the graph), not recomputed after the teachers: the same gradient, tested.
  2. Toy sizes: 8 prompts per task per round (paper: 24), lr 2e-3 (3e-4), a student LoRA of rank
     96 on the toy - room for three rank-32 teachers (paper and real scale: 32 / 64); fp32, no EMA
     by default (--bf16, --grad-checkpointing, --ema 0.9 --ema-every 8: the released options).
  3. Per step the KL is a MEAN over dimensions, steps and tasks averaged (Eq. 4 sums over steps:
     a constant factor); at real scale the last grid step (.0089 -> 0) is not trained (trained_steps).
  4. Data parallel by hand: gradients all-reduced after the round (DDP cannot follow adapter switches).
  5. Task balance (--balance; --no-balance: the paper's plain average): each task's KL is divided
     by its own detached value, so the round's gradient is mean_m grad log KL_m (docs/experiments.md,
     "Task balance: balanced (the default) vs the plain average").
  6. Sampled steps (--sample-steps 5): each rollout trains 5 of its 10 steps drawn at random (an
     unbiased estimate of Eq. 4's step sum, tested) and stops at the last: rounds 1.5x cheaper, so
     100 rounds fit the main job's time (docs/experiments.md, "Stage 2 on GenEval: sampled steps").
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

import evaluate as E
import real_rewards as RR
import rewards as R
import runs
import sampler as S
from runs import arg

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass
class DistillConfig:
    teachers: list = arg([], "teacher folders, one per task, or TASK=PATH for a published LoRA folder (default: every folder in ckpts/)")
    base: str = arg("", "the base of TASK=PATH teachers without opd.json: a diffusers SD3 folder or hub id")
    prompt_dir: str = arg("", 'SD3 bases: the prompt folder (README, "Real scale"); empty: the example set prompts/')
    out: str = arg("runs/distill", "run folder: created with its config; re-running the same command resumes it")
    rounds: int = arg(100, "optimizer steps; each round visits every task once", ">= 1")
    minutes: float = arg(0.0, "also stop after this many minutes of training (probes and evaluations not counted; 0: no limit)", ">= 0")
    prompts: int = arg(8, "prompts per task per round (global, split over processes; paper: 24)", ">= 1")
    steps: int = arg(10, "rollout grid steps (paper: 10)", ">= 1")
    noise_level: float = arg(0.0, "a: 0 = ODE rollouts + Eq. 12 (paper default); > 0 = SDE + Eq. 11", ">= 0")
    train_fraction: float = arg(1.0, "train steps j < floor(fraction * steps), less a last step of negligible weight (sampler.trained_steps; deviation 3)", "> 0")
    sample_steps: int = arg(5, "train K of those steps per rollout, drawn at random, the rollout stopped at the last drawn (0 or >= their number: all; deviation 6)", ">= 0")
    cfg: float = arg(-1.0, "student CFG in rollouts; -1 = the base's own")
    lr: float = arg(2e-3, "AdamW learning rate", "> 0")
    rank: int = arg(0, "student LoRA rank; 0: 32 at real scale (the paper's), 96 on the toy (deviation 2)", ">= 0")
    alpha: int = arg(0, "student LoRA alpha; 0: twice the rank (paper: 64 for 32)", ">= 0")
    eval_every: int = arg(50, "small paired eval on train prompts every N rounds (0: never)", ">= 0")
    eval_small: int = arg(32, "images per task for that eval", ">= 1")
    eval_n: int = arg(256, "images per task, final evaluation, primary table (0: none)", ">= 0")
    eval_heldout_n: int = arg(64, "images per task, final evaluation, held-out table (0: none)", ">= 0")
    seed: int = arg(0, "seeds prompts and rollout noise")
    balance: bool = arg(True, "divide each task's KL by its own detached value (deviation 5)")
    bf16: bool = arg(False, "bf16 autocast of the student's and teachers' transformer passes; KL, loss, LoRA weights stay fp32 (deviation 2)")
    grad_checkpointing: bool = arg(False, "recompute the transformer blocks in backward (diffusers): less memory, same gradient")
    ema: float = arg(0.0, "student EMA decay (0: off; paper 0.9; < 1): the checkpoint and final evaluation use the EMA (deviation 2)", ">= 0")
    ema_every: int = arg(8, "optimizer steps between EMA updates (paper: 8)", ">= 1")
    fresh: bool = arg(False, "delete --out (a distill run folder only) and start over")


def load_teachers(entries: list[str], base_flag: str = "") -> tuple[str, dict[str, str], dict[str, float]]:
    """Validate --teachers -> (common base, {task: folder}, {task: CFG}). An entry is a teacher
    checkpoint folder of ours (opd.json names task, base, CFG) or TASK=PATH, a PEFT adapter folder
    as published (the paper's GenEvalTeacher/lora, ...): its base is then --base, its CFG the task
    table's (CFG-free GenEval 1.0, others 4.5) unless an opd.json says otherwise. Any problem:
    CheckpointError."""
    if not entries:
        raise runs.CheckpointError("no teachers given; pass --teachers ckpts/* (one folder per task) or TASK=PATH ...")
    if base_flag:
        runs.refuse_adapter_as_base(base_flag, "leave --base out (a teacher folder's opd.json names its base) "
                                               "or pass the base of the TASK=PATH teachers")
    by_task, bases, cfgs = {}, {}, {}
    for e in entries:
        named = "=" in e and not Path(e).exists()
        task, p = e.split("=", 1) if named else (None, e)
        if not Path(p).is_dir():
            raise runs.CheckpointError(f"{p}: not a folder; each --teachers entry must be a teacher folder or TASK=PATH")
        meta = runs.read_meta(p)
        if not named and not meta and any((Path(p) / f).exists() for f in runs.ADAPTER_FILES):
            raise runs.CheckpointError(f"{p}: {runs.META} is missing (a teacher's names its task and base); restore or "
                                       "re-export it, or pass TASK=PATH --base BASE for a published LoRA folder")
        if not named and meta.get("role") != "teacher":
            raise runs.CheckpointError(f"{p}: not a teacher checkpoint ({runs.META} role is {meta.get('role')!r}); "
                                    "pass folders written by teachers.py, or TASK=PATH for a published LoRA folder")
        if named and not (Path(p) / "adapter_config.json").is_file():
            raise runs.CheckpointError(f"{p}: not a LoRA adapter folder (no adapter_config.json); pass the folder that "
                                    "holds adapter_config.json and adapter_model.safetensors")
        runs.check_adapter(p)                                   # each file there and readable, named when not
        if named and meta.get("task") not in (None, task):
            raise runs.CheckpointError(f"{p}: given as {task}= but its {runs.META} says task {meta['task']!r}")
        task = task or meta.get("task")
        if task not in R.TASKS:
            raise runs.CheckpointError(f"{p}: teacher for unknown task {task!r}; known tasks: {sorted(R.TASKS)}")
        if task in by_task:
            raise runs.CheckpointError(f"{p}: a second teacher for task {task!r} (first: {by_task[task]}); pass one per task")
        if meta.get("base"):
            base, h = runs.resolve_base(p, meta), meta["base"].get("hash")
        elif base_flag:
            base, h = base_flag, None
        else:
            raise runs.CheckpointError(f"{p}: no {runs.META} names its base; pass --base (the diffusers folder or hub id "
                                    "it was trained on)")
        by_task[task] = p
        bases[p] = (str(Path(base).resolve()) if Path(base).is_dir() else base, h)
        st = runs.settings(base)
        cfgs[task] = float(meta.get("cfg", R.TASKS[task].teacher_cfg if st["kind"] == "sd3" else st["cfg"]))
    if base_flag and any(b != (str(Path(base_flag).resolve()) if Path(base_flag).is_dir() else base_flag)
                         for b, _ in bases.values()):
        raise runs.CheckpointError("teachers sit on different bases: " + "; ".join(f"{p} -> {b[0]}" for p, b in bases.items())
                                + f" (--base {base_flag}); distil teachers of one base")
    if len({b for b, _ in bases.values()}) > 1 or len({h for _, h in bases.values() if h}) > 1:
        raise runs.CheckpointError("teachers sit on different bases: " + "; ".join(f"{p} -> {b[0]}" for p, b in bases.items())
                                + "; distil teachers of one base")
    return next(iter(bases.values()))[0], by_task, cfgs


# ------------------------------------------------------------------------------------
# the closed-form per-task step (Eq. 11 / 12, gradient as Eq. 15)
# ------------------------------------------------------------------------------------
class Chain(NamedTuple):
    """What every task step of a run shares: the rollout grid and how it is walked."""
    grid: torch.Tensor             # t_0 = 1 > ... > t_N = 0 (sampler.time_grid)
    a: float                       # noise level: 0 = ODE rollouts + Eq. 12; > 0 = SDE + Eq. 11
    n_train: int                   # steps j < n_train are trained (deviation 3)
    g_student: float               # the student's CFG
    g_teacher: dict                # {task: its teacher's own CFG}
    bf16: bool = False             # transformer passes under bf16 autocast (deviation 2)
    n_global: int | None = None    # data parallel: the global batch, of which x holds rows `local`
    local: slice = slice(None)
    sample: int = 0                # --sample-steps: train this many of the n_train steps per rollout (0: all)


def closed_form(mean_s: torch.Tensor, mean_t: torch.Tensor, std: float, x_next: torch.Tensor) -> torch.Tensor:
    """The per-step loss DiffusionOPD backpropagates: KL_j itself (Eq. 11 / 12), batch mean.
    x_next (the rollout's next state) is unused: no Monte Carlo, the eps_j cancel exactly."""
    return S.step_kl(mean_s, mean_t, std).mean()


def distill_task(policy: S.Policy, task: str, cond: dict, x: torch.Tensor, gen: torch.Generator, ch: Chain,
                 scale: float | None = None, step_loss: Callable = closed_form, on_step=None) -> float:
    """One task's share of a round, FUSED (deviation 1): roll the student down the grid; at each
    trained step j take its gradient-carrying mean, teacher `task`'s mean at the same x_j, the
    per-step loss, and backward at once (memory holds one step). The next state comes from the
    student's own detached mean: the rollout is on-policy. Returns the task's mean per-step KL.
    With several processes, x holds rows ch.local of a global batch of ch.n_global; SDE noise is
    drawn for the whole batch and sliced the same way, so any process count gives one rollout.
    scale: the factor on each step's loss (default 1 / the steps trained: their mean; which steps:
    sampled_steps, the others before the last are walked without grad or teacher). step_loss: what
    is backpropagated per step (ablations.py swaps in PPO / REINFORCE); on_step(j) runs after
    step j's backward (ablations.estimator_gradients reads .grad there)."""
    trained = sampled_steps(ch, gen)
    total, scale = 0.0, 1.0 / len(trained) if scale is None else scale
    amp = lambda: torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=ch.bf16)
    # a step's noise eps_j: drawn for the global batch, this process's rows kept (none for ODE steps)
    eps = lambda std: torch.randn((ch.n_global or len(x), *x.shape[1:]), generator=gen)[ch.local].to(x) if std > 0 else 0.0
    policy.use("student")
    for j in range(trained[-1] + 1):                                      # no later state is needed
        t, t_next = float(ch.grid[j]), float(ch.grid[j + 1])
        std = S.step_std(t, t_next, ch.a)                                 # Eq. 6: shared by S and T
        if j not in trained:              # --sample-steps: a step not drawn is walked (student, no grad)
            with torch.no_grad(), amp():
                mean = S.step_mean(x, policy.velocity(x, t, cond, ch.g_student), t, t_next, ch.a).to(x.dtype)
            x = mean + std * eps(std)                                     # the same draws as a trained step
            continue
        # ---- student mean, with grad (Eq. 7) ----
        with amp():
            v_s = policy.velocity(x, t, cond, ch.g_student)
        mean_s = S.step_mean(x, v_s, t, t_next, ch.a)
        # ---- teacher mean at the state the STUDENT visited (Eq. 7), no grad ----
        with torch.no_grad(), amp():
            policy.use(task)
            v_t = policy.velocity(x, t, cond, ch.g_teacher[task])
        mean_t = S.step_mean(x, v_t, t, t_next, ch.a)
        # the student's adapter active again BEFORE backward: --grad-checkpointing recomputes
        # the student's blocks in it (with the teacher's adapter active they would be the teacher's)
        policy.use("student")
        if ch.bf16:
            mean_s, mean_t = mean_s.float(), mean_t.float()
        # ---- closed-form per-step KL (Eq. 11 / 12), mean over dims, averaged over the batch ----
        kl = S.step_kl(mean_s, mean_t, std).mean()
        # ---- next state from the student's own kernel: x_{j+1} = mu_S + sbar eps (drawn before
        #      the backward, so a policy-gradient step_loss scores this very draw) ----
        x_next = mean_s.detach().to(x.dtype) + std * eps(std)
        (step_loss(mean_s, mean_t, std, x_next.to(mean_s.dtype)) * scale).backward()   # Eq. 15: through mu_S only
        total += float(kl.detach())
        if on_step is not None:
            on_step(j)
        x = x_next
    return total / len(trained)


def sampled_steps(ch: Chain, gen: torch.Generator) -> list[int]:
    """The steps one rollout trains, in order: all j < ch.n_train, or (--sample-steps K, ch.sample =
    K < n_train) K of them drawn uniformly without replacement from `gen` - every subset equally
    likely, so the mean of the drawn steps' KL is an unbiased estimate of the mean over all steps,
    and so is its gradient (Flow-GRPO's timestep fraction, here in Stage 2; deviation 6). The
    rollout ends at the last drawn step, and the steps before it that were not drawn are walked
    without grad or teacher (a student velocity, ~1/3 of a trained step's passes: bench_distill.py)."""
    if not 0 < ch.sample < ch.n_train:
        return list(range(ch.n_train))
    return sorted(torch.randperm(ch.n_train, generator=gen)[:ch.sample].tolist())


class Variant(NamedTuple):
    """What a run of Algorithm 1 trains with; DiffusionOPD's own is OPD. ablations.py passes others."""
    task_step: Callable = distill_task   # (policy, task, cond, x, gen, chain) -> the task's loss, after its backward
    log_key: str = "kl"                  # the log's <log_key>_<task>
    balance: bool = True                 # whether --balance applies (False: a plain task mean)
    sampled: bool = True                 # whether --sample-steps applies (task_step walks distill_task's chain)
    algorithm: str = "DiffusionOPD"
    loss: str = ""                       # the config's description of the loss ("": Eq. 12 or Eq. 11 by a)
    probe: Callable | None = None        # probe(policy, tasks, chain, table) -> dict, logged every probe_every rounds
    probe_every: int = 0
    setup: Callable | None = None        # setup(policy, tasks, by_task, cfg) -> (task_step, {name: tensors}, optimizer
                                         # or None): a variant's own models (DMD's fake scores), resumed with the student


OPD = Variant()


def small_eval_from_final(cfg: DistillConfig) -> bool:
    """Whether the last round's small evaluation is the final evaluation's first eval_small images
    (the protocol's prompts are a prefix of its longer lists: same prompts, noise and weights) rather
    than the same images sampled twice: when the last round is an evaluation round, the final
    evaluation covers eval_small images and evaluates the raw weights (no EMA)."""
    return bool(cfg.eval_every) and (cfg.rounds % cfg.eval_every == 0 or cfg.rounds == 1) \
        and cfg.eval_n >= cfg.eval_small and cfg.ema == 0


def student_lora(cfg: DistillConfig, kind: str) -> tuple[int, int]:
    """The student LoRA's (rank, alpha): --rank / --alpha, where 0 means rank 32 at real scale (the
    paper's) and 96 on the toy - room for its three rank-32 teachers (deviation 2) - and alpha twice
    the rank (the paper's 64 for 32)."""
    rank = cfg.rank or (32 if kind == "sd3" else 96)
    return rank, cfg.alpha or 2 * rank


# ------------------------------------------------------------------------------------
# Algorithm 1
# ------------------------------------------------------------------------------------
def run(cfg: DistillConfig, variant: Variant = OPD) -> dict:
    """Algorithm 1 (Sec. 4 and the paper's Stage 2): every round visits each task once - the
    student rolls out on that task's prompts, the task's teacher gives its means at the visited
    states, the closed-form per-step KL is backpropagated - and ends with ONE optimizer step on
    the task-averaged gradient. Setup, resume, the end of a round and the final report are the
    plainly named helpers below. Returns the results (evaluate.results, with the paired gains)."""
    r = start(cfg, variant)                      # processes, teachers, the student, resume (or a finished run)
    if isinstance(r, dict):
        return r
    policy, ch, params = r.policy, r.ch, r.params
    for rnd in rounds(r):                        # --rounds, or fewer if --minutes is spent first
        rng = np.random.default_rng([cfg.seed, rnd])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd)
        grad = [torch.zeros_like(p) for p in params]                  # the round's task-averaged gradient
        rec = {"round": rnd} | probe(r, rnd)
        for task in r.tasks:                                          # round-robin over the tasks
            r.opt.zero_grad(set_to_none=True)
            # ---- 1. prompts of THIS task only (routing by dataset, never mixed); noise at t_0 = 1, N(0, I)
            ps = [r.table[task].train[k] for k in rng.integers(len(r.table[task].train), size=cfg.prompts)]
            x = torch.randn((cfg.prompts, *r.shape), generator=gen)[ch.local].to(policy.device, policy.dtype)
            cond = policy.encode(ps[ch.local])                        # (global draw, this process's slice)
            # ---- 2-4. the student's rollout, teacher m's means at its states, the per-step KL (Eq. 11 / 12)
            #      and its backward through mu_S (Eq. 15): distill_task (ablations.py passes other steps)
            kl = r.task_step(policy, task, cond, x, torch.Generator().manual_seed(int(rng.integers(2**31))), ch)
            rec[f"{variant.log_key}_{task}"] = kl = runs.process_mean(kl, r.device)
            # ---- 5. the task average; --balance divides task m's KL by its detached value (deviation 5)
            w = 1.0 / (len(r.tasks) * (max(kl, 1e-12) if cfg.balance and variant.balance else 1.0))
            for g, p in zip(grad, params):
                g.add_(p.grad, alpha=w)
        # ---- 6. one optimizer step on the task-averaged loss, its gradient clipped to norm 1.0
        for g, p in zip(grad, params):
            p.grad = g
        runs.process_mean_grads(params)                               # data parallel (deviation 4)
        rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        stop_if_diverged(r, rnd, rec)
        r.opt.step()
        end_round(r, rnd, rec)                   # EMA, resume state, small evaluation, log line
    return finish(r)                             # the student checkpoint, final evaluation, tables, figures


@dataclasses.dataclass
class Run:
    """What Algorithm 1's loop works with (built by start): the run folder and its resolved config,
    the one backbone with the teachers' and the student's adapters, the chain, the optimizer, and
    the round a resume starts at."""
    cfg: DistillConfig
    variant: Variant
    out: Path
    conf: dict
    base: str
    by_task: dict                  # {task: teacher folder}
    tasks: list                    # round-robin order
    table: dict                    # {task: rewards.Task}: prompts and reward of the toy or the prompt files
    ch: Chain
    policy: S.Policy
    params: list                   # the student's LoRA weights (trained)
    opt: torch.optim.Optimizer
    ema: list                      # the EMA copy of params (--ema > 0), else []
    task_step: Callable            # distill_task, or an ablation's
    extra: dict                    # models of the variant's own (DMD's fake scores): {name: tensors}
    extra_opt: torch.optim.Optimizer | None
    shape: tuple
    start: int                     # the first round this process runs (> 0 after a resume)
    before: float                  # seconds trained before that resume
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    log: object = None             # rank 0: log.jsonl, opened for appending
    t0: float = 0.0                # when this process's first round began
    done: int = 0                  # rounds reached (rounds())
    train_s: float = 0.0           # seconds of training (resumes counted; probes and evaluations not): --minutes
    round_t0: float = 0.0          # when the current round began, and the seconds its probe took
    probe_s: float = 0.0


def start(cfg: DistillConfig, variant: Variant) -> Run | dict:
    """Everything before the first round: the processes, the teachers (load_teachers), the resolved
    config and the run folder (runs.open_run refuses a different config on the same --out), the
    backbone with every teacher's adapter and a fresh student LoRA, its optimizer, and the saved
    state of an unfinished run. A finished run: its results, printed, instead of a Run."""
    if not 0.0 <= cfg.ema < 1.0:                                 # the parser checks >= 0 only
        raise runs.CheckpointError(f"--ema {cfg.ema}: the EMA decay must be in [0, 1) (0: off; the paper's 0.9)")
    if cfg.ema_every < 1:
        raise runs.CheckpointError(f"--ema-every {cfg.ema_every}: must be >= 1 (the paper's 8)")
    lay = runs.layout(os.environ, torch.cuda.is_available())
    world, rank, device = lay["world"], lay["rank"], lay["device"]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():   # the timeout covers the final evaluation's
        torch.distributed.init_process_group(lay["backend"], timeout=datetime.timedelta(hours=2))   # longest wait
    if cfg.prompts % world:
        raise runs.CheckpointError(f"--prompts {cfg.prompts} must be divisible by the number of processes ({world})")
    base, by_task, g_teacher = load_teachers(cfg.teachers, cfg.base)      # each teacher's own CFG
    out = Path(cfg.out)
    tasks = [t for t in R.toy.TASK_NAMES if t in by_task]                  # round-robin order
    table = RR.tasks_for(base, cfg.prompt_dir or None)     # the base picks the prompts (toy or prompt files)
    if table is not R.TASKS and (cfg.eval_every or cfg.eval_n or cfg.eval_heldout_n):
        RR.load_real_rewards(tasks)                         # a missing reward model: one line, nothing written
    st = runs.settings(base)
    g_student = st["cfg"] if cfg.cfg < 0 else cfg.cfg
    rank_s, alpha_s = student_lora(cfg, st["kind"])
    grid = S.time_grid(cfg.steps, st["shift"], st["sigma_min"])
    n_train = S.trained_steps(grid, cfg.noise_level, cfg.train_fraction)
    # --sample-steps as run: 0 (every step) when K covers them all, or for SFT / DMD / TDM (their own steps)
    sample = cfg.sample_steps if variant.sampled and cfg.sample_steps < n_train else 0
    ch = Chain(grid, cfg.noise_level, n_train, g_student, g_teacher, cfg.bf16, cfg.prompts,
               slice(rank * cfg.prompts // world, (rank + 1) * cfg.prompts // world), sample)
    # the resolved config: every flag, plus base and teachers by resolved path AND weights (a resume
    # under anything else is refused, naming the keys - docs/formats.md, "Run folders")
    conf = dataclasses.asdict(cfg) | {
        "base": {"path": str(Path(base).resolve()) if Path(base).is_dir() else base, "weights": E.weights_hash(base)},
        "teachers": {t: {"path": str(Path(p).resolve()), "weights": E.weights_hash(p)} for t, p in by_task.items()},
        "sample_steps": sample, "rank": rank_s, "alpha": alpha_s, "teacher_cfg": g_teacher,
        "student_cfg": g_student, "shift": st["shift"],
        "grid": [round(float(x), 5) for x in grid], "trained_steps": n_train, "processes": world,
        "loss": variant.loss or ("Eq. 12 (ODE)" if cfg.noise_level == 0 else "Eq. 11 (SDE)")}
    if table is not R.TASKS:                                     # real scale: the prompt files' hashes
        conf["prompt_files"] = {t: table[t].source for t in tasks}
    existed = runs.open_run(out, conf, cfg.fresh, "distill") if rank == 0 else None
    runs.barrier()
    if runs.from_rank0(rank == 0 and bool(existed) and (out / "results.json").is_file(), device):
        res = json.loads((out / "results.json").read_text()) if rank == 0 else {}
        if rank == 0:
            print(f"{out} is finished, with this config (--fresh starts over):\n" + E.render_results(res))
        return res
    torch.manual_seed(cfg.seed)
    try:
        policy = S.Policy(base, device=device)
        for t in tasks:
            policy.add_adapter(t, by_task[t])
    except runs.CheckpointError:                                # a corrupt or ill-fitting teacher:
        if rank == 0 and not existed:                           # leave no run folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    from peft import LoraConfig
    # the student: a fresh LoRA; at real scale initialised as the released code's (gaussian A), the
    # toy's with PEFT's default (its shipped results were made so; B = 0 either way: a no-op start)
    policy.add_adapter("student", config=LoraConfig(r=rank_s, lora_alpha=alpha_s, target_modules=S.LORA_TARGETS,
                                                    lora_dropout=0.0,
                                                    init_lora_weights="gaussian" if st["kind"] == "sd3" else True))
    params = list(policy.adapter_params("student").values())
    for p in params:
        p.requires_grad_(True)
    policy.use("student")
    if cfg.grad_checkpointing:                                   # diffusers' own; non-reentrant, so the
        policy.transformer.enable_gradient_checkpointing()       # LoRA weights inside get their gradients
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    ema = [p.detach().clone() for p in params] if cfg.ema > 0 else []   # from the initial LoRA, as Flow-GRPO
    task_step, extra, extra_opt = variant.setup(policy, tasks, by_task, cfg) if variant.setup \
        else (variant.task_step, {}, None)                       # a variant's own models (DMD's fake scores)
    r = Run(cfg, variant, out, conf, base, by_task, tasks, table, ch, policy, params, opt, ema, task_step, extra,
            extra_opt, policy.latent_shape(), 0, 0.0, rank, world, device)
    if (out / "state.json").is_file():
        info = runs.load_state(out / "state", state_tensors(r), optimizers(r))
        r.start, r.before, r.train_s = info["round"], info.get("elapsed_s", 0.0), info.get("train_s", 0.0)
        if rank == 0:
            print(f"resuming {out} at round {r.start}")
    if rank == 0:
        print(json.dumps(conf))
        runs.resume_log(out / "log.jsonl", "round", r.start)
        r.log = open(out / "log.jsonl", "a")
    r.t0 = time.time()
    return r


def state_tensors(r: Run) -> dict:
    """The tensors a resume restores: the student's weights, its EMA, a variant's own models."""
    return {"params": r.params, "ema": r.ema} | r.extra


def optimizers(r: Run) -> list:
    """The optimizers a resume restores: the student's, then a variant's own (DMD's fake scores')."""
    return [o for o in (r.opt, r.extra_opt) if o is not None]


def rounds(r: Run):
    """The rounds this process runs, with a progress bar: from the resume's round to --rounds, or
    until --minutes of training are spent (resumes counted; the probes and small evaluations are
    not, so objectives of different cost per round get the same training time); r.done counts
    the rounds reached."""
    from tqdm import tqdm
    r.done = r.start
    for rnd in tqdm(range(r.start, r.cfg.rounds), initial=r.start, total=r.cfg.rounds, desc="distill",
                    disable=r.rank > 0):
        if r.cfg.minutes and runs.from_rank0(r.train_s >= 60 * r.cfg.minutes, r.device):
            break                                                # the time budget is spent
        r.round_t0, r.probe_s = time.time(), 0.0
        yield rnd
        r.done = rnd + 1


def probe(r: Run, rnd: int) -> dict:
    """A variant's probe (ablations.probe_kl: Eq. 12 on fixed probe rollouts), every probe_every
    rounds from round 0, on rank 0; {} otherwise."""
    if r.rank == 0 and r.variant.probe is not None and r.variant.probe_every > 0 and rnd % r.variant.probe_every == 0:
        t = time.time()
        rec = r.variant.probe(r.policy, r.tasks, r.ch, r.table)
        r.probe_s = time.time() - t                              # not training time (rounds)
        return rec
    return {}


def stop_if_diverged(r: Run, rnd: int, rec: dict) -> None:
    """Before the optimizer step: a NaN / inf loss or gradient stops the run, the last good state kept."""
    if not all(math.isfinite(v) for k, v in rec.items() if k.startswith(r.variant.log_key + "_")) \
            or not math.isfinite(rec["grad_norm"]):
        raise runs.CheckpointError(f"{r.out}: loss is NaN/inf at round {rnd} ({rec}); lower --lr. "
                                   "The last good state is kept; nothing was overwritten")


def end_round(r: Run, rnd: int, rec: dict) -> None:
    """After the optimizer step: the EMA (every --ema-every steps: ema = d ema + (1 - d) w), the
    resume state, the small paired evaluation every --eval-every rounds (every process samples its
    share; the last round's is read off the final evaluation: small_eval_from_final), the log line."""
    cfg = r.cfg
    if r.ema and (rnd + 1) % cfg.ema_every == 0:
        with torch.no_grad():
            for e, p in zip(r.ema, r.params):
                e.mul_(cfg.ema).add_(p, alpha=1.0 - cfg.ema)
    r.train_s += time.time() - r.round_t0 - r.probe_s
    if r.rank == 0:
        runs.save_state(r.out / "state", state_tensors(r), optimizers(r),
                        {"round": rnd + 1, "elapsed_s": r.before + time.time() - r.t0, "train_s": r.train_s})
    rec["time_s"] = round(time.time() - r.t0, 1)
    if cfg.eval_every and ((rnd + 1) % cfg.eval_every == 0 or rnd == 0) \
            and not (rnd + 1 == cfg.rounds and small_eval_from_final(cfg)):
        for task in r.tasks:
            rec[f"eval_{task}"] = float(E.evaluate(r.policy, task, cfg.eval_small, r.ch.g_student, table=r.table).mean())
    if r.rank == 0:
        r.log.write(json.dumps(rec) + "\n"); r.log.flush()


def finish(r: Run) -> dict:
    """After the last round: the probe of the final student, the student checkpoint (the EMA with
    --ema; opd.json records the teachers by weights, the config and the minutes), then report."""
    cfg, policy = r.cfg, r.policy
    if r.rank == 0 and r.variant.probe is not None and r.variant.probe_every > 0:   # the final raw weights
        r.log.write(json.dumps({"round": r.done, **r.variant.probe(policy, r.tasks, r.ch, r.table),
                                "time_s": round(time.time() - r.t0, 1)}) + "\n"); r.log.flush()
    minutes = round((r.before + time.time() - r.t0) / 60, 2)
    if r.ema:                                                    # the EMA is the student: saved and evaluated
        with torch.no_grad():                                    # (the small evals used the raw weights)
            for e, p in zip(r.ema, r.params):
                p.copy_(e)
    meta = {"role": "student", "task": None, "cfg": r.ch.g_student,
            "teachers": {t: {"path": os.path.relpath(Path(p).resolve(), (r.out / "checkpoint").resolve()),
                             "hash": E.weights_hash(p)} for t, p in r.by_task.items()},
            "trained": {"algorithm": f"{r.variant.algorithm} ({r.conf['loss']})", "minutes": minutes,
                        "config": {k: v for k, v in r.conf.items() if k not in ("out", "base", "teachers")}}}
    if r.done < cfg.rounds:                                      # stopped by --minutes
        meta["trained"]["rounds"] = r.done
    if r.rank == 0:
        runs.save_adapter(policy, "student", r.out / "checkpoint", meta)
    runs.barrier()                                               # the checkpoint exists for every process
    res = report(cfg, r.out, r.base, r.by_task, r.ch, policy, r.table, r.rank, r.done)
    runs.barrier()
    return res


def report(cfg, out: Path, base: str, by_task: dict, ch: Chain, policy: S.Policy, table: dict, rank: int = 0,
           done: int | None = None) -> dict:
    """Final evaluation on both tables, every row on the one loaded backbone: the base with the
    adapters off, each teacher's adapter at its own CFG, the student's (per-image scores from
    each checkpoint's cache where they match; every process samples its share of the misses).
    Then, on rank 0: the results JSON, the printed tables, the paired gains, grids and curves."""
    ck = str(out / "checkpoint")
    st = runs.settings(base)                                     # shift and grid of the base; each row its own CFG
    rows, per = [], {}
    for name, path, adapter, g in [("base", base, None, st["cfg"])] + \
            [(f"teacher {t}", p, t, ch.g_teacher[t]) for t, p in by_task.items()] + \
            [("DiffusionOPD student", ck, "student", ch.g_student)]:
        policy.use(adapter)
        per[name] = E.evaluate_checkpoint(path, cfg.eval_n, cfg.eval_heldout_n, policy=policy,
                                          prompt_dir=cfg.prompt_dir or None, st=st | {"cfg": g})
        rows.append({"name": name, "path": os.path.relpath(path),
                     "scores": {k: float(v.mean()) for k, v in per[name].get("train", {}).items()},
                     "heldout": {k: float(v.mean()) for k, v in per[name].get("test", {}).items()}})
    res = E.results(rows, {"n": cfg.eval_n, "heldout_n": cfg.eval_heldout_n, "seed": E.EVAL_SEED,
                           "steps": E.EVAL_STEPS, "sampler": "ODE (a = 0)",
                           "metrics": {t: v.metric for t, v in table.items()}}, per, table)
    gains = {}
    for split in per["base"]:
        for t in by_task:
            s_b, se_sb = E.paired(per["DiffusionOPD student"][split][t], per["base"][split][t])
            t_b, se_tb = E.paired(per[f"teacher {t}"][split][t], per["base"][split][t])
            gains.setdefault(split, {})[t] = {"student_minus_base": s_b, "se": se_sb, "teacher_minus_base": t_b,
                                              "se_teacher": se_tb, "closed": s_b / t_b if t_b else float("nan")}
    res["gains"] = gains
    policy.use("student")
    if rank > 0:
        return res
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    if small_eval_from_final(cfg) and done in (None, cfg.rounds) \
            and not any(f"eval_{t}" in r for r in recs if r["round"] == cfg.rounds - 1 for t in by_task):   # once
        first = {t: len(E.eval_prompts(t, "train", cfg.eval_small, table)) for t in by_task}   # a prefix of eval_n's
        small = {f"eval_{t}": float(per["DiffusionOPD student"]["train"][t][:k].mean()) for t, k in first.items()}
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"round": cfg.rounds - 1, **small, "from": "final evaluation"}) + "\n")
    meta = runs.read_meta(ck)
    meta["scores"] = rows[-1]["scores"] | {"n": cfg.eval_n}
    runs.write_json_atomic(Path(ck) / runs.META, meta)
    runs.write_json_atomic(out / "results.json", res)
    print(E.render_results(res))
    for split, gs in gains.items():
        print(f"\n{'primary table (train prompts)' if split == 'train' else 'held-out table (test prompts)'}:")
        for t, g in gs.items():
            closed = (f"closed {100 * g['closed']:.0f}% of the teacher's gain" if g["teacher_minus_base"] > 2 * g["se_teacher"]
                      else "the teacher's own gain is not significant (< 2 SE): nothing to close")
            print(f"{t:>9}: student - base = {g['student_minus_base']:+.3f} +- {g['se']:.3f} (paired SE); "
                  f"teacher - base = {g['teacher_minus_base']:+.3f} +- {g['se_teacher']:.3f}; {closed}")
    if "train" in per["base"]:
        figures(out, policy, {n: per[n]["train"] for n in ("base", "DiffusionOPD student")}, table)
    return res


def figures(out: Path, policy: S.Policy, scores: dict, table: dict | None = None, k: int = 8) -> dict:
    """grid_<task>.png: base (top) and student (bottom) through the protocol - its first k images
    of the primary table (same prompts, same initial noise, each model's own CFG, the base's
    shift) - each column under its prompt, each image titled with its per-image score from the evaluation; curves.png: per-step KL
    and the small evals. Returns {task: {name: (titles, the drawn images re-scored)}}: equal (tested)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn, table = {}, table or R.TASKS
    k = min([k] + [len(v) for sc in scores.values() for v in sc.values()])   # at most the protocol's n
    for task in [t for t in R.toy.TASK_NAMES if t in scores["base"]]:
        ps = E.eval_prompts(task, "train", k, table)[:k]          # GenEval's list rounds up to equal tags
        seeds = [E.EVAL_SEED + i for i in range(k)]
        fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.9))
        for row, (name, adapter) in enumerate((("base", None), ("DiffusionOPD student", "student"))):
            policy.use(adapter)
            g = runs.settings(policy.base_path)["cfg"] if adapter is None else runs.settings(out / "checkpoint")["cfg"]
            imgs = S.sample(policy, ps, seeds, E.EVAL_STEPS, policy.shift, g)
            drawn.setdefault(task, {})[name] = (scores[name][task][:k], table[task].reward(imgs, ps))
            for c in range(k):
                axes[row, c].imshow(imgs[c], interpolation="nearest")
                prompt = "\n".join(textwrap.wrap(ps[c], 16)) + "\n" if row == 0 else ""   # the column's prompt, once
                axes[row, c].set_title(f"{prompt}{scores[name][task][c]:.2f}", fontsize=6 if row == 0 else 8)
                axes[row, c].axis("off")
            axes[row, 0].text(-4, 16, "base" if adapter is None else "student", rotation=90, va="center",
                              ha="right", fontsize=9)
        fig.suptitle(f"{task}: the protocol's first {k} images (train prompts, same noise); title = score", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"grid_{task}.png", dpi=100)
        plt.close(fig)
    policy.use("student")
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for t in R.toy.TASK_NAMES:
        r = [x for x in recs if f"kl_{t}" in x]
        if r:
            ax[0].plot([x["round"] for x in r], [x[f"kl_{t}"] for x in r], label=t)
        e = [x for x in recs if f"eval_{t}" in x]
        if e:
            ax[1].plot([x["round"] + 1 for x in e], [x[f"eval_{t}"] / (10 if t == "aesthetic" else 1) for x in e],
                       "o-", label=t + (" / 10" if t == "aesthetic" else ""))
    ax[0].set(yscale="log", xlabel="round", ylabel="per-step KL (mean over dims)")
    ax[1].set(xlabel="round", ylabel="train-prompt reward (paired small eval)")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return drawn


def main(argv=None, config=DistillConfig, variant_of=lambda cfg: OPD):
    """The command line of distill.py (and of ablations.py, which passes its config and variants)."""
    ap = runs.config_parser(config, (sys.modules[config.__module__].__doc__ or "").split("\n")[0])
    args = vars(ap.parse_args(argv))
    if not args["teachers"]:                                             # plain `python distill.py`
        ck = HERE / "ckpts"
        args["teachers"] = sorted(os.path.relpath(p) for p in ck.iterdir() if p.is_dir()) if ck.is_dir() else []
    cfg = config(**args)
    try:
        run(cfg, variant_of(cfg))
    except runs.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
