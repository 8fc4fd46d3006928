"""distill.py - Stage 2 of DiffusionOPD: Algorithm 1, on-policy distillation of all teachers into one student.

The student (a fresh LoRA on the teachers' common base) rolls out its OWN denoising chain; at
every visited state x_j the teacher of that prompt's task gives its transition mean; the loss is
the closed-form per-step KL between the two Gaussian kernels, which share their covariance
(sampler.step_kl): Eq. 12 for the default ODE rollouts (a = 0), Eq. 11 for a > 0. The gradient
flows through the student's one-step mean only (Eq. 15). The derivation: kl_proof.ipynb.

    python distill.py --teachers ckpts/*        # the main job: ~9 min on 2 cores -> runs/distill/
    python distill.py                           # the same (every folder in ckpts/ is a teacher)
    torchrun --nproc_per_node 2 distill.py      # data parallel: one process per GPU (NCCL), or per CPU process (gloo)

Outputs in --out: config.json, log.jsonl (glossary in docs/formats.md), grid_<task>.png (base vs
student), curves.png, results.json + both printed tables, checkpoint/ (the student), and state*
(resume). Re-running the same command resumes an unfinished run and only prints a finished run's
tables; other flags on the same --out are refused (--fresh starts over). The paper's ablations
(PPO / REINFORCE estimators, off-policy SFT, the probe KL) run this same loop: ablations.py.

Deliberate deviations from the paper (its Sec. 4 setup and the released code)
  1. Fused schedule: the student's gradient-carrying mean is taken DURING its rollout (the states
     do not depend on its graph, and the weights change only at the end of the round), instead of
     the released rollout -> teachers -> recompute (bench_distill.three_pass_task). Same gradient
     to float64 precision (tested); one student forward per step saved.
  2. Toy sizes: 8 prompts per task per round (paper: 24), lr 2e-3 (3e-4), and a student LoRA of
     rank 96 / alpha 192 - the three teachers' 32 each (paper: 32 / 64, the default at real scale).
     Measured on 64 images a task (docs/experiments.md): at rank 32 the student closed 22% of the
     GenEval teacher's gain in 50 rounds, at 96 78%, with 8 prompts as with 16 (~1.6x the time);
     the main job's 256-image table: 17% (100 rounds of 4 prompts: 63%, at OCR's expense).
     fp32 and no EMA by default. The released real-scale options are flags: --bf16 (autocast of
     the transformer passes; KL, loss and LoRA weights stay fp32), --grad-checkpointing, --ema
     0.9 --ema-every 8 (after every 8th optimizer step ema = 0.9 ema + 0.1 w, from the initial
     no-op LoRA; the checkpoint and final evaluation use the EMA). Round-robin task order, one
     optimizer step per round, grad clip 1.0, AdamW betas (0.9, 0.999), wd 1e-4, as the paper.
  3. Aggregation: per step the KL is a MEAN over dimensions; steps and tasks are averaged (Eq. 4
     sums over steps: a constant factor), as the released code. Trained steps: every step at toy
     scale, whose grid ends 0.1 -> 0 (10% of the weight); at real scale the scheduler's grid ends
     .0089 -> 0 (0.05%), which sampler.trained_steps leaves out: the released 9 of 10.
  4. Data parallel by hand: the student's LoRA gradients are all-reduced after the round's
     backward passes (DDP's wrapper cannot follow one backbone switching adapters in a step).
  5. Task balance (--balance, default; --no-balance is the paper's plain task average): each
     task's KL is divided by its own detached value of this round, so the round's gradient is
     mean_m grad log KL_m - every teacher moves the student by the same RELATIVE amount however
     far it sits from the base (the shipped toy teachers' KLs differ ~20x). Both students are in
     the README's first table.
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
    rounds: int = arg(50, "optimizer steps; each round visits every task once", ">= 1")
    prompts: int = arg(8, "prompts per task per round (global, split over processes; paper: 24)", ">= 1")
    steps: int = arg(10, "rollout grid steps (paper: 10)", ">= 1")
    noise_level: float = arg(0.0, "a: 0 = ODE rollouts + Eq. 12 (paper default); > 0 = SDE + Eq. 11", ">= 0")
    train_fraction: float = arg(1.0, "train steps j < floor(fraction * steps), less a last step of negligible weight (sampler.trained_steps; deviation 3)", "> 0")
    cfg: float = arg(-1.0, "student CFG in rollouts; -1 = the base's own")
    lr: float = arg(2e-3, "AdamW learning rate", "> 0")
    rank: int = arg(0, "student LoRA rank; 0: 32 at real scale (the paper's), 96 on the toy (deviation 2)", ">= 0")
    alpha: int = arg(0, "student LoRA alpha; 0: twice the rank (paper: 64 for 32)", ">= 0")
    eval_every: int = arg(25, "small paired eval on train prompts every N rounds (0: never)", ">= 0")
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
    by_task, bases, cfgs = {}, {}, {}
    for e in entries:
        named = "=" in e and not Path(e).exists()
        task, p = e.split("=", 1) if named else (None, e)
        if not Path(p).is_dir():
            raise runs.CheckpointError(f"{p}: not a folder; each --teachers entry must be a teacher folder or TASK=PATH")
        meta = runs.read_meta(p)
        if not named and meta.get("role") != "teacher":
            raise runs.CheckpointError(f"{p}: not a teacher checkpoint ({runs.META} role is {meta.get('role')!r}); "
                                    "pass folders written by teachers.py, or TASK=PATH for a published LoRA folder")
        if named and not (Path(p) / "adapter_config.json").is_file():
            raise runs.CheckpointError(f"{p}: not a LoRA adapter folder (no adapter_config.json); pass the folder that "
                                    "holds adapter_config.json and adapter_model.safetensors")
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
    scale: the factor on each step's loss (default 1 / n_train: the steps' mean). step_loss: what
    is backpropagated per step (ablations.py swaps in PPO / REINFORCE); on_step(j) runs after
    step j's backward (ablations.estimator_gradients reads .grad there)."""
    total, scale = 0.0, 1.0 / ch.n_train if scale is None else scale
    amp = lambda: torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=ch.bf16)
    policy.use("student")
    for j in range(ch.n_train):
        t, t_next = float(ch.grid[j]), float(ch.grid[j + 1])
        std = S.step_std(t, t_next, ch.a)                                 # Eq. 6: shared by S and T
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
        noise = torch.randn((ch.n_global or len(x), *x.shape[1:]), generator=gen)[ch.local].to(x) if std > 0 else 0.0
        x_next = mean_s.detach().to(x.dtype) + std * noise
        (step_loss(mean_s, mean_t, std, x_next.to(mean_s.dtype)) * scale).backward()   # Eq. 15: through mu_S only
        total += float(kl.detach())
        if on_step is not None:
            on_step(j)
        x = x_next
    return total / ch.n_train


