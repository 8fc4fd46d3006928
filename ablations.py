"""ablations.py - the paper's ablations of Stage 2 (Sec. 3.3 and 5): other gradient estimators and objectives in Algorithm 1's loop.

Each ablation is a distill.Variant passed into distill.run, which is otherwise unchanged:

  * --estimator ppo | reinforce (Sec. 3.3, Eq. 16-23; needs a > 0: an ODE step has no density).
    ppo: advantage -KL_j (not detached) in a PPO-clip surrogate, rho = 1 on the fresh rollout, so
    grad = grad KL_j + KL_j grad log pi (Eq. 19-23); reinforce: LLM OPD's detached sampled log-ratio
    times the score. Both unbiased (estimator_loss); estimator_gradients measures their spread.
  * --objective sft: off-policy baseline of the "distillation objective" ablation: per task, the
    TEACHER's ODE samples from the round's noise (teacher_samples); the student flow-matches them
    (sft_task), t uniform within a uniformly drawn trained step. Log: sft_loss_<task>.
  * --objective dmd: DMD in DMD2's form on the student's final sample (its ODE rollout with
    gradient through every step): re-noised at t ~ U[.02, .98], g = (x0_hat_fake - x0_hat_real) /
    mean|x0 - x0_hat_real|, loss 0.5 MSE(x0, sg(x0 - g)); a fake score per task (a LoRA from its
    teacher) flow-matches the detached samples, 5 updates per student step. Log: dmd_loss_<task>.
  * --objective tdm: TDM - per sample one student step with gradient from a no-grad rollout's x_i;
    x_{i+1} re-noised only within [t_{i+1}, t_i), DMD's g pushed into the step's x0_hat; the fake
    learns the student's intermediate marginals (fake_loss). Log: tdm_loss_<task>.
    sft, dmd and tdm average the tasks plainly (--balance does nothing); dmd / tdm refuse a > 0.
  * --probe-every N: probe_kl_<task> in the log, Eq. 12 on a fixed probe set of the student's ODE
    rollouts (probe_kl), the same states for every --seed, --noise-level, --estimator, --objective.

    python ablations.py --noise-level 0.7 --estimator ppo --probe-every 5 --out runs/distill-ppo
    python ablations.py --objective sft --out runs/distill-sft
    python ablations.py --objective dmd --probe-every 5 --out runs/distill-dmd     # or tdm

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
    objective: str = arg("opd", "opd: DiffusionOPD; sft: the off-policy baseline, flow matching on teacher samples; dmd / tdm: distribution matching on the student's final / intermediate samples (--balance does nothing for sft, dmd, tdm)", "in opd|sft|dmd|tdm")
    probe_every: int = arg(0, "log probe_kl_<task> (Eq. 12 on fixed probe ODE rollouts, comparable across runs) at rounds 0, N, 2N, ... and the end (0: off)", ">= 0")
    fake_lr: float = arg(0.0, "dmd / tdm: the fake scores' lr as a multiple of --lr (0: the method's own, FAKE_LR: DMD 1, TDM 5)", ">= 0")


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


# ------------------------------------------------------------------------------------
# --objective dmd | tdm: the distribution-matching baselines of the objective ablation
# ------------------------------------------------------------------------------------
# Both match a student distribution to the teacher's through a FAKE score (a LoRA on the backbone,
# initialised as the task's teacher, trained online on the student's detached samples) against the
# REAL one (the teacher, its own CFG). In x_data form (sampler section 4) the score difference is
#   x0_hat_fake - x0_hat_real = -t (v_fake - v_real) = t^2 / (1 - t) (s_fake - s_real),
# so DMD's KL gradient E[(s_fake - s_real) dx_t/dtheta] is E[g dx0/dtheta] up to a positive factor
# of t (test_opd.py checks the exact multiples). Every departure from the published methods:
# docs/experiments.md, "Distillation objectives: DMD and TDM".
DM_T = (0.02, 0.98)     # DMD / DMD2: noise levels t ~ U[0.02, 0.98] (their min / max step 20 / 980 of 1000)
# Fake updates per task per round (the student takes ONE step per round) and the fake's lr as a
# multiple of --lr. dmd: DMD2's two-time-scale rule, which replaced DMD's regression loss as what
# keeps it stable - the fake must track the CURRENT student, so it is updated several times per
# student step (DMD2: 5 in its text-to-image runs, with one lr for both). tdm: its demo's own
# schedule, one fake update per student update with the fake's lr 5x the student's.
FAKE_STEPS = {"dmd": 5, "tdm": 1}
FAKE_LR = {"dmd": 1.0, "tdm": 5.0}


def fake_lr(cfg, objective: str) -> float:
    """The fake scores' lr as a multiple of the student's: --fake-lr, or the method's own (FAKE_LR)."""
    return getattr(cfg, "fake_lr", 0.0) or FAKE_LR[objective]


