#!/usr/bin/env python3
"""Collects the outputs of tools/recipe-smollm2.sh into OUT/results.json and OUT/results.md.

    report.py OUT

Reads OUT/eval/{base,extended,result}.json (evaluate --json), OUT/eval/tokenizers.json
(tokenizer-report --json), OUT/eval/gen-*.txt (generate), OUT/train/metrics.jsonl,
OUT/data/split.json, OUT/settings.json and OUT/.steps/*.seconds.
"""
import datetime
import json
import math
import os
import platform
import sys

out = sys.argv[1]
ev = os.path.join(out, "eval")


def load(path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if default is not None:
            return default
        raise


settings = load(os.path.join(out, "settings.json"))
models = {m: load(os.path.join(ev, f"{m}.json")) for m in ("base", "extended", "result") if os.path.exists(os.path.join(ev, f"{m}.json"))}
tok_rows = load(os.path.join(ev, "tokenizers.json"))
split = load(os.path.join(out, "data", "split.json"))

TEXTS = [("zh_heldout", "held-out Chinese poems (tang300+song100, every 10th)"),
         ("en_heldout", "held-out English fortunes (every 20th)"),
         ("grass", "《赋得古原草送别》 (a training document)")]
MCS = ["mmlu", "cmmlu", "ceval", "agieval", "gaokao"]


def rel(new, old):
    return (new - old) / old


# Tokens per character (tokenizer-report over the whole held-out splits).
tpc = {}
for lang in ("zh", "en"):
    row = {r["tokenizer"]: r["tokens_per_char"] for r in tok_rows if r["language"] == lang}
    tpc[lang] = {"base": row["base"], "extended": row["extended"], "change": rel(row["extended"], row["base"])}

bpc = {}
for key, _ in TEXTS:
    entry = {}
    for m, res in models.items():
        s = res[f"text:{key}"]
        entry[m] = s["bits_per_char"]
        entry[f"{m}_tokens"] = s["tokens"]
    entry["chars"] = models["base"][f"text:{key}"]["chars"]
    entry["change"] = rel(entry["result"], entry["base"])
    bpc[key] = entry

mc = {}
for name in MCS:
    k = f"mc:{name}"
    if k in models["base"] and k in models["result"]:
        mc[name] = {"questions": models["base"][k]["questions"], "style": models["base"][k].get("style", "original"),
                    "base": models["base"][k]["accuracy"], "result": models["result"][k]["accuracy"]}

gens = []
for lang, prompt in (("zh", settings["zh_prompt"]), ("en", settings["en_prompt"])):
    g = {"prompt": prompt}
    for m in ("base", "result"):
        with open(os.path.join(ev, f"gen-{m}-{lang}.txt"), encoding="utf-8") as f:
            text = f.read().rstrip("\n")
        g[m] = text[len(prompt):] if text.startswith(prompt) else text
    gens.append(g)

# Training: metrics.jsonl (one line per logged step).
steps = []
mpath = os.path.join(out, "train", "metrics.jsonl")
if os.path.exists(mpath):
    with open(mpath) as f:
        for line in f:
            d = json.loads(line)
            if "step" in d and "loss" in d:
                steps.append(d)
def stage_summary(name):
    s = [d for d in steps if d.get("stage") == name]
    if not s:
        return {"steps": 0}
    tps = [d["tokens_per_s"] for d in s if d.get("tokens_per_s")]
    val = [d["val_loss"] for d in s if "val_loss" in d]
    out = {"steps": s[-1]["stage_step"], "first_loss": s[0]["loss"], "last_loss": s[-1]["loss"],
           "tokens_per_s": sum(tps) / len(tps) if tps else None}
    if val:
        out["last_val_loss"] = val[-1]
    return out
tokens_per_step = settings["rows"] * settings["seq_len"]
training = {"embeddings": stage_summary("embeddings"), "zh-cpt": stage_summary("zh-cpt"),
            "tokens_per_step": tokens_per_step,
            "tokens": steps[-1]["tokens"] if steps else 0}
seconds = {}
sdir = os.path.join(out, ".steps")
for name in sorted(os.listdir(sdir)):
    if name.endswith(".seconds"):
        with open(os.path.join(sdir, name)) as f:
            seconds[name[:-8]] = float(f.read().strip() or 0)
training["pretrain_seconds"] = seconds.get("pretrain")
n_steps = settings["stage1_steps"] + settings["stage2_steps"]
training["seconds_per_step"] = seconds["pretrain"] / n_steps if seconds.get("pretrain") else None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


mem_gib = None
try:
    with open("/proc/meminfo") as f:
        mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
except (OSError, ValueError, IndexError):
    pass
machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads_used": settings["threads"],
           "memory_gib": mem_gib, "os": platform.platform(), "note": settings.get("machine_note", "")}

targets = {
    "zh_tokens_per_char_down_40pct": tpc["zh"]["change"] <= -0.40,
    "zh_heldout_bpc_below_base": bpc["zh_heldout"]["result"] < bpc["zh_heldout"]["base"],
    "en_heldout_bpc_within_2pct": bpc["en_heldout"]["result"] <= 1.02 * bpc["en_heldout"]["base"],
    "grass_poem_continued": gens[0]["result"].startswith("一岁一枯荣"),
    "grass_poem_bpc_falls": bpc["grass"]["result"] < bpc["grass"]["base"],
}

