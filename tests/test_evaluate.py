"""The evaluation (evaluate.py): the protocol's per-checkpoint score cache and what keys it, the
paired tables, the command line, the shipped checkpoints and their caches, and the README's and
docs' tables rendered from the shipped results."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import evaluate as E
import rewards as R
import runs
import sampler as S
import toy
from conftest import REPO, _cli, _refused


# ---- evaluation protocol, cache, results table ---------------------------------------------
def test_evaluate_checkpoint_caches_by_protocol(tiny_base, tmp_path, monkeypatch):
    ck = tmp_path / "base"
    shutil.copytree(tiny_base, ck, ignore=shutil.ignore_patterns("scores.json"))   # other tests' entries left behind
    first = E.evaluate_checkpoint(str(ck), 4, 3)
    assert set(first) == {"train", "test"} and all(set(v) == set(R.TASKS) for v in first.values())
    assert all(len(first[s][t]) == len(E.eval_prompts(t, s, k)) for s, k in (("train", 4), ("test", 3)) for t in R.TASKS)
    assert len(first["train"]["ocr"]) == 4 and len(first["train"]["geneval"]) == 5     # GenEval: one per tag
    cache = json.loads((ck / "scores.json").read_text())
    assert len(cache) == 6 and all(c["protocol"]["steps"] == 40 for c in cache.values())
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = E.evaluate_checkpoint(str(ck), 4, 3)               # same protocol: from the cache
    assert all(np.array_equal(first[s][k], again[s][k]) for s in first for k in first[s])
    with pytest.raises(AssertionError, match="recomputed"):    # another n: a new protocol key
        E.evaluate_checkpoint(str(ck), 5, 3)


@pytest.mark.parametrize("split,n", [("train", 256), ("test", E.HELDOUT_N), ("train", 7)])
def test_geneval_is_drawn_per_tag(split, n):
    """GenEval's images come the same number per tag (its tags take turns, each cycling through its own
    prompts in list order), so the plain mean of the per-image scores is GenEval's Overall - the mean
    of the per-tag accuracies - and a shorter list is a prefix of a longer one. Other tasks: split[i % len]."""
    from collections import Counter
    pool = R.TASKS["geneval"].train if split == "train" else R.TASKS["geneval"].test
    tags = list(dict.fromkeys(R.geneval_tag(p) for p in pool))
    ps = E.eval_prompts("geneval", split, n)
    k = -(-n // len(tags))
    assert len(ps) == k * len(tags) and Counter(map(R.geneval_tag, ps)) == {t: k for t in tags}
    for t in tags:
        mine, theirs = [p for p in ps if R.geneval_tag(p) == t], [p for p in pool if R.geneval_tag(p) == t]
        assert mine == [theirs[i % len(theirs)] for i in range(k)]
    assert E.eval_prompts("geneval", split, 3) == ps[:len(tags)]
    sc = np.random.default_rng(0).random(len(ps))
    acc = E.tag_accuracies("geneval", split, sc)
    assert {n_t for _, n_t in acc.values()} == {k} and abs(np.mean([a for a, _ in acc.values()]) - sc.mean()) < 1e-12
    assert E.tag_accuracies("ocr", split, sc[:5]) == {}
    ocr = R.TASKS["ocr"].train if split == "train" else R.TASKS["ocr"].test
    assert E.eval_prompts("ocr", split, n) == [ocr[i % len(ocr)] for i in range(n)]
    if split == "train" and n == 256:
        assert k >= 40, f"{k} images per tag in the primary table; GenEval's Overall wants at least 40"


def test_results_carry_geneval_per_tag():
    """Each row of a results JSON stores GenEval's per-tag accuracies of both tables, and the printed
    tables show them under the table whose column is their mean."""
    rng = np.random.default_rng(1)
    per = {name: {s: {t: rng.integers(0, 2, len(E.eval_prompts(t, s, k))).astype(float) for t in R.TASKS}
                  for s, k in (("train", 256), ("test", 64))} for name in ("base", "teacher geneval")}
    rows = [{"name": name, "scores": {t: float(v.mean()) for t, v in p["train"].items()},
             "heldout": {t: float(v.mean()) for t, v in p["test"].items()}} for name, p in per.items()]
    res = E.results(rows, {"n": 256, "heldout_n": 64}, per)
    for r in res["rows"]:
        for key, s in (("tags", "train"), ("tags_heldout", "test")):
            acc = r[key]["geneval"]
            assert acc == E.tag_accuracies("geneval", s, per[r["name"]][s]["geneval"])
            assert abs(np.mean([a for a, _ in acc.values()]) - r["scores" if s == "train" else "heldout"]["geneval"]) < 1e-12
    text = E.render_results(res)
    assert text.count("GenEval per tag") == 2 and "n = 52 per tag" in text and "n = 16 per tag" in text
    assert f"{res['rows'][1]['tags']['geneval']['counting'][0]:.3f}" in text


def test_geneval_diagnostics_are_the_columns_images(tiny_base, tiny_teachers, tmp_path, capsys, sd3_dir):
    """evaluate.py --geneval-diagnostics: per checkpoint, GenEval's per-tag accuracies and per-colour
    found-rates on the primary table's GenEval images - the same images: its Overall is the column's
    mean and its tags the table's. Real scale: refused before any work."""
    out = tmp_path / "res.json"
    E.main([str(tiny_base), tiny_teachers[0], "--n", "5", "--heldout-n", "0", "--geneval-diagnostics", "--json", str(out)])
    printed, res = capsys.readouterr().out, json.loads(out.read_text())
    diag = res["geneval_diagnostics"]
    assert list(diag) == [r["name"] for r in res["rows"]] and E.render_diagnostics(diag) in printed
    for r in res["rows"]:
        assert abs(diag[r["name"]]["strict"] - r["scores"]["geneval"]) < 1e-9, (diag[r["name"]], r["scores"])
        assert {t: v[0] for t, v in diag[r["name"]]["tags"].items()} == {t: v[0] for t, v in r["tags"]["geneval"].items()}
    msg = _refused(capsys, E.main, [str(sd3_dir), "--geneval-diagnostics", "--json", str(tmp_path / "x" / "r.json")])
    assert "--geneval-diagnostics" in msg and not (tmp_path / "x").exists()