def _rand(gen: torch.Generator, ch: D.Chain, n: int) -> torch.Tensor:
    """U[0, 1) for the global batch (float64, CPU), this process's rows: any process count, one run."""
    return torch.rand(ch.n_global or n, generator=gen, dtype=torch.float64)[ch.local]


def _randn(gen: torch.Generator, ch: D.Chain, like: torch.Tensor) -> torch.Tensor:
    return torch.randn((ch.n_global or len(like), *like.shape[1:]), generator=gen)[ch.local].to(like)


def _bt(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:                # (B,) -> (B, 1, 1, 1), x's dtype
    return t.to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))


def dm_gradient(x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample gradient on the sample, unnormalised: x0_hat_fake - x0_hat_real (= t^2 / (1 - t)
    (s_fake - s_real) at the noised sample: DMD's KL gradient, in DMD2's x_data form). No gradient."""
    return (x0_fake - x0_real).detach()


def dm_normaliser(x: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """DMD2's normaliser, per sample: mean over dims of |x - x0_hat_real| (DMD's weight without its
    (1 - t) factor, as DMD2's code), shaped to divide g. No gradient."""
    return (x - x0_real).detach().abs().flatten(1).mean(1).view(-1, *[1] * (x.dim() - 1))


def dm_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """DMD2's student loss 0.5 MSE(x, sg(x - g)), a mean over batch and dims: value 0.5 mean g^2,
    gradient g / x.numel() on x - the surrogate that injects g into the sample's backward."""
    return 0.5 * (x - (x - g).detach()).pow(2).mean()


def renoise_coefs(s: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, c) of the forward kernel q(x_tau | x_s) = N(r x_s, c^2 I), s <= tau (TDM's add_noise from
    an intermediate time): r = (1 - tau) / (1 - s), c^2 = tau^2 - r^2 s^2, so that r (1 - s) = 1 - tau
    and r^2 s^2 + c^2 = tau^2 - the marginal of x_s = (1 - s) x_data + s eps goes to the one at tau."""
    r = (1 - tau) / (1 - s)                                          # TDM's kernel: mean coefficient
    return r, (tau * tau - (r * s) ** 2).clamp_min(0).sqrt()         # TDM's kernel: std


def renoise(x_s: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    r, c = renoise_coefs(s, tau)
    return _bt(r, x_s) * x_s + _bt(c, x_s) * eps                     # x_tau = r x_s + c eps


def fake_loss(v: torch.Tensor, x_tau: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The fake score's loss: denoising score matching for q(x_tau | x_s) (target score -eps / c, in
    velocity form v* = sampler.velocity_from_score(x_tau, -eps / c, tau) = (tau eps / c - x_tau) /
    (1 - tau)) weighted by (c / tau)^2: mean over batch and dims of (c / tau)^2 (v - v*)^2. Its
    minimiser's score is that of the student's marginal at s noised to tau. At s = 0 (a clean sample:
    DMD) c = tau and v* = eps - x_s: plain flow matching, the loss the teachers were trained with."""
    r, c = renoise_coefs(s, tau)
    c_b, tau_b = _bt(c, x_tau), _bt(tau, x_tau)
    v_star = S.velocity_from_score(x_tau, -eps / c_b, tau_b.flatten())   # the DSM target, velocity form
    return ((c_b / tau_b) * (v - v_star)).pow(2).mean()


def real_fake_x0(policy: S.Policy, task: str, x_t: torch.Tensor, t: torch.Tensor, cond: dict, ch: D.Chain):
    """x0_hat_real (teacher `task`, its own CFG) and x0_hat_fake (fake_<task>, conditional: guidance 1,
    as DMD2's fake) at (x_t, t), t (B,): x0_hat = x_t - t v (sampler.data_from_velocity). No gradient."""
    amp = torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=ch.bf16)
    tt = t.to(x_t.device, x_t.dtype)
    with torch.no_grad(), amp:
        policy.use(task)
        v_r = policy.velocity(x_t, tt, cond, ch.g_teacher[task])
        policy.use(f"fake_{task}")
        v_f = policy.velocity(x_t, tt, cond, 1.0)
    policy.use("student")
    return S.data_from_velocity(x_t, v_r, tt), S.data_from_velocity(x_t, v_f, tt)


