"""test_opd.py - the math tier: every formula against a float64 oracle, on tiny models built in memory.

    python -m pytest test_opd.py -q            # the math alone: ~35 s on 2 CPU cores; no files, no processes
    python -m pytest test_opd.py tests -q      # + the scripts' integration tests (tests/: runs, files, processes)

(The one process started here is the notebook's kernel.)

Sections: 1. sampler math (oracles: diffusers' scheduler, Eq. 5-7 / 11-12 written out,
torch.distributions; which steps train)  2. kl_proof.ipynb executed  3. Stage 1's pieces
(GRPO-Guard ratio, group advantages, PPO clip, NFT loss)  4. Stage 2's gradient (fused ==
three-pass, gradient checkpointing) and the SFT baseline's  5. the gradient estimators of
Sec. 3.3 (formulas, Monte Carlo, clip, spread)  6. the evaluation's arithmetic (the Average,
paired SEs, the bootstrap)  7. the distribution-matching baselines DMD and TDM (the velocity /
x_data / score identities, their gradients against the noised KL, the fake score's loss, no leaks).

The models here are SD3Transformer2DModel's (SD3.5-M's block layout with one dual-attention
layer, no qk-norm) at 16 wide and 2 layers, on 4 x 8 x 8 states, in float64, wrapped by
sampler.Policy.from_transformer; teachers are LoRA adapters with random lora_B, the student a
LoRA moved off its no-op init; text conditioning comes from a stand-in encoder (_encode) that
gives each prompt a fixed random embedding. Nothing is pretrained or read from disk.
"""
import itertools
import math
import zlib
from pathlib import Path

from nbclient import NotebookClient
import nbformat
import numpy as np
import pytest
import torch

import ablations as A
import bench_distill as B
import distill as D
import evaluate as E
import runs
import sampler
import sampler as S
import teachers as T

HERE = Path(__file__).resolve().parent
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread (with 2, every op waits for the
    other core; bench_distill.py measured 0.43 s vs 15-22 s a round)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ==== 1. sampler math ====
# ---- 1.1 time grid  (oracle: diffusers' FlowMatchEulerDiscreteScheduler) --------------------
@pytest.mark.parametrize("n,shift", [(1, 1.0), (4, 1.0), (10, 3.0), (40, 3.0)])
def test_time_grid_endpoints_monotone_float64(n, shift):
    """t_0 = 1 (noise), t_N = 0 (data) exactly, strictly decreasing (dt < 0), float64."""
    g = sampler.time_grid(n, shift)
    assert g.dtype == F64 and g.shape == (n + 1,)
    assert g[0].item() == 1.0 and g[-1].item() == 0.0
    assert (g[1:] - g[:-1] < 0).all()


def test_time_grid_rejects_zero_steps():
    with pytest.raises(ValueError):
        sampler.time_grid(0)