def test_evaluation_is_paired_and_deterministic(tiny_base):
    pol = S.Policy(str(tiny_base))
    a, b = E.evaluate(pol, "aesthetic", 6), E.evaluate(pol, "aesthetic", 6, batch=4)
    assert np.array_equal(a, b)                                # noise of image i does not depend on batching


def test_evaluate_cli_prints_table_and_json(tiny_base, tmp_path, capsys):
    ck = tmp_path / "b"
    shutil.copytree(tiny_base, ck)
    r = _cli("evaluate.py", ck, ck, "--n", "4", "--heldout-n", "2", "--json", tmp_path / "res.json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert [x["name"] for x in res["rows"]] == ["base", "base'"]
    assert E.render_results(res) in r.stdout and r.stdout.count("| Model | GenEval | OCR | Aesthetic | Average |") == 2
    assert res["rows"][1]["vs_base"]["ocr"] == [0.0, 0.0]      # the same checkpoint twice: paired difference 0
    assert "nope" in _refused(capsys, E.main, [str(tmp_path / "nope")])


def test_sampling_folds_the_adapter_in_and_gives_the_base_back_exactly(tiny_base, tiny_teachers):
    """S.sample folds the active adapter into the weights (Policy.merged): its images are the
    adapter-as-a-branch ones up to float rounding, and afterwards every base weight is bit-identical
    to before and the adapter is a separate branch again (adapters off gives the base's velocity)."""
    import torch
    pol = S.Policy(str(tiny_base))
    pol.add_adapter("ocr", tiny_teachers[1])
    pol.use("ocr")
    before = {k: v.clone() for k, v in pol.transformer.state_dict().items() if "lora_" not in k}
    x, cond = torch.randn(2, *pol.latent_shape(), generator=torch.Generator().manual_seed(0)), pol.encode(["a", "b"])
    with torch.no_grad():
        v_branch = pol.velocity(x, 0.6, cond)
        with pol.merged():
            v_merged = pol.velocity(x, 0.6, cond)
            moved = [k for k, v in pol.transformer.state_dict().items() if k in before and not torch.equal(v, before[k])]
        pol.use(None)
        v_base = pol.velocity(x, 0.6, cond)
        pol.use("ocr")
        v_after = pol.velocity(x, 0.6, cond)
    assert len(moved) > 0, "merged() changed no base weight: nothing was folded in"
    assert torch.allclose(v_merged, v_branch, atol=1e-5) and not torch.equal(v_branch, v_base), \
        f"merged velocity differs from the branch one by {float((v_merged - v_branch).abs().max()):.2e}"
    after = {k: v for k, v in pol.transformer.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], before[k]) for k in before), "a base weight was not restored bit for bit"
    assert torch.equal(v_after, v_branch), "after merged() the adapter's velocity changed"
    ps, seeds = ["a red circle", 'a sign that says "K7"'], [1, 2]
    folded = S.sample(pol, ps, seeds, 6, pol.shift)
    grid, x0 = S.time_grid(6, pol.shift, pol.sigma_min), S.initial_noise(pol.latent_shape(), seeds)
    branch = pol.decode(S.rollout(pol, pol.encode(ps), x0, grid)["states"][-1])   # the adapter as a branch
    assert np.abs(folded.astype(int) - branch.astype(int)).max() <= 1, "folded sampling moved a pixel by > 1 level"


