"""distill.py - Stage 2: on-policy distillation of all teachers into one student (Alg. 1, Eq. 11-12).

The student (a fresh LoRA on the teachers' common base) rolls out its OWN denoising chain;
at every visited state x_j the teacher of that prompt's task gives its transition mean; the
loss is the closed-form per-step KL between the two Gaussian kernels, which share their
covariance (sampler.step_kl): Eq. 12 for the default ODE rollouts (a = 0), Eq. 11 for a > 0.

    python distill.py --teachers ckpts/*        # the main job: 12.6 min on 2 cores -> runs/distill/
    python distill.py                           # the same (every folder in ckpts/ is a teacher)
    torchrun --nproc_per_node 2 distill.py      # data parallel: one process per GPU (NCCL), or per CPU process (gloo)
    python distill.py --noise-level 0.7 --estimator ppo --probe-every 5 --out runs/distill-ppo   # Sec. 3.3 ablation
    python distill.py --noise-level 0.7 --probe-every 5 --out runs/distill-a0.7   # noise-level study: probe_kl_* compare
    python distill.py --objective sft --out runs/distill-sft   # the off-policy SFT baseline (below)

--objective sft is the paper's off-policy baseline of its ablation "distillation objective"
(same teachers, prompts and budget): each round, per task, the TEACHER samples the round's
prompts from the round's initial noise (its ODE down the same grid, its own CFG; the student
never rolls out: `teacher_samples`), and the student is trained by flow matching on those clean
images (`sft_task`): x_t = (1 - t) x_data + t eps, loss = mean ||v_S(x_t, t) - (eps - x_data)||^2
with v_S the student's velocity under ITS CFG (--cfg: what it samples and is evaluated with;
--cfg 1 gives the plain conditional SFT), t uniform within a uniformly drawn trained grid step
(U(0, 1) on a shift-1 grid; at shift 3 a piecewise-linear shift(U), the sampler's time density).
Tasks are plainly averaged (--balance does nothing: there is no per-task KL), one optimizer step
per round; the log has sft_loss_<task> instead of kl_<task>. Teacher samples are ODE only
(--noise-level > 0 is refused).

--estimator (the paper's Sec. 3.3, Eq. 16-23: closed form vs policy gradient; needs a > 0, an ODE
step has no density). closed (default): backward through the per-step KL_j itself (Eq. 11/12).
ppo: the teacher as a process reward, advantage -KL_j (not detached), PPO-clip surrogate with the
density ratio rho_j of the rollout's own next state (Eq. 16's ratio of densities: Flow-GRPO's ratio
of mean-over-dimension log-probs would shrink the noise term by 1/D); one step per rollout keeps rho = 1,
so grad = grad KL_j + KL_j grad log pi (Eq. 19): the closed form plus zero-mean noise (Eq. 20-23).
reinforce: LLM OPD's route, the sampled log-ratio log p_S - log p_T (detached) times the score.
Both equal the closed-form gradient in expectation (estimator_loss gives the scaling for the
project's mean-over-dimension log-probs); estimator_gradients measures their spread across
rollouts. --probe-every N logs probe_kl_<task>: Eq. 12 on a fixed probe set of ODE rollouts of
the student (probe_kl), the same states for every --seed, --noise-level and --estimator.

Outputs in --out: config.json, log.jsonl (glossary in docs/formats.md), grid_<task>.png (base
vs student), curves.png, results.json + both printed tables, checkpoint/ (the student), and
state* (resume). Re-running the same command resumes an unfinished run and only prints a
finished run's tables; other flags on the same --out are refused (--fresh starts over).

Deliberate deviations from the paper (its Sec. 4 setup and the released code)
  1. Fused schedule: the student's gradient-carrying prediction is taken DURING its rollout
     (the states do not depend on the prediction's graph, and the weights only change at the
     end of the round), instead of the released rollout -> teacher -> recompute. Same
     gradient to float64 precision (test), one student forward per step saved.
  2. Toy sizes: 16 prompts per task per round (paper: 24, 3 per GPU on 8), lr 2e-3 (3e-4); fp32
     and no EMA by default. The released real-scale options are flags (paper values): --bf16
     (autocast of the transformer passes; KL, loss and LoRA master weights stay fp32),
     --grad-checkpointing (same gradient, tested), --ema 0.9 --ema-every 8: after every 8th
     optimizer step ema = 0.9 ema + 0.1 w, starting from the initial (no-op) LoRA as Flow-GRPO;
     the checkpoint and the final evaluation use the EMA, the periodic small eval the raw
     weights. Off at toy scale: 50 rounds give 6 updates, which leave 0.9^6 = 53% of the
     initial LoRA in the average (Flow-GRPO's wrapper also warms the decay up as
     min(d, (1+s)/(10+s)); not done here). Round-robin task order, one optimizer step per
     round, grad clip 1.0, AdamW betas (0.9, 0.999), wd 1e-4 as the paper.
  3. Aggregation: per step the KL is a MEAN over dimensions, steps and tasks are averaged (Eq. 4
     sums over steps: a constant factor), as the released code. But every step is trained: the
     released code skips the last one (timestep_fraction 0.99 -> 9 of 10), where its grid ends
     with a tiny .0089 -> 0 step; on this project's grid (sampler.py, deviation 2) the last step
     is 0.1 -> 0 at shift 1 and 0.25 -> 0 at shift 3, 10% and 44% of the Eq. 12 weight
     (sum_j dt_j^2 / 2). --train-fraction 0.99 restores the released schedule.
  4. Data parallel by hand: after the round's backward passes, the student's LoRA gradients
     are all-reduced (averaged) over processes. DDP's wrapper is not used because the one
     backbone switches between adapters (student / teachers) inside a step.
  5. Task balance (--balance, the default; --no-balance is the paper's plain task average):
     each task's KL is divided by its own detached value of this round, so the round's
     gradient is mean_m grad log KL_m - every teacher moves the student by the same RELATIVE
     amount, however far it sits from the base. With the shipped toy teachers the aesthetic KL
     starts ~20x the OCR KL (1.1e-2 vs 5e-4); both students are in the README's first table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rewards as R
import sampler as S
import teachers as T

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass
class DistillConfig:
    teachers: list = dataclasses.field(default_factory=list)  # teacher folders, one per task, or TASK=PATH for a published LoRA folder (default: every folder in ckpts/)
    base: str = ""                   # the base of TASK=PATH teachers without opd.json: a diffusers SD3 folder or hub id
    prompt_dir: str = ""             # SD3 bases: the prompt folder (README, "Real scale"); empty: the example set prompts/
    out: str = "runs/distill"        # run folder: created with its config; re-running the same command resumes it
    rounds: int = 50                 # optimizer steps; each round visits every task once  [>= 1]
    prompts: int = 16                # prompts per task per round (global, split over processes)  [>= 1]
    steps: int = 10                  # rollout grid steps (paper: 10)  [>= 1]
    noise_level: float = 0.0         # a: 0 = ODE rollouts + Eq. 12 (paper default); > 0 = SDE + Eq. 11  [>= 0]
    estimator: str = "closed"        # per-step gradient (Sec. 3.3): closed = Eq. 11/12; ppo = PPO-clip surrogate, advantage -KL_j; reinforce = sampled log-ratio; ppo/reinforce need --noise-level > 0  [in closed|ppo|reinforce]
    probe_every: int = 0             # log probe_kl_<task> (Eq. 12 on fixed probe ODE rollouts, comparable across runs) at rounds 0, N, 2N, ... and the end (0: off)  [>= 0]
    train_fraction: float = 1.0      # train steps j < floor(fraction * steps); 1 = all, 0.99 = the released 9 of 10 (deviation 3)  [> 0]
    cfg: float = -1.0                # student CFG in rollouts (sft: in its flow-matching loss); -1 = the base's own
    lr: float = 2e-3                 # AdamW learning rate  [> 0]
    rank: int = 32                   # student LoRA rank (paper: 32)  [>= 1]
    alpha: int = 64                  # student LoRA alpha (paper: 64)  [>= 1]
    eval_every: int = 25             # small paired eval on train prompts every N rounds (0: never)  [>= 0]
    eval_small: int = 32             # images per task for that eval  [>= 1]
    eval_n: int = 256                # images per task, final evaluation, primary table (0: none)  [>= 0]
    eval_heldout_n: int = 64         # images per task, final evaluation, held-out table (0: none)  [>= 0]
    seed: int = 0                    # seeds prompts and rollout noise
    balance: bool = True             # divide each task's KL by its own detached value (deviation 5)
    objective: str = "opd"           # opd: DiffusionOPD; sft: the off-policy baseline, flow matching on teacher samples (docstring; --balance does nothing)  [in opd|sft]
    bf16: bool = False               # bf16 autocast of the student's and teachers' transformer passes; KL, loss, LoRA weights stay fp32 (deviation 2)
    grad_checkpointing: bool = False # recompute the transformer blocks in backward (diffusers): less memory, same gradient
    ema: float = 0.0                 # student EMA decay (0: off; paper 0.9; < 1): the checkpoint and final evaluation use the EMA (deviation 2)  [>= 0]
    ema_every: int = 8               # optimizer steps between EMA updates (paper: 8)  [>= 1]
    fresh: bool = False              # delete --out (a distill run folder only) and start over


def load_teachers(entries: list[str], base_flag: str = "") -> tuple[str, dict[str, str], dict[str, float]]:
    """Validate --teachers -> (common base, {task: folder}, {task: CFG}). An entry is a teacher
    checkpoint folder of ours (opd.json names task, base, CFG) or TASK=PATH, a PEFT adapter folder
    as published (the paper's GenEvalTeacher/lora, ...): its base is then --base, its CFG the task
    table's (CFG-free GenEval 1.0, others 4.5) unless an opd.json says otherwise. Any problem:
    CheckpointError."""
    if not entries:
        raise S.CheckpointError("no teachers given; pass --teachers ckpts/* (one folder per task) or TASK=PATH ...")
    by_task, bases, cfgs = {}, {}, {}
    for e in entries:
        named = "=" in e and not Path(e).exists()
        task, p = e.split("=", 1) if named else (None, e)
        if not Path(p).is_dir():
            raise S.CheckpointError(f"{p}: not a folder; each --teachers entry must be a teacher folder or TASK=PATH")
        meta = S.read_meta(p)
        if not named and meta.get("role") != "teacher":
            raise S.CheckpointError(f"{p}: not a teacher checkpoint ({S.META} role is {meta.get('role')!r}); "
                                    "pass folders written by teachers.py, or TASK=PATH for a published LoRA folder")
        if named and not (Path(p) / "adapter_config.json").is_file():
            raise S.CheckpointError(f"{p}: not a LoRA adapter folder (no adapter_config.json); pass the folder that "
                                    "holds adapter_config.json and adapter_model.safetensors")
        if named and meta.get("task") not in (None, task):
            raise S.CheckpointError(f"{p}: given as {task}= but its {S.META} says task {meta['task']!r}")
        task = task or meta.get("task")
        if task not in R.TASKS:
            raise S.CheckpointError(f"{p}: teacher for unknown task {task!r}; known tasks: {sorted(R.TASKS)}")
        if task in by_task:
            raise S.CheckpointError(f"{p}: a second teacher for task {task!r} (first: {by_task[task]}); pass one per task")
        if meta.get("base"):
            base, h = S.resolve_base(p, meta), meta["base"].get("hash")
        elif base_flag:
            base, h = base_flag, None
        else:
            raise S.CheckpointError(f"{p}: no {S.META} names its base; pass --base (the diffusers folder or hub id "
                                    "it was trained on)")
        by_task[task] = p
        bases[p] = (str(Path(base).resolve()) if Path(base).is_dir() else base, h)
        st = S.settings(base)
        cfgs[task] = float(meta.get("cfg", R.TASKS[task].teacher_cfg if st["kind"] == "sd3" else st["cfg"]))
    if base_flag and any(b != (str(Path(base_flag).resolve()) if Path(base_flag).is_dir() else base_flag)
                         for b, _ in bases.values()):
        raise S.CheckpointError("teachers sit on different bases: " + "; ".join(f"{p} -> {b[0]}" for p, b in bases.items())
                                + f" (--base {base_flag}); distil teachers of one base")
    if len({b for b, _ in bases.values()}) > 1 or len({h for _, h in bases.values() if h}) > 1:
        raise S.CheckpointError("teachers sit on different bases: " + "; ".join(f"{p} -> {b[0]}" for p, b in bases.items())
                                + "; distil teachers of one base")
    return next(iter(bases.values()))[0], by_task, cfgs


ESTIMATORS = ("closed", "ppo", "reinforce")                  # --estimator (Sec. 3.3 ablation)
PPO_CLIP = 1e-4                 # --estimator ppo: Flow-GRPO's clip range (SD3); it cannot fire here (estimator_loss)


def ppo_log_ratio(x_next: torch.Tensor, mean_s: torch.Tensor, std: float) -> torch.Tensor:
    """log rho_j = log pi_theta(a_j | x_j) - log pi_old(a_j | x_j) per sample (B,), the DENSITY ratio
    of Eq. 16: a sum over the D dims, i.e. D x the difference of sampler.gaussian_logprob's means.
    pi_old is the student's own kernel, detached (the rollout policy). On a fresh rollout it is 0
    in value, bit for bit; its gradient is the score (a_j - mu_S)^T grad mu_S / sbar^2 (Eq. 23)."""
    d = mean_s[0].numel()
    return d * (S.gaussian_logprob(x_next, mean_s, std) - S.gaussian_logprob(x_next, mean_s.detach(), std))


def estimator_loss(estimator: str, mean_s: torch.Tensor, mean_t: torch.Tensor, std: float,
                   x_next: torch.Tensor) -> torch.Tensor:
    """--estimator ppo | reinforce: one step's loss (mean over the batch) whose gradient estimates
    grad KL_j, KL_j = sampler.step_kl(mu_S, mu_T, sbar) (Eq. 11, a MEAN over the D dims), from the
    rollout's own next state x_next = a_j = mu_S.detach() + sbar eps_j (Sec. 3.3, Eq. 16-23).
    mean_s carries the student's gradient; mean_t is the teacher's (constant). Needs sbar > 0.

    Scaling. The paper's identities hold for TRUE quantities, sums over dims: Delta = D KL_j,
    log Pi = D log pi (log pi: sampler.gaussian_logprob, a mean), and with a_j = mu_S + sbar eps
      grad log Pi(a_j) = sum_d (eps_d / sbar) grad mu_S,d =: s_j   (Eq. 23), E[s_j] = 0 (Eq. 20);
      PPO:       grad(rho Delta) = grad Delta + Delta s_j, rho = Pi_theta / Pi_old (Eq. 19),
                 so E = grad Delta (Eq. 21);
      REINFORCE: E[K s_j] = grad Delta, K = log Pi_S(a_j) - log Pi_T(a_j) detached (LLM OPD's
                 sampled log-ratio; K = eps.u + Delta with u = (mu_S - mu_T) / sbar, E[K eps] = u).
    The closed form trains Delta / D = KL_j, so each estimator is its true form divided by D:
      ppo:       rho Delta / D = rho KL_j, rho = exp(ppo_log_ratio) (= 1 in value)
                 -> grad = grad KL_j + KL_j s_j;                       E = grad KL_j
      reinforce: K log Pi / D = D k log pi, k = log pi_S(a_j) - log pi_T(a_j) (means: K = D k)
                 -> grad = D k grad log pi = k s_j;                     E = grad Delta / D = grad KL_j.
    Without the factor D, k log pi would estimate grad KL_j / D. Flow-GRPO's ratio exp(log pi -
    log pi_old), of MEAN log-probs (= rho^(1/D)), is unbiased too but scales PPO's score term KL_j s_j
    by 1/D (its variance by 1/D^2): it is not Eq. 16's ratio, so it is not used here."""
    if std <= 0.0:
        raise ValueError(f"--estimator {estimator}: a = 0 (ODE) transitions have no density (Sec. 3.3)")
    kl = S.step_kl(mean_s, mean_t, std)                                   # Delta_j(theta) / D, (B,)
    if estimator == "ppo":
        # PPO-clip as Flow-GRPO / GRPO-Guard build it (teachers.ppo_clip_loss): the max of
        # -A rho and -A clip(rho, 1 -+ PPO_CLIP), with the advantage A = -KL_j NOT detached. The
        # clip cannot fire here: the rollout is fresh (pi_old = pi_theta, one optimizer step per
        # rollout), so rho = 1 exactly in value (tested); both terms then equal rho KL_j, the max
        # splits its gradient between them, and the loss's gradient is grad(rho KL_j) (Eq. 19).
        return T.ppo_clip_loss(ppo_log_ratio(x_next, mean_s, std), -kl, PPO_CLIP)
    if estimator == "reinforce":
        logp = S.gaussian_logprob(x_next, mean_s, std)                    # log pi_theta(a_j | x_j), mean over dims
        k = (logp - S.gaussian_logprob(x_next, mean_t, std)).detach()     # sampled log-ratio, mean over dims
        return (mean_s[0].numel() * k * logp).mean()                      # D k log pi (scaling above)
    raise ValueError(f"--estimator {estimator!r}: estimator_loss takes ppo or reinforce (closed: sampler.step_kl)")


