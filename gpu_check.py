"""gpu_check.py - the real-scale path at SD3.5-Medium's full size, on one GPU, without downloads.

What a GPU session runs first (about 8 minutes on one 80-140 GB GPU), to check that the code the
README's real-scale command runs works at full size before any download:

  1. a StableDiffusion3Pipeline of SD3.5-M's architecture (2.2B transformer, CLIP-L, CLIP-G,
     T5-XXL, 16-channel VAE) with RANDOM weights, built on the GPU and saved as a diffusers folder;
  2. three published-style teachers: PEFT LoRA folders with random weights and no opd.json,
     passed as TASK=PATH with --base, as the paper's GenEvalTeacher/lora etc. are;
  3. distill.run: two Stage 2 rounds (3 prompts per task, the scheduler's 10-step grid, bf16
     autocast) and the final report - every row on the one backbone, evaluation sharded over the
     processes - with the reward models replaced by tiny random ones (no hub), so the numbers
     mean nothing; what is checked is that it runs, its time and its memory;
  4. bench_distill.py --size full --dtype bf16: fused / three-pass / floor per batch, peak GiB,
     adapters vs copies.

    python gpu_check.py --out runs/gpu_check                 # on a GPU: JSON summary in runs/gpu_check/
    python gpu_check.py --size tiny --out runs/gpu_check     # the same path on the CPU, tiny sizes (~30 s)

The tiny size is what the tests run. The summary (summary.json) holds each part's seconds, the peak
GPU memory, the results table's rows and the bench JSON.
"""
from __future__ import annotations

import functools
import json
import string
import sys
import time
from pathlib import Path

import torch

import bench_distill as B
import distill as D
import real_rewards as RR
import runs
import sampler as S

CHARS = list(string.ascii_lowercase + string.digits + " ")


def tokenizers():
    """CLIP and T5 tokenizers built in memory from a character vocabulary (no files)."""
    from transformers import CLIPTokenizer, T5TokenizerFast
    chars = [c for c in CHARS if c != " "]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}         # CLIP BPE: characters, no merges
    vocab.update({c: len(vocab) for c in chars})
    vocab.update({c + "</w>": len(vocab) for c in chars})
    t5 = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    t5 += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), T5TokenizerFast(vocab=t5, extra_ids=0)


def pipeline(size: str, device: torch.device):
    """SD3.5-M's pipeline (size "full": its published configs) or a tiny one with the same wiring,
    random weights, built on `device`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    clip_tok, t5_tok = tokenizers()
    full = size == "full"
    # (hidden, intermediate, layers, heads, act): CLIP-L and CLIP-G as SD3.5-M's text_encoder(_2)
    clips = [(768, 3072, 12, 12, "quick_gelu"), (1280, 5120, 32, 20, "gelu")] if full else [(8, 16, 2, 2, "gelu")] * 2
    t5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu") \
        if full else dict(d_model=64, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    tr = B.SD35M if full else dict(B.TINY, pooled_projection_dim=16, joint_attention_dim=64, sample_size=8,
                                   pos_embed_max_size=8)
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024) \
        if full else dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)
    torch.manual_seed(0)
    with torch.device(device):
        te, te2 = (CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
            hidden_act=act, projection_dim=h, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)) for h, i, n, a, act in clips)
        te3 = T5EncoderModel(T5Config(vocab_size=32128, decoder_start_token_id=0, **t5))
        transformer = SD3Transformer2DModel(**tr)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, scaling_factor=1.5305,
                            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, **vae)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te, tokenizer=clip_tok, text_encoder_2=te2,
                                    tokenizer_2=clip_tok, text_encoder_3=te3, tokenizer_3=t5_tok)


def teachers(base: Path, out: Path, seed: int = 1) -> list[str]:
    """Three PEFT LoRA folders (r 32, alpha 64, the released targets) with random weights and no
    opd.json on `base`: TASK=PATH entries for --teachers."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file
    net = SD3Transformer2DModel.from_pretrained(base / "transformer")
    entries, pm = [], None
    for k, task in enumerate(("geneval", "ocr", "aesthetic")):
        cfg = LoraConfig(r=32, lora_alpha=64, target_modules=S.LORA_TARGETS, init_lora_weights="gaussian")
        if pm is None:
            pm = get_peft_model(net, cfg, adapter_name=task)
        else:
            pm.add_adapter(task, cfg)
        g = torch.Generator().manual_seed(seed + k)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if f"lora_B.{task}." in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        d = out / task / "lora"
        d.mkdir(parents=True, exist_ok=True)
        save_file({n: v.contiguous() for n, v in get_peft_model_state_dict(pm, adapter_name=task).items()},
                  str(d / "adapter_model.safetensors"))
        conf = pm.peft_config[task].to_dict() | {"base_model_name_or_path": None}
        (d / "adapter_config.json").write_text(json.dumps({k_: sorted(v) if isinstance(v, set) else v
                                                           for k_, v in conf.items()}, default=str))
        entries.append(f"{task}={d}")
    return entries


