"""
The report of a run: every stage's numbers side by side, in one markdown file with loss-curve plots.

    python report.py --out=out          # after `bash speedrun.sh`; writes out/report.md and out/plots/*.png

It only reads what the stages wrote under --out (it imports no stage, as no stage imports another):
  data/stats.json, data/tokenizer_meta.json    prepare_data.py: documents and tokens per source, the tokenizer
  train/, train_moe/, sft/, dpo/ metrics.jsonl train.py, sft.py and dpo.py logs (loss, tokens/s, MoE balance)
  upcycle/config.json, */model.safetensors     upcycle.py; parameter counts from the safetensors header
  synth/summary.json, dpo/summary.json         synth.py and dpo.py summaries
  eval/<stage>/eval.json                       eval.py once per model stage (pretrain, moe_train, sft, dpo)
  timings.jsonl                                speedrun.sh: {"stage": name, "seconds": s} per stage
A number a stage should have written but did not shows as "missing" (the file is named under the table);
"—" means the column does not apply to that stage by design. matplotlib is optional (requirements-extra.txt).
"""

import json
import math
import os
import struct
import sys

# the one setting; parsed by hand because common.load_config would import torch (seconds) for a markdown file
out = "out"
for arg in sys.argv[1:]:
    if not arg.startswith("--out="):
        sys.exit(f"unknown argument {arg!r}: report.py takes --out=DIR only")
    out = arg.split("=", 1)[1]

STAGES = ["data", "tokenizer", "pretrain", "upcycle", "moe_train", "synth", "sft", "dpo", "eval"]
MODEL_DIRS = {"pretrain": "train", "moe_train": "train_moe", "sft": "sft", "dpo": "dpo"}  # stage -> out/<dir>/model
NA, MISSING = "—", "missing"
missing = []  # files a stage should have written, for the note under the table


def load(path):
    """A stage's JSON (JSONL: a list) under out/, or None (remembered as missing) when the stage did not write it."""
    full = os.path.join(out, path)
    if not os.path.exists(full):
        missing.append(path)
        return None
    with open(full, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)


