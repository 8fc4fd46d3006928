"""The toy world (toy.py): its fixed prompt sets, parser and renderer, and the tiny pretrained base
in the checkpoint contract (pretraining, loading without toy.py, its tokenizer, exact resume)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards as R
import runs
import sampler as S
import toy
from conftest import _cli


# ---- prompts, parser, renderer ---------------------------------------------------------------
@pytest.mark.parametrize("task", toy.TASK_NAMES)
def test_prompt_sets_fixed_disjoint_and_parseable(task):
    train, test = toy.prompts(task, "train"), toy.prompts(task, "test")
    assert train == toy.prompts(task, "train") and test == toy.prompts(task, "test")  # fixed
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert len(train) >= 80 and len(test) >= 64
    for p in train + test:
        assert toy.parse(p)["task"] == task


def test_vocabulary_is_small_lower_case_words_glyphs_and_quote():
    words = set()
    for task in toy.TASK_NAMES:
        for p in toy.prompts(task, "train") + toy.prompts(task, "test"):
            for w in p.replace('"', " ").split():
                if task == "ocr" and p.split('"')[1] == w:
                    assert set(w) <= set(toy.GLYPHS)      # the glyphs: upper case / digits
                else:
                    assert re.fullmatch(r"[a-z]+", w), w
                    words.add(w)
    assert len(words) < 100
    assert not set(toy.GLYPHS) & set("O0I1")           # glyphs OCR confuses are out


def test_heldout_combinations_never_seen_in_training():
    # geneval: a held-out two-object pairing never appears together in training, in
    # any order or relation; held-out count/colour/shape triples likewise
    def pair(p):
        s = toy.parse(p)
        return frozenset((o["color"], o["shape"]) for o in s["objects"]) \
            if s["category"] in ("two_object", "position") else None
    train_pairs = {pair(p) for p in toy.prompts("geneval", "train")} - {None}
    test_pairs = {pair(p) for p in toy.prompts("geneval", "test")} - {None}
    assert test_pairs and not train_pairs & test_pairs
    # ocr: new strings, but every glyph is trained in both slots
    train_strs = [toy.parse(p)["text"] for p in toy.prompts("ocr", "train")]
    assert all(sum(s[k] == g for s in train_strs) >= 4 for g in toy.GLYPHS for k in (0, 1))


def test_parse():
    assert toy.parse('a sign that says "K5"') == {"task": "ocr", "text": "K5"}
    assert toy.parse("a misty forest at dawn") == {"task": "aesthetic", "mood": "misty",
                                                   "place": "forest", "time": "dawn"}
    s = toy.parse("a red square left of a blue triangle")
    assert s["category"] == "position" and s["relation"] == "left of"
    assert s["objects"] == [{"shape": "square", "color": "red", "count": 1},
                            {"shape": "triangle", "color": "blue", "count": 1}]
    assert toy.parse("three green triangles")["objects"] == [
        {"shape": "triangle", "color": "green", "count": 3}]
    assert toy.parse("a square")["category"] == "single"
    for bad in ("a purple square", "two square", "a red square left of a red square"):
        with pytest.raises(ValueError):
            toy.parse(bad)


def test_render_is_uint8_seeded_and_jittered():
    p = "two red triangles"
    a = toy.render(p, np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == (toy.RES, toy.RES, 3)
    assert np.array_equal(a, toy.render(p, np.random.default_rng(3)))
    assert not np.array_equal(a, toy.render(p, np.random.default_rng(4)))


# ---- the tiny toy base: pretrained for a few steps, in the checkpoint contract -------------
def test_pretrain_smoke_and_contract(tiny_base):
    """`python toy.py` at a tiny budget writes a base of the contract: diffusers + transformers
    folders, a tokenizer, opd.json (role base, cfg, no absolute paths), fp16 weights on disk."""
    meta = runs.read_meta(tiny_base)
    assert meta["role"] == "base" and meta["cfg"] > 1 and meta["shift"] == 1.0
    for part in ("transformer", "text_encoder", "tokenizer"):
        assert (tiny_base / part).is_dir()
    assert not any(str(Path("/")) + "tmp" in json.dumps(v) for v in meta.values()), meta
    assert "out" not in meta["trained"]["config"]


def test_base_loads_without_toy(tiny_base):
    """sampler.Policy loads the toy base with standard libraries only (toy.py never imported)."""
    code = ("import sys, sampler; p = sampler.Policy(sys.argv[1]); c = p.encode(['a red square']); "
            "assert 'toy' not in sys.modules; print(p.latent_shape())")
    r = _cli("-c", code, tiny_base)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(3, 32, 32)" in r.stdout


def test_tokenizer_spells_heldout_strings(tiny_base):
    """Held-out OCR strings are sequences of known character tokens (no <unk>)."""
    pol = S.Policy(str(tiny_base))
    unk = pol.tokenizer.convert_tokens_to_ids("<unk>")
    for p in R.TASKS["ocr"].test[:20] + R.TASKS["geneval"].test[:20]:
        ids = pol.tokenizer(p).input_ids
        assert unk not in ids, (p, ids)
    s = R.TASKS["ocr"].test[0]
    target = s.split('"')[1]
    toks = pol.tokenizer.convert_ids_to_tokens(pol.tokenizer(s).input_ids)
    assert all(ch in toks for ch in target), toks


def test_pretrain_resume_is_exact(tmp_path, monkeypatch):
    """A pretraining killed after its step-2 state, re-run with the same command, ends with the
    same weights as an uninterrupted run (bitwise: data and noise depend on (seed, step) only)."""
    kw = dict(steps=4, batch=4, width=32, layers=1, save_every=2)
    toy.pretrain(toy.PretrainConfig(out=str(tmp_path / "a"), **kw))
    real, calls = toy.render, {"n": 0}

    def dies_at_step_3(p, rng):
        calls["n"] += 1
        if calls["n"] > 4 * 3:
            raise KeyboardInterrupt
        return real(p, rng)
    monkeypatch.setattr(toy, "render", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        toy.pretrain(toy.PretrainConfig(out=str(tmp_path / "b"), **kw))
    monkeypatch.setattr(toy, "render", real)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 2
    toy.pretrain(toy.PretrainConfig(out=str(tmp_path / "b"), **kw))
    from safetensors.torch import load_file
    f = "checkpoint/transformer/diffusion_pytorch_model.safetensors"
    fa, fb = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