@pytest.mark.parametrize("n", [4, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_time_grid_equals_diffusers_with_unshifted_sigmas(n, shift):
    """Oracle: diffusers shifts explicitly passed sigmas once, so passing the UNSHIFTED
    linspace(1, 0, N + 1)[:-1] must reproduce our grid (float32 tolerance: diffusers stores
    float32), and its timesteps must be 1000 * t (the network's timestep input)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1])
    g = sampler.time_grid(n, shift)
    assert sch.sigmas.shape == g.shape
    torch.testing.assert_close(sch.sigmas.to(F64), g, rtol=0, atol=1e-6)
    torch.testing.assert_close(sch.timesteps.to(F64), 1000.0 * g[:-1], rtol=0, atol=1e-3)


def test_diffusers_default_grid_differs_from_ours():
    """Documents the pitfall (paper Sec. 2; sampler.py deviation 2): diffusers' DEFAULT grid linspaces to an already
    shifted sigma_min, shifts again and appends 0, so its last step is tiny. The toy's grid (sigma_min = 0) does
    not; at real scale the scheduler's own grid is used (next test)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sch.set_timesteps(4)
    torch.testing.assert_close(sch.sigmas.to(F64), torch.tensor([1, .667, .334, .001, 0], dtype=F64),
                               rtol=0, atol=1e-3)
    assert sampler.time_grid(4, 1.0)[-2].item() == pytest.approx(0.25)     # ours: even steps
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(10)
    paper = [1, .960, .913, .858, .790, .707, .602, .465, .278, .0089, 0]
    torch.testing.assert_close(sch.sigmas.to(F64), torch.tensor(paper, dtype=F64), rtol=0, atol=1e-3)
    assert sch.sigmas[-2].item() == pytest.approx(0.0089, abs=1e-4)
    assert sampler.time_grid(10, 3.0)[-2].item() == pytest.approx(0.25)     # 3 * .1 / (1 + 2 * .1)


@pytest.mark.parametrize("n", [3, 10, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_time_grid_with_sigma_min_is_the_schedulers_own(n, shift):
    """Real scale (sigma_min > 0: runs.settings reads it from an SD3 pipeline's scheduler): the grid
    is what diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(N) samples - shift(linspace(1,
    sigma_min, N)) then 0 (float32 tolerance: diffusers stores float32) - with timesteps 1000 t, and
    runs.sigma_min_of(shift) is the scheduler's own sigma_min (the shifted 1 / 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sigma_min = runs.sigma_min_of(shift)
    assert sigma_min == pytest.approx(float(sch.sigma_min), rel=1e-6)
    sch.set_timesteps(n)
    g = sampler.time_grid(n, shift, sigma_min)
    assert g.dtype == F64 and g.shape == (n + 1,) and g[0].item() == 1.0 and g[-1].item() == 0.0
    assert (g[1:] - g[:-1] < 0).all()
    torch.testing.assert_close(sch.sigmas.to(F64), g, rtol=0, atol=1e-6)
    torch.testing.assert_close(sch.timesteps.to(F64), 1000.0 * g[:-1], rtol=0, atol=1e-3)


def test_trained_steps_leave_out_only_a_negligible_last_step():
    """sampler.trained_steps: floor(fraction * N) steps (at least 1), less a last step carrying under
    NEGLIGIBLE (1%) of the summed per-step KL weight (velocity_kl_weight, written out here for Eq. 12:
    dt^2 / 2). The scheduler's 10-step grid at shift 3 ends .0089 -> 0, ~0.05% of Eq. 12's weight:
    9 of 10 train (the released schedule); the toy's even grid ends 0.1 -> 0 (10%): all 10; at a = 0.7
    (Eq. 11, weight ~ |dt| / t) the same last step is not negligible: all 10."""
    sd3, even = sampler.time_grid(10, 3.0, runs.sigma_min_of(3.0)), sampler.time_grid(10, 1.0)
    share = lambda g: float((g[-2] - g[-1]) ** 2 / ((g[1:] - g[:-1]) ** 2).sum())       # Eq. 12: w = dt^2 / 2
    assert share(sd3) < 1e-3 and share(even) == pytest.approx(0.1)
    assert sampler.trained_steps(sd3, 0.0) == 9 and sampler.trained_steps(even, 0.0) == 10
    assert sampler.trained_steps(sd3, 0.7) == 10 and sampler.trained_steps(even, 0.7) == 10
    assert sampler.trained_steps(sd3, 0.0, 0.5) == 5 == sampler.trained_steps(even, 0.0, 0.5)   # the fraction first
    assert sampler.trained_steps(sd3, 0.0, 0.99) == 9 and sampler.trained_steps(even, 0.0, 0.01) == 1
    assert sampler.trained_steps(sampler.time_grid(1, 3.0, runs.sigma_min_of(3.0)), 0.0) == 1     # never 0


# ---- 1.2 the a = 0 step  (oracle: FlowMatchEulerDiscreteScheduler.step) ---------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a0_step_equals_scheduler_step(dtype, shift):
    """step_mean at a = 0 is exactly diffusers' Euler step x + (sigma_next - sigma) v, and std = 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, 6)[:-1])
    gen = torch.Generator().manual_seed(1)
    for j, ts in enumerate(sch.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=gen, dtype=F64).to(dtype)
        v = torch.randn(2, 4, 8, 8, generator=gen, dtype=F64).to(dtype)
        ref = sch.step(v, ts, x).prev_sample                 # scheduler upcasts x to float32
        t, t_next = sch.sigmas[j].item(), sch.sigmas[j + 1].item()
        ours = sampler.step_mean(x, v, t, t_next, 0.0)
        torch.testing.assert_close(ours.to(F64), ref.to(F64), rtol=0, atol=2e-6)
        assert sampler.step_std(t, t_next, 0.0) == 0.0


# ---- 1.3 the transition kernel  (oracle: Eq. 5-7 written out here, and the SDE drift form) ----
def _eq5_7(t, t_next, a):
    """Paper Eq. 5-7, with the Flow-GRPO substitution 1 - t -> 1 - t_next inside sigma_t at t = 1."""
    dt = t_next - t
    sigma = a * math.sqrt(t / ((1 - t) if t < 1 else (1 - t_next)))     # Eq. 5
    cx = 1 + sigma ** 2 * dt / (2 * t)                                  # Eq. 7, x-coefficient
    cv = 1 + sigma ** 2 * (1 - t) / (2 * t)                             # Eq. 7, v-coefficient
    std = sigma * math.sqrt(-dt)                                        # Eq. 6
    return sigma, cx, cv, std


def test_noised_is_the_forward_interpolation():
    """Sec. 2: x_t = (1 - t) x_data + t eps: data at t = 0, noise at t = 1, d x_t / dt = eps - x_data = v."""
    g = torch.Generator().manual_seed(3)
    xd, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    xt = sampler.noised(xd, eps, t)
    assert torch.equal(xt[0], xd[0]) and torch.equal(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.7 * xd[1] + 0.3 * eps[1], rtol=0, atol=1e-15)
    d = (sampler.noised(xd, eps, t + 1e-6) - sampler.noised(xd, eps, t - 1e-6)) / 2e-6
    torch.testing.assert_close(d, eps - xd, rtol=0, atol=1e-8)


def test_kernel_matches_eq5_7_random():
    """50 random (t, t_next, a) with t < 1: coefficients equal Eq. 5-7, cv = 1 + a^2/2,
    and step_mean equals the Euler-Maruyama drift x + [v + sigma^2/(2t)(x + (1-t)v)] dt."""
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        t = float(rng.uniform(0.01, 0.999))
        t_next = float(rng.uniform(0.0, t * 0.999))
        a = float(rng.uniform(0.01, 1.5))
        sigma, cx, cv, std = _eq5_7(t, t_next, a)
        got = sampler.kernel(t, t_next, a)
        assert got == pytest.approx((cx, cv, std), rel=1e-12, abs=1e-14)
        assert got[1] == pytest.approx(1 + a * a / 2, rel=1e-12)      # [D] constant v-coefficient
        assert sampler.step_std(t, t_next, a) == pytest.approx(std, rel=1e-12)
        x = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64)
        v = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64)
        dt = t_next - t
        drift = v + sigma ** 2 / (2 * t) * (x + (1 - t) * v)            # reverse-SDE drift (Sec. 3)
        torch.testing.assert_close(sampler.step_mean(x, v, t, t_next, a), x + drift * dt,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_next", [0.95, 0.6, 0.0])
@pytest.mark.parametrize("a", [0.1, 0.7, 1.2])
def test_kernel_first_step_t1(t_next, a):
    """t = 1 step with the Flow-GRPO substitution: cx = 1 - a^2/2, cv = 1, std^2 = a^2 (sampler.py, deviation 1)."""
    cx, cv, std = sampler.kernel(1.0, t_next, a)
    assert cx == pytest.approx(1 - a * a / 2, rel=1e-12)
    assert cv == 1.0
    assert std ** 2 == pytest.approx(a * a, rel=1e-12)
    assert (cx, cv, std) == pytest.approx(_eq5_7(1.0, t_next, a)[1:], rel=1e-12)
    assert all(math.isfinite(c) for c in (cx, cv, std))


@pytest.mark.parametrize("t,t_next", [(1.0, 0.8), (0.5, 0.3), (0.1, 0.0)])
def test_kernel_a0_is_euler(t, t_next):
    """a = 0: (cx, cv, std) = (1, 1, 0), the limit of Eq. 5-7 as a -> 0."""
    assert sampler.kernel(t, t_next, 0.0) == (1.0, 1.0, 0.0)
    lim = sampler.kernel(t, t_next, 1e-7)
    assert lim[0] == pytest.approx(1.0, abs=1e-12) and lim[1] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("t,t_next", [(1.2, 0.5), (0.5, 0.5), (0.5, 0.7), (0.5, -0.1), (0.0, 0.0),
                                      (float("nan"), 0.5), (0.5, float("nan"))])
def test_kernel_rejects_bad_times(t, t_next):
    with pytest.raises(ValueError):
        sampler.kernel(t, t_next, 0.7)
    with pytest.raises(ValueError):
        sampler.kernel(t, t_next, 0.0)


@pytest.mark.parametrize("a", [-0.7, float("nan"), float("inf")])
def test_kernel_rejects_bad_noise_level(a):
    """a is a noise level, a >= 0 and finite: a negative a silently acting as |a| (or a NaN
    propagating into every loss) hides a caller's bug."""
    with pytest.raises(ValueError):
        sampler.kernel(0.5, 0.3, a)


# ---- 1.4 Gaussian log-prob  (oracle: torch.distributions.Normal) ----------------------------
@pytest.mark.parametrize("std", [0.05, 0.7, 1.3])
def test_gaussian_logprob_vs_torch_normal(std):
    """MEAN over non-batch dims of Normal(mean, std).log_prob(x)."""
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(3, 4, 5, 5, generator=gen, dtype=F64)
    x = mean + std * torch.randn(3, 4, 5, 5, generator=gen, dtype=F64) + 0.1
    ref = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).mean(1)
    got = sampler.gaussian_logprob(x, mean, std)
    assert got.shape == (3,) and got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("std", [0.0, -0.5])
def test_gaussian_logprob_no_density_at_std0(std):
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError):
        sampler.gaussian_logprob(x, x, std)


# ---- 1.5 per-step KL  (oracle: torch.distributions.kl_divergence; Eq. 12 written out) -------
@pytest.mark.parametrize("std", [0.05, 0.7, 2.0])
def test_step_kl_vs_torch_kl(std):
    """Eq. 11: mean over dims of KL(N(mu_S, std) || N(mu_T, std)) from torch.distributions."""
    gen = torch.Generator().manual_seed(3)
    mu_s = torch.randn(4, 3, 6, 6, generator=gen, dtype=F64)
    mu_t = torch.randn(4, 3, 6, 6, generator=gen, dtype=F64)
    N = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(N(mu_s, std), N(mu_t, std)).flatten(1).mean(1)
    got = sampler.step_kl(mu_s, mu_t, std)
    assert got.shape == (4,)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_step_kl_ode_is_half_mse():
    """Eq. 12 at std = 0: 1/2 mean ||dmu||^2."""
    gen = torch.Generator().manual_seed(4)
    mu_s, mu_t = torch.randn(2, 4, 3, 3, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(sampler.step_kl(mu_s, mu_t, 0.0),
                               0.5 * (mu_s - mu_t).pow(2).flatten(1).mean(1), rtol=1e-14, atol=0)


_STEPS = [(1.0, 0.9, 0.7), (1.0, 0.75, 0.3), (1.0, 0.0, 1.0), (0.6, 0.45, 0.7), (0.3, 0.2, 1.0),
          (0.25, 0.0, 0.7), (0.6, 0.45, 0.0), (1.0, 0.9, 0.0)]


@pytest.mark.parametrize("t,t_next,a", _STEPS)
def test_velocity_kl_weight(t, t_next, a):
    """w * mean||v_S - v_T||^2 == step_kl(mu(x, v_S), mu(x, v_T), std) (the x-terms cancel), and
    w equals the paper's closed form: (1 + a^2/2)^2 (1 - t)|dt| / (2 a^2 t) for t < 1,
    dt^2 / (2 a^2) at the t = 1 step (cv = 1, std^2 = a^2), dt^2 / 2 at a = 0 (Eq. 12)."""
    gen = torch.Generator().manual_seed(5)
    x, vs, vt = torch.randn(3, 2, 4, 4, 4, generator=gen, dtype=F64)
    w = sampler.velocity_kl_weight(t, t_next, a)
    kl = sampler.step_kl(sampler.step_mean(x, vs, t, t_next, a), sampler.step_mean(x, vt, t, t_next, a),
                         sampler.step_std(t, t_next, a))
    torch.testing.assert_close(w * (vs - vt).pow(2).flatten(1).mean(1), kl, rtol=1e-10, atol=1e-14)
    dt = t_next - t
    if a == 0:
        closed = dt * dt / 2
    elif t == 1.0:
        closed = dt * dt / (2 * a * a)
    else:
        closed = (1 + a * a / 2) ** 2 * (1 - t) * abs(dt) / (2 * a * a * t)
    assert w == pytest.approx(closed, rel=1e-12)


# ==== 2. the derivation notebook ====
def test_kl_proof_notebook_executes(monkeypatch):
    # The kernel named "python3" must be THIS interpreter (the one with torch): ipykernel ships that
    # kernelspec under sys.prefix/share/jupyter, and jupyter_client swaps its "python" for
    # sys.executable. Preferring the environment's kernelspecs keeps a stale user-level "python3"
    # (~/.local/share/jupyter/kernels) from being picked instead.
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                 # small tensors: one thread (see one_thread)
    nb = nbformat.read(HERE / "kl_proof.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()      # raises nbclient.exceptions.CellExecutionError on the first failing cell
    # every cell ran: the summary table (last code cell) must report its checks, none failed
    summary = "".join(o.get("text", "") for o in [c for c in nb.cells if c.cell_type == "code"][-1].outputs)
    assert " checks, 0 failed" in summary, summary[-2000:]


# ==== 3. Stage 1's pieces (teachers.py) ====
def test_ratio_norm_is_per_sample_dot_product():
    """GRPO-Guard RatioNorm (arXiv 2510.22319; teachers.py): s (Delta + b) = eps . (mu_theta - mu_old), PER SAMPLE
    (mean over dims, as our log-probs), in float64; plain Flow-GRPO keeps the biased Delta."""
    g = torch.Generator().manual_seed(0)
    B_, s = 5, 0.13
    mu_old = torch.randn(B_, 3, 4, 4, generator=g, dtype=F64)
    mu_new = mu_old + 0.05 * torch.randn(B_, 3, 4, 4, generator=g, dtype=F64) * torch.arange(1, B_ + 1, dtype=F64).view(-1, 1, 1, 1)
    eps = torch.randn(B_, 3, 4, 4, generator=g, dtype=F64)
    x_next = mu_old + s * eps
    lp_old = S.gaussian_logprob(x_next, mu_old, s)
    got = T.guard_log_ratio(x_next, mu_new, mu_old, lp_old, s, ratio_norm=True)
    want = (eps * (mu_new - mu_old)).flatten(1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    plain = T.guard_log_ratio(x_next, mu_new, mu_old, lp_old, s, ratio_norm=False)
    bias = (mu_new - mu_old).pow(2).flatten(1).mean(1) / (2 * s * s)
    torch.testing.assert_close(plain, want / s - bias, rtol=1e-12, atol=1e-12)
    assert (bias > 0).all() and not torch.allclose(bias, bias.mean().expand(B_))   # per sample, not batch-averaged


def test_group_advantages_drop_zero_std_groups():
    r = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    adv, keep = T.group_advantages(r, 3)
    assert keep.tolist() == [False] * 3 + [True] * 3
    assert abs(adv[3:].mean()) < 1e-12 and adv[4] > adv[5] > adv[3]


def test_group_advantages_batch_scale():
    """scale="batch": each group centred on its own mean, every group divided by the batch's std - a
    group whose rewards differ by 0.05 keeps a small advantage (its own std would make it +-1)."""
    r = np.array([0.60, 0.55, 0.0, 1.0])
    adv, keep = T.group_advantages(r, 2, "batch")
    s = r.std()
    np.testing.assert_allclose(adv, [0.025 / (s + 1e-4), -0.025 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)], rtol=1e-12)
    own, _ = T.group_advantages(r, 2)
    assert abs(own[0] - 0.025 / (0.025 + 1e-4)) < 1e-12 and abs(adv[0]) < 0.1 * abs(own[0]) and keep.all()


def test_ppo_clip_loss_clips_the_ratio():
    adv = torch.tensor([1.0, -1.0])
    lr = torch.log(torch.tensor([1.5, 0.5]))
    # A > 0, rho 1.5 -> min(1.5, 1.1) = 1.1; A < 0, rho 0.5 -> -max(0.5, 0.9) = -0.9
    assert abs(T.ppo_clip_loss(lr, adv, 0.1).item() - (-(1.1) + 0.9) / 2) < 1e-6


def test_nft_loss_hand_computed():
    """One sample, one dimension: x_data = 1, t = 0.5, x_t = 0.5 (eps = 0), v_old = 1.2, v_theta = 0.8,
    beta = 0.5: v+ = 1.0, v- = 1.4; x0_hat = x_t - t v: + 0.0, - -0.2; errors -1.0 and -1.2;
    adaptive weights |err| -> per-term losses 1.0 and 1.2; r = 0.75: (0.75 * 1.0 + 0.25 * 1.2) / 0.5 = 2.1."""
    one = lambda v: torch.tensor([[v]], dtype=F64)
    got = T.nft_loss(one(0.8), one(1.2), one(0.5), torch.tensor([0.5], dtype=F64), one(1.0),
                     torch.tensor([0.75], dtype=F64), 0.5)
    assert abs(got.item() - 2.1) < 1e-12


# ==== 4. Stage 2's gradient, on a tiny SD3 transformer built in memory ====
# SD3.5-M's transformer block layout (bench_distill.SD35M: a dual-attention first layer, a
# context-pre-only last one) at 2 x 8 = 16 wide, 2 layers, on 4 x 8 x 8 states; the text side is a
# stand-in (_encode). No qk_norm: diffusers' RMSNorm computes its variance in float32, which
# would cap every float64 comparison here at ~1e-8.
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
            pos_embed_max_size=8, dual_attention_layers=(0,))
TEXT_TOKENS = 6
PROMPTS = ["a red square left of a blue triangle", 'a sign that says "K7"', "a misty forest at dawn"]
G_STUDENT, G_TEACHER = 3.0, 1.0             # student with CFG, the teacher CFG-free: both branches matter


def _encode(prompts):
    """A stand-in for Policy.encode: each prompt's (and the empty prompt's) embedding and pooled
    vector are fixed random tensors seeded by the prompt's crc32, float64, in encode's dict."""
    def one(p):
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
        return (torch.randn(TEXT_TOKENS, TINY["joint_attention_dim"], generator=g, dtype=F64),
                torch.randn(TINY["pooled_projection_dim"], generator=g, dtype=F64))
    e, p = (torch.stack(v) for v in zip(*map(one, prompts)))
    ue, up = one("")
    return {"emb": e, "pooled": p, "uemb": ue.expand_as(e), "upooled": up.expand_as(p)}


def tiny_policy(teachers=("geneval", "ocr"), seed=1):
    """A float64 Policy.from_transformer around a random TINY transformer (the same weights for
    every call), the teachers as LoRA adapters (r 4) with random lora_B (a fresh LoRA's B = 0 is a
    no-op), and a trainable student LoRA moved off its no-op init by `seed` (so both of its factors
    get gradients and it differs from the base); the student is active; encode = _encode."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    lora = lambda: LoraConfig(r=4, lora_alpha=8, target_modules=S.LORA_TARGETS, lora_dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)                                   # the transformer and every lora_A
        pol = S.Policy.from_transformer(SD3Transformer2DModel(**TINY), shift=1.0, guidance=G_STUDENT,
                                        device="cpu", dtype=F64)
        for name in (*teachers, "student"):
            pol.add_adapter(name, config=lora())
    with torch.no_grad():
        for i, name in enumerate(teachers):
            g = torch.Generator().manual_seed(100 + i)
            for k, p in pol.adapter_params(name).items():
                if "lora_B" in k:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
        g = torch.Generator().manual_seed(seed)
        for p in pol.adapter_params("student").values():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    for p in pol.adapter_params("student").values():
        p.requires_grad_(True)
    pol.use("student")
    pol.encode = _encode
    return pol


def _noise(n, seed):
    return torch.randn(n, *[TINY[k] for k in ("in_channels", "sample_size", "sample_size")],
                       generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_tiny_policy_is_a_real_test_bed():
    """The models below are not vacuous: the teachers differ from the base and from each other,
    the student from the base, CFG changes the velocity, and the prompts reach it."""
    pol, x, c = tiny_policy(), _noise(2, 0), _encode(PROMPTS[:2])
    assert pol.latent_shape() == (4, 8, 8) and c["emb"].shape == (2, TEXT_TOKENS, 16)
    with torch.no_grad():
        v = {}
        for name in (None, "geneval", "ocr", "student"):
            pol.use(name)
            v[name] = pol.velocity(x, 0.6, c, 1.0)
        pol.use(None)
        vg = pol.velocity(x, 0.6, c, G_STUDENT)
        swapped = pol.velocity(x, 0.6, _encode(PROMPTS[1::-1]), 1.0)
    rel = lambda a, b: float((a - b).norm() / b.norm())
    gaps = {"geneval-base": rel(v["geneval"], v[None]), "ocr-base": rel(v["ocr"], v[None]),
            "ocr-geneval": rel(v["ocr"], v["geneval"]), "student-base": rel(v["student"], v[None]),
            "cfg": rel(vg, v[None]), "prompt": rel(swapped, v[None])}
    assert min(gaps.values()) > 0.02, gaps


def assert_same_grads(got: dict, want: dict) -> None:
    """Two LoRA gradients equal to float64 precision, and not trivially: at least half the tensors nonzero."""
    nz = 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
        nz += int(want[k].abs().sum() > 0)
    assert nz >= len(want) // 2, f"only {nz} of {len(want)} LoRA tensors got a gradient"


@pytest.mark.parametrize("a", [0.0, 0.7])
def test_fused_equals_three_pass_gradient(a):
    """distill.py's fused schedule (distill_task) and the released rollout -> teacher -> recompute
    schedule (bench_distill.three_pass_task) give the same loss - the task's MEAN per-step KL - and
    the same student gradient, in float64, for ODE (Eq. 12) and SDE (Eq. 11) rollouts. At a = 0 the
    returned value is also checked against its definition: the student's own ODE rollout
    (sampler.rollout), the teacher's means at its states, step_kl, averaged over the 5 trained steps."""
    pol = tiny_policy()
    params = pol.adapter_params("student")
    grid, cond, x = S.time_grid(6), _encode(PROMPTS), _noise(3, 2)
    ch = D.Chain(grid, a, 5, G_STUDENT, {"ocr": G_TEACHER})
    grads, losses = [], []
    for fn in (D.distill_task, B.three_pass_task):
        for p in params.values():
            p.grad = None
        losses.append(fn(pol, "ocr", cond, x, torch.Generator().manual_seed(7), ch, scale=0.2))
        grads.append({k: p.grad.clone() for k, p in params.items()})
    assert losses[0] > 0 and abs(losses[0] - losses[1]) <= 1e-12 * losses[0], losses
    assert_same_grads(grads[0], grads[1])
    if a == 0.0:
        with torch.no_grad():
            pol.use("student")
            ro = S.rollout(pol, cond, x, grid, 0.0, G_STUDENT)
            pol.use("ocr")
            kls = [float(S.step_kl(ro["means"][j], S.step_mean(ro["states"][j], pol.velocity(
                ro["states"][j], float(grid[j]), cond, G_TEACHER), float(grid[j]), float(grid[j + 1]), 0.0), 0.0).mean())
                   for j in range(5)]
            pol.use("student")
        assert abs(losses[0] - sum(kls) / 5) <= 1e-12 * losses[0], (losses[0], kls)
    for p in params.values():
        p.grad = None


def test_sampled_steps_are_an_unbiased_estimate_of_every_step():
    """--sample-steps K (deviation 6): sampled_steps draws every K-subset of the trained steps with
    equal probability, so over the C(n, K) subsets the mean of distill_task's returned KL and of its
    student gradient is the all-steps one, in float64 (ODE rollouts: the states do not depend on the
    draw). Subsets are found by seed; K >= n trains every step with the same generator use."""
    pol = tiny_policy()
    params = pol.adapter_params("student")
    grid, cond, x = S.time_grid(5), _encode(PROMPTS), _noise(3, 2)
    full_ch, ch = D.Chain(grid, 0.0, 4, G_STUDENT, {"ocr": G_TEACHER}), D.Chain(grid, 0.0, 4, G_STUDENT, {"ocr": G_TEACHER}, sample=2)

    def run(chain, seed):
        for p in params.values():
            p.grad = None
        kl = D.distill_task(pol, "ocr", cond, x, torch.Generator().manual_seed(seed), chain)
        return kl, {k: p.grad.clone() for k, p in params.items()}

    seeds, counts = {}, {}
    for seed in range(600):
        sub = tuple(D.sampled_steps(ch, torch.Generator().manual_seed(seed)))
        seeds.setdefault(sub, seed)
        counts[sub] = counts.get(sub, 0) + 1
    assert sorted(seeds) == sorted(itertools.combinations(range(4), 2)), sorted(seeds)
    assert max(counts.values()) - min(counts.values()) < 45, counts      # 100 each expected, SD ~9
    full_kl, full_g = run(full_ch, 0)
    got = [run(ch, s) for s in seeds.values()]
    mean_kl = sum(k for k, _ in got) / len(got)
    assert abs(mean_kl - full_kl) <= 1e-12 * full_kl, (mean_kl, full_kl)
    assert_same_grads({k: sum(g[k] for _, g in got) / len(got) for k in full_g}, full_g)
    assert D.sampled_steps(D.Chain(grid, 0.0, 4, G_STUDENT, {}, sample=4), torch.Generator()) == [0, 1, 2, 3]
    for p in params.values():
        p.grad = None


def test_grad_checkpointing_same_lora_gradient():
    """diffusers' gradient checkpointing on the PEFT-wrapped transformer gives the student's LoRA
    the same gradient (float64) - which needs the student's adapter active again before backward:
    the checkpointed blocks are recomputed there, after the teacher's pass switched adapters."""
    pol = tiny_policy()
    params = pol.adapter_params("student")
    cond, x = _encode(PROMPTS[:2]), _noise(2, 3)
    ch = D.Chain(S.time_grid(4), 0.0, 3, G_STUDENT, {"ocr": G_TEACHER})
    calls = {"n": 0}
    grads, losses = [], []
    for ckpt in (False, True):
        if ckpt:
            pol.transformer.enable_gradient_checkpointing()
            real = pol.transformer._gradient_checkpointing_func

            def counting(*a, **k):
                calls["n"] += 1
                return real(*a, **k)
            pol.transformer._gradient_checkpointing_func = counting
        for p in params.values():
            p.grad = None
        losses.append(D.distill_task(pol, "ocr", cond, x, torch.Generator().manual_seed(7), ch))
        grads.append({k: p.grad.clone() for k, p in params.items()})
    pol.transformer.disable_gradient_checkpointing()
    assert calls["n"] >= 3, f"the checkpointed path ran {calls['n']} times (expected >= 1 per student step)"
    assert losses[0] == losses[1], f"loss {losses[0]!r} vs {losses[1]!r} with checkpointing"
    diff = max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])
    scale = max(float(v.abs().max()) for v in grads[0].values())
    nz = sum(int(v.abs().sum() > 0) for v in grads[0].values())
    assert nz >= len(grads[0]) // 2, f"only {nz} of {len(grads[0])} LoRA tensors got a gradient"
    assert diff <= 1e-12 * scale, f"checkpointed gradient differs by {diff:.3e} (max |grad| {scale:.3e})"


