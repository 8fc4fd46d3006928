"""Real scale, offline: the policy on a tiny random StableDiffusion3Pipeline (encode, CFG velocity,
VAE decode, rollout, seeded sampling), LoRA teachers on it (saved, reloaded, switched) and bad
checkpoints; the prompt folders and the task table of an SD3 base; the real rewards (PickScore /
ClipScore on a tiny CLIP, Mask2Former detections and GenEval's rules, PP-OCR at 512 px); and
distill.py / evaluate.py on published-layout inputs (plain diffusers folder, PEFT adapters, hub ids)."""
import json
import os
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import distill as D
import evaluate as E
import real_rewards as RR
import rewards as R
import runs
import sampler
import toy
from conftest import F64, REPO, _CLIP_LEN, _PROMPTS, _T5_LEN, _cli, _probe, _refused, _student


# ---- the policy on a tiny random SD3 pipeline, built offline (conftest.sd3_dir) -------------
def test_sd3_encode_shapes(sd3_policy):
    """Shapes from the pipeline's config: CLIP + T5 tokens, joint/pooled widths; the uncond
    branch is the empty prompt, the same for every row."""
    cfg = sd3_policy.transformer.config
    c = sd3_policy.encode(_PROMPTS)
    assert set(c) == {"emb", "pooled", "uemb", "upooled"}
    assert c["emb"].shape == c["uemb"].shape == (2, _CLIP_LEN + _T5_LEN, cfg.joint_attention_dim)
    assert c["pooled"].shape == c["upooled"].shape == (2, cfg.pooled_projection_dim)
    assert all(v.dtype == F64 for v in c.values())
    empty = sd3_policy.encode([""])
    torch.testing.assert_close(c["uemb"], empty["emb"].expand(2, -1, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(c["upooled"], empty["pooled"].expand(2, -1), rtol=0, atol=1e-12)
    assert (c["emb"][0] - c["emb"][1]).abs().max() > 1e-3          # prompts reach the embedding
    assert sd3_policy.latent_shape() == (4, 8, 8)


def test_sd3_velocity_cfg(sd3_policy):
    """Oracle: two separate direct transformer calls (timestep = 1000 t). g = 1 is the
    conditional pass; g != 1 is v_u + g (v_c - v_u); guidance=None uses the policy's own: an SD3
    pipeline folder without opd.json samples at the paper's 4.5, with its scheduler's shift (3.0) and
    sigma_min (the scheduler's own attribute: what its set_timesteps linspaces to)."""
    x, t, c = _probe(sd3_policy)
    tr = sd3_policy.pipe.transformer
    ts = torch.full((2,), 1000.0 * t, dtype=F64)
    with torch.no_grad():
        vc = tr(hidden_states=x, encoder_hidden_states=c["emb"], pooled_projections=c["pooled"],
                timestep=ts, return_dict=False)[0]
        vu = tr(hidden_states=x, encoder_hidden_states=c["uemb"], pooled_projections=c["upooled"],
                timestep=ts, return_dict=False)[0]
        assert (vc - vu).abs().max() > 1e-4                        # else the CFG check is vacuous
        torch.testing.assert_close(sd3_policy.velocity(x, t, c, 1.0), vc, rtol=1e-10, atol=1e-12)
        assert sd3_policy.guidance == 4.5 and sd3_policy.shift == 3.0
        sigma_min = float(sd3_policy.pipe.scheduler.sigma_min)                # diffusers' float32 value
        assert runs.settings(sd3_policy.base_path) == {"base": sd3_policy.base_path, "cfg": 4.5, "shift": 3.0, "kind": "sd3",
                                                       "sigma_min": pytest.approx(sigma_min, rel=1e-6)}
        assert sd3_policy.sigma_min == pytest.approx(sigma_min, rel=1e-6) and 0 < sigma_min < 0.01
        torch.testing.assert_close(sd3_policy.velocity(x, t, c, None), vu + 4.5 * (vc - vu), rtol=1e-10, atol=1e-12)
        for g in (0.0, 4.5):
            torch.testing.assert_close(sd3_policy.velocity(x, t, c, g), vu + g * (vc - vu),
                                       rtol=1e-10, atol=1e-12)


def test_sd3_decode_uint8(sd3_policy):
    """Oracle: the VAE by hand, z / scaling_factor + shift_factor, then [-1, 1] -> uint8 NHWC."""
    x = _probe(sd3_policy)[0]
    img = sd3_policy.decode(x)
    assert img.dtype == np.uint8 and img.shape == (2, 16, 16, 3)
    vae = sd3_policy.vae
    with torch.no_grad():
        px = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    ref = ((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("a", [0.0, 0.7])
def test_sd3_rollout(sd3_policy, a):
    """Shapes; x_{j+1} = mu_j + sbar_j eps_j exactly; mu_j recomputed from the policy's velocity
    and step_mean (Eq. 7); log-probs (only for a > 0) equal gaussian_logprob; seeded."""
    grid = sampler.time_grid(4, 3.0)
    c = sd3_policy.encode(_PROMPTS)
    x1 = sampler.initial_noise(sd3_policy.latent_shape(), [0, 1], dtype=F64)
    run = lambda seed: sampler.rollout(sd3_policy, c, x1, grid, a, 2.0, torch.Generator().manual_seed(seed))
    out = run(0)
    shp = (2, 4, 8, 8)
    assert out["states"].shape == (5, *shp) and out["means"].shape == out["noises"].shape == (4, *shp)
    assert out["stds"].shape == (4,) and out["states"].dtype == F64
    assert torch.equal(out["states"][0], x1)
    assert ("logprobs" in out) == (a > 0)
    for j in range(4):
        t, t_next = grid[j].item(), grid[j + 1].item()
        assert out["stds"][j].item() == sampler.step_std(t, t_next, a)
        assert torch.equal(out["states"][j + 1], out["means"][j] + out["stds"][j].item() * out["noises"][j])
        with torch.no_grad():
            v = sd3_policy.velocity(out["states"][j], t, c, 2.0)
        torch.testing.assert_close(out["means"][j], sampler.step_mean(out["states"][j], v, t, t_next, a),
                                   rtol=1e-12, atol=1e-12)
        if a > 0:
            assert out["noises"][j].abs().max() > 0
            torch.testing.assert_close(out["logprobs"][j], sampler.gaussian_logprob(
                out["states"][j + 1], out["means"][j], out["stds"][j].item()), rtol=1e-12, atol=1e-12)
        else:
            assert not out["noises"][j].any()
    assert torch.equal(run(0)["states"], out["states"])            # same seed -> same trajectory
    if a > 0:
        assert not torch.equal(run(1)["states"][-1], out["states"][-1])


def test_sd3_sample_seeded(sd3_policy):
    """sample() -> uint8 (B, H, W, 3); identical for identical seeds; image i depends only on
    (prompt i, seed i), not on the rest of the batch or the batch size (paired evaluation)."""
    shape = sd3_policy.latent_shape()
    n3 = sampler.initial_noise(shape, [7, 8, 9], dtype=F64)
    assert torch.equal(n3[1], sampler.initial_noise(shape, [8], dtype=F64)[0])
    assert not torch.equal(n3[1], n3[2])
    prompts = ["ab", "cd 3", "ef"]
    kw = dict(n_steps=3, shift=3.0, guidance=2.0)
    imgs = sampler.sample(sd3_policy, prompts, [7, 8, 9], **kw)
    assert imgs.dtype == np.uint8 and imgs.shape == (3, 16, 16, 3)
    assert np.array_equal(imgs, sampler.sample(sd3_policy, prompts, [7, 8, 9], **kw))
    assert np.array_equal(imgs, sampler.sample(sd3_policy, prompts, [7, 8, 9], batch=2, **kw))
    assert np.array_equal(imgs[1], sampler.sample(sd3_policy, ["cd 3"], [8], **kw)[0])


# ---- LoRA adapters on the tiny pipeline's transformer  (oracle: the saving policy's outputs) ----
def test_lora_fresh_is_noop_perturbed_changes(lora_ckpts):
    ref = lora_ckpts["ref"]
    for name in ("ocr", "geneval"):
        torch.testing.assert_close(ref[f"{name}_fresh"], ref["base"], rtol=0, atol=1e-12)
        assert (ref[name] - ref["base"]).abs().max() > 1e-3
    assert (ref["ocr"] - ref["geneval"]).abs().max() > 1e-3


def _json_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_strings(k)
            yield from _json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_strings(v)


def test_lora_saved_folder_layout(lora_ckpts, sd3_dir):
    """PEFT files + opd.json; base.path relative to the checkpoint and resolving to the base;
    base.hash = content_hash(base); no absolute path in any JSON file of the folder."""
    d = lora_ckpts["ocr"]
    for f in ("adapter_config.json", "adapter_model.safetensors", runs.META):
        assert (d / f).is_file(), f
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    meta = json.loads((d / runs.META).read_text())
    assert (meta["role"], meta["task"], meta["cfg"]) == ("teacher", "ocr", 1.0)
    assert not os.path.isabs(meta["base"]["path"])
    assert (d / meta["base"]["path"]).resolve() == Path(sd3_dir).resolve()
    assert meta["base"]["hash"] == runs.content_hash(sd3_dir)
    for f in d.glob("*.json"):
        for s in _json_strings(json.loads(f.read_text())):
            assert not os.path.isabs(s) and str(lora_ckpts["root"].parent) not in s, (f.name, s)
    assert not list(d.parent.glob("*.tmp")) and not list(d.parent.glob("*.old"))   # atomic write


def test_lora_reload_single(lora_ckpts, sd3_dir):
    """Policy(teacher folder) loads base + adapter, activates it, reproduces the saver's output."""
    for name in ("ocr", "geneval"):
        pol = sampler.Policy(str(lora_ckpts[name]), dtype=F64)
        assert pol.active == name and set(pol.adapters) == {name}
        assert Path(pol.base_path).resolve() == Path(sd3_dir).resolve()
        x, t, c = _probe(pol)
        with torch.no_grad():
            torch.testing.assert_close(pol.velocity(x, t, c, 1.0), lora_ckpts["ref"][name], rtol=1e-10, atol=1e-12)


def test_lora_two_adapters_one_backbone(lora_ckpts, sd3_dir):
    """add_adapter x 2 on one backbone: use(name) switches, each matches its single-adapter
    policy, adding an adapter does not change the active one, use(None) is the plain base."""
    pol = sampler.Policy(str(sd3_dir), dtype=F64)
    ref = lora_ckpts["ref"]
    x, t, c = _probe(pol)
    v = lambda: pol.velocity(x, t, c, 1.0)
    with torch.no_grad():
        pol.add_adapter("ocr", lora_ckpts["ocr"])
        assert pol.active is None
        torch.testing.assert_close(v(), ref["base"], rtol=1e-10, atol=1e-12)
        pol.use("ocr")
        torch.testing.assert_close(v(), ref["ocr"], rtol=1e-10, atol=1e-12)
        pol.add_adapter("geneval", lora_ckpts["geneval"])
        assert pol.active == "ocr"
        torch.testing.assert_close(v(), ref["ocr"], rtol=1e-10, atol=1e-12)
        pol.use("geneval")
        torch.testing.assert_close(v(), ref["geneval"], rtol=1e-10, atol=1e-12)
        pol.use(None)
        torch.testing.assert_close(v(), ref["base"], rtol=1e-10, atol=1e-12)
        pol.use("ocr")                                             # disable_adapter was undone
        torch.testing.assert_close(v(), ref["ocr"], rtol=1e-10, atol=1e-12)
    with pytest.raises(KeyError):
        pol.use("aesthetic")


def test_teacher_policy_uses_its_own_cfg(lora_ckpts, tmp_path):
    """docs/formats.md, "Evaluation protocol": each checkpoint's own CFG scale from its metadata.
    Policy(teacher) must take guidance and meta from the teacher's opd.json, not from its base's."""
    d = lora_ckpts["root"] / "teacher_cfg3"
    shutil.copytree(lora_ckpts["ocr"], d)
    meta = json.loads((d / runs.META).read_text())
    meta["cfg"] = 3.0
    (d / runs.META).write_text(json.dumps(meta))
    pol = sampler.Policy(str(d), dtype=F64)
    assert pol.guidance == 3.0
    assert pol.meta.get("task") == "ocr"


# ---- bad input: one CheckpointError that names the folder -------------------------------
def _raises_naming(path, *words):
    """Policy(path) must raise CheckpointError whose message names the path (and words)."""
    with pytest.raises(runs.CheckpointError) as e:
        sampler.Policy(str(path))
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg                                         # one clear line


def test_bad_empty_folder(tmp_path):
    _raises_naming(tmp_path)


@pytest.mark.parametrize("path", ["/nonexistent_opd_dir/model", "nonexistent_opd_dir",
                                  "./nonexistent_opd_dir/model", "a/b/nonexistent_opd_dir"])
def test_bad_nonexistent_path(path):
    """Absolute, relative, ./-relative and multi-slash paths are never hub ids: no download."""
    assert not Path(path).exists()
    _raises_naming(path)


@pytest.mark.parametrize("part", ["vae", "transformer", "text_encoder", "text_encoder_3",
                                  "tokenizer", "tokenizer_3"])
def test_bad_missing_component(sd3_dir, tmp_path, part):
    """A pipeline folder without one of its components. (transformers 5 would silently build an
    EMPTY-vocabulary tokenizer for a missing tokenizer folder: every prompt becomes <unk>.)"""
    d = tmp_path / "model"
    shutil.copytree(sd3_dir, d)
    shutil.rmtree(d / part)
    _raises_naming(d, part)


@pytest.mark.parametrize("part,fname", [("transformer", "diffusion_pytorch_model.safetensors"),
                                        ("vae", "diffusion_pytorch_model.safetensors"),
                                        ("text_encoder", "model.safetensors"),
                                        ("text_encoder_3", "model.safetensors")])
@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_bad_corrupt_safetensors(sd3_dir, tmp_path, part, fname, how):
    d = tmp_path / "model"
    shutil.copytree(sd3_dir, d)
    f = d / part / fname
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" * 64)
    _raises_naming(d, part)


def test_bad_teacher_base_hash(lora_ckpts):
    """A teacher whose recorded base hash does not match its base folder."""
    d = lora_ckpts["root"] / "teacher_badhash"                      # sibling: base.path still valid
    shutil.copytree(lora_ckpts["ocr"], d)
    meta = json.loads((d / runs.META).read_text())
    meta["base"]["hash"] = "0" * 16
    (d / runs.META).write_text(json.dumps(meta))
    _raises_naming(d, "hash")


def test_bad_teacher_missing_base_or_meta(lora_ckpts):
    """A teacher moved away from its base, and a teacher with an unreadable opd.json."""
    d = lora_ckpts["root"] / "moved" / "deeper" / "teacher_ocr"
    shutil.copytree(lora_ckpts["ocr"], d)
    _raises_naming(d)
    d2 = lora_ckpts["root"] / "teacher_badjson"
    shutil.copytree(lora_ckpts["ocr"], d2)
    (d2 / runs.META).write_text("{not json")
    _raises_naming(d2, runs.META)


def test_bad_adapter_twice(lora_ckpts, sd3_dir):
    """Two adapters with one name (two teachers for one task) -> CheckpointError naming the folder."""
    pol = sampler.Policy(str(sd3_dir), dtype=F64)
    pol.add_adapter("ocr", lora_ckpts["ocr"])
    with pytest.raises(runs.CheckpointError) as e:
        pol.add_adapter("ocr", lora_ckpts["geneval"])
    assert str(lora_ckpts["geneval"]) in str(e.value)


# ---- prompt folders, the task table of an SD3 base, bad prompt files -----------------------
def test_shipped_prompt_folder_is_usable():
    """The example prompt set (prompts/) reads for every task and split, in the anchors' layout;
    GenEval's training prompts never repeat a test prompt; every metadata record is valid."""
    for task in toy.TASK_NAMES:
        for split in R.SPLITS:
            ps, specs = RR.read_prompts(RR.PROMPT_DIR, task, split)
            assert len(ps) >= 16, (task, split, len(ps))
            if task == "geneval":
                assert set(ps) == set(specs) and all(not RR._geneval_meta_ok(m) for m in specs.values())
    tr, te = (set(RR.read_prompts(RR.PROMPT_DIR, "geneval", s)[0]) for s in R.SPLITS)
    assert not tr & te, f"GenEval train prompts repeat test prompts: {sorted(tr & te)[:3]}"
    assert {m["tag"] for m in RR.read_prompts(RR.PROMPT_DIR, "geneval", "train")[1].values()} == set(RR.GENEVAL_TAGS)


def test_geneval_prompt_generator(tmp_path):
    """The generator writes GenEval metadata from the templates (80 classes, 10 colours, six tags),
    leaves out every prompt of the test file it is given, and never overwrites."""
    test_f = RR.PROMPT_DIR / "geneval" / "test_metadata.jsonl"
    r = _cli("evaluate.py", "--geneval-prompts", tmp_path / "p", "--count", "1200", "--exclude", test_f)
    assert r.returncode == 0, r.stderr[-2000:]
    ps, specs = RR.read_prompt_file(tmp_path / "p" / "geneval" / "train_metadata.jsonl", "geneval")
    test = set(RR.read_prompt_file(test_f, "geneval")[0])
    assert len(ps) == len(set(ps)) == 1200 and not set(ps) & test
    tags = {t: [m["tag"] for m in specs.values()].count(t) for t in RR.GENEVAL_TAGS}
    assert 70 <= tags["single_object"] <= 80 and min(tags.values()) >= 70, tags   # 80 classes: single runs out
    for m in specs.values():
        if m["tag"] == "counting":
            k = m["include"][0]["count"]
            assert 2 <= k <= 4 and m["exclude"] == [{"class": m["include"][0]["class"], "count": k + 1}]
        if m["tag"] == "position":
            assert m["prompt"].endswith(m["include"][0]["class"]) and m["include"][1]["position"][1] == 0
    classes = {r["class"] for m in specs.values() for r in m["include"]}
    assert len(classes) >= 70 and classes <= set(RR.COCO_CLASSES)
    # the same prompts drawn without the exclusion do hit the test set: the exclusion is doing work
    assert set(p["prompt"] for p in RR.geneval_prompts(1200, 0)) & test
    before = (tmp_path / "p" / "geneval" / "train_metadata.jsonl").read_bytes()
    again = _cli("evaluate.py", "--geneval-prompts", tmp_path / "p", "--count", "5")
    assert again.returncode == 2 and "exists" in again.stderr.strip().splitlines()[-1]
    assert (tmp_path / "p" / "geneval" / "train_metadata.jsonl").read_bytes() == before


@pytest.mark.parametrize("task,line,words", [
    ("ocr", "", "no usable prompt line"),
    ("ocr", "a sign without a quoted target", "double quotes"),
    ("aesthetic", "\n\n", "no usable prompt line"),
    ("geneval", "{not json", "not a JSON object"),
    ("geneval", '{"tag": "counting", "prompt": "two cats", "include": [{"class": "kitten", "count": 2}]}', "COCO"),
    ("geneval", '{"tag": "position", "prompt": "a cat left of a dog", "include": [{"class": "cat", "count": 1, '
                '"position": ["left of", 0]}]}', "earlier include"),
])
def test_bad_prompt_file_one_line(tmp_path, task, line, words):
    """A prompt file that cannot be used is one line naming the file (and line), before anything runs."""
    d = tmp_path / "prompts"
    shutil.copytree(RR.PROMPT_DIR, d)
    f = d / RR.REAL_FOLDERS[task] / ("train_metadata.jsonl" if task == "geneval" else "train.txt")
    f.write_text(line + "\n")
    with pytest.raises(runs.CheckpointError, match=words) as e:
        RR.real_tasks(d)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_the_base_picks_the_task_table(tiny_base, sd3_dir):
    """Same three task names at both scales: a toy base takes the toy prompts, an SD3 base the prompt
    folder's, with the aesthetic task scored by PickScore and the teachers' CFG from the table."""
    assert RR.tasks_for(tiny_base) is R.TASKS
    real = RR.tasks_for(sd3_dir)
    assert list(real) == list(R.TASKS)
    assert real["ocr"].train == RR.read_prompts(RR.PROMPT_DIR, "ocr", "train")[0]
    assert real["aesthetic"].metric == "PickScore" and real["aesthetic"].test[0].startswith("A green colored bicycle")
    assert {t: v.teacher_cfg for t, v in real.items()} == {"geneval": 1.0, "ocr": 4.5, "aesthetic": 4.5}
    proto = E.protocol("geneval", "test", 4, 1.0, 3.0, 16, real)
    assert proto["prompt_files"] == real["geneval"].source and "prompt_files" not in E.protocol("geneval", "test", 4, 1.0, 1.0, 32)


# ---- real-scale rewards: tiny random CLIP / Mask2Former saved as model folders, hand-made detections, PP-OCR at 512 px ----
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])


CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (hidden 16, 1 layer, 32 px images, patch 8) with a character-level
    CLIPTokenizer and a 32 px CLIPImageProcessor, saved as a model folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    chars = list(string.ascii_lowercase + string.digits)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}          # CLIP BPE: characters, no merges
    vocab.update({c: len(vocab) for c in chars})
    vocab.update({c + "</w>": len(vocab) for c in chars})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    with torch.no_grad():
        model.logit_scale.fill_(3.0)                 # e^3 = 20.1: the scale is visible in PickScore
    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(d)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return d


def test_pickscore_and_clipscore_by_hand(clip_dir):
    """PickScore = logit_scale.exp() x cosine and ClipScore = the cosine, against the embeddings
    computed by hand (pixels normalised with CLIP's mean / std, tokens from the tokenizer)."""
    from transformers import CLIPModel, CLIPTokenizer
    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red cat", "two dogs on a bench", "x"]
    px = torch.tensor(((imgs / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        img = RR._pooled(model.get_image_features(pixel_values=px))
        t = tok(prompts, padding=True, return_tensors="pt")
        txt = RR._pooled(model.get_text_features(**t))
        cos = ((img / img.norm(dim=-1, keepdim=True)) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
        want_pick = (cos * model.logit_scale.exp()).double().numpy()
    pick = RR.PickScore(str(clip_dir), str(clip_dir))(imgs, prompts)
    clip = RR.ClipScore(str(clip_dir))(imgs, prompts)
    assert pick.dtype == np.float64 and pick.shape == (3,)
    np.testing.assert_allclose(pick, want_pick, rtol=1e-4, atol=1e-5, err_msg=f"PickScore {pick} vs {want_pick}")
    np.testing.assert_allclose(clip, cos.double().numpy(), rtol=1e-4, atol=1e-6, err_msg=f"ClipScore {clip}")
    np.testing.assert_allclose(pick / clip, np.exp(3.0), rtol=1e-4)
    assert np.ptp(clip) > 1e-4, f"the prompts do not reach the score: {clip}"


def test_clip_colour_templates(clip_dir):
    """ClipColour's class head is GenEval's: per colour, the 3 templates' normalised text
    embeddings averaged and renormalised; the answer is the argmax over the 10 colours."""
    cc = RR.ClipColour(str(clip_dir))
    head = cc._head("dog")
    assert head.shape == (10, 8) and torch.allclose(head.norm(dim=-1), torch.ones(10), atol=1e-5)
    texts = [t.format(c="orange", cls="dog") for t in cc.TEMPLATES]
    assert texts == ["a photo of a orange dog", "a photo of a orange-colored dog", "a photo of a orange object"]
    with torch.no_grad():
        e = RR._pooled(cc.model.get_text_features(**cc.processor(text=texts, padding=True, return_tensors="pt")))
    want = torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(head[1], want, atol=1e-5, rtol=1e-5)
    crops = list(np.random.default_rng(1).integers(0, 256, (4, 20, 30, 3), dtype=np.uint8))
    got = cc(crops, "dog")
    assert len(got) == 4 and set(got) <= set(RR.GENEVAL_COLORS) and cc([], "dog") == []


# ---- mask2former_detections --------------------------------------------------------
def _rect_logits(r0, r1, c0, c1, inside=6.0, outside=-6.0, hw=(8, 8)):
    m = np.full(hw, outside, np.float32)
    m[r0:r1 + 1, c0:c1 + 1] = inside
    return m


def test_mask2former_detections_fabricated():
    """5 queries x 4 classes (+ no-object), masks at 1/4 of 32 x 32. Class probabilities:
    q0 dog .9987 (strong mask A), q3 "unicorn" .990 (not a COCO class: dropped), q4 dog .974 (empty
    mask: dropped), q1 "mouse" .834 (weak mask: +0.4 inside), q2 "aeroplane" .649 (strong mask C).
    top=5 keeps exactly these pairs; the airplane outranks the mouse on class prob x mask score."""
    id2label = {0: "dog", 1: "mouse", 2: "aeroplane", 3: "unicorn"}
    cls = np.zeros((5, 5), np.float32)
    cls[0, 0], cls[1, 1], cls[2, 2], cls[3, 3], cls[4, 0] = 8, 3, 2, 6, 5
    masks = np.stack([_rect_logits(2, 4, 1, 5), _rect_logits(0, 2, 0, 2, inside=0.4),
                      _rect_logits(5, 7, 4, 7), _rect_logits(1, 6, 1, 6), np.full((8, 8), -6, np.float32)])
    dets = RR.mask2former_detections(torch.tensor(cls), torch.tensor(masks), (32, 32), id2label, top=5)
    assert [d["class"] for d in dets] == ["dog", "airplane", "computer mouse"], [(d["class"], d["score"]) for d in dets]
    # symmetric +-6 logits cross zero exactly on the 4x cell boundary: box = 4 x the cell rectangle
    assert dets[0]["box"] == (4, 8, 24, 20) and dets[1]["box"] == (16, 20, 32, 32)
    p = torch.softmax(torch.tensor(cls), -1)[:, :-1]
    up = torch.nn.functional.interpolate(torch.tensor(masks)[None], size=(32, 32), mode="bilinear",
                                         align_corners=False)[0].sigmoid()
    for d, (q, c) in zip(dets, [(0, 0), (2, 2), (1, 1)]):
        m = up[q] > 0.5
        want = float(p[q, c] * up[q][m].mean())
        assert abs(d["score"] - want) < 1e-5, (d["class"], d["score"], want)
        assert d["mask"].dtype == bool and (d["mask"] == m.numpy()).all()
        ys, xs = np.nonzero(d["mask"])
        assert d["box"] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert dets[0]["mask"].sum() == 20 * 12 - 4          # the box, less its 4 corner pixels (bilinear)
    assert [d["class"] for d in RR.mask2former_detections(cls, masks, (32, 32), id2label, top=3)] == ["dog"]
    # string keys (a config read as JSON) and min_score
    some = RR.mask2former_detections(cls, masks, (32, 32), {str(k): v for k, v in id2label.items()}, min_score=0.7)
    assert [d["class"] for d in some] == ["dog", "computer mouse"]


# ---- geneval_rules -------------------------------------------------------------------
def det(cls, score=0.95, box=(0, 0, 10, 10), colour="red"):
    return {"class": cls, "score": score, "box": box, "colour": colour}


class Colours:
    """colour_of for hand-made detections: reads their "colour"; counts the calls."""
    def __init__(self):
        self.calls = []

    def __call__(self, found):
        self.calls.append([d["class"] for d in found])
        return [d["colour"] for d in found]


def rules(meta, dets, strict=True):
    return RR.geneval_rules(meta, dets, Colours(), strict)


def test_geneval_single_and_two_object():
    one = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
    assert rules(one, [det("cat"), det("dog", 0.31)]) == 1.0
    assert rules(one, [det("dog", 0.3), det("cat")]) == 0.0               # > 0.3 is required
    two = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "bench", "count": 1}]}
    assert rules(two, [det("dog", 0.5), det("bench", 0.4)]) == 1.0
    assert rules(two, [det("dog", 0.5), det("bench", 0.2)]) == 0.0
    assert rules(two, [det("dog", 0.5)], strict=False) == 0.5


def test_geneval_counting():
    """Counting prompts keep detections > 0.9; the exclude (n + 1) makes it exactly n; at most 16
    detections are kept per class. strict=False (Stage 1's RL reward, Flow-GRPO's) scores a count
    1 - |n - found| / n over all the class's detections, without the exclude rule."""
    three = {"tag": "counting", "include": [{"class": "apple", "count": 3}],
             "exclude": [{"class": "apple", "count": 4}], "prompt": "a photo of three apples"}
    assert rules(three, [det("apple", 0.95)] * 3) == 1.0
    assert rules(three, [det("apple", 0.95)] * 3 + [det("apple", 0.85)]) == 1.0   # 4th below 0.9
    assert rules(three, [det("apple", 0.95)] * 2 + [det("apple", 0.85)]) == 0.0
    assert rules(three, [det("apple", 0.95)] * 4) == 0.0
    assert rules(three, [det("apple", 0.95)] * 4, strict=False) == pytest.approx(2 / 3)     # 1 - |3 - 4| / 3
    assert rules(three, [det("apple", 0.95)] * 2 + [det("apple", 0.85)], strict=False) == pytest.approx(2 / 3)
    assert rules(three, [det("apple", 0.95)] * 9, strict=False) == 0.0                        # 6 too many: capped at 0
    many = {"tag": "counting", "include": [{"class": "apple", "count": 16}], "exclude": [{"class": "apple", "count": 17}]}
    assert rules(many, [det("apple")] * 20) == 1.0


def test_geneval_colors_and_color_attr():
    """Only the top `count` detections are judged: a correct weaker object does not rescue a
    wrong stronger one; colour_of is asked only about detections that exist."""
    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    c = Colours()
    assert RR.geneval_rules(red_car, [det("car", 0.6, colour="red"), det("car", 0.9, colour="blue")], c) == 0.0
    assert c.calls == [["car"]]
    assert rules(red_car, [det("car", 0.9, colour="red"), det("car", 0.6, colour="blue")]) == 1.0
    c = Colours()
    assert RR.geneval_rules(red_car, [det("bus")], c, strict=False) == 0.0 and c.calls == []
    attr = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bus", "count": 1, "color": "blue"}]}
    assert rules(attr, [det("car", colour="red"), det("bus", colour="blue")]) == 1.0
    assert rules(attr, [det("car", colour="blue"), det("bus", colour="red")]) == 0.0
    assert rules(attr, [det("car", colour="red"), det("bus", colour="red")], strict=False) == 0.75


def test_geneval_position():
    """"a dog left of a cat": include [cat, dog with position ("left of", 0)], boxes (x0, y0, x1, y1)."""
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    cat, left, right = det("cat", box=(300, 200, 400, 300)), det("dog", box=(50, 210, 150, 310)), det("dog", box=(420, 200, 500, 300))
    assert rules(meta, [cat, left]) == 1.0
    assert rules(meta, [cat, right]) == 0.0
    assert rules(meta, [cat, right], strict=False) == pytest.approx(2 / 3)
    assert rules(meta, [left], strict=False) == pytest.approx(1 / 3)      # no cat: no target
    # overlapping boxes: within GenEval's 0.1 x (sizes) slack, no relation holds
    assert rules(meta, [cat, det("dog", box=(290, 200, 390, 300))]) == 0.0
    # a reference group that failed its colour has no target either
    meta2 = {"tag": "position", "include": [{"class": "cat", "count": 1, "color": "white"},
                                            {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert rules(meta2, [cat, left]) == 0.0
    assert rules(meta2, [det("cat", box=(300, 200, 400, 300), colour="white"), left]) == 1.0


def test_colour_crops():
    """GenEval's crops: grey #999999 outside the mask, cut to the box."""
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    yy, xx = np.mgrid[:40, :50]
    mask[(yy - 20) ** 2 + (xx - 25) ** 2 <= 64] = True                 # a disk, radius 8
    crop, = RR.colour_crops(img, [{"box": (17, 12, 34, 29), "mask": mask}])
    assert crop.shape == (17, 17, 3) and crop.dtype == np.uint8
    m = mask[12:29, 17:34]
    assert (crop[~m] == 0x99).all() and (crop[m] == img[12:29, 17:34][m]).all() and m.sum() > 100


# ---- GenEvalScorer --------------------------------------------------------------------
def _square_image(rgb, box):
    img = np.full((64, 64, 3), 200, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = rgb
    return img


def test_geneval_scorer_injected():
    """End to end with an injected detector (one object where the square is) and a colour callable
    that sees the masked crops: a red square is "red", a blue one is not."""
    box = (10, 20, 40, 50)

    def detect(img):
        mask = np.zeros(img.shape[:2], bool)
        mask[20:50, 10:40] = True
        return [{"class": "car", "score": 0.8, "box": box, "mask": mask}]

    seen = []

    def colour(crops, cls):
        seen.append((cls, [c.shape for c in crops]))
        return ["red" if c[..., 0].mean() > 128 else "blue" for c in crops]

    imgs = np.stack([_square_image((230, 20, 20), box), _square_image((20, 20, 230), box)])
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
    g = RR.GenEvalScorer(detect=detect, colour=colour)
    out = g(imgs, [meta, json.dumps(meta)])
    assert out.dtype == np.float64 and list(out) == [1.0, 0.0], out
    assert seen == [("car", [(30, 30, 3)])] * 2
    with pytest.raises(ValueError):
        g(imgs, [meta])


def test_geneval_scorer_tiny_mask2former(tmp_path):
    """The model path on a tiny random Mask2Former (no scipy: the training loss is not built):
    the scorer's detections are mask2former_detections of a direct forward pass."""
    from transformers import Mask2FormerConfig, Mask2FormerImageProcessor, SwinConfig
    sw = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                    window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=sw, hidden_dim=32, mask_feature_size=32, feature_size=32,
                            encoder_layers=1, decoder_layers=2, num_queries=6, encoder_feedforward_dim=32,
                            dim_feedforward=32, num_attention_heads=2, use_pretrained_backbone=False,
                            id2label={0: "dog", 1: "mouse", 2: "cat"}, label2id={"dog": 0, "mouse": 1, "cat": 2})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = RR._mask2former()(cfg)
    assert model.criterion is None
    model.save_pretrained(tmp_path)
    Mask2FormerImageProcessor().save_pretrained(tmp_path)
    g = RR.GenEvalScorer(str(tmp_path), colour=lambda crops, cls: ["red"] * len(crops), short_edge=64)
    imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    dets = g.detections(imgs)
    inp = g.processor(images=list(imgs), return_tensors="pt", size={"shortest_edge": 64, "longest_edge": 1333})
    assert inp["pixel_values"].shape == (2, 3, 64, 64)
    with torch.no_grad():
        res = g.model(**inp)
    for k in range(2):
        want = RR.mask2former_detections(res.class_queries_logits[k], res.masks_queries_logits[k], (64, 64),
                                         model.config.id2label, min_score=RR.GENEVAL_THRESHOLD)
        assert [(d["class"], d["box"]) for d in dets[k]] == [(d["class"], d["box"]) for d in want]
        assert all(d["class"] in ("dog", "computer mouse", "cat") for d in dets[k])
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert set(g(imgs, [meta, meta])) <= {0.0, 1.0}


def test_missing_model_is_one_line(monkeypatch):
    """Offline, an id that is not in the hub cache -> runs.CheckpointError, one line, naming the id
    and the download command; nothing is tried on the network."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read at import time
    t = time.time()
    for make in (lambda: RR.PickScore("nobody/no-such-model"), lambda: RR.ClipScore("nobody/no-such-model"),
                 lambda: RR.ClipColour("nobody/no-such-model"),
                 lambda: RR.GenEvalScorer("nobody/no-such-model", colour=lambda c, k: [])):
        with pytest.raises(runs.CheckpointError) as e:
            make()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("nobody/no-such-model: the ") and \
            msg.endswith(runs.download_hint("nobody/no-such-model")), msg
    assert "hf download nobody/no-such-model" in runs.download_hint("nobody/no-such-model")
    assert time.time() - t < 10, f"{time.time() - t:.1f} s: did it try the network?"


# ---- OCR at 512 px ---------------------------------------------------------------------
OCR_PROMPTS = REPO / "prompts" / "ocr"


OCR_N = 32                    # texts rendered, spread over train.txt + test.txt


OCR_FALLBACK = ["OPEN LATE", "Fresh Bread", "NO PARKING", "Exit", "Hello World", "Coffee Shop", "SALE 50% OFF",
                "Welcome Home", "STOP", "Bookstore", "Pizza", "Happy Birthday", "Closed", "The End", "Danger",
                "Pharmacy", "Good Morning", "Keep Calm", "Moonlight Cafe", "Vintage Records", "Hotel Paris",
                "Bus Stop 42", "Ocean Drive", "Library", "Gas Station", "Taxi", "Free WiFi", "Fish Market",
                "Night Owl", "Sunrise Bakery", "Route 66", "Please Do Not Disturb"]


def render_text(text, res=512):
    """Dark text centred on a light background, the largest font (72 px down to 24) that fits 85%
    of the width; texts too long for one line at 48 px are wrapped at spaces."""
    img = Image.new("RGB", (res, res), (235, 232, 225))
    d = ImageDraw.Draw(img)
    for size in range(72, 23, -4):
        font, lines = ImageFont.load_default(size=size), [text]
        if size <= 48 and d.textlength(text, font=font) > 0.85 * res:
            lines = [""]
            for w in text.split():
                if lines[-1] and d.textlength(lines[-1] + " " + w, font=font) > 0.85 * res:
                    lines.append(w)
                else:
                    lines[-1] = (lines[-1] + " " + w).strip()
        if max(d.textlength(ln, font=font) for ln in lines) <= 0.85 * res:
            break
    d.multiline_text((res / 2, res / 2), "\n".join(lines), fill=(25, 25, 30), font=font, anchor="mm",
                     align="center", spacing=size // 3)
    return np.asarray(img)


def test_ocr_reward_512px():
    """real_rewards.ocr_real_reward (rapidocr detection + recognition, set as Flow-GRPO's): 32 of the
    OCR prompts' quoted texts rendered at 512 x 512 score >= 0.95 on average, uniform noise <= 0.05.
    Measured on 2 busy CPU cores: all 48 texts 0.997 (the lowest: "Room 404", read "Ro0m 404",
    0.857), ~1.1 s an image; noise 0.000."""
    files = [OCR_PROMPTS / "train.txt", OCR_PROMPTS / "test.txt"]
    prompts = [ln.strip() for f in files if f.is_file() for ln in f.read_text().splitlines() if ln.strip()]
    if len(prompts) < OCR_N:
        prompts = [f'A sign that reads "{t}"' for t in OCR_FALLBACK]
    prompts = [prompts[i] for i in np.linspace(0, len(prompts) - 1, OCR_N).round().astype(int)]  # ~1 s each
    imgs = np.stack([render_text(R.ocr_target(p)) for p in prompts])
    t = time.time()
    s = RR.ocr_real_reward(imgs, prompts)
    dt = time.time() - t
    worst = sorted(zip(s, prompts))[:3]
    print(f"\nOCR 512 px: {len(prompts)} renders, mean {s.mean():.4f} in {dt:.1f} s "
          f"({1000 * dt / len(prompts):.0f} ms an image); lowest {worst}")
    assert s.mean() >= 0.95, f"mean {s.mean():.4f} on {len(prompts)} renders; lowest {worst}"
    noise = np.random.default_rng(0).integers(0, 256, (4, 512, 512, 3), dtype=np.uint8)
    n = RR.ocr_real_reward(noise, prompts[:4])
    print(f"OCR 512 px: uniform noise mean {n.mean():.4f}")
    assert n.mean() <= 0.05, f"noise scores {n}"


# ---- distill.py and evaluate.py on published-layout inputs -----------------------------------
@pytest.fixture()
def released(lora_ckpts, tmp_path):
    """Three adapters in the released layout (no opd.json) plus ill-fitting variants of one."""
    from safetensors.torch import load_file, save_file
    rel = tmp_path / "released"
    for name, src in (("GenEvalTeacher", "geneval"), ("OCRTeacher", "ocr"), ("AesTeacher", "ocr"),
                      ("Targets", "ocr"), ("Rank", "ocr"), ("Width", "ocr")):
        d = rel / name / "lora"
        d.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(lora_ckpts[src] / f, d / f)
    cfg = json.loads((rel / "Targets/lora/adapter_config.json").read_text())
    (rel / "Targets/lora/adapter_config.json").write_text(json.dumps(cfg | {"target_modules": ["to_qkv_fused"]}))
    (rel / "Rank/lora/adapter_config.json").write_text(json.dumps(cfg | {"r": 2 * cfg["r"]}))   # weights keep r
    w = load_file(rel / "Width/lora/adapter_model.safetensors")                               # another base's width
    save_file({k: torch.cat([v, v], 1) if "lora_A" in k else v for k, v in w.items()},
              str(rel / "Width/lora/adapter_model.safetensors"))
    return rel


@pytest.mark.parametrize("case,words", [
    ("lora targets", "does not fit this base"), ("lora rank", "does not fit this base"),
    ("lora width", "does not fit this base"), ("hub id offline", "not in the local hub cache"),
    ("empty prompt file", "no usable prompt line"), ("unknown task", "unknown task 'pickscore'"),
    ("reward model missing", "not available"),
])
def test_real_scale_bad_input_one_line_exit_2(sd3_dir, released, tmp_path, capsys, case, words):
    """Bad input at real scale - an adapter that does not fit the base (target modules, rank,
    width), a hub id not available offline, a prompt file with no usable line, an unknown task
    name, a reward model that is not there - ends with one line, exit 2, and no run folder."""
    t = {k: f"{k}={released}/{d}/lora" for k, d in (("geneval", "GenEvalTeacher"), ("ocr", "OCRTeacher"),
                                                     ("aesthetic", "AesTeacher"))}
    base, extra = str(sd3_dir), ["--eval-n", "0", "--eval-heldout-n", "0", "--eval-every", "0"]
    if case.startswith("lora"):
        t["ocr"] = f"ocr={released}/{case.split()[1].title()}/lora"
    elif case == "hub id offline":
        base = "nobody/no-such-sd3"
    elif case == "empty prompt file":
        shutil.copytree(RR.PROMPT_DIR, tmp_path / "p")
        (tmp_path / "p" / "ocr" / "train.txt").write_text("\n  \n")
        extra += ["--prompt-dir", tmp_path / "p"]
    elif case == "unknown task":
        t["aesthetic"] = t["aesthetic"].replace("aesthetic=", "pickscore=")
    else:
        extra = ["--eval-n", "4"]                                         # evaluating needs the reward models
    err = _refused(capsys, D.main, ["--base", base, "--teachers", *t.values(), "--rounds", "1", "--prompts", "2",
                                    "--steps", "2", "--rank", "4", "--alpha", "8", *map(str, extra),
                                    "--out", str(tmp_path / "run")], progress=True)
    assert words in err, (case, err)
    assert not (tmp_path / "run").exists(), f"{case}: a run folder was left behind"


def test_real_scale_evaluation_path(sd3_policy, monkeypatch):
    """Evaluation on an SD3 base draws the prompt folder's prompts and hands the real scorers the
    decoded images with GenEval's metadata records (geneval) or the prompts (PickScore); the
    scorers' models are replaced by recorders here (their math is tested above)."""
    seen = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __call__(self, images, what, strict=True):
            seen[self.name] = (images.shape, images.dtype, list(what))
            return np.arange(len(what), dtype=np.float64)
    monkeypatch.setattr(RR, "_scorer", lambda cls: Recorder(cls.__name__))
    real = RR.tasks_for(sd3_policy.base_path)
    sc = E.evaluate(sd3_policy, "geneval", 3, 1.0, split="test", table=real)     # drawn per tag: one of each of 6
    assert list(sc) == [0, 1, 2, 3, 4, 5]
    shape, dtype, metas = seen["GenEvalScorer"]
    assert shape == (6, 16, 16, 3) and dtype == np.uint8
    assert [m["prompt"] for m in metas] == E.eval_prompts("geneval", "test", 3, real) and all("include" in m for m in metas)
    assert sorted(m["tag"] for m in metas) == sorted(RR.GENEVAL_TAGS)
    E.evaluate(sd3_policy, "aesthetic", 2, 1.0, split="train", table=real)
    assert seen["PickScore"][2] == real["aesthetic"].train[:2]


def test_evaluate_cli_hub_id_offline_one_line(tmp_path):
    """evaluate.py takes a hub id as a base; one not available offline is one line, exit 2, and no
    folder named after it appears."""
    r = _cli(REPO / "evaluate.py", "nobody/no-such-sd3", "--n", "2", "--heldout-n", "0", cwd=tmp_path,
             env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: nobody/no-such-sd3") and \
        lines[-1].endswith(runs.download_hint("nobody/no-such-sd3")), r.stderr[-2000:]
    assert not (tmp_path / "nobody").exists() and not any(tmp_path.iterdir())


def test_distill_published_sd3_teachers(sd3_dir, lora_ckpts, tmp_path, capsys):
    """Real-scale inputs as published: a plain diffusers SD3 folder (its scheduler says shift 3.0;
    no opd.json) and three PEFT adapters in the released layout (GenEvalTeacher/lora, ...; no
    opd.json). distill.py takes the grid from the scheduler (what its set_timesteps samples; the
    negligible last step untrained), the paper's CFG 4.5 for the student,
    the task table's CFG for each teacher (1.0 for CFG-free GenEval), and 2 processes train the
    same student as one."""
    rel = tmp_path / "released"
    for name, src in (("GenEvalTeacher", "geneval"), ("OCRTeacher", "ocr"), ("AesTeacher", "ocr")):
        d = rel / name / "lora"
        d.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(lora_ckpts[src] / f, d / f)
    args = ["--base", sd3_dir, "--teachers", f"geneval={rel}/GenEvalTeacher/lora", f"ocr={rel}/OCRTeacher/lora",
            f"aesthetic={rel}/AesTeacher/lora", "--rounds", "2", "--prompts", "2", "--steps", "3", "--eval-n", "0",
            "--eval-heldout-n", "0", "--eval-every", "0", "--rank", "4", "--alpha", "8"]
    D.main([*map(str, args), "--out", str(tmp_path / "one")])             # in this process; two below
    conf = json.loads((tmp_path / "one" / "config.json").read_text())
    from diffusers import FlowMatchEulerDiscreteScheduler                   # the scheduler's own grid
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_dir, subfolder="scheduler")
    sch.set_timesteps(3)
    assert conf["shift"] == 3.0 and conf["grid"] == pytest.approx([float(x) for x in sch.sigmas], abs=2e-5), conf["grid"]
    assert conf["trained_steps"] == 2, conf              # its last step (.0089 -> 0 at shift 3) carries ~0 weight
    assert conf["student_cfg"] == 4.5 and conf["teacher_cfg"] == {"geneval": 1.0, "ocr": 4.5, "aesthetic": 4.5}
    assert runs.read_meta(tmp_path / "one" / "checkpoint")["cfg"] == 4.5
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29541", "distill.py",
                          *map(str, args), "--out", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert two.returncode == 0, two.stderr[-3000:]
    sa, sb = _student(tmp_path / "one"), _student(tmp_path / "two")
    # Adam's first steps move each weight by ~lr * g / |g|: a gradient entry that is ~0 by
    # cancellation can take either sign under another float summation order (gloo's all-reduce),
    # so single entries may differ by up to ~lr. A wrong data split moves most entries by ~lr.
    # Hence: nearly every entry agrees to 1e-5 and the mean difference is tiny.
    d = torch.cat([(sa[k] - sb[k]).abs().flatten() for k in sa])
    off, mean = float((d > 1e-5).float().mean()), float(d.mean())
    assert off < 1e-3 and mean < 1e-6, \
        f"2-process student differs from 1-process: {off:.2%} of entries by > 1e-5 (at most 0.1%), mean {mean:.2e} (< 1e-6)"
    err = _refused(capsys, D.main, [*map(str, args[2:]), "--out", str(tmp_path / "nobase")], progress=True)  # no --base, no opd.json
    assert "pass --base" in err, err
    assert not (tmp_path / "nobase").exists()


def test_ocr_real_reward_runs_pp_ocr_as_flow_grpo(monkeypatch):
    """The real-scale OCR reward calls PP-OCR as Flow-GRPO's PaddleOCR(use_angle_cls=False): no
    angle classifier and every read kept (text_score 0; rapidocr's default 0.5 would drop a
    0.3-confidence read), the reads joined, then Sec. 9's score; the image reaches it as BGR."""
    calls = []

    class Engine:
        def __call__(self, img, use_cls=None, text_score=None):
            calls.append((img[0, 0].tolist(), use_cls, text_score))
            return [[[0, 0], "open", 0.3], [[0, 0], "late", 0.9]], None     # (box, text, confidence) rows
    monkeypatch.setattr(RR, "_ocr_engine", lambda: Engine())
    img = np.zeros((1, 8, 8, 3), np.uint8)
    img[..., 0] = 200                                                      # red in RGB
    s = RR.ocr_real_reward(img, ['a sign that says "OPEN LATE"'])
    assert calls == [([0, 0, 200], False, 0.0)] and s.tolist() == [1.0]


def test_lora_targets_are_the_released_list_without_attn2():
    """The LoRA targets (teachers and students) are the released code's list; on SD3.5-M's
    architecture (here 2 layers, one with dual attention) they adapt every joint-attention
    projection and none of the second attention (attn2); a bare "to_q" would take attn2 too."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model
    import bench_distill as B
    assert sorted(sampler.LORA_TARGETS) == sorted(["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
                                                    "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q",
                                                    "attn.to_v"])

    def adapted(targets):
        net = get_peft_model(SD3Transformer2DModel(**B.TINY), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        return {n.split(".lora_A")[0] for n, _ in net.named_parameters() if ".lora_A." in n}
    ours, bare = adapted(sampler.LORA_TARGETS), adapted([t.split("attn.")[1] for t in sampler.LORA_TARGETS])
    assert ours and not any(".attn2." in n for n in ours), sorted(ours)
    assert {n for n in bare if ".attn2." in n} and ours == {n for n in bare if ".attn2." not in n}


def test_t5_prompts_reach_the_encoder_at_128_tokens(sd3_dir):
    """At real scale T5 sees 128 tokens per prompt (the released code's; the pipeline's default
    is 256): every prompt is padded or cut to 128 and the conditioning is 16 CLIP + 128 T5
    tokens; the text encoders are held in half precision, the transformer in the policy's dtype."""
    pol = sampler.Policy(str(sd3_dir))
    seen = []
    hook = pol.pipe.text_encoder_3.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("input_ids", a[0] if a else None).shape), with_kwargs=True)
    try:
        c = pol.encode(["ab " * 80, "a red cat"])                        # ~160 T5 pieces: cut at 128
    finally:
        hook.remove()
    assert seen and all(shape[-1] == sampler.T5_TOKENS == 128 for shape in seen), seen
    assert c["emb"].shape[1] == _CLIP_LEN + 128 and c["emb"].dtype == torch.float32
    assert pol.pipe.text_encoder_3.dtype == pol.pipe.text_encoder.dtype == sampler.TEXT_DTYPE["cpu"]
    assert pol.transformer.dtype == torch.float32


def _published(lora_ckpts, root):
    """Three adapters in the released layout (GenEvalTeacher/lora, ...: PEFT files, no opd.json)."""
    for name, src in (("GenEvalTeacher", "geneval"), ("OCRTeacher", "ocr"), ("AesTeacher", "ocr")):
        d = root / name / "lora"
        d.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(lora_ckpts[src] / f, d / f)
    return [f"geneval={root}/GenEvalTeacher/lora", f"ocr={root}/OCRTeacher/lora", f"aesthetic={root}/AesTeacher/lora"]


def test_real_scale_main_job_ends_with_its_report(sd3_dir, lora_ckpts, tmp_path, monkeypatch):
    """The whole real-scale main job with published teachers, final evaluation included: results.json
    with a base row and a row per teacher and the student, each evaluated on the ONE loaded backbone
    (one pipeline load: the base with adapters off, each teacher at its task's CFG), the student's
    LoRA initialised gaussian (the released code's). The reward models are stand-ins here (PickScore:
    the image's mean brightness; GenEval: 1 for every image) - their own code is tested above."""
    from diffusers import StableDiffusion3Pipeline
    loads = []
    real_load = StableDiffusion3Pipeline.from_pretrained.__func__
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real_load(cls, *a, **k)))
    stand_in = {"GenEvalScorer": lambda imgs, metas, strict=True: np.ones(len(imgs)),
                "PickScore": lambda imgs, prompts, strict=True: imgs.reshape(len(imgs), -1).mean(1) / 255.0}
    monkeypatch.setattr(RR, "_scorer", lambda cls: stand_in[cls.__name__])
    out = tmp_path / "run"
    res = D.run(D.DistillConfig(base=str(sd3_dir), teachers=_published(lora_ckpts, tmp_path / "rel"), out=str(out),
                                rounds=1, prompts=2, steps=2, rank=4, alpha=8, eval_every=0, eval_n=2,
                                eval_heldout_n=1))
    saved = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in saved["rows"]]
    assert names == ["base", "teacher geneval", "teacher ocr", "teacher aesthetic", "DiffusionOPD student"], names
    assert saved["rows"][0]["path"] == os.path.relpath(sd3_dir) and res["rows"][0]["scores"] == saved["rows"][0]["scores"]
    assert all(set(r["scores"]) == {"geneval", "ocr", "aesthetic"} and set(r["heldout"]) == set(r["scores"])
               for r in saved["rows"])
    assert loads == [str(sd3_dir)], loads
    base_scores = saved["rows"][0]["scores"]["aesthetic"]
    pol = sampler.Policy(str(sd3_dir))                    # the base alone, loaded on its own: the same row
    fresh = E.evaluate(pol, "aesthetic", 2, split="train", table=RR.tasks_for(str(sd3_dir)))
    assert abs(float(fresh.mean()) - base_scores) < 1e-6, (float(fresh.mean()), base_scores)
    assert json.loads((out / "checkpoint" / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"


def test_dmd_on_published_sd3_teachers(sd3_dir, lora_ckpts, tmp_path):
    """ablations.py --objective dmd at real scale, on the tiny SD3 pipeline with the three adapters in
    the released layout: 2 rounds run (the student's rollout backpropagated through the scheduler's
    grid, its CFG 4.5), dmd_loss_<task> is logged, and the resume state holds one fake score per task -
    one more LoRA on the backbone, loaded from the task's published adapter (the released targets,
    sampler.LORA_TARGETS) - and the fakes' AdamW moments."""
    import ablations as A
    from safetensors.torch import load_file
    out = tmp_path / "dmd"
    A.run(A.AblationConfig(base=str(sd3_dir), teachers=_published(lora_ckpts, tmp_path / "rel"), out=str(out),
                           objective="dmd", rounds=2, prompts=2, steps=3, rank=4, alpha=8, eval_every=0, eval_n=0,
                           eval_heldout_n=0))
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1]
    assert all(np.isfinite(r[f"dmd_loss_{t}"]) and r[f"dmd_loss_{t}"] >= 0 for r in log for t in R.TASKS), log
    assert any(r[f"dmd_loss_{t}"] > 0 for r in log for t in R.TASKS), log
    conf = json.loads((out / "config.json").read_text())
    assert conf["student_cfg"] == 4.5 and conf["objective"] == "dmd" and conf["shift"] == 3.0
    state = load_file(str(out / json.loads((out / "state.json").read_text())["tensors"]))
    teacher = load_file(str(lora_ckpts["ocr"] / "adapter_model.safetensors"))
    published = json.loads((lora_ckpts["ocr"] / "adapter_config.json").read_text())
    assert set(published["target_modules"]) == set(sampler.LORA_TARGETS)
    assert sum(k.startswith("fake.") for k in state) == 3 * len(teacher), (len(teacher), sorted(state)[:4])
    assert any(k.startswith("opt1.") for k in state)