# ---- the score cache: keyed on everything that changes a score -----------------------------
def _key(path, task="ocr", split="train", n=8, **over):
    st = runs.settings(path) | over
    proto = E.protocol(task, split, n, st["cfg"], st["shift"], over.get("resolution", E._resolution(st["base"])))
    return E.cache_key(proto, E.weights_hash(path))


def test_cache_key_changes_with_every_part(tiny_base, tiny_teachers, tmp_path, monkeypatch):
    ck = tmp_path / "t"
    shutil.copytree(tiny_teachers[1], ck)
    m = runs.read_meta(ck); m["base"]["path"] = os.path.relpath(tiny_base, ck); runs.write_json_atomic(ck / runs.META, m)
    k0 = _key(ck)
    assert _key(ck) == k0                                                   # deterministic
    variants = {"split": _key(ck, split="test"), "n": _key(ck, n=9), "task": _key(ck, task="geneval"),
                "shift": _key(ck, shift=3.0), "cfg": _key(ck, cfg=2.0), "resolution": _key(ck, resolution=64)}
    monkeypatch.setattr(E, "EVAL_SEED", 1); variants["seed"] = _key(ck); monkeypatch.undo()
    monkeypatch.setattr(E, "EVAL_STEPS", 20); variants["steps"] = _key(ck); monkeypatch.undo()
    monkeypatch.setattr(R, "OCR_UPSCALE", 3); variants["scorer constant"] = _key(ck); monkeypatch.undo()
    monkeypatch.setattr(R, "levenshtein", lambda a, b: 0); variants["scorer helper"] = _key(ck); monkeypatch.undo()
    import importlib.metadata as im
    real_version = im.version
    monkeypatch.setattr(im, "version", lambda p: "0.0" if p == "rapidocr-onnxruntime" else real_version(p))
    variants["package version"] = _key(ck); monkeypatch.undo()
    object.__setattr__(R.TASKS["ocr"], "train", list(reversed(R.TASKS["ocr"].train)))
    try:
        variants["prompt list"] = _key(ck)
    finally:
        object.__setattr__(R.TASKS["ocr"], "train", toy.prompts("ocr", "train"))
    assert _key(ck) == k0
    f = ck / "adapter_model.safetensors"
    data = bytearray(f.read_bytes()); data[-1] ^= 1; f.write_bytes(bytes(data))   # one bit of the adapter
    variants["adapter weights"] = _key(ck)
    b0 = _key(tiny_base, task="aesthetic")
    for part in ("transformer", "text_encoder", "tokenizer"):
        b = tmp_path / f"base-{part}"
        shutil.copytree(tiny_base, b)
        f = sorted(list((b / part).glob("*.safetensors")) or list((b / part).glob("*.json")))[0]
        data = bytearray(f.read_bytes()); data[-1] ^= 1; f.write_bytes(bytes(data))  # one bit of one file
        if _key(b, task="aesthetic") == b0:
            variants[f"base {part}"] = k0                                    # reported below
    same = [k for k, v in variants.items() if v == k0]
    assert not same, f"cache key unchanged when these changed: {same}"