def fake_update(policy: S.Policy, task: str, opt: torch.optim.Optimizer, cond: dict, draw, gen: torch.Generator,
                ch: D.Chain, steps: int) -> float:
    """`steps` AdamW steps of fake_<task> on fake_loss: draw() -> (x_s, s, tau) gives student states at
    times s (B,) and a noise level tau >= s each; eps ~ N(0, I) fresh. The states are DETACHED here, so
    the fake's backward cannot reach the student; with several processes the fake's gradients are
    averaged. Returns the last fake loss (0.0 for steps = 0). The student is left active."""
    amp = torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=ch.bf16)
    params = list(policy.adapter_params(f"fake_{task}").values())
    loss = torch.zeros(())
    policy.use(f"fake_{task}")
    for _ in range(steps):
        x_s, s, tau = draw()
        x_s = x_s.detach()                                               # no gradient into the student
        eps = _randn(gen, ch, x_s)
        x_tau = renoise(x_s, eps, s, tau)                                # q(x_tau | x_s); s = 0: sampler.noised
        opt.zero_grad(set_to_none=True)
        with amp:
            v = policy.velocity(x_tau, tau.to(x_s.device, x_s.dtype), cond, 1.0)
        loss = fake_loss(v.to(x_s.dtype), x_tau, eps, s, tau)
        loss.backward()
        runs.process_mean_grads([p for p in params if p.grad is not None])   # data parallel: one fake
        opt.step()
    policy.use("student")                                                # before the round goes on
    return float(loss.detach())


def dmd_step(policy: S.Policy, task: str, cond: dict, x: torch.Tensor, gen: torch.Generator, ch: D.Chain, *,
             fake_opt: torch.optim.Optimizer, fake_steps: int) -> float:
    """--objective dmd, one task's share of a round (DMD in DMD2's form). The student's own ODE
    rollout from x down the whole grid at its CFG, WITH gradient through every step, gives x0; its
    detached copy is re-noised at t ~ U[0.02, 0.98]; g = dm_gradient / dm_normaliser at (x_t, t);
    dm_loss(x0, g) is backpropagated through the chain (exact: 10 steps of the student's graph held
    at once - the memory of 10 student forwards, ~2x a rollout's compute for the backward; at real
    scale --grad-checkpointing). Then fake_<task> takes `fake_steps` flow-matching steps on the
    detached x0. Returns the loss (0.5 mean g^2)."""
    amp = lambda: torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=ch.bf16)
    # ---- 1. the student's ODE rollout (a = 0) with gradient through every step ----
    policy.use("student")
    x0 = x
    for j in range(len(ch.grid) - 1):
        t, t_next = float(ch.grid[j]), float(ch.grid[j + 1])
        with amp():
            v = policy.velocity(x0, t, cond, ch.g_student)
        x0 = S.step_mean(x0, v, t, t_next, 0.0)                          # Eq. 7 at a = 0: x_{j+1} = x_j + dt v
    # ---- 2. re-noise the detached sample: x_t = (1 - t) sg(x0) + t eps, t ~ U[0.02, 0.98] (DMD) ----
    t = DM_T[0] + (DM_T[1] - DM_T[0]) * _rand(gen, ch, len(x))
    x_t = S.noised(x0.detach(), _randn(gen, ch, x0), t.to(x0.device, x0.dtype))
    # ---- 3. real vs fake at (x_t, t): DMD's gradient, DMD2's normaliser, no gradient ----
    x0_real, x0_fake = real_fake_x0(policy, task, x_t, t, cond, ch)
    g = dm_gradient(x0_fake, x0_real) / dm_normaliser(x0, x0_real)
    # ---- 4. the student's loss, backpropagated through the whole rollout (student active: see distill_task) ----
    loss = dm_loss(x0, g)
    loss.backward()
    # ---- 5. the fake score tracks the student: flow matching on its detached samples (s = 0) ----
    zero = torch.zeros(len(x), dtype=torch.float64)
    fake_update(policy, task, fake_opt, cond,
                lambda: (x0, zero, DM_T[0] + (DM_T[1] - DM_T[0]) * _rand(gen, ch, len(x))), gen, ch, fake_steps)
    return float(loss.detach())


