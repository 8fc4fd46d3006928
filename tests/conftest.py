"""tests/conftest.py - what the integration tests share: the script runner, the tiny toy base and
its teachers, the tiny offline SD3 pipeline and LoRA checkpoints on it, and small helpers.

The tests here run the project's scripts (in-process through their run() / main(), or as
subprocesses with cwd = the repository root) on tiny models written to tmp folders; the math
itself is tested in ../test_opd.py. `python -m pytest test_opd.py tests -q` runs both tiers.
Helpers are plain functions, imported by the test modules (`from conftest import _cli, ...`).
"""
import json
import os
import string
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")                # the tests never reach a model hub
import huggingface_hub.constants                            # noqa: E402 (read at import: set it here too)
import pytest                                               # noqa: E402
import torch                                                # noqa: E402

huggingface_hub.constants.HF_HUB_OFFLINE = True

REPO = Path(__file__).resolve().parent.parent              # the repository root (tests/ is one level down)
if str(REPO) not in sys.path:                               # the project's modules, however pytest is started
    sys.path.insert(0, str(REPO))

import distill as D                                         # noqa: E402
import rewards as R                                         # noqa: E402
import runs                                                 # noqa: E402
import sampler as S                                         # noqa: E402
import teachers as T                                        # noqa: E402
import toy                                                  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread, here and in the scripts the tests
    start (with 2, every op waits for a descheduled core: bench_distill.py measured 0.43 s vs 15-22 s
    a round; the experiments.py smoke ran 93 s vs over 16 min with another job on the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- running the scripts ------------------------------------------------------------------
def _cli(*args, cwd=REPO, env=None, timeout=300):
    """Run a repo script in a subprocess (one torch thread, as one_thread); returns CompletedProcess (text)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


def _tree(path: Path) -> dict:
    """Every file under path with its bytes' hash: to check that a refusal touched nothing."""
    import hashlib
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def _refused(capsys, fn, argv, progress=False):
    """fn(argv) (a script's main) exits 2 with one line on stderr, "error: ..."; returns the line.
    progress=True: loading progress bars (diffusers / transformers, on stderr) may come before it."""
    capsys.readouterr()                                        # only this call's output counts
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    if progress:
        err = [l for l in err if l.strip() and not ("it/s]" in l or "?it/s" in l or "s/it]" in l)]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), (e.value.code, err)
    return err[0]


# ---- the tiny toy base: pretrained for a few steps, in the checkpoint contract; its teachers ----
@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("toybase")
    cfg = toy.PretrainConfig(out=str(d / "run"), steps=3, batch=8, width=32, layers=1, save_every=2)
    ck = toy.pretrain(cfg)
    # 3 steps leave the zero-initialised adaLN gates and output layer near 0, so adapters would
    # barely change the output; give every weight a small random kick so the tests see real effects
    from safetensors.torch import load_file, save_file
    f = ck / "transformer" / "diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(0)
    sd = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in load_file(str(f)).items()}
    save_file(sd, str(f), metadata={"format": "pt"})
    runs.export_checkpoint(ck, d / "base")
    return d / "base"