def fmt(x, spec, none=MISSING):
    return none if x is None else format(x, spec)


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def params_in(path):
    """(total, in experts) parameters from a safetensors header (8-byte length + JSON), no torch needed. Experts are
    moe.py's stacked 3-d FFN weights (E, out, in). The expert_bias buffer is no parameter."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    shapes = [t["shape"] for name, t in header.items() if name != "__metadata__" and not name.endswith("expert_bias")]
    return sum(map(math.prod, shapes)), sum(math.prod(s) for s in shapes if len(s) == 3)


timings = {line["stage"]: line["seconds"] for line in load("timings.jsonl") or []}  # a re-run stage: the last
evals = {stage: load(f"eval/{stage}/eval.json") for stage in MODEL_DIRS}
metrics = {stage: load(f"{d}/metrics.jsonl") or [] for stage, d in MODEL_DIRS.items()}
stats, tok_meta, upcycle_meta = load("data/stats.json"), load("data/tokenizer_meta.json"), load("upcycle/config.json")
synth, dpo = load("synth/summary.json"), load("dpo/summary.json")
rounds = (dpo or {}).get("rounds") or []


def val_losses(stage):
    return {src: v["loss"] for src, v in (evals[stage] or {}).get("val", {}).items()}


# -----------------------------------------------------------------------------
# one row per stage. A cell starts as MISSING where the stage should have a number, NA where the column does not
# apply to it by design; the model stages take their metrics from their own eval.py run.

HEADER = ["stage", "val loss (mean of sources)", "mc strict", "mc lenient", "task pass rate (strict)",
          "reward accuracy", "tokens/s", "time", "what it did"]
KEYS = ["val_loss", "mc_strict", "mc_lenient", "pass_rate", "reward", "tokens_s", "time", "what"]
MODEL_KEYS = ["val_loss", "mc_strict", "mc_lenient", "pass_rate", "tokens_s"]
APPLIES = {"data": ["tokens_s"], "tokenizer": [], "pretrain": MODEL_KEYS, "upcycle": [], "moe_train": MODEL_KEYS,
           "synth": [], "sft": MODEL_KEYS, "dpo": MODEL_KEYS + ["reward"], "eval": []}
rows = {stage: {k: MISSING if k in APPLIES[stage] or k == "what" or k == "time" and stage != "tokenizer" else NA
                for k in KEYS} for stage in STAGES}  # the tokenizer is trained inside prepare_data: data's time
for stage in STAGES:
    # eval: the held-out task generation and the four eval.py runs
    seconds = sum(s for name, s in timings.items()
                  if name == stage or stage == "eval" and (name.startswith("eval_") or name == "heldout"))
    if seconds and stage != "tokenizer":
        rows[stage]["time"] = f"{seconds:.0f}s"
for stage, e in evals.items():
    if e:
        rows[stage].update(val_loss=fmt(mean(list(val_losses(stage).values())), ".3f"),
                           mc_strict=f"{e['mc']['strict']:.3f}", mc_lenient=f"{e['mc']['lenient']:.3f}",
                           pass_rate=f"{e['tasks']['strict']:.3f}")


def per_second(n, stage):
    return f"{n / timings[stage]:,.0f}" if timings.get(stage) else MISSING


if stats:
    src = stats["sources"]
    tokens = sum(s["tokens_train"] + s["tokens_val"] for s in src.values())
    rows["data"].update(tokens_s=per_second(tokens, "data"),
                        what=f"{sum(s['docs_out'] for s in src.values()):,} of "
                             f"{sum(s['docs_in'] for s in src.values()):,} docs kept, {tokens:,} tokens "
                             f"({len(src)} sources)")
    # characters per token of the text itself: each document also carries its <|bos|> and <|eos|>
    cpt = {name: s["chars_out"] / max(1, s["tokens_train"] + s["tokens_val"] - 2 * s["docs_out"])
           for name, s in src.items()}
    rows["tokenizer"]["what"] = (f"{tok_meta['vocab_size'] if tok_meta else MISSING} ids; chars/token "
                                 + ", ".join(f"{name} {c:.2f}" for name, c in cpt.items()))

for stage in ("pretrain", "moe_train"):
    train = [m for m in metrics[stage] if "loss" in m]
    if train:
        # the median over log intervals (the first holds start-up); one batch's loss is noisy: the last 3 averaged
        what = (f"{train[-1]['step']} steps, {train[-1]['tokens']:,} tokens, train loss {train[0]['loss']:.2f} -> "
                f"{mean([m['loss'] for m in train[-3:]]):.2f} (last 3 logs)")
        if "moe" in train[-1]:  # Switch balance loss: 1.0 when tokens spread evenly (Tanuki's stayed ~1)
            what += f", balance loss {mean([l['aux_loss'] for l in train[-1]['moe'].values()]):.3f} (1.0 = even)"
        rows[stage].update(tokens_s=f"{sorted(m['tok_per_s_per_gpu'] for m in train)[len(train) // 2]:,.0f}",
                           what=what)

if upcycle_meta and os.path.exists(os.path.join(out, "upcycle", "model.safetensors")):
    total, experts = params_in(os.path.join(out, "upcycle", "model.safetensors"))
    dense = os.path.join(upcycle_meta["upcycled_from"], "model.safetensors")
    dense = f"{params_in(dense)[0] / 1e6:.2f}M dense -> " if os.path.exists(dense) else ""
    m = upcycle_meta["model"]
    active = total - experts + experts * m["moe_top_k"] // m["n_experts"]  # a token uses top_k of the experts
    rows["upcycle"]["what"] = (f"{m['n_experts']} experts top-{m['moe_top_k']}, noise {upcycle_meta['noise_ratio']}: "
                               f"{dense}{total / 1e6:.2f}M params, {active / 1e6:.2f}M active")

if synth:
    rejected = ", ".join(f"{n} {why}" for why, n in synth["rejected"].items()) or "none rejected"
    rows["synth"]["what"] = f"{synth['total_kept']:,} samples kept of {synth['config']['num_samples']:,} ({rejected})"

sft_train = [m for m in metrics["sft"] if "loss" in m]
sft_val = [m for m in metrics["sft"] if "val_loss" in m]
if sft_train and sft_val:
    rows["sft"].update(tokens_s=per_second(sft_train[-1]["tokens"], "sft"),
                       what=f"{sft_train[-1]['step']} steps, {sft_train[-1]['tokens']:,} tokens, held-out chat loss "
                            f"{sft_val[0]['val_loss']:.2f} -> {sft_val[-1]['val_loss']:.2f}")

if rounds:
    seconds = sum(r["seconds"] for r in rounds)
    # on the held-out pairs after the last round; dpo.py writes null when no held-out prompt gave a pair
    rows["dpo"].update(reward=fmt(rounds[-1]["val_reward_accuracy_after"], ".3f", "none (no held-out pairs)"),
                       tokens_s=f"{sum(r['tokens_per_second'] * r['seconds'] for r in rounds) / seconds:,.0f}",
                       what=f"{len(rounds)} round(s), {sum(r['pairs'] for r in rounds):,} pairs from "
                            f"{sum(r['samples'] for r in rounds):,} samples, sampled pass rate "
                            f"{rounds[0]['pass_rate_before']:.3f} -> {rounds[-1]['pass_rate_after']:.3f}")

done = [e for e in evals.values() if e]
if done:
    rows["eval"]["what"] = (f"{len(done)} checkpoints x {done[0]['tasks']['tasks']} held-out tasks "
                            f"({done[0]['mc']['questions']} multiple choice), {len(done[0]['val'])} val sources")

# -----------------------------------------------------------------------------
# did each model stage improve on the checkpoint it started from? Said plainly either way.


def parent_of(stage):
    """The model stage whose checkpoint this one started from: its config.json's init_from (through upcycle)."""
    meta = load(f"{MODEL_DIRS[stage]}/model/config.json") or {}
    init = meta.get("init_from") or meta.get("config", {}).get("init_from", "")
    if os.path.basename(os.path.normpath(init)) == "upcycle" and upcycle_meta:
        init = upcycle_meta["upcycled_from"]
    parts = os.path.normpath(init).split(os.sep)[-2:]
    return next((other for other, d in MODEL_DIRS.items() if parts == [d, "model"]), None)