def tdm_step(policy: S.Policy, task: str, cond: dict, x: torch.Tensor, gen: torch.Generator, ch: D.Chain, *,
             fake_opt: torch.optim.Optimizer, fake_steps: int) -> float:
    """--objective tdm, one task's share of a round (TDM). The student's ODE rollout without gradient;
    per sample a trained step i < n_train uniformly and ONE student step with gradient from x_i:
    x0_hat_i = x_i - t_i v, x_{i+1} = (1 - t_{i+1}) x0_hat_i + t_{i+1} eps_hat_i (DDIM form = the Euler
    step). x_{i+1} is matched to the teacher's marginal at t_{i+1} (its ODE keeps the data's marginals)
    through a reverse KL noised only within its step's interval: tau = t_{i+1} + u (t_i - t_{i+1}),
    u ~ U[0.02, 0.98], x_tau ~ q(x_tau | sg(x_{i+1})) (renoise); g = dm_gradient / dm_normaliser with
    TDM's normaliser mean |x0_hat_i - x0_hat_real|, and g is pushed into x0_hat_i: dm_loss(x0_hat_i, g).
    Since dx0_hat_i = (t_i / |dt_i|) dx_{i+1}, that is g on x_{i+1} rescaled by t_i / |dt_i| per step.
    Then fake_<task> (one per task; tau tells the steps apart) takes `fake_steps` steps of fake_loss
    on the rollout's detached states x_{i'+1} at fresh i', tau' in the same way. Returns the loss."""
    amp = lambda: torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=ch.bf16)
    grid, n, rows = ch.grid, len(x), torch.arange(len(x))
    # ---- 1. the student's ODE rollout (a = 0), no gradient: states (N + 1, B, ...) ----
    policy.use("student")
    with amp():
        states = S.rollout(policy, cond, x, grid, 0.0, ch.g_student)["states"].to(x.dtype)
    # ---- 2. a trained step per sample, and ONE student step with gradient ----
    i = (_rand(gen, ch, n) * ch.n_train).long()                          # uniform over j < n_train
    t_i, s = grid[i], grid[i + 1]                                        # (B,) float64: t_i > s = t_{i+1}
    x_i, tt = states[i, rows], t_i.to(x.device, x.dtype)
    with amp():
        v = policy.velocity(x_i, tt, cond, ch.g_student)
    x0_i = S.data_from_velocity(x_i, v, tt)                             # x0_hat_i = x_i - t_i v
    x_next = S.noised(x0_i, S.noise_from_velocity(x_i, v, tt), s.to(x.device, x.dtype))   # = x_i + dt_i v
    # ---- 3. re-noise x_{i+1} within its interval: tau in [t_{i+1}, t_i) (TDM) ----
    tau = s + (t_i - s) * (DM_T[0] + (DM_T[1] - DM_T[0]) * _rand(gen, ch, n))
    x_tau = renoise(x_next.detach(), _randn(gen, ch, x), s, tau)
    # ---- 4. real vs fake at (x_tau, tau), g pushed into the step's x0_hat (student active) ----
    x0_real, x0_fake = real_fake_x0(policy, task, x_tau, tau, cond, ch)
    g = dm_gradient(x0_fake, x0_real) / dm_normaliser(x0_i, x0_real)
    loss = dm_loss(x0_i, g)
    loss.backward()
    # ---- 5. the fake score: the student's intermediate states x_{i'+1}, tau' in [t_{i'+1}, t_i') ----
    def draw():
        j = (_rand(gen, ch, n) * ch.n_train).long()
        u = DM_T[0] + (DM_T[1] - DM_T[0]) * _rand(gen, ch, n)
        return states[j + 1, rows], grid[j + 1], grid[j + 1] + (grid[j] - grid[j + 1]) * u
    fake_update(policy, task, fake_opt, cond, draw, gen, ch, fake_steps)
    return float(loss.detach())