def _make_teacher(base, out, task, seed, cfg=None, rank=4):
    from peft import LoraConfig
    pol = S.Policy(str(base))
    pol.add_adapter("t", config=LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=S.LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in pol.adapter_params("t").items():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    runs.save_adapter(pol, "t", out, {"role": "teacher", "task": task, "cfg": cfg or pol.guidance})
    return out


@pytest.fixture(scope="session")
def tiny_teachers(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return [str(_make_teacher(tiny_base, d / t, t, i, cfg=1.0 if t == "geneval" else None))
            for i, t in enumerate(R.TASKS)]


def _dcfg(tmp, teachers, config=None, **kw):
    """A tiny Stage 2 config (distill.DistillConfig, or config=ablations.AblationConfig)."""
    base = dict(teachers=list(teachers), out=str(tmp), rounds=3, prompts=4, steps=3, eval_every=2,
                eval_small=2, eval_n=8, eval_heldout_n=2, rank=4, alpha=8)
    return (config or D.DistillConfig)(**{**base, **kw})


def _student(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "checkpoint" / "adapter_model.safetensors"))


# ---- the policy at real scale: a tiny random SD3 pipeline built offline, LoRA teachers on it ----
_CLIP_LEN = 16            # CLIP tokenizer model_max_length (= CLIP max_position_embeddings)
_T5_LEN = 128             # T5 tokens per prompt at real scale: the released code's (sampler.T5_TOKENS)


def _tiny_sd3_pipeline():
    """A StableDiffusion3Pipeline with tiny random components; no files, no network.

    Widths must line up the way SD3's encode_prompt combines them: the two CLIP hidden states
    are concatenated (8 + 8) and zero-padded to the T5 width (32) = joint_attention_dim; the
    pooled embedding is the concat of the two CLIP projections (8 + 8) = pooled_projection_dim.
    caption_projection_dim must equal heads x head_dim (2 x 8). VAE: 2 blocks -> factor 2, so
    16 px images <-> 4 x 8 x 8 latents; pos_embed_max_size 8 >= 8 / patch 2."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)
    chars = list(string.ascii_lowercase + string.digits)
    # CLIP BPE: characters, and characters that end a word ("</w>"); no merges needed.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) for c in chars})
    vocab.update({c + "</w>": len(vocab) for c in chars})
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_LEN)
    # T5 Unigram: pad / eos / unk first (ids 0, 1, 2), then pieces with log-probs.
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    t5_vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    t5_tok = T5TokenizerFast(vocab=t5_vocab, extra_ids=0)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=_CLIP_LEN, projection_dim=8,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))

    with torch.random.fork_rng():
        torch.manual_seed(0)
        te, te2 = clip(), clip()
        te3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2, decoder_start_token_id=0))
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            pooled_projection_dim=16, pos_embed_max_size=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                            scaling_factor=1.5, shift_factor=0.1)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=te3, tokenizer_3=t5_tok)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """The tiny pipeline saved as a standard diffusers folder (model_index.json + components)."""
    d = tmp_path_factory.mktemp("sd3") / "pipe"
    _tiny_sd3_pipeline().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sd3_policy(sd3_dir):
    """Read-only shared policy in float64 (tests that add adapters load their own)."""
    return S.Policy(str(sd3_dir), dtype=F64)


_PROMPTS = ["ab 12", "a red cat"]


def _probe(policy, t=0.6):
    """Fixed inputs for comparing velocities across policies."""
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(11), dtype=F64)
    return x, t, policy.encode(_PROMPTS)


def _lora_config():
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, target_modules=S.LORA_TARGETS, init_lora_weights=True)


def _perturb_lora_b(policy, name, seed):
    """Random lora_B (fresh LoRA has B = 0, a no-op). Values are float32-representable, so
    runs.save_adapter's float32 file reloads them bit-exactly into a float64 policy."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for k, p in policy.adapter_params(name).items():
        if "lora_B" in k:
            p.data = (0.5 * torch.randn(p.shape, generator=gen)).to(p.dtype)
            n += 1
    assert n > 0


@pytest.fixture(scope="module")
def lora_ckpts(sd3_dir, tmp_path_factory):
    """Two teachers (ocr, geneval) with different perturbations on one backbone, saved; plus the
    reference velocities of the saving policy (base, fresh adapter, each teacher)."""
    root = tmp_path_factory.mktemp("lora")
    pol = S.Policy(str(sd3_dir), dtype=F64)
    x, t, c = _probe(pol)
    v = lambda: pol.velocity(x, t, c, 1.0)
    with torch.no_grad():
        ref = {"base": v()}
        for seed, name in enumerate(["ocr", "geneval"]):
            pol.add_adapter(name, config=_lora_config())
            pol.use(name)
            ref[f"{name}_fresh"] = v()
            _perturb_lora_b(pol, name, seed)
            ref[name] = v()
            runs.save_adapter(pol, name, root / f"teacher_{name}", {"role": "teacher", "task": name, "cfg": 1.0})
    return {"root": root, "ref": ref, "ocr": root / "teacher_ocr", "geneval": root / "teacher_geneval"}


# ---- tiny Stage 1 (teachers.py) runs ----------------------------------------------------------
TINY_RL = dict(prompts=2, group=2, steps=2, eval_every=0, eval_n=0, eval_heldout_n=0, rank=4, alpha=8)


def _cfg(base, out, **kw):
    """A tiny Stage 1 config (teachers.TeacherConfig): 2 prompts x 2 images, 2 steps, rank 4, no evaluation."""
    return T.TeacherConfig(base=str(base), out=str(out), **(TINY_RL | kw))


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _argv(base, out, *extra):
    """The same tiny Stage 1 run as command-line flags."""
    return ["--base", str(base), "--out", str(out), "--prompts", "2", "--group", "2", "--steps", "2",
            "--eval-every", "0", "--eval-n", "0", "--eval-heldout-n", "0", "--rank", "4", "--alpha", "8", *extra]