def test_patched_scorer_constant_misses_the_cache(tiny_base, tmp_path, monkeypatch):
    ck = tmp_path / "b"
    shutil.copytree(tiny_base, ck)
    first = E.evaluate_checkpoint(str(ck), 4, 2, tasks=("geneval",))
    calls = []
    real = E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: calls.append(k.get("split")) or real(*a, **k))
    again = E.evaluate_checkpoint(str(ck), 4, 2, tasks=("geneval",))
    assert calls == [] and np.array_equal(first["train"]["geneval"], again["train"]["geneval"])
    monkeypatch.setattr(R, "MIN_AREA", R.MIN_AREA + 1)                    # no version edit anywhere
    E.evaluate_checkpoint(str(ck), 4, 2, tasks=("geneval",))
    assert calls == ["train", "test"], calls


def test_two_tables_are_paired(tiny_base, tiny_teachers, monkeypatch):
    """Image i of either table starts from the noise of seed EVAL_SEED + i in every checkpoint;
    prompt i is split[i % len]."""
    seen = []
    real = S.sample
    monkeypatch.setattr(S, "sample", lambda pol, ps, seeds, *a, **k: seen.append((list(ps), list(seeds))) or real(pol, ps, seeds, *a, **k))
    for ck in (tiny_base, tiny_teachers[2]):
        pol = S.Policy(str(ck))
        for split in R.SPLITS:
            E.evaluate(pol, "aesthetic", 5, split=split)
    want = [list(range(E.EVAL_SEED, E.EVAL_SEED + 5))] * 4
    assert [s for _, s in seen] == want
    assert seen[0][0] == E.eval_prompts("aesthetic", "train", 5) == seen[2][0]
    assert seen[1][0] == E.eval_prompts("aesthetic", "test", 5) == seen[3][0]
    assert seen[0][0] != seen[1][0]


def test_a_shipped_checkpoints_cache_is_never_written(tiny_base, monkeypatch, tmp_path):
    """A miss of a checkpoint inside base/ or ckpts/ lands under runs/scores/, not in the folder."""
    monkeypatch.setattr(runs, "REPO", tmp_path)
    shipped = tmp_path / "ckpts" / "x"
    shutil.copytree(tiny_base, shipped)
    (shipped / "scores.json").unlink(missing_ok=True)          # other tests cache into the tiny base
    before = (shipped / "opd.json").read_bytes()
    E.evaluate_checkpoint(str(shipped), 2, 0, tasks=("aesthetic",))
    assert not (shipped / "scores.json").exists() and (shipped / "opd.json").read_bytes() == before
    assert (tmp_path / "runs" / "scores" / "ckpts__x.json").is_file()
    E.evaluate_checkpoint(str(shipped), 2, 0, tasks=("aesthetic",), export=True)   # evaluate.py --export-scores
    assert len(json.loads((shipped / "scores.json").read_text())) == 1


# ---- the shipped checkpoints ---------------------------------------------------------------
SHIPPED = ["base"] + sorted(f"ckpts/{p.name}" for p in (REPO / "ckpts").iterdir() if p.is_dir())