results = {
    "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, imported to F32)",
    "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    "settings": settings,
    "machine": machine,
    "split": split,
    "tokens_per_char": tpc,
    "bits_per_char": bpc,
    "mc_accuracy": mc,
    "generations": gens,
    "training": training,
    "step_seconds": seconds,
    "targets": targets,
}


def check_finite(v, path="results"):
    if isinstance(v, float) and not math.isfinite(v):
        sys.exit(f"report.py: {path} is not finite: {v}")
    if isinstance(v, dict):
        for k, x in v.items():
            check_finite(x, f"{path}.{k}")
    if isinstance(v, list):
        for i, x in enumerate(v):
            check_finite(x, f"{path}[{i}]")


check_finite({k: v for k, v in results.items() if k != "training"})
tmp = os.path.join(out, "results.json.tmp")
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, ensure_ascii=False)
os.replace(tmp, os.path.join(out, "results.json"))

# Markdown.
has_ext = "extended" in models
def pct(x):
    return f"{100 * x:+.1f}%"
L = []
L.append("# Colossal-LLaMA-2 recipe on SmolLM2-135M-Instruct: results\n")
L.append(f"Finished {results['finished_utc']} UTC. Written by `tools/recipe-smollm2.sh` (`tools/recipe/report.py`).\n")
L.append("| metric | base | " + ("extended, untrained | " if has_ext else "") + "result | change (result vs base) |")
L.append("|---|---:|" + ("---:|" if has_ext else "") + "---:|---:|")
for lang in ("zh", "en"):
    t = tpc[lang]
    L.append(f"| {lang} tokens/char (held-out split) | {t['base']:.3f} | " + (f"{t['extended']:.3f} | " if has_ext else "") + f"{t['extended']:.3f} | {pct(t['change'])} |")
for key, label in TEXTS:
    b = bpc[key]
    L.append(f"| bits/char: {label} | {b['base']:.4f} | " + (f"{b['extended']:.4f} | " if has_ext else "") + f"{b['result']:.4f} | {pct(b['change'])} |")
for name, r in mc.items():
    L.append(f"| {name} sample accuracy ({r['questions']} q., {settings['mc_shots']}-shot, {r['style']} prompts) | {100 * r['base']:.1f}% | " + ("– | " if has_ext else "") + f"{100 * r['result']:.1f}% | {100 * (r['result'] - r['base']):+.1f} pt |")
L.append("")
L.append("## Targets (issue #9)\n")
L.append("| target | met |")
L.append("|---|---|")
names = {"zh_tokens_per_char_down_40pct": "Chinese tokens/char at least 40% down",
         "zh_heldout_bpc_below_base": "held-out Chinese bits/char below base",
         "en_heldout_bpc_within_2pct": "held-out English bits/char within 2% of base",
         "grass_poem_continued": "「离离原上草，」 → 「一岁一枯荣」",
         "grass_poem_bpc_falls": "bits/char of the 离离原上草 poem fall"}
for k, v in targets.items():
    L.append(f"| {names[k]} | {'yes' if v else 'no'} |")
L.append("")
L.append(f"## Greedy generations ({settings['gen_tokens']} new tokens)\n")
for g in gens:
    L.append(f"Prompt `{g['prompt']}`\n")
    for m in ("base", "result"):
        L.append(f"- {m}: `{g['prompt']}` + `{g[m].replace(chr(10), '⏎').replace('`', 'ʼ')}`")
    L.append("")
L.append("## Training\n")
L.append("| stage | steps | first loss | last loss | tokens/s |")
L.append("|---|---:|---:|---:|---:|")
for name in ("embeddings", "zh-cpt"):
    s = training[name]
    if s["steps"]:
        L.append(f"| {name} | {s['steps']} | {s['first_loss']:.3f} | {s['last_loss']:.3f} | {s['tokens_per_s'] or 0:.0f} |")
L.append("")
if training["seconds_per_step"]:
    L.append(f"{training['tokens']} training tokens ({tokens_per_step} per step), pretrain wall time {training['pretrain_seconds']:.0f} s, {training['seconds_per_step']:.1f} s/step.\n")
L.append("## Settings\n")
for k, v in settings.items():
    L.append(f"- `{k}` = `{v}`")
L.append("")
L.append("Data split: " + ", ".join(f"{k} {v['documents']} docs / {v['chars']} chars" for k, v in split.items()) + ".\n")
L.append("Step wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".\n")
L.append("## Machine\n")
L.append(f"{machine['cpu']}, {machine['cores']} cores ({machine['threads_used']} threads used), {machine['memory_gib']} GiB, {machine['os']}. {machine['note']}\n")
with open(os.path.join(out, "results.md.tmp"), "w", encoding="utf-8") as f:
    f.write("\n".join(L))
os.replace(os.path.join(out, "results.md.tmp"), os.path.join(out, "results.md"))
print("\n".join(L[:3 + 2 + 2 + len(TEXTS) + len(mc) + 1]))