def dm_setup(objective: str, policy: S.Policy, tasks: list, by_task: dict, cfg) -> tuple:
    """distill.Variant.setup of --objective dmd | tdm, once, after the student exists: a fake score
    fake_<task> per task, loaded from the task's teacher (DMD, DMD2, TDM initialise the fake as the
    real score), trainable, and one AdamW over them all (the run's betas and weight decay; lr
    FAKE_LR x --lr). Returns (task_step, {"fake": their weights}, that AdamW): resumed with the student."""
    keep = [p for p in policy.net.parameters() if p.requires_grad]     # add_adapter freezes every weight
    fakes = []
    for t in tasks:
        policy.add_adapter(f"fake_{t}", by_task[t])
        fakes += list(policy.adapter_params(f"fake_{t}").values())
    for p in keep + fakes:
        p.requires_grad_(True)
    policy.use("student")
    opt = torch.optim.AdamW(fakes, lr=fake_lr(cfg, objective) * cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    step = {"dmd": dmd_step, "tdm": tdm_step}[objective]                 # read at setup (tests patch them)
    return functools.partial(step, fake_opt=opt, fake_steps=FAKE_STEPS[objective]), {"fake": fakes}, opt


def variant(cfg: AblationConfig) -> D.Variant:
    """The Variant of Algorithm 1 that cfg asks for; bad combinations: CheckpointError."""
    if cfg.estimator not in ESTIMATORS:                          # the parser checks it too; this is an API
        raise runs.CheckpointError(f"--estimator {cfg.estimator!r}: must be one of {'|'.join(ESTIMATORS)}")
    if cfg.objective in ("dmd", "tdm") and cfg.estimator != "closed":
        raise runs.CheckpointError(f"--estimator {cfg.estimator}: --objective {cfg.objective} has its own distribution-"
                                   "matching gradient, no per-step KL to estimate; drop --estimator")
    if cfg.fake_lr and cfg.objective not in ("dmd", "tdm"):
        raise runs.CheckpointError(f"--fake-lr {cfg.fake_lr:g}: only --objective dmd and tdm train a fake score")
    if cfg.objective in ("dmd", "tdm") and cfg.noise_level > 0:
        raise runs.CheckpointError(f"--noise-level {cfg.noise_level}: --objective {cfg.objective} rolls the student out "
                                   "with its ODE sampler (a = 0), as DMD / TDM students sample; drop --noise-level")
    if cfg.estimator != "closed" and cfg.noise_level <= 0:
        raise runs.CheckpointError(f"--estimator {cfg.estimator}: needs --noise-level > 0 (e.g. 0.7): an ODE step (a = 0) "
                                   "has no density, so no ratio or score (Sec. 3.3); use --estimator closed")
    if cfg.objective not in ("opd", "sft", "dmd", "tdm"):
        raise runs.CheckpointError(f"--objective {cfg.objective!r}: must be opd (DiffusionOPD), sft (the off-policy "
                                   "baseline), dmd or tdm (distribution matching)")
    if cfg.objective == "sft" and cfg.noise_level > 0:
        raise runs.CheckpointError(f"--noise-level {cfg.noise_level}: --objective sft trains on the teachers' ODE samples "
                                   "and rolls nothing out; drop --noise-level")
    probe = dict(probe=lambda pol, tasks, ch, table: probe_kl(pol, tasks, ch.g_teacher, ch.g_student, ch.grid, table),
                 probe_every=cfg.probe_every) if cfg.probe_every else {}
    if cfg.objective == "sft":
        return D.Variant(sft_step, "sft_loss", balance=False, sampled=False, algorithm="SFT baseline",
                         loss="flow matching on the teachers' ODE samples, plain task mean (no balance)", **probe)
    if cfg.objective in ("dmd", "tdm"):
        return D.Variant({"dmd": dmd_step, "tdm": tdm_step}[cfg.objective], f"{cfg.objective}_loss", balance=False, sampled=False,
                         algorithm=f"{cfg.objective.upper()} baseline", setup=functools.partial(dm_setup, cfg.objective),
                         loss={"dmd": "DMD2's normalised distribution-matching gradient on the student's final ODE "
                                      "samples, backpropagated through the rollout",
                               "tdm": "TDM's distribution matching of the student's intermediate states, one step "
                                      "with gradient"}[cfg.objective]
                         + f"; a fake score per task, {FAKE_STEPS[cfg.objective]} fake update(s) per task per round "
                           f"at {fake_lr(cfg, cfg.objective):g}x --lr; plain task mean (no balance)", **probe)
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