@pytest.mark.parametrize("ckpt", SHIPPED)
def test_shipped_checkpoints_follow_the_contract(ckpt):
    """base/ and ckpts/*: load as policies and carry opd.json without absolute paths."""
    path = REPO / ckpt
    meta = runs.read_meta(path)
    assert meta["role"] == ("base" if ckpt == "base" else "teacher")
    texts = [(path / f).read_text() for f in ("opd.json", "adapter_config.json") if (path / f).is_file()]
    assert not any(str(REPO) in t or '"/' in t for t in texts), "absolute path in shipped metadata"
    if ckpt != "base":
        assert meta["task"] == Path(ckpt).name and runs.resolve_base(path, meta) == str((REPO / "base").resolve())
        # at most 60 minutes on 2 cores (--minutes stops at the first iteration past the budget)
        assert meta["trained"]["minutes"] <= 60.2, f"{ckpt} trained {meta['trained']['minutes']} min"
    pol = S.Policy(str(path))
    assert pol.guidance == meta["cfg"]


def test_shipped_caches_hit(monkeypatch):
    """On a clean checkout the main job's evaluations of base/ and ckpts/* come from their
    shipped scores.json (both tables): nothing is sampled."""
    monkeypatch.setattr(S, "Policy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("cache miss: would sample")))
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("cache miss: would score")))
    for ck in SHIPPED:
        per = E.evaluate_checkpoint(str(REPO / ck), 256, E.HELDOUT_N)
        assert {s: sorted(v) for s, v in per.items()} == {"train": sorted(R.TASKS), "test": sorted(R.TASKS)}
        assert all(len(v) == len(E.eval_prompts(t, s, k)) for s, k in (("train", 256), ("test", E.HELDOUT_N))
                   for t, v in per[s].items())


LSB_FLIPS = 8          # pixel values a different CPU may round the other way, per image (measured: 1-2)


def reward_noise(task: str, imgs: np.ndarray, prompts: list[str], draws: int = 16) -> float:
    """A reward's own numerical noise on these images, measured: the largest change of a score when
    one pixel value moves by one (the last bit of a uint8 image, which another CPU's floating point
    can flip), over `draws` random pixels per image, times LSB_FLIPS. Smooth rewards (aesthetic:
    ~4e-5 per flip) get a tolerance; discrete ones (GenEval's rules, OCR reads) almost always 0."""
    rng, base = np.random.default_rng(0), R.TASKS[task].reward(imgs, prompts)
    worst = 0.0
    for _ in range(draws):
        moved = imgs.copy()
        n, h, w, c = imgs.shape
        i, y, x, ch = np.arange(n), rng.integers(h, size=n), rng.integers(w, size=n), rng.integers(c, size=n)
        moved[i, y, x, ch] = np.where(imgs[i, y, x, ch] == 255, 254, imgs[i, y, x, ch] + 1)
        worst = max(worst, float(np.abs(R.TASKS[task].reward(moved, prompts) - base).max()))
    return LSB_FLIPS * worst


def test_shipped_teacher_cache_reproduces():
    """Recomputing the first 8 images per task of a shipped teacher gives its cached per-image
    scores (the cache holds what the protocol computes, not a stale or hand-made number), within
    the reward's own numerical noise on those images (reward_noise) plus the cache's rounding (1e-6):
    the floating point of another CPU may flip a pixel's last bit, nothing more."""
    path = REPO / "ckpts" / "ocr"
    cached = E.evaluate_checkpoint(str(path), 256, E.HELDOUT_N)["train"]
    pol = S.Policy(str(path))
    for task in R.TASKS:
        ps = E.eval_prompts(task, "train", 8)[:8]                # GenEval's list rounds up to whole tags
        imgs = S.sample(pol, ps, [E.EVAL_SEED + i for i in range(8)], E.EVAL_STEPS, pol.shift, pol.guidance)
        fresh = R.TASKS[task].reward(imgs, ps)
        tol = reward_noise(task, imgs, ps) + 1e-6
        diff = np.abs(fresh - cached[task][:8])
        assert diff.max() <= tol, (f"{task}: {int((diff > tol).sum())} of 8 images differ from the cache by up to "
                                   f"{diff.max():.2e}, more than the reward's measured noise {tol:.2e}")