def distill_task(policy: S.Policy, teacher: str, g_teacher: float, g_student: float, cond: dict,
                 x: torch.Tensor, grid: torch.Tensor, a: float, n_train: int, scale: float,
                 gen: torch.Generator, n_global: int | None = None, local: slice = slice(None),
                 bf16: bool = False, estimator: str = "closed", on_step=None) -> float:
    """One task's share of a round, FUSED: roll the student down the grid; at each trained
    step j take its gradient-carrying mean, the teacher's mean at the same x_j, the closed-form
    KL (Eq. 11/12), and backward at once (so memory holds one step). The next state comes from
    the student's own (detached) mean: the rollout is on-policy. Returns the summed KL.
    With several processes, x holds rows `local` of a global batch of n_global; the SDE noise
    is drawn for the whole batch and sliced the same way, so any process count gives the
    single-process rollout. bf16: the transformer passes run under bf16 autocast; the
    velocities come back in x's dtype, and the means, KL and backward are float32.
    estimator: what is backpropagated per step (--estimator; the returned KL is always Eq. 11/12):
    closed = the KL itself; ppo / reinforce = estimator_loss on the rollout's own next state.
    on_step(j), if given, runs after step j's backward (estimator_gradients reads .grad there)."""
    total = 0.0
    amp = lambda: torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16)
    policy.use("student")
    for j in range(n_train):
        t, t_next = float(grid[j]), float(grid[j + 1])
        std = S.step_std(t, t_next, a)                                    # Eq. 6: shared by S and T
        # ---- student mean, with grad (Eq. 7) ----
        with amp():
            v_s = policy.velocity(x, t, cond, g_student)
        mean_s = S.step_mean(x, v_s, t, t_next, a)
        # ---- teacher mean at the state the STUDENT visited (Eq. 7), no grad ----
        with torch.no_grad(), amp():
            policy.use(teacher)
            v_t = policy.velocity(x, t, cond, g_teacher)
        mean_t = S.step_mean(x, v_t, t, t_next, a)
        # the student's adapter active again BEFORE backward: --grad-checkpointing recomputes
        # the student's blocks in it (with the teacher's adapter active they would be the teacher's)
        policy.use("student")
        if bf16:
            mean_s, mean_t = mean_s.float(), mean_t.float()
        # ---- closed-form per-step KL (Eq. 11 / 12), mean over dims, averaged over batch ----
        kl = S.step_kl(mean_s, mean_t, std).mean()
        # ---- next state from the student's own kernel: x_{j+1} = mu_S + sbar eps (drawn before
        #      the backward: ppo / reinforce score this very draw; gen's stream is unchanged) ----
        noise = torch.randn((n_global or len(x), *x.shape[1:]), generator=gen)[local].to(x) if std > 0 else 0.0
        x_next = (mean_s.detach().to(x.dtype) + std * noise)
        loss = kl if estimator == "closed" else estimator_loss(estimator, mean_s, mean_t, std, x_next.to(mean_s.dtype))
        (loss * scale).backward()
        total += float(kl.detach())
        if on_step is not None:
            on_step(j)
        x = x_next
    return total