# ---- the off-policy SFT baseline's loss (ablations.py --objective sft) ----
def test_sft_gradient_is_flow_matching(monkeypatch):
    """sft_task's loss and student gradient equal a hand-written flow-matching loss on the same
    teacher samples, t and eps (float64): v = v_u + g (v_c - v_u) at x_t = (1 - t) x + t eps,
    loss = mean (v - (eps - x))^2. The samples are the teacher's own ODE (teacher_samples)."""
    pol = tiny_policy()
    params = pol.adapter_params("student")
    grid, g = S.time_grid(4), G_STUDENT
    cond, x = _encode(PROMPTS), _noise(3, 2)
    x_data = A.teacher_samples(pol, "ocr", G_TEACHER, cond, x, grid)
    pol.use("ocr")
    with torch.no_grad():
        ref = S.rollout(pol, cond, x, grid, 0.0, G_TEACHER)["states"][-1]
    pol.use("student")
    assert torch.equal(x_data, ref) and pol.active == "student"
    seen, real = [], S.noised
    monkeypatch.setattr(S, "noised", lambda xd, e, t: seen.append((xd, e, t)) or real(xd, e, t))
    loss = A.sft_task(pol, x_data, g, cond, grid, 4, 1.0, torch.Generator().manual_seed(7))
    monkeypatch.undo()
    got = {k: p.grad.clone() for k, p in params.items()}
    (xd, eps, t), = seen
    assert xd is x_data and t.dtype == eps.dtype == F64 and eps.shape == x_data.shape
    assert float(t.min()) >= 0 and float(t.max()) <= 1 and len(set(t.tolist())) == 3
    for p in params.values():
        p.grad = None
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x_data + tb * eps                                   # by hand, not sampler.noised
    v_c = pol.velocity(x_t, t, cond, 1.0)
    v_u = pol.velocity(x_t, t, {"emb": cond["uemb"], "pooled": cond["upooled"]}, 1.0)
    want = ((v_u + g * (v_c - v_u)) - (eps - x_data)).pow(2).mean()
    want.backward()
    assert loss > 0 and abs(loss - want.item()) <= 1e-12 * loss, (loss, want.item())
    assert_same_grads(got, {k: p.grad for k, p in params.items()})
    for p in params.values():
        p.grad = None


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sft_times_follow_the_grid(shift):
    """sft_times: on a shift-1 grid U(0, 1); at shift 3 the sampler's time density (a piecewise-
    linear shift(U) through the grid points); only trained steps j < n_train are drawn."""
    grid = S.time_grid(10, shift)
    t = A.sft_times(grid, 10, 200_000, torch.Generator().manual_seed(0)).numpy()
    assert t.min() >= 0 and t.max() < 1
    # the CDF at every grid point t_j is the fraction of steps below it: (N - j) / N
    cdf = np.array([(t < float(tj)).mean() for tj in grid[1:-1]])
    want = (10 - np.arange(1, 10)) / 10
    assert np.abs(cdf - want).max() < 0.005, (cdf, want)
    if shift == 1.0:                                                      # U(0, 1): mean 1/2, var 1/12
        assert abs(t.mean() - 0.5) < 0.003 and abs(t.var() - 1 / 12) < 0.002, (t.mean(), t.var())
    t9 = A.sft_times(grid, 9, 10_000, torch.Generator().manual_seed(0))
    assert float(t9.min()) >= float(grid[9]), "an untrained step was drawn"