def change(a, b):
    return "raised" if a > b else "did not raise" if a == b else "lowered"


# why a worse number can be the expected outcome on the tiny run
EXPECTED = {"sft": "expected: SFT trains on chat answers only, not on the pretraining text",
            "dpo": "expected: DPO moves the policy toward its preferred chat answers, not the pretraining text"}
findings = []
for stage in ("moe_train", "sft", "dpo"):
    parent = parent_of(stage)
    if not parent or not evals[stage] or not evals[parent]:
        continue
    before, after = val_losses(parent), val_losses(stage)
    common = [src for src in after if src in before]
    worse = [src for src in common if after[src] > before[src]]
    verb = ("raised" if len(worse) == len(common) else f"raised (on {', '.join(worse)})" if worse
            else "lowered" if any(after[src] < before[src] for src in common) else "did not change")
    findings.append(f"{stage} {verb} the {parent} val loss: "
                    + ", ".join(f"{src} {before[src]:.2f} -> {after[src]:.2f}" for src in common)
                    + (f": {EXPECTED.get(stage, 'not an improvement')}" if worse else ""))
    for key, name in [("mc", "multiple choice strict accuracy"), ("tasks", "verifiable-task pass rate")]:
        b, a = evals[parent][key]["strict"], evals[stage][key]["strict"]
        chance = f", chance {evals[stage]['mc']['chance']:.3f}" if key == "mc" else ""
        findings.append(f"{stage} {change(a, b)} the {name}: {b:.3f} -> {a:.3f} ({parent} -> {stage}{chance})")