def teacher_samples(policy: S.Policy, teacher: str, g_teacher: float, cond: dict, x: torch.Tensor,
                    grid: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """--objective sft: the teacher's own clean samples from the initial noise x - its ODE (a = 0)
    down the rollout grid with its own CFG (sampler.rollout), no gradient. The student is left
    active: it never rolls out."""
    policy.use(teacher)
    with torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16):
        x_data = S.rollout(policy, cond, x, grid, 0.0, g_teacher)["states"][-1]
    policy.use("student")
    return x_data


def sft_times(grid: torch.Tensor, n_train: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """--objective sft's flow-matching times (n,), float64: a trained step j < n_train of the
    rollout grid uniformly (as OPD weights its steps), then t uniform in [t_{j+1}, t_j). On a
    shift-1 grid that is U(0, 1); at shift s it follows the sampler's time density (a piecewise-
    linear shift(U)), so SFT and OPD train the same noise levels."""
    j = torch.randint(n_train, (n,), generator=gen)
    return grid[j + 1] + torch.rand(n, generator=gen, dtype=torch.float64) * (grid[j] - grid[j + 1])


def sft_task(policy: S.Policy, x_data: torch.Tensor, g_student: float, cond: dict, grid: torch.Tensor,
             n_train: int, scale: float, gen: torch.Generator, n_global: int | None = None,
             local: slice = slice(None), bf16: bool = False) -> float:
    """--objective sft, one task's share of a round: flow matching of the student on the teacher's
    samples x_data. t (sft_times) and eps ~ N(0, I) are drawn for the global batch and sliced like
    x (any process count gives the single-process loss); x_t = sampler.noised(x_data, eps, t);
    loss = mean over batch and dimensions of (v_S(x_t, t) - (eps - x_data))^2, v_S the student's
    velocity under its CFG g_student; backward(scale * loss). Returns the loss."""
    n = n_global or len(x_data)
    t = sft_times(grid, n_train, n, gen)[local].to(x_data.device, x_data.dtype)
    eps = torch.randn((n, *x_data.shape[1:]), generator=gen)[local].to(x_data)
    policy.use("student")
    with torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16):
        v = policy.velocity(S.noised(x_data, eps, t), t, cond, g_student)
    loss = (v - (eps - x_data)).pow(2).mean()                # flow matching: v target = eps - x_data
    (loss * scale).backward()
    return float(loss.detach())