# ==== 5. gradient estimators (Sec. 3.3, Eq. 16-23; ablations.py --estimator) ====
K_SE = 5.0          # Monte Carlo: |mean - exact| <= K_SE standard errors, per coordinate (max over <= 2.4e3:
                    # P(max |z| > 5) <= 2.4e3 * 5.7e-7 = 1.4e-3 under the null)
EST_A = 0.7             # the noise level of the paper's PPO ablation (Flow-GRPO's SD3 value)


@pytest.fixture(scope="module")
def est_pol():
    """A float64 tiny policy (tiny_policy): the teachers and a student LoRA moved off its no-op
    init (so that both LoRA factors get gradients and the student differs from the base)."""
    return tiny_policy()


def _means(est_pol, x, j, grid, a, prompts):
    """The student's gradient-carrying mean and the teacher's constant mean at state x, step j."""
    t, t_next = float(grid[j]), float(grid[j + 1])
    cond = est_pol.encode(prompts)
    est_pol.use("student")
    mean_s = S.step_mean(x, est_pol.velocity(x, t, cond, G_STUDENT), t, t_next, a)
    with torch.no_grad():
        est_pol.use("ocr")
        mean_t = S.step_mean(x, est_pol.velocity(x, t, cond, G_TEACHER), t, t_next, a)
    est_pol.use("student")
    return mean_s, mean_t, S.step_std(t, t_next, a)


def _flat(gs):
    return torch.cat([g.flatten() for g in gs])


# ---- 5.1 each estimator against its formula, one step at a fixed x_j -------------------------
def test_estimators_equal_their_formulas_at_a_fixed_state(est_pol):
    """At a fixed x_j (a = 0.7, B = 2), with a_j = mu_S.detach() + sbar eps:
    ppo:       grad = grad KL_j + KL_j sum_d (eps_d / sbar) grad mu_S,d          (Eq. 19 + 23)
    reinforce: grad = k sum_d (eps_d / sbar) grad mu_S,d, k = mean_d[(a - mu_T)^2 - (a - mu_S)^2] / (2 sbar^2)
    per sample, batch-averaged; KL_j = mean_d (mu_S - mu_T)^2 / (2 sbar^2) (Eq. 11) written out here;
    the score term as a vector-Jacobian product of mu_S. Float64, relative 1e-10."""
    params = list(est_pol.adapter_params("student").values())
    grid, g = S.time_grid(6), torch.Generator().manual_seed(5)
    x = torch.randn(2, *est_pol.latent_shape(), generator=g, dtype=F64)
    mean_s, mean_t, sbar = _means(est_pol, x, 2, grid, EST_A, PROMPTS[:2])
    eps = torch.randn(x.shape, generator=g, dtype=F64)
    x_next = mean_s.detach() + sbar * eps
    B = len(x)
    grad = lambda y, **k: _flat(torch.autograd.grad(y, params, retain_graph=True, **k))
    kl_hand = ((mean_s - mean_t) ** 2).flatten(1).mean(1) / (2 * sbar ** 2)            # Eq. 11, (B,)
    g_cf = grad(kl_hand.mean())                                                         # the closed form
    score = lambda w: grad(mean_s, grad_outputs=w.view(B, 1, 1, 1) * eps / sbar / B)    # batch mean of w_b s_b
    mu_s, mu_t = mean_s.detach(), mean_t
    k_hand = (((x_next - mu_t) ** 2 - (x_next - mu_s) ** 2) / (2 * sbar ** 2)).flatten(1).mean(1)
    want = {"ppo": g_cf + score(kl_hand.detach()), "reinforce": score(k_hand)}
    for est, w in want.items():
        got = grad(A.estimator_loss(est, mean_s, mean_t, sbar, x_next))
        err = float((got - w).abs().max() / w.abs().max())
        assert err < 1e-10, f"{est}: autograd of estimator_loss vs the formula: rel. error {err:.2e}"
    # the closed form used by distill_task (sampler.step_kl) is the same Eq. 11
    assert float((grad(S.step_kl(mean_s, mean_t, sbar).mean()) - g_cf).abs().max() / g_cf.abs().max()) < 1e-12
    # the score term is not negligible here: PPO's gradient differs from the closed form's
    rel = float((want["ppo"] - g_cf).norm() / g_cf.norm())
    assert rel > 1e-3, f"PPO's score term is only {rel:.1e} of the closed-form gradient: the test cannot tell them apart"


