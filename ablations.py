"""ablations.py - the paper's ablations of Stage 2 (Sec. 3.3 and 5): other gradient estimators and objectives in Algorithm 1's loop.

Each ablation is a distill.Variant passed into distill.run, which is otherwise unchanged:

  * --estimator ppo | reinforce (Sec. 3.3, Eq. 16-23: closed form vs policy gradient; needs a > 0,
    an ODE step has no density). ppo: the teacher as a process reward, advantage -KL_j (not
    detached), PPO-clip surrogate with the density ratio of the rollout's own next state; with one
    step per rollout rho = 1 and grad = grad KL_j + KL_j grad log pi (Eq. 19): the closed form plus
    zero-mean noise (Eq. 20-23). reinforce: LLM OPD's route, the sampled log-ratio log p_S - log p_T
    (detached) times the score. Both equal the closed-form gradient in expectation (estimator_loss
    gives the scaling for mean-over-dimension log-probs); estimator_gradients measures their spread.
  * --objective sft: the off-policy baseline of the ablation "distillation objective" (same
    teachers, prompts and budget): each round, per task, the TEACHER samples the round's prompts
    from the round's initial noise (its ODE down the same grid, its own CFG: teacher_samples), and
    the student is trained by flow matching on those clean images (sft_task): x_t = (1 - t) x_data
    + t eps, loss = mean ||v_S(x_t, t) - (eps - x_data)||^2 under the student's CFG, t uniform
    within a uniformly drawn trained grid step. Tasks are plainly averaged (no --balance); the log
    has sft_loss_<task> instead of kl_<task>.
  * --probe-every N: probe_kl_<task> in the log, Eq. 12 on a fixed probe set of the student's ODE
    rollouts (probe_kl), the same states for every --seed, --noise-level and --estimator.

    python ablations.py --noise-level 0.7 --estimator ppo --probe-every 5 --out runs/distill-ppo
    python ablations.py --noise-level 0.7 --probe-every 5 --out runs/distill-a0.7   # noise-level study
    python ablations.py --objective sft --out runs/distill-sft

Every flag of distill.py applies; python experiments.py runs the studies and renders their tables.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

import distill as D
import rewards as R
import runs
import sampler as S
import teachers as T
from runs import arg


@dataclasses.dataclass
class AblationConfig(D.DistillConfig):
    out: str = arg("runs/ablation", "run folder: created with its config; re-running the same command resumes it")
    estimator: str = arg("closed", "per-step gradient (Sec. 3.3): closed = Eq. 11/12; ppo = PPO-clip surrogate, advantage -KL_j; reinforce = sampled log-ratio; ppo/reinforce need --noise-level > 0", "in closed|ppo|reinforce")
    objective: str = arg("opd", "opd: DiffusionOPD; sft: the off-policy baseline, flow matching on teacher samples (--balance does nothing)", "in opd|sft")
    probe_every: int = arg(0, "log probe_kl_<task> (Eq. 12 on fixed probe ODE rollouts, comparable across runs) at rounds 0, N, 2N, ... and the end (0: off)", ">= 0")


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
        loss = D.closed_form if estimator == "closed" else functools.partial(estimator_loss, estimator)
        kls.append(D.distill_task(policy, teacher, cond, x, torch.Generator().manual_seed(seed * 1_000_003 + 2 * r + 1),
                                  D.Chain(grid, a, n_train, g_student, {teacher: g_teacher}), scale=1.0,
                                  step_loss=loss, on_step=grab))
        g = torch.stack(rows)                                          # (n_train, P)
        d = g - mean
        mean += d / (r + 1)
        m2 += (d * (g - mean)).sum(1)
        if keep:
            grads.append(g)
    return {"t": grid[:n_train].clone(), "trace_cov": m2 / max(n_rollouts - 1, 1), "mean_norm": mean.norm(dim=1),
            "kl": torch.tensor(kls, dtype=torch.float64)} | ({"grads": torch.stack(grads)} if keep else {})


def sft_step(policy: S.Policy, task: str, cond: dict, x: torch.Tensor, gen: torch.Generator, ch: D.Chain) -> float:
    """--objective sft as Algorithm 1's task step: the teacher's samples from the round's noise x,
    then the student's flow-matching step on them. Returns the flow-matching loss."""
    x_data = teacher_samples(policy, task, ch.g_teacher[task], cond, x, ch.grid, ch.bf16)
    return sft_task(policy, x_data, ch.g_student, cond, ch.grid, ch.n_train, 1.0, gen,
                    n_global=ch.n_global, local=ch.local, bf16=ch.bf16)


def variant(cfg: AblationConfig) -> D.Variant:
    """The Variant of Algorithm 1 that cfg asks for; bad combinations: CheckpointError."""
    if cfg.estimator not in ESTIMATORS:                          # the parser checks it too; this is an API
        raise runs.CheckpointError(f"--estimator {cfg.estimator!r}: must be one of {'|'.join(ESTIMATORS)}")
    if cfg.estimator != "closed" and cfg.noise_level <= 0:
        raise runs.CheckpointError(f"--estimator {cfg.estimator}: needs --noise-level > 0 (e.g. 0.7): an ODE step (a = 0) "
                                   "has no density, so no ratio or score (Sec. 3.3); use --estimator closed")
    if cfg.objective not in ("opd", "sft"):
        raise runs.CheckpointError(f"--objective {cfg.objective!r}: must be opd (DiffusionOPD) or sft (the off-policy baseline)")
    if cfg.objective == "sft" and cfg.noise_level > 0:
        raise runs.CheckpointError(f"--noise-level {cfg.noise_level}: --objective sft trains on the teachers' ODE samples "
                                   "and rolls nothing out; drop --noise-level")
    probe = dict(probe=lambda pol, tasks, ch, table: probe_kl(pol, tasks, ch.g_teacher, ch.g_student, ch.grid, table),
                 probe_every=cfg.probe_every) if cfg.probe_every else {}
    if cfg.objective == "sft":
        return D.Variant(sft_step, "sft_loss", balance=False, algorithm="SFT baseline",
                         loss="flow matching on the teachers' ODE samples, plain task mean (no balance)", **probe)
    if cfg.estimator == "closed":
        return D.Variant(**probe)
    sde = "Eq. 11 (SDE)"
    return D.Variant(functools.partial(D.distill_task, step_loss=functools.partial(estimator_loss, cfg.estimator)),
                     loss=sde + {"ppo": ", PPO-clip surrogate (Eq. 16-19)",
                                 "reinforce": ", REINFORCE on the sampled log-ratio"}[cfg.estimator], **probe)


def run(cfg: AblationConfig) -> dict:
    return D.run(cfg, variant(cfg))


def main(argv=None):
    D.main(argv, AblationConfig, variant)


if __name__ == "__main__":
    main()