def test_shipped_teachers_are_specialists():
    """Measured on the shipped teachers, primary table (cached n = 256 paired scores; GenEval 260,
    52 per tag): each gains over the base on its own task by more than 2 paired standard errors,
    and its own task is where it gains most, each gain divided by its column's range over base +
    teachers (GenEval +0.177 +- 0.032 on its Overall; README, "Results")."""
    per = {ck: E.evaluate_checkpoint(str(REPO / ck), 256, E.HELDOUT_N)["train"] for ck in SHIPPED}
    rng = {t: np.ptp([per[ck][t].mean() for ck in SHIPPED]) for t in R.TASKS}
    for own in R.TASKS:
        ck = f"ckpts/{own}"
        gain, se = E.paired(per[ck][own], per["base"][own])
        assert gain > 2 * se, f"{own} teacher - base = {gain:+.3f} +- {se:.3f} (paired SE); need > 2 SE"
        norm = {t: (per[ck][t].mean() - per["base"][t].mean()) / rng[t] for t in R.TASKS}
        assert max(norm, key=norm.get) == own, f"{own} teacher's normalised gains {norm}: largest not on its own task"


# ---- the README and docs: tables rendered from the shipped results ---------------------------
def test_readme_is_short_and_its_tables_are_the_shipped_results():
    """At most 12 KB, and every table marked <!-- table FILE KEY --> equals E.render_table of
    the results JSON shipped under docs/ (so every number in it is current)."""
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes (limit 12 KB)"
    marked = re.findall(r"<!-- table (\S+) (\w+) -->\n(.*?)<!-- end -->", text, re.S)
    assert len(marked) >= 2, "the README's tables must be rendered from docs/ results JSONs"
    for f, key, body in marked:
        res = json.loads((REPO / f).read_text())
        assert body.strip() == E.render_table(res, key).strip(), f"README table {f} {key} is stale: re-render it"
    for link in re.findall(r"\]\(((?:docs|assets)/[^)]+)\)", text):
        assert (REPO / link).is_file(), f"README links to a missing file {link}"


def test_study_tables_in_docs_are_the_shipped_results():
    """Every results JSON shipped under docs/studies/ has its table in docs/experiments.md, marked
    <!-- study FILE -->, equal to experiments.render_study of that JSON, and every table marked
    <!-- table FILE KEY --> equals E.render_table of its JSON (every number current)."""
    import experiments as X
    text = (REPO / "docs" / "experiments.md").read_text()
    marked = dict(re.findall(r"<!-- study (\S+) -->\n(.*?)<!-- end -->", text, re.S))
    for f in sorted((REPO / "docs" / "studies").glob("*.json")):
        rel = str(f.relative_to(REPO))
        assert rel in marked, f"docs/experiments.md shows no table of {rel}"
        assert marked[rel].strip() == X.render_study(f.stem, json.loads(f.read_text())).strip(), \
            f"docs/experiments.md's table of {rel} is stale: re-render it"
    for rel in marked:
        assert (REPO / rel).is_file(), f"docs/experiments.md marks a table of a missing {rel}"
    t1 = marked["docs/studies/table1.json"]                    # GenEval's per-tag accuracies, both tables
    assert t1.count("per tag (strict accuracy") == 2 and t1.count("| Model | position |") == 2, t1
    for f, key, body in re.findall(r"<!-- table (\S+) (\w+) -->\n(.*?)<!-- end -->", text, re.S):
        assert body.strip() == E.render_table(json.loads((REPO / f).read_text()), key).strip(), \
            f"docs/experiments.md's table {f} {key} is stale: re-render it"