def test_estimators_refuse_a0(est_pol):
    """An ODE step (sbar = 0) has no density: estimator_loss refuses it."""
    x = torch.zeros(1, *est_pol.latent_shape(), dtype=F64)
    with pytest.raises(ValueError, match="no density"):
        A.estimator_loss("ppo", x, x, 0.0, x)


# ---- 5.2 in expectation: Monte Carlo over eps at a fixed state ------------------------------
def test_estimators_unbiased_monte_carlo(est_pol):
    """Eq. 20-21 and LLM OPD: over n = 2e5 draws of eps at one fixed state (a 4 x 4 x 4 state, D = 64,
    so the Jacobian J = d mu_S / d theta (D x P) is cheap), the mean PPO and REINFORCE gradients
    equal the closed-form gradient: every coordinate within K_SE standard errors. Per-draw
    gradients are exact: g_i = J^T m_i with m_i = d loss_i / d mu_S from autograd of
    estimator_loss (checked against autograd through the network for 2 draws); their mean is
    mean(m) J and their per-coordinate variance diag(J^T Cov(m) J). Power: k log pi WITHOUT the
    factor D (mean-over-dims log-probs taken as the densities) has mean grad KL_j / D, and the
    detached advantage (score term only) mean 0: both are rejected by far. Also PPO's trace of
    covariance = KL_j^2 ||J||_F^2 / sbar^2 (Eq. 23)."""
    params = list(est_pol.adapter_params("student").values())
    grid, g = S.time_grid(6), torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 4, 4, generator=g, dtype=F64)                                 # 4 x 4: D = 64
    mean_s, mean_t, sbar = _means(est_pol, x, 2, grid, EST_A, PROMPTS[:1])
    d = mean_s[0].numel()
    J = torch.autograd.grad(mean_s, params, grad_outputs=torch.eye(d, dtype=F64).view(d, *mean_s.shape),
                            retain_graph=True, is_grads_batched=True)
    J = torch.cat([q.flatten(1) for q in J], 1)                                        # (D, P)
    g_cf = _flat(torch.autograd.grad(S.step_kl(mean_s, mean_t, sbar).mean(), params, retain_graph=True))
    m_cf = (mean_s - mean_t).detach().flatten() / (d * sbar ** 2)
    assert float((m_cf @ J - g_cf).abs().max() / g_cf.abs().max()) < 1e-10              # J is right

    def per_draw(est, eps):                                                            # (n, D): m_i
        mu = mean_s.detach().expand(len(eps), *mean_s.shape[1:]).clone().requires_grad_(True)
        loss = A.estimator_loss(est, mu, mean_t.expand_as(mu), sbar, mu.detach() + sbar * eps)
        return torch.autograd.grad(loss * len(eps), mu)[0].flatten(1)                  # loss is a batch mean
    e2 = torch.randn(2, *mean_s.shape[1:], generator=g, dtype=F64)
    for est in ("ppo", "reinforce"):
        m = per_draw(est, e2)
        for i in range(2):
            direct = _flat(torch.autograd.grad(A.estimator_loss(est, mean_s, mean_t, sbar, mean_s.detach() + sbar * e2[i:i + 1]),
                                               params, retain_graph=True))
            assert float((m[i] @ J - direct).abs().max() / direct.abs().max()) < 1e-10, est
    n, chunk = 200_000, 25_000
    stats = {}
    for est in ("ppo", "reinforce"):
        s1, s2 = torch.zeros(d, dtype=F64), torch.zeros(d, d, dtype=F64)
        gen = torch.Generator().manual_seed(7)                                         # common random numbers
        for _ in range(n // chunk):
            m = per_draw(est, torch.randn(chunk, *mean_s.shape[1:], generator=gen, dtype=F64))
            s1 += m.sum(0); s2 += m.T @ m
        mm = s1 / n
        C = (s2 - n * torch.outer(mm, mm)) / (n - 1)                                   # Cov(m), (D, D)
        stats[est] = (mm, C)
    kl = float(S.step_kl(mean_s, mean_t, sbar).detach())
    live = J.abs().sum(0) > 0                                                          # coordinates mu_S depends on
    out = {}
    for name, (mm, C), scale in (("ppo", stats["ppo"], 1.0), ("reinforce", stats["reinforce"], 1.0),
                                 ("reinforce without D", stats["reinforce"], 1.0 / d),
                                 ("score term only", (stats["ppo"][0] - m_cf, stats["ppo"][1]), 1.0)):
        mean_g = scale * (mm @ J)
        var_g = scale ** 2 * ((C @ J) * J).sum(0)
        z = (mean_g - g_cf).abs()[live] / (var_g[live] / n).sqrt()
        out[name] = (float(z.max()), float(var_g.sum()))
    tr_ppo = kl ** 2 * float(J.pow(2).sum()) / sbar ** 2
    msg = (f"max z over {int(live.sum())} coords (n = {n}): " + ", ".join(f"{k} {v[0]:.2f}" for k, v in out.items())
           + f"; tr Cov: ppo {out['ppo'][1]:.4e} (Eq. 23: {tr_ppo:.4e}), reinforce {out['reinforce'][1]:.4e}; "
           f"KL_j {kl:.4e}, ||grad KL_j|| {float(g_cf.norm()):.4e}")
    print(msg)
    assert out["ppo"][0] <= K_SE and out["reinforce"][0] <= K_SE, msg
    assert out["reinforce without D"][0] >= 10 * K_SE and out["score term only"][0] >= 10 * K_SE, msg
    assert abs(out["ppo"][1] / tr_ppo - 1) < 0.03, msg
    assert bool((g_cf[~live] == 0).all())                                            # dead coordinates: 0 = 0


# ---- 5.3 the clip never fires on a fresh rollout --------------------------------------------
def test_ppo_clip_never_fires_on_a_fresh_rollout(est_pol, monkeypatch):
    """--estimator ppo (its Variant's task step: distill_task with estimator_loss) at a = 0.7 over a whole 4-step rollout: every step's log rho is 0
    and rho = 1 exactly (pi_old = pi_theta: one optimizer step per rollout), so no (image, step)
    term lies outside 1 +- PPO_CLIP; and each scored action a_j is, bit for bit, the state x_{j+1}
    the rollout continues from (the next student call's input)."""
    ratios, actions, inputs = [], [], []
    real_ratio, real_velocity = A.ppo_log_ratio, est_pol.velocity

    def ratio_spy(x_next, mean_s, std):
        lr = real_ratio(x_next, mean_s, std)
        ratios.append(lr.detach().clone()); actions.append(x_next.detach().clone())
        return lr

    def velocity_spy(x, *a, **k):
        if est_pol.active == "student":
            inputs.append(x.detach().clone())
        return real_velocity(x, *a, **k)
    monkeypatch.setattr(A, "ppo_log_ratio", ratio_spy)
    monkeypatch.setattr(est_pol, "velocity", velocity_spy)
    grid, g = S.time_grid(4), torch.Generator().manual_seed(8)
    cond = est_pol.encode(PROMPTS[:2])
    x = torch.randn(2, *est_pol.latent_shape(), generator=g, dtype=F64)
    task_step = A.variant(A.AblationConfig(estimator="ppo", noise_level=EST_A)).task_step    # what a run trains with
    kl = task_step(est_pol, "ocr", cond, x, torch.Generator().manual_seed(9), D.Chain(grid, EST_A, 4, G_STUDENT, {"ocr": G_TEACHER}))
    monkeypatch.undo()
    for p in est_pol.adapter_params("student").values():
        p.grad = None
    assert len(ratios) == 4 and len(inputs) == 4 and kl > 0
    rho = torch.stack(ratios).exp()
    assert torch.equal(rho, torch.ones_like(rho)), f"max |rho - 1| = {float((rho - 1).abs().max()):.2e}"
    assert float(((rho - 1).abs() > A.PPO_CLIP).float().mean()) == 0.0
    assert all(torch.equal(actions[j], inputs[j + 1]) for j in range(3)), "the scored action is not the next state"


# ---- 5.4 estimator_gradients: spread across rollouts ----------------------------------------
def test_estimator_gradients_across_rollouts(est_pol):
    """One student, one task (OCR), a = 0.7, 4 steps, 8 rollouts of one prompt: the per-step
    gradients vary across rollouts for every estimator (fresh initial and SDE noise), finite for
    the closed form; the rollouts are the same for every estimator (common random numbers: equal
    per-rollout KLs); PPO's trace of covariance exceeds the closed form's at every step (measured;
    values in the message), and so does REINFORCE's. The closed form's mean gradient is also
    compared with PPO's and REINFORCE's (|difference| / SE of the difference, reported)."""
    grid, prompts, n = S.time_grid(4), PROMPTS[1:2], 8
    res = {e: A.estimator_gradients(est_pol, "ocr", G_TEACHER, G_STUDENT, prompts, grid, EST_A, e, n, seed=3)
           for e in A.ESTIMATORS}
    for e, r in res.items():
        assert r["grads"].shape == (n, 4, sum(p.numel() for p in est_pol.adapter_params("student").values()))
        assert torch.equal(r["kl"], res["closed"]["kl"]), f"{e}: other trajectories than the closed form's"
        G = r["grads"]                                                                # the returned stats are the sample's
        torch.testing.assert_close(r["trace_cov"], (G - G.mean(0)).pow(2).sum(-1).sum(0) / (n - 1), rtol=1e-9, atol=0)
        torch.testing.assert_close(r["mean_norm"], G.mean(0).norm(dim=-1), rtol=1e-9, atol=0)
    cf = res["closed"]["trace_cov"]
    assert bool(torch.isfinite(cf).all() and (cf > 0).all()), f"closed-form trace of covariance {cf.tolist()}"
    rows = []
    for j in range(4):
        rows.append(f"t={float(grid[j]):.2f}: tr Cov closed {float(cf[j]):.3e}, |mean| {float(res['closed']['mean_norm'][j]):.3e}; "
                    + ", ".join(f"{e} x{float(res[e]['trace_cov'][j] / cf[j]):.3g}" for e in ("ppo", "reinforce")))
    diff = {e: [float(((res[e]["grads"] - res["closed"]["grads"]).mean(0)[j]).norm()
                      / math.sqrt(float((res[e]["grads"] - res["closed"]["grads"])[:, j].var(0).sum()) / n)) for j in range(4)]
            for e in ("ppo", "reinforce")}
    msg = "; ".join(rows) + f"; ||mean(est - closed)|| / SE per step: {diff}"
    print(msg)
    for e in ("ppo", "reinforce"):
        assert bool((res[e]["trace_cov"] > cf).all()), f"{e} not noisier than the closed form at every step: " + msg
    for p in est_pol.adapter_params("student").values():
        assert p.grad is None                                                          # left clean


# ==== 6. the evaluation's arithmetic (evaluate.py): the Average, paired SEs, the bootstrap ====
def test_results_average_is_the_papers_rule():
    rows = [{"name": "a", "scores": {"geneval": 0.2, "ocr": 0.5, "aesthetic": 5.0}},
            {"name": "b", "scores": {"geneval": 0.6, "ocr": 0.5, "aesthetic": 7.0}},
            {"name": "c", "scores": {"geneval": 1.0, "ocr": 0.5, "aesthetic": 6.0}}]
    res = E.results(rows, {})
    # geneval: 0, .5, 1; ocr all equal -> 0; aesthetic: 0, 1, .5
    assert [round(r["average"], 6) for r in res["rows"]] == [0.0, round(1.5 / 3, 6), 0.5]
    table = E.render_table(res)
    assert "| b | 0.600 | 0.500 | 7.000 | 0.500 |" in table


def test_minmax_average_batched_and_degenerate():
    """minmax_average((..., rows, metrics)): each leading index on its own; the rule is invariant to an
    increasing affine map of the scores and follows a reordering of the rows; an all-equal column adds
    0; no rows or no metrics give zeros of the right shape."""
    m = np.array([[0.2, 0.5, 5.0], [0.6, 0.5, 7.0], [1.0, 0.5, 6.0]])
    want = np.array([0.0, 0.5, 0.5])                                   # (0 + 0 + 0), (.5 + 0 + 1), (1 + 0 + .5), / 3
    np.testing.assert_allclose(E.minmax_average(m), want, rtol=0, atol=1e-15)
    got = E.minmax_average(np.stack([m, m[::-1], 2 * m + 1]))
    np.testing.assert_allclose(got, np.stack([want, want[::-1], want]), rtol=0, atol=1e-12)
    assert E.minmax_average(np.zeros((4, 0))).tolist() == [0.0] * 4
    assert E.minmax_average(np.ones((2, 0, 3))).shape == (2, 0)


def test_paired_standard_error():
    a, b = np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0, 0.0])
    m, se = E.paired(a, b)
    assert m == 0.5 and abs(se - np.std([1, 0, 0, 1], ddof=1) / 2) < 1e-12