def main(argv=None):
    ap = S.config_parser(DistillConfig, __doc__.split("\n")[0])
    args = vars(ap.parse_args(argv))
    if not args["teachers"]:                                             # plain `python distill.py`
        ck = HERE / "ckpts"
        args["teachers"] = sorted(os.path.relpath(p) for p in ck.iterdir() if p.is_dir()) if ck.is_dir() else []
    cfg = DistillConfig(**args)
    try:
        run(cfg)
    except S.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def layout(env, cuda: bool) -> dict:
    """Processes from torchrun's environment: WORLD_SIZE, RANK (global), LOCAL_RANK (this node's
    GPU). One GPU per process, NCCL between GPUs; gloo between CPU processes (deviation 4)."""
    world, rank, local = (int(env.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return {"world": world, "rank": rank, "device": device, "backend": "nccl" if cuda else "gloo"}


PROBE_N, PROBE_SEED = 16, 20_000   # --probe-every: images per task; seed of their prompts and noise (never --seed)


@torch.no_grad()
def probe_kl(policy: S.Policy, tasks: list[str], g_teacher: dict, g_student: float, grid: torch.Tensor,
             table: dict | None = None, n: int = PROBE_N, batch: int = 8) -> dict:
    """--probe-every: {"probe_kl_<task>": the per-step Eq. 12 KL (a = 0, mean over dims) between the
    student and the task's teacher at the states of the student's own ODE rollout down `grid`,
    averaged over ALL the grid's steps and the n probe images}. The probe set is fixed: n prompts of
    the task's train split drawn with PROBE_SEED (and the task's name), image i from the initial
    noise of seed PROBE_SEED + i (sampler.initial_noise). It depends on no --seed, --noise-level or
    --estimator and draws no training randomness, so runs of one base and grid compare on one
    curve, and a run's training is the same with or without probes. The student stays active."""
    shape, out = policy.latent_shape(), {}
    for task in tasks:
        train = (table or R.TASKS)[task].train
        ps = [train[k] for k in np.random.default_rng([PROBE_SEED, *map(ord, task)]).integers(len(train), size=n)]
        total = 0.0
        for i in range(0, n, batch):
            cond = policy.encode(ps[i:i + batch])
            x = S.initial_noise(shape, [PROBE_SEED + k for k in range(i, min(i + batch, n))], policy.device, policy.dtype)
            policy.use("student")
            ro = S.rollout(policy, cond, x, grid, 0.0, g_student)          # the student's own ODE states
            policy.use(task)
            for j in range(len(grid) - 1):
                t, t_next = float(grid[j]), float(grid[j + 1])
                x_j = ro["states"][j]
                v_t = policy.velocity(x_j, t, cond, g_teacher[task]).to(ro["means"].dtype)   # as the rollout's v_S
                mean_t = S.step_mean(x_j.to(v_t.dtype), v_t, t, t_next, 0.0)                 # Eq. 7 at a = 0
                total += float(S.step_kl(ro["means"][j], mean_t, 0.0).sum())   # Eq. 12, per image
        policy.use("student")
        out[f"probe_kl_{task}"] = total / (n * (len(grid) - 1))
    return out


def estimator_gradients(policy: S.Policy, teacher: str, g_teacher: float, g_student: float, prompts: list[str],
                        grid: torch.Tensor, a: float, estimator: str, n_rollouts: int, n_train: int | None = None,
                        seed: int = 0, keep: bool = True) -> dict:
    """The Sec. 3.3 ablation's measurement: for ONE student (the adapter "student", weights left
    unchanged) and one task, each trained step's gradient (flattened student LoRA gradients,
    float64) in each of n_rollouts independent rollouts of the prompts, run through distill_task as
    in training (scale 1: the step's own loss, batch mean). Rollout r starts from fresh initial
    noise and draws fresh SDE noise, both seeded by (seed, r) only - the same for every estimator
    (common random numbers: the estimators differ on identical trajectories). The spread is ACROSS
    ROLLOUTS (the states differ), not at fixed states, where the closed form's would be 0.
    Returns {"grads": (n_rollouts, n_train, P) if keep, "t": (n_train,) t_j of each step,
    "trace_cov": (n_train,) trace of the across-rollout covariance (the unbiased mean squared
    deviation from the mean gradient, summed over parameters), "mean_norm": (n_train,) the norm of
    the mean gradient, "kl": (n_rollouts,) each rollout's per-step KL}."""
    params = list(policy.adapter_params("student").values())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    n_train = n_train or len(grid) - 1
    cond, shape = policy.encode(prompts), policy.latent_shape()
    mean = torch.zeros(n_train, sum(p.numel() for p in params), dtype=torch.float64)
    m2 = torch.zeros(n_train, dtype=torch.float64)                    # Welford, summed over parameters
    grads, kls, rows = [], [], []

    def grab(j):                                                       # step j's gradient, then a clean slate
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
                    .to("cpu", torch.float64))
        for p in params:
            p.grad = None
    for r in range(n_rollouts):
        x = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + 2 * r),
                        dtype=torch.float64).to(policy.device, policy.dtype)
        rows.clear()
        kls.append(distill_task(policy, teacher, g_teacher, g_student, cond, x, grid, a, n_train, 1.0,
                                torch.Generator().manual_seed(seed * 1_000_003 + 2 * r + 1), estimator=estimator,
                                on_step=grab) / n_train)
        g = torch.stack(rows)                                          # (n_train, P)
        d = g - mean
        mean += d / (r + 1)
        m2 += (d * (g - mean)).sum(1)
        if keep:
            grads.append(g)
    return {"t": grid[:n_train].clone(), "trace_cov": m2 / max(n_rollouts - 1, 1), "mean_norm": mean.norm(dim=1),
            "kl": torch.tensor(kls, dtype=torch.float64)} | ({"grads": torch.stack(grads)} if keep else {})


