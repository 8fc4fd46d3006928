"""sampler.py - the paper's shared math and the policy (DiffusionOPD Sec. 3.1-3.2, Eq. 5-12).

Everything formula-shaped that two files need lives here and only here: the time grid, the
SDE/ODE kernel (mean and std), a transition's Gaussian log-prob, the per-step closed-form KL,
the policy (encode / velocity with CFG / decode, adapters on one backbone) and the rollout.

    python sampler.py base/ --prompt 'a sign that says "K7"'   # 40-step ODE samples -> runs/sampler.png

CONVENTIONS (stated once, used everywhere)
  * Rectified flow, SD3 convention: x_t = (1 - t) x_data + t eps.  t = 1 IS PURE NOISE, t = 0 IS
    DATA.  The network predicts v = eps - x_data; its timestep input is 1000 * t (diffusers).
  * Sampling runs DOWN the grid 1 = t_0 > t_1 > ... > t_N = 0, so every dt_j = t_{j+1} - t_j < 0.
  * "Step j" maps x_j (at t_j) to x_{j+1}. Beware: x_0 is the NOISE a rollout starts from, never
    the data (`x_data`).
  * Log-probs and KLs are MEANS over the non-batch dimensions (C*H*W; sum = mean * x[0].numel()),
    as in the released code and Flow-GRPO: a clip range and a learning rate then mean the same at any size.

NOTATION (paper -> code)
  t_j, t_{j+1}, dt_j   t, t_next, dt = t_next - t (< 0)
  a                    a             global noise level (a = 0: ODE; Flow-GRPO SD3: 0.7)
  sigma_t              sqrt(sig2)    a * sqrt(t / (1 - t))                      Eq. 5
  mu(x_j)              mean          cx * x_j + cv * dt * v_j                   Eq. 7
  sbar_j               std           sigma_t * sqrt(-dt)                        Eq. 6
  KL_j                 step_kl       ||mu_S - mu_T||^2 / (2 sbar^2)  (a > 0)    Eq. 11
                                     ||mu_S - mu_T||^2 / 2           (a = 0)    Eq. 12

Deliberate deviations / choices
  1. t = 1, where sigma_t is infinite: 1 - t -> 1 - t_1 inside sigma_t only, as the released code
     (Flow-GRPO); the first step (cx = 1 - a^2/2, cv = 1, sbar^2 = a^2, tested) stays in the loss.
  2. Grid: at real scale the scheduler's own, which the released teachers were trained on (ends
     .0089 -> 0; time_grid); the toy's ends exactly at 0, as its numbers were made on it.
  3. Eq. 11 keeps the paper's (-dt) in sbar^2; the released code drops it (a 1/|dt| weight per step).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import runs
from runs import SD3_CFG, CheckpointError, read_meta, settings
if TYPE_CHECKING:                                             # annotations only: numpy is imported where used
    import numpy as np

SD3_RES = 512                # px: the paper trains and evaluates SD3.5-M at 512 x 512 (Sec. 4)
T5_TOKENS = 128              # T5 prompt length at real scale: Flow-GRPO's, DiffusionNFT's and the released code's
# LoRA targets (teachers and students, both scales): the released code's list. "attn." keeps SD3.5-M's
# second attention of its dual-attention blocks (attn2) out, as the released adapters do; the toy has none.
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
TEXT_DTYPE = {"cuda": torch.float16, "cpu": torch.bfloat16}   # SD3's text encoders: half precision, as the released code



# ------------------------------------------------------------------------------------
# 1. time grid (Sec. 2)
# ------------------------------------------------------------------------------------
def time_grid(n_steps: int, shift: float = 1.0, sigma_min: float = 0.0) -> torch.Tensor:
    """1 = t_0 > ... > t_N = 0 as float64, with SD3's time shift t -> s t / (1 + (s - 1) t).

    ONE rule, two scales (deviation 2): sigma_min = 0 (the toy): shift(linspace(1, 0, N + 1)),
    ending exactly at 0. sigma_min > 0 (an SD3 base: its scheduler's sigma_min, runs.settings):
    what diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(N) samples - shift(linspace(1,
    sigma_min, N)) followed by 0, so the last step is tiny (.0089 -> 0 at shift 3, 10 steps)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if sigma_min > 0.0:
        u = torch.linspace(1.0, sigma_min, n_steps, dtype=torch.float64)
    else:
        u = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    t = shift * u / (1.0 + (shift - 1.0) * u)
    return torch.cat([t, t.new_zeros(1)]) if sigma_min > 0.0 else t


NEGLIGIBLE = 0.01            # a last step below this share of the per-step KL weight is not trained


def trained_steps(grid: torch.Tensor, a: float, fraction: float = 1.0) -> int:
    """How many leading steps of `grid` are trained: floor(fraction * N) (at least 1), less a last
    step that carries under NEGLIGIBLE of the summed per-step KL weight (velocity_kl_weight at noise
    level a). The scheduler's grid (deviation 2) ends .0089 -> 0: 0.05% of the Eq. 12 weight at 10
    steps, so 9 of 10 train - the released code's schedule; the toy's 0.1 -> 0 carries 10%: all 10."""
    n = len(grid) - 1
    k = max(1, min(n, math.floor(fraction * n)))
    w = [velocity_kl_weight(float(grid[j]), float(grid[j + 1]), a) for j in range(n)]
    return k - 1 if k == n > 1 and w[-1] < NEGLIGIBLE * sum(w) else k


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
# 4. what a velocity says about x_data, eps and the score (rectified flow, Sec. 2)
#    x_t = (1 - t) x_data + t eps and v = eps - x_data, so for a model's v at (x_t, t):
#    x_data_hat = x_t - t v, eps_hat = x_t + (1 - t) v, score = grad log p_t(x_t) = -eps_hat / t
#    (Tweedie: E[eps | x_t] = -t grad log p_t). The distribution-matching baselines (DMD, TDM;
#    ablations.py) read their gradients off these. t: a float or a (B,) tensor.
# ------------------------------------------------------------------------------------
def _per_sample(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.view(-1, *[1] * (x.dim() - 1)) if t.dim() == 1 else t


def data_from_velocity(x: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    return x - _per_sample(t, x) * v                           # x_data_hat = x_t - t v


def noise_from_velocity(x: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    return x + (1 - _per_sample(t, x)) * v                     # eps_hat = x_t + (1 - t) v


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    return -noise_from_velocity(x, v, t) / _per_sample(t, x)  # grad log p_t = -eps_hat / t  (t > 0)


def velocity_from_score(x: torch.Tensor, score: torch.Tensor, t) -> torch.Tensor:
    tb = _per_sample(t, x)
    return (-tb * score - x) / (1 - tb)                        # v = (eps_hat - x_t) / (1 - t), eps_hat = -t score  (t < 1)


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
    the plain base. The checkpoint files are runs.py's: checked there before anything loads
    (runs.resolve_checkpoint, check_model, check_adapter) and written by runs.save_adapter."""

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        # the device is detected: a GPU when there is one (real scale), else the CPU (toy scale)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        meta, adapter, path = runs.resolve_checkpoint(path)   # a teacher / student: its files checked first
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
        self.guidance, self.shift, self.sigma_min, self.meta = st["cfg"], st["shift"], st["sigma_min"], self.base_meta
        if adapter is not None:
            name = meta.get("task") or meta["role"]
            self.add_adapter(name, adapter)
            self.use(name)
            self.meta = meta

    @classmethod
    def from_transformer(cls, transformer, shift: float = 3.0, guidance: float = SD3_CFG, sigma_min: float | None = None,
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
        self.base_path, self.base_meta, self.meta = None, {}, {}            # no folder: runs.save_adapter is unavailable
        self.pipe = self.vae = self.text_encoder = self.tokenizer = None
        self.transformer = transformer.to(self.device, dtype).requires_grad_(False).eval()
        self.net, self.active, self.adapters = self.transformer, None, {}
        self.guidance, self.shift = float(guidance), float(shift)
        self.sigma_min = runs.sigma_min_of(shift) if sigma_min is None else float(sigma_min)   # SD3's scheduler
        return self

    # -- loading ------------------------------------------------------------------
    def _load_toy(self, path: Path) -> None:
        from diffusers import SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection
        runs.check_model(path)                                 # its folders and safetensors, named when missing
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
            runs.check_model(path)                             # every component model_index.json lists
        half = TEXT_DTYPE[self.device.type]                    # the text encoders (T5-XXL: 4.7B) in half precision
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype={"default": self.dtype, "text_encoder": half,
                                                                         "text_encoder_2": half, "text_encoder_3": half})
        except (OSError, ValueError, KeyError) as e:
            hint = "" if Path(path).is_dir() else "; " + runs.download_hint(path)
            raise CheckpointError(f"{path}: cannot load an SD3 pipeline ({str(e).splitlines()[0][:200]}){hint}") from None
        pipe.to(self.device)
        for m in filter(None, (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)):
            m.requires_grad_(False).eval()
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae

    # -- adapters -----------------------------------------------------------------
    def add_adapter(self, name: str, ckpt: str | Path | None = None, config=None) -> None:
        """Load a saved adapter (ckpt: a folder in PEFT's format, runs.check_adapter; written by
        runs.save_adapter) or create a fresh trainable one (config: peft.LoraConfig)."""
        from peft import PeftModel, get_peft_model
        if name in self.adapters:
            raise CheckpointError(f"{ckpt}: an adapter named {name!r} is already loaded (two teachers for one task?)")
        if ckpt is not None:
            ckpt = Path(ckpt)
            runs.check_adapter(ckpt)                           # each file there and readable, named when not
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

    @contextlib.contextmanager
    def merged(self):
        """For no-grad sampling: the active adapter folded into the base weights, W + (alpha / r) B A,
        the same function with one matmul per targeted layer instead of three (on the toy's 128-wide
        layers a rank-96 LoRA costs more than the layer itself: 64 images 15.3 s -> ~11.6 s).
        The base weights are kept aside and restored bit for bit on exit, not un-merged by a
        subtraction that would leave rounding behind. Not under autocast or in low precision, where
        the merged weight would round the adapter's small delta into the large base weight: there
        the adapter stays a separate branch, as before."""
        from peft.tuners.lora import LoraLayer
        layers = [m for m in self.net.modules() if isinstance(m, LoraLayer) and self.active in m.lora_A] \
            if self.active is not None else []
        if not layers or self.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(self.device.type):
            yield
            return
        kept = [m.get_base_layer().weight.detach().clone() for m in layers]
        try:
            with torch.no_grad():
                for m in layers:
                    m.merge(adapter_names=[self.active])
            yield
        finally:
            with torch.no_grad():
                for m, w in zip(layers, kept):
                    m.unmerge()                                # PEFT's bookkeeping: the layer is a branch again
                    m.get_base_layer().weight.copy_(w)         # and its base weight exactly the one before

    def adapter_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.net.named_parameters() if f".{name}." in k and "lora_" in k}

    # -- the three calls ------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        """Text conditioning for prompts and for the empty prompt (the CFG 'uncond' branch)."""
        if self.pipe is not None:
            e, ne, p, np_ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                     do_classifier_free_guidance=True,
                                                     negative_prompt=[""] * len(prompts),
                                                     max_sequence_length=T5_TOKENS)
            return {k: v.to(self.dtype) for k, v in {"emb": e, "pooled": p, "uemb": ne, "upooled": np_}.items()}
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
    grid, out = time_grid(n_steps, shift, policy.sigma_min), []
    with policy.merged():                                      # the active adapter folded in (not in low precision)
        for i in range(0, len(prompts), batch):
            cond = policy.encode(prompts[i:i + batch])
            x = initial_noise(policy.latent_shape(), seeds[i:i + batch], policy.device, policy.dtype)
            out.append(policy.decode(rollout(policy, cond, x, grid, 0.0, guidance)["states"][-1]))
    return np.concatenate(out)


def main(argv=None):                                          # python sampler.py CKPT --prompt P [--prompt Q]
    import numpy as np
    from PIL import Image
    ap = runs.Parser(description="Sample a checkpoint with the 40-step ODE sampler into a PNG grid.")
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