def test_average_difference_is_the_papers_rule_with_a_paired_bootstrap():
    rng = np.random.default_rng(0)
    tasks, n = list(E.toy.TASK_NAMES), 200
    per = {name: {"train": {t: rng.uniform(lo, hi, n) for t in tasks}}
           for name, lo, hi in (("base", 0.0, 0.6), ("x", 0.2, 0.9), ("y", 0.1, 1.0))}
    rows = [{"name": k, "scores": {t: float(v["train"][t].mean()) for t in tasks}} for k, v in per.items()]
    avg = {r["name"]: r["average"] for r in E.results(rows, {})["rows"]}
    d, se = E.average_difference(per, list(per), "x", "y")
    assert abs(d - (avg["x"] - avg["y"])) < 1e-12, (d, avg)        # the point estimate: results()' rule
    assert E.average_difference(per, list(per), "x", "x") == (0.0, 0.0)
    # fixed column ends (a row of zeros, a row of ones): Average(a) - Average(zeros) = mean over tasks
    # of a's mean, whose bootstrap SE is sqrt(sum_t var0(a_t) / n) / T (tasks resampled independently)
    ends = {"zeros": {"train": {t: np.zeros(n) for t in tasks}}, "ones": {"train": {t: np.ones(n) for t in tasks}}}
    per2 = ends | {"a": per["x"]}
    d, se = E.average_difference(per2, list(per2), "a", "zeros", draws=4000)
    want = math.sqrt(sum(per["x"]["train"][t].var() for t in tasks) / n) / len(tasks)
    assert abs(d - np.mean([per["x"]["train"][t].mean() for t in tasks])) < 1e-12
    assert abs(se / want - 1) < 0.07, f"bootstrap SE {se:.5f} vs analytic {want:.5f} (tolerance 7%)"


# ==== 7. the distribution-matching baselines (ablations.py --objective dmd | tdm) ====
# Oracles: 1-D Gaussians in closed form. Data (the teacher's) N(MU, SIG^2): its marginal at t is
# N((1 - t) MU, (1 - t)^2 SIG^2 + t^2), with an exact score; the student's marginals are Gaussian
# too (a linear student), so real and fake velocities are exact (sampler.velocity_from_score), the
# KL between noised marginals is closed form, and expectations are Gauss-Hermite sums (exact for
# the degree-2 polynomials integrated here).
MU, SIG = 0.7, 0.5