dpo_val = [m["val_loss"] for m in metrics["dpo"] if m.get("val_loss") is not None]
if len(dpo_val) > 1:  # the held-out pairs' DPO loss, first and last evaluation (0.693 = log 2 before training)
    findings.append(f"dpo {change(dpo_val[-1], dpo_val[0])} the held-out DPO loss: "
                    f"{dpo_val[0]:.3f} -> {dpo_val[-1]:.3f}")
for key, name in [("pass_rate", "sampled pass rate on held-out prompts"), ("greedy_pass_rate", "greedy pass rate"),
                  ("val_reward_accuracy", "held-out reward accuracy")] if rounds else []:
    b, a = rounds[0][f"{key}_before"], rounds[-1][f"{key}_after"]
    findings.append(f"dpo has no {name}: no held-out prompt gave a pair" if a is None or b is None
                    else f"dpo {change(a, b)} the {name}: {b:.3f} -> {a:.3f}")

# -----------------------------------------------------------------------------
# plots (optional): pretrain + MoE train loss vs tokens, SFT loss vs step, DPO loss and reward accuracy vs step

plots, plot_note = [], ""
try:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display: works on a headless machine
    import matplotlib.pyplot as plt
except ImportError:
    plt, plot_note = None, "plots skipped: matplotlib is not installed (pip install -r requirements-extra.txt)"


def save(fig, axes, name, title):
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "plots", name), dpi=100)
    plt.close(fig)
    plots.append((title, f"plots/{name}"))