def run(cfg: DistillConfig) -> dict:
    from tqdm import tqdm
    if not 0.0 <= cfg.ema < 1.0:                                 # the parser checks >= 0 only
        raise S.CheckpointError(f"--ema {cfg.ema}: the EMA decay must be in [0, 1) (0: off; the paper's 0.9)")
    if cfg.ema_every < 1:
        raise S.CheckpointError(f"--ema-every {cfg.ema_every}: must be >= 1 (the paper's 8)")
    if cfg.estimator not in ESTIMATORS:                          # the parser checks it too; run() is an API
        raise S.CheckpointError(f"--estimator {cfg.estimator!r}: must be one of {'|'.join(ESTIMATORS)}")
    if cfg.estimator != "closed" and cfg.noise_level <= 0:
        raise S.CheckpointError(f"--estimator {cfg.estimator}: needs --noise-level > 0 (e.g. 0.7): an ODE step (a = 0) "
                                "has no density, so no ratio or score (Sec. 3.3); use --estimator closed")
    if cfg.objective not in ("opd", "sft"):                      # the parser checks it too; run() is an API
        raise S.CheckpointError(f"--objective {cfg.objective!r}: must be opd (DiffusionOPD) or sft (the off-policy baseline)")
    if cfg.objective == "sft" and cfg.noise_level > 0:
        raise S.CheckpointError(f"--noise-level {cfg.noise_level}: --objective sft trains on the teachers' ODE samples "
                                "and rolls nothing out; drop --noise-level")
    # ---- 0. processes, teachers, student ----
    lay = layout(os.environ, torch.cuda.is_available())
    world, rank, device = lay["world"], lay["rank"], lay["device"]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(lay["backend"])
    if cfg.prompts % world:
        raise S.CheckpointError(f"--prompts {cfg.prompts} must be divisible by the number of processes ({world})")
    base, by_task, g_teacher = load_teachers(cfg.teachers, cfg.base)      # each teacher's own CFG
    out = Path(cfg.out)
    tasks = [t for t in R.toy.TASK_NAMES if t in by_task]                    # round-robin order
    table = R.tasks_for(base, cfg.prompt_dir or None)     # the base picks the prompts (toy or prompt files)
    if table is not R.TASKS and (cfg.eval_every or cfg.eval_n or cfg.eval_heldout_n):
        R.load_real_rewards(tasks)                         # a missing reward model: one line, nothing written
    g_student = S.settings(base)["cfg"] if cfg.cfg < 0 else cfg.cfg
    grid = S.time_grid(cfg.steps, S.settings(base)["shift"])
    n_train = max(1, min(cfg.steps, math.floor(cfg.train_fraction * cfg.steps)))
    # the resolved config: every flag, plus base and teachers by resolved path AND weights (a resume
    # under anything else is refused, naming the keys - README, "Run folders")
    conf = dataclasses.asdict(cfg) | {
        "base": {"path": str(Path(base).resolve()) if Path(base).is_dir() else base, "weights": R.weights_hash(base)},
        "teachers": {t: {"path": str(Path(p).resolve()), "weights": R.weights_hash(p)} for t, p in by_task.items()},
        "teacher_cfg": g_teacher, "student_cfg": g_student, "shift": S.settings(base)["shift"],
        "grid": [round(float(x), 5) for x in grid],
        "trained_steps": n_train, "processes": world, "loss": "Eq. 12 (ODE)" if cfg.noise_level == 0 else "Eq. 11 (SDE)"}
    if cfg.estimator != "closed":                                # Sec. 3.3 ablation: the gradient estimator
        conf["loss"] += {"ppo": ", PPO-clip surrogate (Eq. 16-19)", "reinforce": ", REINFORCE on the sampled log-ratio"}[cfg.estimator]
    if cfg.objective == "sft":                                   # what the student is trained on (--balance: nothing)
        conf["loss"] = "flow matching on the teachers' ODE samples, plain task mean (no balance)"
    if table is not R.TASKS:                                     # real scale: the prompt files' hashes
        conf["prompt_files"] = {t: table[t].source for t in tasks}
    existed = S.open_run(out, conf, cfg.fresh, "distill") if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
    finished = torch.tensor(float(rank == 0 and bool(existed) and (out / "results.json").is_file()), device=device)
    if world > 1:
        torch.distributed.all_reduce(finished)                   # every process learns rank 0's answer
    if finished:
        res = json.loads((out / "results.json").read_text()) if rank == 0 else {}
        if rank == 0:
            print(f"{out} is finished, with this config (--fresh starts over):\n" + R.render_results(res))
        return res
    torch.manual_seed(cfg.seed)
    try:
        policy = S.Policy(base, device=device)
        for t in tasks:
            policy.add_adapter(t, by_task[t])
    except S.CheckpointError:                                   # a corrupt or ill-fitting teacher:
        if rank == 0 and not existed:                           # leave no run folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    from peft import LoraConfig
    policy.add_adapter("student", config=LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                                    target_modules=S.LORA_TARGETS, lora_dropout=0.0))
    params = list(policy.adapter_params("student").values())
    for p in params:
        p.requires_grad_(True)
    policy.use("student")
    if cfg.grad_checkpointing:                                   # diffusers' own; non-reentrant, so the
        policy.transformer.enable_gradient_checkpointing()       # LoRA weights inside get their gradients
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    # --ema: a copy of the student's LoRA weights, starting from the initial ones (Flow-GRPO)
    ema = [p.detach().clone() for p in params] if cfg.ema > 0 else []
    shape = policy.latent_shape()
    local = slice(rank * cfg.prompts // world, (rank + 1) * cfg.prompts // world)
    start, before = 0, 0.0                                       # before: seconds spent before a resume
    if (out / "state.json").is_file():
        info = S.load_state(out / "state", {"params": params, "ema": ema}, opt)
        start, before = info["round"], info.get("elapsed_s", 0.0)
        if rank == 0:
            print(f"resuming {out} at round {start}")
    if rank == 0:
        print(json.dumps(conf))
        kept = [l for l in (out / "log.jsonl").read_text().splitlines() if json.loads(l)["round"] < start] \
            if (out / "log.jsonl").is_file() else []
        (out / "log.jsonl").write_text("".join(l + "\n" for l in kept))
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    t0 = time.time()
    for rnd in tqdm(range(start, cfg.rounds), initial=start, total=cfg.rounds, desc="distill", disable=rank > 0):
        rng = np.random.default_rng([cfg.seed, rnd])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd)
        acc = [torch.zeros_like(p) for p in params]                # the round's task-averaged gradient
        rec = {"round": rnd}
        if rank == 0 and cfg.probe_every and rnd % cfg.probe_every == 0:   # --probe-every: the student after rnd steps
            rec |= probe_kl(policy, tasks, g_teacher, g_student, grid, table)
        for task in tasks:
            opt.zero_grad(set_to_none=True)
            # ---- 1. prompts of THIS task only (routing by dataset, never mixed) ----
            ps = [table[task].train[k] for k in rng.integers(len(table[task].train), size=cfg.prompts)]
            x = torch.randn((cfg.prompts, *shape), generator=gen)[local].to(policy.device, policy.dtype)  # global draw, local slice
            cond = policy.encode(ps[local])
            if cfg.objective == "sft":                             # the off-policy baseline (docstring): the
                x_data = teacher_samples(policy, task, g_teacher[task], cond, x, grid, cfg.bf16)   # teacher samples,
                fm = sft_task(policy, x_data, g_student, cond, grid, n_train, 1.0,        # the student fits them
                              torch.Generator().manual_seed(int(rng.integers(2**31))),
                              n_global=cfg.prompts, local=local, bf16=cfg.bf16)
                fm = torch.tensor(fm, dtype=torch.float64, device=device)
                if world > 1:                                          # the global batch's loss
                    torch.distributed.all_reduce(fm)
                    fm /= world
                rec[f"sft_loss_{task}"] = float(fm)
                for a_, p in zip(acc, params):                         # plain task mean: nothing to balance
                    a_.add_(p.grad, alpha=1.0 / len(tasks))
                continue                                               # the round's step, eval, probes: shared with opd
            # ---- 2-4. fused rollout + teacher means + closed-form KL + backward ----
            kl = distill_task(policy, task, g_teacher[task], g_student, cond, x, grid, cfg.noise_level,
                              n_train, 1.0 / n_train, torch.Generator().manual_seed(int(rng.integers(2**31))),
                              n_global=cfg.prompts, local=local, bf16=cfg.bf16, estimator=cfg.estimator)
            kl = torch.tensor(kl / n_train, dtype=torch.float64, device=device)  # this task's per-step KL
            if world > 1:                                              # the global batch's KL
                torch.distributed.all_reduce(kl)
                kl /= world
            rec[f"kl_{task}"] = float(kl)
            # ---- task average; with --balance each task's KL is divided by its own detached
            #      value, so its gradient is grad log KL_m (deviation 5) ----
            w = 1.0 / (len(tasks) * (max(float(kl), 1e-12) if cfg.balance else 1.0))
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
        if not all(math.isfinite(v) for k, v in rec.items() if k.startswith(("kl_", "sft_loss_"))) \
                or not math.isfinite(rec["grad_norm"]):
            raise S.CheckpointError(f"{out}: loss is NaN/inf at round {rnd} ({rec}); lower --lr. "
                                    "The last good state is kept; nothing was overwritten")
        opt.step()
        if ema and (rnd + 1) % cfg.ema_every == 0:                # after every ema_every-th optimizer step
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.mul_(cfg.ema).add_(p, alpha=1.0 - cfg.ema)  # ema = d ema + (1 - d) w
        if rank == 0:
            S.save_state(out / "state", {"params": params, "ema": ema}, opt,
                         {"round": rnd + 1, "elapsed_s": before + time.time() - t0})
        rec["time_s"] = round(time.time() - t0, 1)
        # ---- 6. small paired evaluation every N rounds ----
        if rank == 0 and cfg.eval_every and ((rnd + 1) % cfg.eval_every == 0 or rnd == 0):
            for task in tasks:
                rec[f"eval_{task}"] = float(R.evaluate(policy, task, cfg.eval_small, g_student, table=table).mean())
        if rank == 0:
            log.write(json.dumps(rec) + "\n"); log.flush()
    if rank == 0 and cfg.probe_every:                            # --probe-every: the final student (raw weights)
        log.write(json.dumps({"round": cfg.rounds, **probe_kl(policy, tasks, g_teacher, g_student, grid, table),
                              "time_s": round(time.time() - t0, 1)}) + "\n"); log.flush()
    # ---- 7. the student checkpoint, final evaluation, table, figures ----
    if rank > 0:
        torch.distributed.barrier()
        return {}
    minutes = round((before + time.time() - t0) / 60, 2)
    if ema:                                                      # the EMA is the student: saved and evaluated
        with torch.no_grad():                                    # (the small evals above used the raw weights)
            for e, p in zip(ema, params):
                p.copy_(e)
    meta = {"role": "student", "task": None, "cfg": g_student,
            "teachers": {t: {"path": os.path.relpath(Path(p).resolve(), (out / "checkpoint").resolve()),
                             "hash": R.weights_hash(p)} for t, p in by_task.items()},
            "trained": {"algorithm": ("DiffusionOPD (" if cfg.objective == "opd" else "SFT baseline (") + conf["loss"] + ")",
                        "objective": cfg.objective, "minutes": minutes,
                        "config": {k: v for k, v in conf.items() if k not in ("out", "base", "teachers")}}}
    policy.save_adapter("student", out / "checkpoint", meta)
    res = report(cfg, out, base, by_task, policy, table)
    if world > 1:
        torch.distributed.barrier()
    return res