def reward_models(out: Path) -> None:
    """Tiny random CLIP and Mask2Former folders standing in for the hub's reward models (PickScore,
    the GenEval detector and colour classifier): the real scorers' code, no downloads."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerConfig,
                              Mask2FormerImageProcessor, SwinConfig)
    clip_tok, _ = tokenizers()
    text = dict(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(out / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tok).save_pretrained(out / "clip")
    sw = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                    window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    names = list(RR.COCO_CLASSES)
    RR._mask2former()(Mask2FormerConfig(
        backbone_config=sw, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_layers=1, decoder_layers=2,
        num_queries=6, encoder_feedforward_dim=32, dim_feedforward=32, num_attention_heads=2,
        use_pretrained_backbone=False, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})).save_pretrained(out / "mask2former")
    Mask2FormerImageProcessor().save_pretrained(out / "mask2former")
    scorers = {RR.GenEvalScorer: lambda: RR.GenEvalScorer(str(out / "mask2former"), colour=str(out / "clip"), short_edge=64),
               RR.PickScore: lambda: RR.PickScore(str(out / "clip"), str(out / "clip"))}
    RR._scorer = functools.cache(lambda cls: scorers[cls]())


def main(argv=None) -> dict:
    ap = runs.Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="full", choices=("full", "tiny"), help="full: SD3.5-M on a GPU; tiny: the CPU test (default: full)")
    ap.add_argument("--out", default="runs/gpu_check", help="where the pipeline, teachers, run and summary go (default: runs/gpu_check)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.size == "full" and not cuda:
        ap.error("--size full needs a CUDA GPU (SD3.5-M with T5-XXL: ~25 GB of weights); use --size tiny here")
    dev = torch.device("cuda" if cuda else "cpu")
    out, times = Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = out / "sd3"
    if not (base / "model_index.json").is_file():             # ---- 1. the pipeline, random weights ----
        pipe = pipeline(args.size, dev)
        for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            m.to(torch.float16)                                # saved as distill.py holds them (half)
        pipe.save_pretrained(base)
        del pipe
        torch.cuda.empty_cache() if cuda else None
    times["build_s"] = time.time() - t0
    entries = teachers(base, out / "teachers")                 # ---- 2. three published-style teachers ----
    reward_models(out / "rewards")
    times["teachers_s"] = time.time() - t0 - times["build_s"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()                                           # ---- 3. two rounds + the final report ----
    res = D.run(D.DistillConfig(base=str(base), teachers=entries, out=str(out / "distill"), rounds=2, prompts=3,
                                eval_every=0, eval_n=4, eval_heldout_n=2, bf16=cuda, fresh=True))
    times["distill_s"] = time.time() - t1
    summary = {"size": args.size, "device": torch.cuda.get_device_name() if cuda else "cpu", "times": times,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               "rows": [r["name"] for r in res["rows"]], "config": json.loads((out / "distill" / "config.json").read_text())}
    t2 = time.time()                                           # ---- 4. the benchmark table ----
    B.main(["--size", args.size, "--repeats", "1", "--json", str(out / "bench.json")]
           + (["--dtype", "bf16"] if cuda else ["--batches", "1", "--threads", "1"]))
    times["bench_s"] = time.time() - t2
    summary["bench"] = json.loads((out / "bench.json").read_text())
    runs.write_json_atomic(out / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("size", "device", "times", "peak_gib", "rows")}, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