if plt is not None:
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    if metrics["pretrain"] or metrics["moe_train"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        offset = 0  # MoE training continues from the pretrained model: its tokens follow the dense run's
        for stage in ("pretrain", "moe_train"):
            tokens_at = {m["step"]: offset + m["tokens"] for m in metrics[stage] if "loss" in m}
            losses = [m["loss"] for m in metrics[stage] if "loss" in m]
            ax.plot(list(tokens_at.values()), losses, label=f"{stage} train")
            # train.py's own held-out loss (mean of sources) at its eval steps: less noisy than one batch
            val = [(tokens_at[m["step"]], mean(list(m["val_loss"].values())))
                   for m in metrics[stage] if "val_loss" in m and m["step"] in tokens_at]
            ax.plot([t for t, _ in val], [v for _, v in val], "o--", label=f"{stage} val (mean of sources)")
            offset = max(tokens_at.values(), default=offset)
        ax.set(xlabel="tokens", ylabel="loss", title="pretraining: dense, then upcycled MoE")
        save(fig, [ax], "pretrain_loss.png", "pretrain + MoE train loss vs tokens")
    if sft_train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([m["step"] for m in sft_train], [m["loss"] for m in sft_train], label="train loss")
        ax.plot([m["step"] for m in sft_val], [m["val_loss"] for m in sft_val], "o-", label="held-out loss")
        ax.set(xlabel="step", ylabel="loss (assistant tokens)", title="SFT")
        save(fig, [ax], "sft_loss.png", "SFT loss and held-out loss vs step")
    if any("loss" in m for m in metrics["dpo"]):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in sorted({m.get("round", 0) for m in metrics["dpo"]}):
            train = [m for m in metrics["dpo"] if m.get("round", 0) == r and "loss" in m]
            val = [m for m in metrics["dpo"] if m.get("round", 0) == r and m.get("val_reward_accuracy") is not None]
            for ax, key in [(ax1, "loss"), (ax2, "reward_accuracy")]:
                ax.plot([m["step"] for m in train], [m[key] for m in train], label=f"round {r} train")
                ax.plot([m["step"] for m in val], [m[f"val_{key}"] for m in val], "o-", label=f"round {r} held-out")
        ax1.set(xlabel="step", ylabel="DPO loss", title="DPO loss")
        ax2.set(xlabel="step", ylabel="reward accuracy", title="DPO reward accuracy", ylim=(-0.05, 1.05))
        save(fig, [ax1, ax2], "dpo.png", "DPO loss and reward accuracy vs step")

# -----------------------------------------------------------------------------
# the markdown


def table(header, body):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


total = sum(timings.values())
main_table = table(HEADER, [[stage] + [rows[stage][k] for k in KEYS] for stage in STAGES])
lines = [f"# nanotanuki report: {out}", "", f"Stages in run order; {total:.0f}s of stage time ({total / 60:.1f} min).",
         "", *main_table, "",
         ("val loss: eval.py's mean over the sources (each below); mc strict / lenient: the reply is exactly the "
          "option number / contains it; task pass rate: strict, held-out verifiable tasks; reward accuracy: DPO's "
          "implicit reward ranks the held-out chosen answer first; tokens/s: train.py's median log interval, dpo.py's "
          "own, else tokens / the stage's wall time (data: written, sft: trained); time: speedrun.sh's wall time (the "
          "tokenizer is trained in data; eval: held-out tasks + four eval.py runs). \"—\": does not apply.")]
if missing:
    lines += ["", "Missing (a stage did not write it): " + ", ".join(f"`{out}/{p}`" for p in sorted(set(missing)))]
lines += ["", "## Did each stage improve?", "", *[f"- {f}" for f in findings or ["(no model stage pair to compare)"]]]

lines += ["", "## Stage details", ""]
if stats:
    lines += ["Data, per source:", "", *table(
        ["source", "docs in", "docs kept", "tokens (train + val)", "chars/token"],
        [[name, f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{s['tokens_train'] + s['tokens_val']:,}",
          f"{cpt[name]:.2f}"] for name, s in stats["sources"].items()]), ""]
sources = sorted({src for stage in MODEL_DIRS for src in val_losses(stage)})
if sources:
    lines += ["Validation loss per source (eval.py, the same windows for every checkpoint):", "", *table(
        ["checkpoint", *sources],
        [[stage, *(fmt(val_losses(stage).get(src), ".3f") for src in sources)] for stage in MODEL_DIRS
         if evals[stage]]), ""]
moe_last = next((m["moe"] for m in reversed(metrics["moe_train"]) if "moe" in m), None)
if moe_last:
    even = 1 / len(next(iter(moe_last.values()))["expert_load"])
    lines += [f"MoE balance at the last logged step, per layer (balance loss 1.0 = even; the busiest expert's share "
              f"of assignments, even = {even:.3f}): " + "; ".join(
                  f"layer {n}: {m['aux_loss']:.3f}, busiest {m['load_max']:.3f}" for n, m in moe_last.items()), ""]
if rounds:
    lines += ["DPO per round (pass rates: the offline verifier, strict, on held-out prompts; before -> after):", "",
              *table(["round", "prompts", "samples", "pairs", "held-out pairs", "unparsable", "pass rate (T=1)",
                      "greedy pass rate", "held-out reward accuracy", "seconds"],
                     [[str(r[k]) for k in ("round", "prompts", "samples", "pairs", "held_out_pairs", "unparsable")]
                      + [f"{fmt(r[f'{k}_before'], '.3f', 'none')} -> {fmt(r[f'{k}_after'], '.3f', 'none')}"
                         for k in ("pass_rate", "greedy_pass_rate", "val_reward_accuracy")]
                      + [f"{r['seconds']:.0f}"] for r in rounds]), ""]

lines += ["## Plots", "", *([f"![{title}]({path})" for title, path in plots] or [plot_note or "no metrics to plot"])]
with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(main_table))
print(f"wrote {os.path.join(out, 'report.md')}" + (f" ({plot_note})" if plot_note else f" and {len(plots)} plots"))