def report(cfg, out: Path, base: str, by_task: dict, policy: S.Policy, table: dict) -> dict:
    """Final evaluation on both tables (student computed; base and teachers from their cached
    per-image scores), the results JSON, the printed tables, the paired gains, grids and curves."""
    ck = str(out / "checkpoint")
    rows, per = [], {}
    for name, path in [("base", base)] + [(f"teacher {t}", p) for t, p in by_task.items()] + [("DiffusionOPD student", ck)]:
        per[name] = R.evaluate_checkpoint(path, cfg.eval_n, cfg.eval_heldout_n, policy=policy if path == ck else None,
                                          prompt_dir=cfg.prompt_dir or None)
        rows.append({"name": name, "path": os.path.relpath(path),
                     "scores": {k: float(v.mean()) for k, v in per[name].get("train", {}).items()},
                     "heldout": {k: float(v.mean()) for k, v in per[name].get("test", {}).items()}})
    res = R.results(rows, {"n": cfg.eval_n, "heldout_n": cfg.eval_heldout_n, "seed": R.EVAL_SEED,
                           "steps": R.EVAL_STEPS, "sampler": "ODE (a = 0)",
                           "metrics": {t: v.metric for t, v in table.items()}}, per)
    gains = {}
    for split in per["base"]:
        for t in by_task:
            s_b, se_sb = R.paired(per["DiffusionOPD student"][split][t], per["base"][split][t])
            t_b, se_tb = R.paired(per[f"teacher {t}"][split][t], per["base"][split][t])
            gains.setdefault(split, {})[t] = {"student_minus_base": s_b, "se": se_sb, "teacher_minus_base": t_b,
                                              "se_teacher": se_tb, "closed": s_b / t_b if t_b else float("nan")}
    res["gains"] = gains
    meta = S.read_meta(ck)
    meta["scores"] = rows[-1]["scores"] | {"n": cfg.eval_n}
    S.write_json_atomic(Path(ck) / S.META, meta)
    S.write_json_atomic(out / "results.json", res)
    print(R.render_results(res))
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
    shift) - each titled with its per-image score from the evaluation; curves.png: per-step KL
    and the small evals. Returns {task: {name: (titles, the drawn images re-scored)}}: equal (tested)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn, table = {}, table or R.TASKS
    k = min([k] + [len(v) for sc in scores.values() for v in sc.values()])   # at most the protocol's n
    for task in [t for t in R.toy.TASK_NAMES if t in scores["base"]]:
        ps = R.eval_prompts(task, "train", k, table)
        seeds = [R.EVAL_SEED + i for i in range(k)]
        fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.1))
        for row, (name, adapter) in enumerate((("base", None), ("DiffusionOPD student", "student"))):
            policy.use(adapter)
            g = S.settings(policy.base_path)["cfg"] if adapter is None else S.settings(out / "checkpoint")["cfg"]
            imgs = S.sample(policy, ps, seeds, R.EVAL_STEPS, policy.shift, g)
            drawn.setdefault(task, {})[name] = (scores[name][task][:k], table[task].reward(imgs, ps))
            for c in range(k):
                axes[row, c].imshow(imgs[c], interpolation="nearest")
                axes[row, c].set_title(f"{scores[name][task][c]:.2f}", fontsize=8)
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


if __name__ == "__main__":
    main()