def _gauss_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)), 1-D."""
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def _gauss_velocity(x, m, var, t):
    """The exact velocity of a flow whose marginal at t is N(m, var): from its score -(x - m) / var."""
    return S.velocity_from_score(x, -(x - m) / var, t)


def _hermite(n=6):
    """Nodes (z, e) of a 2-D Gauss-Hermite rule for two independent N(0, 1), and weights (sum 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    z, w = torch.tensor(z, dtype=F64), torch.tensor(w / w.sum(), dtype=F64)
    return z.repeat_interleave(n), z.repeat(n), w.repeat_interleave(n) * w.repeat(n)


def test_velocity_conversions_are_the_rectified_flow_identities():
    """sampler section 4, float64: on x_t = (1 - t) x_data + t eps with v = eps - x_data, x_data and
    eps come back exactly (t a float or per sample); for Gaussian data the exact velocity E[eps - x_data
    | x_t] gives the marginal's exact score and E[x_data | x_t] (Tweedie), and velocity_from_score
    inverts score_from_velocity."""
    g = torch.Generator().manual_seed(0)
    x_data, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=F64), torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    for t in (torch.rand(5, generator=g, dtype=F64), 0.37):
        tb = t.view(-1, 1, 1, 1) if torch.is_tensor(t) else t
        x = (1 - tb) * x_data + tb * eps
        torch.testing.assert_close(S.data_from_velocity(x, eps - x_data, t), x_data, rtol=0, atol=1e-14)
        torch.testing.assert_close(S.noise_from_velocity(x, eps - x_data, t), eps, rtol=0, atol=1e-14)
    x, t = torch.linspace(-3, 3, 13, dtype=F64).view(13, 1), torch.linspace(0.05, 0.95, 13, dtype=F64)
    tb = t.view(-1, 1)
    var = (1 - tb) ** 2 * SIG ** 2 + tb ** 2                                   # Var x_t
    e_data = MU + (1 - tb) * SIG ** 2 * (x - (1 - tb) * MU) / var               # E[x_data | x_t], Gaussian conditioning
    e_eps = tb * (x - (1 - tb) * MU) / var                                      # E[eps | x_t]
    v = e_eps - e_data
    torch.testing.assert_close(S.score_from_velocity(x, v, t), -(x - (1 - tb) * MU) / var, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(S.data_from_velocity(x, v, t), e_data, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(S.velocity_from_score(x, S.score_from_velocity(x, v, t), t), v, rtol=1e-12, atol=1e-12)


def test_renoise_kernel_and_fake_loss_reduce_to_the_forward_process():
    """ablations.renoise, q(x_tau | x_s): r (1 - s) = 1 - tau and r^2 s^2 + c^2 = tau^2 (the marginal
    at s goes to the one at tau); at s = 0 it is sampler.noised and fake_loss is plain flow matching,
    mean (v - (eps - x_s))^2."""
    g = torch.Generator().manual_seed(1)
    s = torch.rand(64, generator=g, dtype=F64) * 0.9
    tau = s + (1 - s) * torch.rand(64, generator=g, dtype=F64) * 0.99
    r, c = A.renoise_coefs(s, tau)
    torch.testing.assert_close(r * (1 - s), 1 - tau, rtol=0, atol=1e-15)
    torch.testing.assert_close(r ** 2 * s ** 2 + c ** 2, tau ** 2, rtol=0, atol=1e-15)
    x_s, eps, v = (torch.randn(64, 2, 3, generator=g, dtype=F64) for _ in range(3))
    zero = torch.zeros(64, dtype=F64)
    torch.testing.assert_close(A.renoise(x_s, eps, zero, tau), S.noised(x_s, eps, tau), rtol=0, atol=1e-15)
    want = (v - (eps - x_s)).pow(2).mean()
    got = A.fake_loss(v, A.renoise(x_s, eps, zero, tau), eps, zero, tau)
    assert abs(float(got - want)) <= 1e-12 * float(want), (float(got), float(want))


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_dmd_gradient_is_a_multiple_of_the_noised_kl_gradient(t):
    """DMD's student gradient without its normaliser: for a linear student x0 = a z + b and exact real
    (teacher data N(MU, SIG^2)) and fake (the student's own) velocities at x_t = (1 - t) x0 + t eps,
      E[(x0_hat_fake - x0_hat_real) dx0/dtheta] = (t / (1 - t))^2 grad_theta KL(p^S_t || p^T_t):
    the score gap is s_f - s_r = (1 - t) / t^2 (x0_hat_f - x0_hat_r) (sampler section 4) and dx_t /
    dtheta = (1 - t) dx0 / dtheta in DMD's KL gradient E[(s_f - s_r) dx_t / dtheta]. Exact expectation
    (Gauss-Hermite) through ablations.dm_gradient and dm_loss (weights folded into g)."""
    z, e, w = _hermite()
    theta = torch.tensor([1.3, -0.4], dtype=F64, requires_grad=True)            # (a, b)
    x0 = (theta[0] * z + theta[1]).view(-1, 1)                                  # (K, 1): K samples, D = 1
    x_t = S.noised(x0.detach(), e.view(-1, 1), torch.full((len(z),), t, dtype=F64))
    m_s, v_s = (1 - t) * theta[1].detach(), (1 - t) ** 2 * theta[0].detach() ** 2 + t * t    # p^S_t
    m_r, v_r = (1 - t) * MU, (1 - t) ** 2 * SIG ** 2 + t * t                                   # p^T_t
    x0_f = S.data_from_velocity(x_t, _gauss_velocity(x_t, m_s, v_s, t), t)
    x0_r = S.data_from_velocity(x_t, _gauss_velocity(x_t, m_r, v_r, t), t)
    g = A.dm_gradient(x0_f, x0_r)
    A.dm_loss(x0, len(z) * w.view(-1, 1) * g).backward()                        # grad = sum_k w_k g_k dx0_k/dtheta
    th2 = theta.detach().clone().requires_grad_(True)
    _gauss_kl((1 - t) * th2[1], (1 - t) ** 2 * th2[0] ** 2 + t * t, torch.tensor(m_r, dtype=F64),
              torch.tensor(v_r, dtype=F64)).backward()
    want = (t / (1 - t)) ** 2 * th2.grad
    assert float(want.abs().min()) > 1e-3, want                                 # not a vacuous 0 = 0
    torch.testing.assert_close(theta.grad, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("t_i,s,u", [(1.0, 0.8, 0.5), (0.6, 0.45, 0.1), (0.3, 0.0, 0.9)])
def test_tdm_step_gradient_is_a_multiple_of_the_interval_kl_gradient(t_i, s, u):
    """TDM's per-step form, one step: x_i ~ N(M_I, S_I^2), a linear student velocity v = a x_i + b at t_i,
    x0_hat_i = x_i - t_i v, x_{i+1} = (1 - s) x0_hat_i + s eps_hat_i (s = t_{i+1}), x_tau = renoise(sg(x_{i+1}),
    eps, s, tau) with tau = s + u (t_i - s); exact real (data) and fake (the student's marginal at s,
    noised to tau) velocities. g pushed into x0_hat_i:
      E[g dx0_hat_i/dtheta] = t_i / |dt_i| * tau^2 (1 - s) / (1 - tau)^2 * grad_theta KL(p^S_tau || p^T_tau),
    since dx_tau/dx_{i+1} = r = (1 - tau) / (1 - s), s_f - s_r = (1 - tau) / tau^2 (x0_hat_f - x0_hat_r) and
    dx0_hat_i = (t_i / |dt_i|) dx_{i+1}. s = 0 (the last step) is DMD's (tau / (1 - tau))^2 times t_i / |dt_i|."""
    M_I, S_I = 0.3, 0.9
    z, e, w = _hermite()
    tau, dt = s + u * (t_i - s), s - t_i
    theta = torch.tensor([0.4, -0.2], dtype=F64, requires_grad=True)
    x_i = (M_I + S_I * z).view(-1, 1)
    v = theta[0] * x_i + theta[1]
    x0_i = S.data_from_velocity(x_i, v, t_i)
    x_next = S.noised(x0_i, S.noise_from_velocity(x_i, v, t_i), torch.full((len(z),), s, dtype=F64))
    sv, tv = torch.full((len(z),), s, dtype=F64), torch.full((len(z),), tau, dtype=F64)
    x_tau = A.renoise(x_next.detach(), e.view(-1, 1), sv, tv)
    r, c = (float(q[0]) for q in A.renoise_coefs(sv, tv))

    def student_tau(th):                                                        # p^S_tau: mean, variance
        return r * (M_I + dt * (th[0] * M_I + th[1])), r * r * (1 + dt * th[0]) ** 2 * S_I ** 2 + c * c
    m_f, v_f = student_tau(theta.detach())
    m_r, v_r = (1 - tau) * MU, (1 - tau) ** 2 * SIG ** 2 + tau ** 2
    x0_f = S.data_from_velocity(x_tau, _gauss_velocity(x_tau, m_f, v_f, tau), tau)
    x0_r = S.data_from_velocity(x_tau, _gauss_velocity(x_tau, m_r, v_r, tau), tau)
    A.dm_loss(x0_i, len(z) * w.view(-1, 1) * A.dm_gradient(x0_f, x0_r)).backward()
    th2 = theta.detach().clone().requires_grad_(True)
    _gauss_kl(*student_tau(th2), torch.tensor(m_r, dtype=F64), torch.tensor(v_r, dtype=F64)).backward()
    want = t_i / abs(dt) * tau ** 2 * (1 - s) / (1 - tau) ** 2 * th2.grad
    assert float(want.abs().min()) > 1e-4, want
    torch.testing.assert_close(theta.grad, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(x_next, x_i + dt * v, rtol=0, atol=1e-14)       # the DDIM form is the Euler step


@pytest.mark.parametrize("s,tau", [(0.0, 0.4), (0.5, 0.7), (0.8, 0.99)])
def test_fake_loss_is_minimised_by_the_students_noised_velocity(s, tau):
    """ablations.fake_loss on student states x_s ~ N(M, V) noised to tau (renoise): its expected
    gradient over a linear fake v_f(x) = alpha x + beta vanishes at the exact velocity of the student's
    marginal at tau, N(r M, r^2 V + c^2) - the fake learns the score that DMD / TDM need (s = 0:
    flow matching on clean samples). Exact expectation (Gauss-Hermite), one call per node."""
    M, V = -0.3, 0.6
    z, e, w = _hermite()
    sv, tv = torch.tensor([s], dtype=F64), torch.tensor([tau], dtype=F64)
    r, c = (float(q) for q in A.renoise_coefs(sv, tv))
    # the exact fake, affine in x: v = alpha x + beta
    var = r * r * V + c * c
    x_probe = torch.tensor([0.0, 1.0], dtype=F64)
    v_probe = _gauss_velocity(x_probe, r * M, var, tau)
    ab = torch.tensor([float(v_probe[1] - v_probe[0]), float(v_probe[0])], dtype=F64, requires_grad=True)
    total = 0
    for k in range(len(z)):
        x_s = torch.full((1, 1), M + math.sqrt(V) * float(z[k]), dtype=F64)
        eps = torch.full((1, 1), float(e[k]), dtype=F64)
        x_tau = A.renoise(x_s, eps, sv, tv)
        total = total + w[k] * A.fake_loss(ab[0] * x_tau + ab[1], x_tau, eps, sv, tv)
    total.backward()
    assert float(total.detach()) > 1e-3                                                  # the loss's irreducible part
    assert float(ab.grad.abs().max()) < 1e-12, ab.grad
    off = ab.detach() + torch.tensor([0.05, -0.05], dtype=F64)                  # and a wrong fake is not a minimum
    off.requires_grad_(True)
    tot2 = sum(w[k] * A.fake_loss(off[0] * (xt := A.renoise(torch.full((1, 1), M + math.sqrt(V) * float(z[k]), dtype=F64),
                                                            torch.full((1, 1), float(e[k]), dtype=F64), sv, tv)) + off[1],
                                  xt, torch.full((1, 1), float(e[k]), dtype=F64), sv, tv) for k in range(len(z)))
    tot2.backward()
    assert float(off.grad.abs().max()) > 1e-4, off.grad


def _dm_policy(fake_steps=0, objective="dmd"):
    """The tiny float64 policy with teacher "ocr", a fake score fake_ocr (the teacher's weights, lora_B
    nudged so fake != real at CFG 1 too) and its AdamW; -> (policy, the task step, the AdamW)."""
    from peft import LoraConfig
    pol = tiny_policy(teachers=("ocr",))
    pol.add_adapter("fake_ocr", config=LoraConfig(r=4, lora_alpha=8, target_modules=S.LORA_TARGETS, lora_dropout=0.0))
    teacher = pol.adapter_params("ocr")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, p in pol.adapter_params("fake_ocr").items():
            p.copy_(teacher[k.replace(".fake_ocr.", ".ocr.")])
            if "lora_B" in k:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=F64))
    fakes = list(pol.adapter_params("fake_ocr").values())
    for p in [*fakes, *pol.adapter_params("student").values()]:
        p.requires_grad_(True)
    pol.use("student")
    opt = torch.optim.AdamW(fakes, lr=1e-2)
    step = {"dmd": A.dmd_step, "tdm": A.tdm_step}[objective]
    return pol, (lambda *a: step(*a, fake_opt=opt, fake_steps=fake_steps)), opt


def test_dmd_step_gradient_is_its_formula_through_the_whole_rollout(monkeypatch):
    """dmd_step on the tiny policy (float64, no fake update): its student gradient equals a hand-built
    one - the student's CFG Euler rollout with gradient through all 4 steps, x_t = (1 - t) sg(x0) + t eps
    at the step's own t and eps, the teacher's (CFG 1) and the fake's x0_hat, g normalised per sample by
    mean |x0 - x0_hat_real|, surrogate sum(g x0) / numel; the returned loss is 0.5 mean g^2."""
    pol, step, _ = _dm_policy()
    params = pol.adapter_params("student")
    grid, cond, x = S.time_grid(4), _encode(PROMPTS), _noise(3, 2)
    ch = D.Chain(grid, 0.0, 4, G_STUDENT, {"ocr": G_TEACHER})
    seen, real = [], S.noised
    monkeypatch.setattr(S, "noised", lambda xd, e, t: seen.append((xd, e, t)) or real(xd, e, t))
    loss = step(pol, "ocr", cond, x, torch.Generator().manual_seed(7), ch)
    monkeypatch.undo()
    got = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    (x0_seen, eps, t), = seen
    assert float(t.min()) >= 0.02 and float(t.max()) <= 0.98 and len(set(t.tolist())) == 3
    x0 = x
    for j in range(4):
        x0 = x0 + float(grid[j + 1] - grid[j]) * pol.velocity(x0, float(grid[j]), cond, G_STUDENT)
    torch.testing.assert_close(x0.detach(), x0_seen, rtol=0, atol=1e-13)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0.detach() + tb * eps
    with torch.no_grad():
        pol.use("ocr")
        x0_r = x_t - tb * pol.velocity(x_t, t, cond, G_TEACHER)
        pol.use("fake_ocr")
        x0_f = x_t - tb * pol.velocity(x_t, t, cond, 1.0)
        pol.use("student")
    g = (x0_f - x0_r) / (x0.detach() - x0_r).abs().mean((1, 2, 3), keepdim=True)
    ((g * x0).sum() / x0.numel()).backward()
    assert abs(loss - 0.5 * float(g.pow(2).mean())) <= 1e-12 * loss, loss
    assert_same_grads(got, {k: p.grad for k, p in params.items()})
    for p in params.values():
        p.grad = None


def test_tdm_step_gradient_is_its_formula_at_one_step(monkeypatch):
    """tdm_step on the tiny policy (float64, no fake update): per sample a trained step i, one student
    step with gradient from the rollout's x_i, whose x_{i+1} is the rollout's own next state; tau in
    [t_{i+1} + .02 dt, t_{i+1} + .98 dt] of that step; the gradient equals a hand-built one with g
    (real vs fake at (x_tau, tau), normalised by mean |x0_hat_i - x0_hat_real|) on x0_hat_i = x_i - t_i v."""
    pol, step, _ = _dm_policy(objective="tdm")
    params = pol.adapter_params("student")
    grid, cond, x = S.time_grid(5), _encode(PROMPTS), _noise(3, 4)
    ch = D.Chain(grid, 0.0, 4, G_STUDENT, {"ocr": G_TEACHER})
    seen, real = [], A.renoise
    monkeypatch.setattr(A, "renoise", lambda *a: seen.append(a) or real(*a))
    loss = step(pol, "ocr", cond, x, torch.Generator().manual_seed(3), ch)
    monkeypatch.undo()
    got = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    (x_next, eps, s, tau), = seen
    i = torch.tensor([int((grid - float(si)).abs().argmin()) - 1 for si in s])
    assert bool((i >= 0).all() and (i < 4).all()) and torch.equal(grid[i + 1], s)
    t_i = grid[i]
    assert bool(((tau - s) >= 0.02 * (t_i - s) - 1e-15).all() and ((tau - s) <= 0.98 * (t_i - s) + 1e-15).all())
    with torch.no_grad():
        states = S.rollout(pol, cond, x, grid, 0.0, G_STUDENT)["states"]
    rows = torch.arange(3)
    torch.testing.assert_close(x_next, states[i + 1, rows], rtol=0, atol=1e-12)
    x_i, tb = states[i, rows], t_i.view(-1, 1, 1, 1)
    x0_i = x_i - tb * pol.velocity(x_i, t_i, cond, G_STUDENT)
    x_tau = (1 - tau.view(-1, 1, 1, 1)) / (1 - s.view(-1, 1, 1, 1)) * x_next + \
        (tau ** 2 - ((1 - tau) / (1 - s) * s) ** 2).sqrt().view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        pol.use("ocr")
        x0_r = x_tau - tau.view(-1, 1, 1, 1) * pol.velocity(x_tau, tau, cond, G_TEACHER)
        pol.use("fake_ocr")
        x0_f = x_tau - tau.view(-1, 1, 1, 1) * pol.velocity(x_tau, tau, cond, 1.0)
        pol.use("student")
    g = (x0_f - x0_r) / (x0_i.detach() - x0_r).abs().mean((1, 2, 3), keepdim=True)
    ((g * x0_i).sum() / x0_i.numel()).backward()
    assert abs(loss - 0.5 * float(g.pow(2).mean())) <= 1e-12 * loss, loss
    for k, p in params.items():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-14)
        p.grad = None


@pytest.mark.parametrize("objective", ["dmd", "tdm"])
def test_fake_update_and_student_backward_do_not_leak(objective):
    """The fake score's update leaves the student's gradient and weights exactly as the student's own
    backward left them, and the student's backward leaves no gradient on the fake: one task step
    without a fake update, then the same (same draws) with 2; the fake moves; its first update's
    gradient is flow matching (dmd: v_fake(x_t', t') vs eps' - x0 on the detached x0) by hand."""
    grid, cond, x = S.time_grid(4), _encode(PROMPTS[:2]), _noise(2, 5)
    ch = D.Chain(grid, 0.0, 4, G_STUDENT, {"ocr": G_TEACHER})
    runs_ = {}
    for k in (0, 2):
        pol, step, opt = _dm_policy(fake_steps=k, objective=objective)
        fakes = pol.adapter_params("fake_ocr")
        before = {n: p.detach().clone() for n, p in fakes.items()}
        w_student = {n: p.detach().clone() for n, p in pol.adapter_params("student").items()}
        first = []
        real_step = opt.step
        opt.step = lambda *a, **kw: (first.append({n: p.grad.clone() for n, p in fakes.items()}) if not first else None,
                                     real_step(*a, **kw))[1]
        step(pol, "ocr", cond, x, torch.Generator().manual_seed(11), ch)
        runs_[k] = {"grad": {n: p.grad.clone() for n, p in pol.adapter_params("student").items()},
                    "fake_grad": [p.grad for p in fakes.values()], "pol": pol, "before": before, "first": first,
                    "moved": max(float((p.detach() - before[n]).abs().max()) for n, p in fakes.items()),
                    "student_w": all(torch.equal(p, w_student[n]) for n, p in pol.adapter_params("student").items())}
    assert all(g is None for g in runs_[0]["fake_grad"]), "the student's backward reached the fake score"
    assert runs_[0]["moved"] == 0.0 and runs_[2]["moved"] > 0, (runs_[0]["moved"], runs_[2]["moved"])
    assert all(torch.equal(runs_[0]["grad"][n], runs_[2]["grad"][n]) for n in runs_[0]["grad"]), \
        "the fake's update changed the student's gradient"
    assert runs_[2]["student_w"], "the fake's update moved the student's weights"
    if objective == "dmd":                                  # the first fake gradient, by hand
        pol = _dm_policy(objective="dmd")[0]
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            x0 = S.rollout(pol, cond, x, grid, 0.0, G_STUDENT)["states"][-1]
        A._rand(gen, ch, 2), A._randn(gen, ch, x0)          # the student's own draws: t, eps
        tau = 0.02 + 0.96 * A._rand(gen, ch, 2)
        eps = A._randn(gen, ch, x0)
        pol.use("fake_ocr")
        v = pol.velocity(S.noised(x0, eps, tau), tau, cond, 1.0)
        (v - (eps - x0)).pow(2).mean().backward()
        for n, p in pol.adapter_params("fake_ocr").items():
            torch.testing.assert_close(runs_[2]["first"][0][n], p.grad, rtol=1e-9, atol=1e-13)


def test_dmd_step_same_gradient_with_grad_checkpointing():
    """--grad-checkpointing, which DMD's chain needs at real scale: the same student gradient (float64)
    through the whole rollout, the checkpointed blocks recomputed in the student's adapter after the
    real and fake passes switched adapters."""
    grid, cond, x = S.time_grid(3), _encode(PROMPTS[:2]), _noise(2, 6)
    ch = D.Chain(grid, 0.0, 3, G_STUDENT, {"ocr": G_TEACHER})
    pol, step, _ = _dm_policy()
    params, grads, calls = pol.adapter_params("student"), [], {"n": 0}
    for ckpt in (False, True):
        if ckpt:
            pol.transformer.enable_gradient_checkpointing()
            real = pol.transformer._gradient_checkpointing_func
            pol.transformer._gradient_checkpointing_func = lambda *a, **k: calls.__setitem__("n", calls["n"] + 1) or real(*a, **k)
        for p in params.values():
            p.grad = None
        step(pol, "ocr", cond, x, torch.Generator().manual_seed(2), ch)
        grads.append({k: p.grad.clone() for k, p in params.items()})
    pol.transformer.disable_gradient_checkpointing()
    assert calls["n"] >= 3, calls
    scale = max(float(v.abs().max()) for v in grads[0].values())
    diff = max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])
    assert scale > 0 and diff <= 1e-12 * scale, f"checkpointed DMD gradient differs by {diff:.3e} (max {scale:.3e})"