class Variant(NamedTuple):
    """What a run of Algorithm 1 trains with; DiffusionOPD's own is OPD. ablations.py passes others."""
    task_step: Callable = distill_task   # (policy, task, cond, x, gen, chain) -> the task's loss, after its backward
    log_key: str = "kl"                  # the log's <log_key>_<task>
    balance: bool = True                 # whether --balance applies (False: a plain task mean)
    algorithm: str = "DiffusionOPD"
    loss: str = ""                       # the config's description of the loss ("": Eq. 12 or Eq. 11 by a)
    probe: Callable | None = None        # probe(policy, tasks, chain, table) -> dict, logged every probe_every rounds
    probe_every: int = 0


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
    from tqdm import tqdm
    if not 0.0 <= cfg.ema < 1.0:                                 # the parser checks >= 0 only
        raise runs.CheckpointError(f"--ema {cfg.ema}: the EMA decay must be in [0, 1) (0: off; the paper's 0.9)")
    if cfg.ema_every < 1:
        raise runs.CheckpointError(f"--ema-every {cfg.ema_every}: must be >= 1 (the paper's 8)")
    # ---- 0. processes, teachers, student, resume ----
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
    ch = Chain(grid, cfg.noise_level, n_train, g_student, g_teacher, cfg.bf16, cfg.prompts,
               slice(rank * cfg.prompts // world, (rank + 1) * cfg.prompts // world))
    # the resolved config: every flag, plus base and teachers by resolved path AND weights (a resume
    # under anything else is refused, naming the keys - docs/formats.md, "Run folders")
    conf = dataclasses.asdict(cfg) | {
        "base": {"path": str(Path(base).resolve()) if Path(base).is_dir() else base, "weights": E.weights_hash(base)},
        "teachers": {t: {"path": str(Path(p).resolve()), "weights": E.weights_hash(p)} for t, p in by_task.items()},
        "rank": rank_s, "alpha": alpha_s, "teacher_cfg": g_teacher, "student_cfg": g_student, "shift": st["shift"],
        "grid": [round(float(x), 5) for x in grid], "trained_steps": n_train, "processes": world,
        "loss": variant.loss or ("Eq. 12 (ODE)" if cfg.noise_level == 0 else "Eq. 11 (SDE)")}
    if table is not R.TASKS:                                     # real scale: the prompt files' hashes
        conf["prompt_files"] = {t: table[t].source for t in tasks}
    existed = runs.open_run(out, conf, cfg.fresh, "distill") if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
    finished = torch.tensor(float(rank == 0 and bool(existed) and (out / "results.json").is_file()), device=device)
    if world > 1:
        torch.distributed.all_reduce(finished)                   # every process learns rank 0's answer
    if finished:
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
    shape = policy.latent_shape()
    start, before = 0, 0.0                                       # before: seconds spent before a resume
    if (out / "state.json").is_file():
        info = runs.load_state(out / "state", {"params": params, "ema": ema}, opt)
        start, before = info["round"], info.get("elapsed_s", 0.0)
        if rank == 0:
            print(f"resuming {out} at round {start}")
    if rank == 0:
        print(json.dumps(conf))
        runs.resume_log(out / "log.jsonl", "round", start)
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    probe = rank == 0 and variant.probe is not None and variant.probe_every > 0
    t0 = time.time()
    # ---- Alg. 1: repeat, one optimizer step per round ----
    for rnd in tqdm(range(start, cfg.rounds), initial=start, total=cfg.rounds, desc="distill", disable=rank > 0):
        rng = np.random.default_rng([cfg.seed, rnd])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd)
        acc = [torch.zeros_like(p) for p in params]                # the round's task-averaged gradient
        rec = {"round": rnd}
        if probe and rnd % variant.probe_every == 0:               # the student after rnd steps
            rec |= variant.probe(policy, tasks, ch, table)
        for task in tasks:                                         # round-robin over the tasks
            opt.zero_grad(set_to_none=True)
            # ---- 1. prompts of THIS task only (routing by dataset, never mixed) ----
            ps = [table[task].train[k] for k in rng.integers(len(table[task].train), size=cfg.prompts)]
            x = torch.randn((cfg.prompts, *shape), generator=gen)[ch.local].to(policy.device, policy.dtype)  # global draw, local slice
            cond = policy.encode(ps[ch.local])
            # ---- 2-4. the student's rollout, teacher m's means at its states, the per-step KL
            #      (Eq. 11 / 12) and its backward through mu_S (Eq. 15): distill_task ----
            loss = variant.task_step(policy, task, cond, x, torch.Generator().manual_seed(int(rng.integers(2**31))), ch)
            loss = torch.tensor(loss, dtype=torch.float64, device=device)
            if world > 1:                                          # the global batch's value
                torch.distributed.all_reduce(loss)
                loss /= world
            rec[f"{variant.log_key}_{task}"] = float(loss)
            # ---- task average; with --balance each task's KL is divided by its own detached
            #      value, so its gradient is grad log KL_m (deviation 5) ----
            w = 1.0 / (len(tasks) * (max(float(loss), 1e-12) if cfg.balance and variant.balance else 1.0))
            for a_, p in zip(acc, params):
                a_.add_(p.grad, alpha=w)
        for a_, p in zip(acc, params):
            p.grad = a_
        # ---- 5. one optimizer step per round on the task-averaged loss ----
        if world > 1:
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        if not all(math.isfinite(v) for k, v in rec.items() if k.startswith(variant.log_key + "_")) \
                or not math.isfinite(rec["grad_norm"]):
            raise runs.CheckpointError(f"{out}: loss is NaN/inf at round {rnd} ({rec}); lower --lr. "
                                       "The last good state is kept; nothing was overwritten")
        opt.step()
        if ema and (rnd + 1) % cfg.ema_every == 0:                # after every ema_every-th optimizer step
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.mul_(cfg.ema).add_(p, alpha=1.0 - cfg.ema)  # ema = d ema + (1 - d) w
        if rank == 0:
            runs.save_state(out / "state", {"params": params, "ema": ema}, opt,
                            {"round": rnd + 1, "elapsed_s": before + time.time() - t0})
        rec["time_s"] = round(time.time() - t0, 1)
        # ---- 6. small paired evaluation every N rounds (every process samples its share); the
        #      last round's is read off the final evaluation instead (small_eval_from_final) ----
        if cfg.eval_every and ((rnd + 1) % cfg.eval_every == 0 or rnd == 0) \
                and not (rnd + 1 == cfg.rounds and small_eval_from_final(cfg)):
            for task in tasks:
                rec[f"eval_{task}"] = float(E.evaluate(policy, task, cfg.eval_small, g_student, table=table).mean())
        if rank == 0:
            log.write(json.dumps(rec) + "\n"); log.flush()
    if probe:                                                    # the final student (raw weights)
        log.write(json.dumps({"round": cfg.rounds, **variant.probe(policy, tasks, ch, table),
                              "time_s": round(time.time() - t0, 1)}) + "\n"); log.flush()
    # ---- 7. the student checkpoint, final evaluation (every process its share), table, figures ----
    minutes = round((before + time.time() - t0) / 60, 2)
    if ema:                                                      # the EMA is the student: saved and evaluated
        with torch.no_grad():                                    # (the small evals above used the raw weights)
            for e, p in zip(ema, params):
                p.copy_(e)
    meta = {"role": "student", "task": None, "cfg": g_student,
            "teachers": {t: {"path": os.path.relpath(Path(p).resolve(), (out / "checkpoint").resolve()),
                             "hash": E.weights_hash(p)} for t, p in by_task.items()},
            "trained": {"algorithm": f"{variant.algorithm} ({conf['loss']})", "minutes": minutes,
                        "config": {k: v for k, v in conf.items() if k not in ("out", "base", "teachers")}}}
    if rank == 0:
        policy.save_adapter("student", out / "checkpoint", meta)
    if world > 1:
        torch.distributed.barrier()                              # the checkpoint exists for every process
    res = report(cfg, out, base, by_task, ch, policy, table, rank)
    if world > 1:
        torch.distributed.barrier()
    return res


def report(cfg, out: Path, base: str, by_task: dict, ch: Chain, policy: S.Policy, table: dict, rank: int = 0) -> dict:
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
    if small_eval_from_final(cfg) and not any(f"eval_{t}" in r for r in recs if r["round"] == cfg.rounds - 1
                                              for t in by_task):                  # once, also on a rerun
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
