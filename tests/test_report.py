"""Claims about report.py and the one command: every stage gets a row of its own numbers, "—" only where a column
does not apply to the stage by design; a stage that made a number worse is said to have done so; the loss curves are
drawn when matplotlib is there and the report says why when it is not; and `SMOKE=1 bash speedrun.sh` runs the whole
pipeline, DPO and the report included, to a report with every row filled."""

import json
import os
import re
import runpy
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "report.py")
STAGES = ["data", "tokenizer", "pretrain", "upcycle", "moe_train", "synth", "sft", "dpo", "eval"]
COLUMNS = ["val loss", "mc strict", "mc lenient", "pass rate", "reward accuracy", "tokens/s", "time", "what it did"]
METRICS = COLUMNS[:4]
# the columns that do not apply to each stage: the only cells allowed to be "—"
NOT_APPLICABLE = {"data": METRICS + ["reward accuracy"], "tokenizer": COLUMNS[:-1],
                  "pretrain": ["reward accuracy"], "upcycle": COLUMNS[:6], "moe_train": ["reward accuracy"],
                  "synth": COLUMNS[:6], "sft": ["reward accuracy"], "dpo": [], "eval": COLUMNS[:6]}
try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def write(path, obj):
    """JSON, or JSONL (one object of the list per line) for a .jsonl path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(o) + "\n" for o in obj) if path.endswith(".jsonl") else json.dumps(obj))


def write_safetensors_header(path, shapes):
    """A safetensors file whose header names these shapes; report.py reads only the header."""
    header = json.dumps({name: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]} for name, s in shapes.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())


def eval_json(val, strict, lenient, pass_rate):
    return {"val": {src: {"loss": loss} for src, loss in val.items()},
            "mc": {"questions": 12, "strict": strict, "lenient": lenient, "chance": 0.25},
            "tasks": {"tasks": 40, "strict": pass_rate, "lenient": pass_rate}}


def make_run(out):
    """The outputs of a whole run, small and hand-made: each number differs so a cell shows where it came from."""
    write(f"{out}/timings.jsonl", [{"stage": s, "seconds": t} for s, t in
                                   [("data", 10.0), ("pretrain", 20.0), ("upcycle", 3.0), ("moe_train", 30.0),
                                    ("synth", 2.0), ("sft", 8.0), ("dpo", 40.0), ("heldout", 1.0),
                                    ("eval_pretrain", 4.0), ("eval_moe_train", 4.0), ("eval_sft", 4.0),
                                    ("eval_dpo", 4.0)]])
    source = {"docs_in": 100, "docs_out": 80, "chars_out": 30_000, "tokens_train": 9_000, "tokens_val": 1_160}
    write(f"{out}/data/stats.json", {"sources": {"en": source, "ja": {**source, "chars_out": 15_000}}})
    write(f"{out}/data/tokenizer_meta.json", {"vocab_size": 512})
    write(f"{out}/train/metrics.jsonl", [
        {"step": 10, "loss": 7.0, "tokens": 1000, "tok_per_s_per_gpu": 900.0},
        {"step": 20, "loss": 6.0, "tokens": 2000, "tok_per_s_per_gpu": 1000.0},
        {"step": 30, "loss": 5.0, "tokens": 3000, "tok_per_s_per_gpu": 1100.0},
        {"step": 30, "val_loss": {"en": 5.5, "ja": 4.5}}])
    moe = {"0": {"aux_loss": 1.02, "load_max": 0.2, "expert_load": [0.125] * 8}}
    write(f"{out}/train_moe/metrics.jsonl", [
        {"step": 10, "loss": 4.8, "tokens": 1000, "tok_per_s_per_gpu": 700.0, "moe": moe},
        {"step": 10, "val_loss": {"en": 5.2, "ja": 4.4}}])
    write(f"{out}/sft/metrics.jsonl", [{"step": 0, "val_loss": 9.0}, {"step": 5, "loss": 6.0, "tokens": 800},
                                       {"step": 10, "loss": 4.0, "tokens": 1600}, {"step": 10, "val_loss": 4.5}])
    write(f"{out}/dpo/metrics.jsonl", [
        {"round": 0, "step": 1, "loss": 0.69, "reward_accuracy": 0.5},
        {"round": 0, "step": 2, "loss": 0.60, "reward_accuracy": 0.75},
        {"round": 0, "step": 0, "val_loss": 0.6931, "val_reward_accuracy": 0.0, "val_reward_margin": 0.0},
        {"round": 0, "step": 2, "val_loss": 0.65, "val_reward_accuracy": 0.625, "val_reward_margin": 0.1}])
    write(f"{out}/dpo/summary.json", {"model": f"{out}/dpo/model", "rounds": [
        {"round": 0, "prompts": 16, "samples": 64, "pairs": 12, "held_out_pairs": 4, "unparsable": 1,
         "pass_rate_before": 0.25, "pass_rate_after": 0.3125, "greedy_pass_rate_before": 0.5,
         "greedy_pass_rate_after": 0.5, "val_reward_accuracy_before": 0.0, "val_reward_accuracy_after": 0.625,
         "tokens_per_second": 321.0, "seconds": 40.0}]})
    write(f"{out}/synth/summary.json", {"total_kept": 190, "rejected": {"exact_duplicate": 10},
                                        "config": {"num_samples": 200}})
    write_safetensors_header(f"{out}/train/model/model.safetensors",
                             {"embed.weight": [1000, 100], "blocks.0.ffn.w_up.weight": [300, 100]})
    write_safetensors_header(f"{out}/upcycle/model.safetensors",
                             {"embed.weight": [1000, 100], "blocks.0.ffn.w_up": [4, 300, 100],
                              "blocks.0.ffn.expert_bias": [4], "blocks.0.ffn.router.weight": [4, 100]})
    write(f"{out}/upcycle/config.json", {"model": {"n_experts": 4, "moe_top_k": 2}, "noise_ratio": 0.001,
                                         "upcycled_from": f"{out}/train/model"})
    write(f"{out}/train/model/config.json", {"config": {"init_from": ""}})
    write(f"{out}/train_moe/model/config.json", {"config": {"init_from": f"{out}/upcycle"}})
    write(f"{out}/sft/model/config.json", {"init_from": f"{out}/train/model"})
    write(f"{out}/dpo/model/config.json", {"init_from": f"{out}/sft/model"})
    write(f"{out}/eval/pretrain/eval.json", eval_json({"en": 5.5, "ja": 4.5}, 0.0, 0.25, 0.05))
    write(f"{out}/eval/moe_train/eval.json", eval_json({"en": 5.25, "ja": 4.25}, 0.0, 0.25, 0.05))
    # SFT makes the pretraining text worse (as on the tiny run) and the format better; DPO leaves the mc alone
    write(f"{out}/eval/sft/eval.json", eval_json({"en": 6.0, "ja": 5.0}, 0.5, 0.5, 0.1))
    write(f"{out}/eval/dpo/eval.json", eval_json({"en": 6.25, "ja": 5.0}, 0.5, 0.5, 0.125))


def run_report(monkeypatch, out):
    monkeypatch.setattr(sys, "argv", [REPORT, f"--out={out}"])
    runpy.run_path(REPORT, run_name="__main__")
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        return f.read()


def table_rows(report):
    """{stage: {column: cell}} from the first markdown table of the report."""
    rows = {}
    for line in report.split("\n\n| stage |", 1)[1].split("\n\n", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in STAGES:
            rows[cells[0]] = dict(zip(COLUMNS, cells[1:]))
    return rows


def assert_rows_filled(rows):
    assert list(rows) == STAGES
    for stage, row in rows.items():
        for column, cell in row.items():
            if column in NOT_APPLICABLE[stage]:
                assert cell == "—", (stage, column, cell)
            else:  # a real value: a number leads every cell but the free-text one, which must hold one too
                assert cell != "—" and "missing" not in cell, (stage, column, cell)
                assert re.search(r"\d", cell), (stage, column, cell)
                if column != "what it did":
                    float(cell.rstrip("s").replace(",", ""))


def test_every_stage_row_has_its_own_numbers(tmp_path, monkeypatch):
    make_run(tmp_path)
    rows = table_rows(run_report(monkeypatch, tmp_path))
    assert_rows_filled(rows)
    assert rows["pretrain"]["val loss"] == "5.000" and rows["moe_train"]["val loss"] == "4.750"  # mean of sources
    assert rows["sft"]["mc strict"] == "0.500" and rows["pretrain"]["mc lenient"] == "0.250"
    assert rows["dpo"]["pass rate"] == "0.125" and rows["dpo"]["reward accuracy"] == "0.625"
    assert rows["pretrain"]["tokens/s"] == "1,000"  # the median log interval
    assert rows["sft"]["tokens/s"] == "200"  # 1,600 tokens in the stage's 8 s
    assert rows["dpo"]["tokens/s"] == "321" and rows["data"]["tokens/s"] == "2,032"  # 20,320 tokens written in 10 s
    assert rows["dpo"]["time"] == "40s" and rows["eval"]["time"] == "17s"  # held-out tasks + four eval.py runs
    assert "160 of 200 docs kept" in rows["data"]["what it did"]
    # 30,000 characters over 10,160 tokens less a <|bos|> and an <|eos|> for each of 80 documents
    assert "en 3.00" in rows["tokenizer"]["what it did"] and "512 ids" in rows["tokenizer"]["what it did"]
    # 100k + 4 experts of 30k + the router's 400 (the expert_bias buffer is no parameter); 2 experts of 4 active
    assert "4 experts top-2, noise 0.001: 0.13M dense -> 0.22M params, 0.16M active" in rows["upcycle"]["what it did"]
    assert "190 samples kept of 200" in rows["synth"]["what it did"]
    assert "balance loss 1.020" in rows["moe_train"]["what it did"]
    assert "held-out chat loss 9.00 -> 4.50" in rows["sft"]["what it did"]


def test_parameter_counts_from_the_safetensors_header(tmp_path, monkeypatch):
    make_run(tmp_path)
    write_safetensors_header(f"{tmp_path}/upcycle/model.safetensors",
                             {"embed.weight": [1000, 100], "blocks.0.ffn.w_up": [8, 1000, 100]})
    write(f"{tmp_path}/upcycle/config.json", {"model": {"n_experts": 8, "moe_top_k": 2}, "noise_ratio": 0.001,
                                              "upcycled_from": f"{tmp_path}/nowhere"})
    rows = table_rows(run_report(monkeypatch, tmp_path))
    # 100k shared + 800k in experts, of which a token uses 2 of 8: 0.3M active
    assert "0.90M params, 0.30M active" in rows["upcycle"]["what it did"]


def test_a_stage_that_made_a_number_worse_is_said_so(tmp_path, monkeypatch):
    make_run(tmp_path)
    report = run_report(monkeypatch, tmp_path)
    assert ("sft raised the pretrain val loss: en 5.50 -> 6.00, ja 4.50 -> 5.00: expected: SFT trains on chat answers "
            "only") in report
    assert "moe_train lowered the pretrain val loss: en 5.50 -> 5.25" in report
    assert "dpo raised (on en) the sft val loss: en 6.00 -> 6.25, ja 5.00 -> 5.00: expected" in report
    assert "dpo did not raise the multiple choice strict accuracy: 0.500 -> 0.500" in report
    assert "dpo raised the verifiable-task pass rate: 0.100 -> 0.125" in report
    assert "dpo did not raise the greedy pass rate: 0.500 -> 0.500" in report
    assert "dpo raised the held-out reward accuracy: 0.000 -> 0.625" in report
    assert "dpo lowered the held-out DPO loss: 0.693 -> 0.650" in report


def test_a_stage_that_wrote_nothing_shows_missing_not_a_number(tmp_path, monkeypatch):
    make_run(tmp_path)
    os.remove(f"{tmp_path}/dpo/summary.json")
    os.remove(f"{tmp_path}/eval/dpo/eval.json")
    report = run_report(monkeypatch, tmp_path)
    rows = table_rows(report)
    assert all(rows["dpo"][c] == "missing" for c in METRICS + ["reward accuracy", "tokens/s", "what it did"])
    assert rows["dpo"]["time"] == "40s"  # it ran, and wrote nothing
    assert f"`{tmp_path}/dpo/summary.json`" in report and f"`{tmp_path}/eval/dpo/eval.json`" in report
    # dpo.py writes null for the reward accuracy when no held-out prompt gave a pair: said so, not made a number
    make_run(tmp_path)
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    summary["rounds"][0].update(val_reward_accuracy_before=None, val_reward_accuracy_after=None)
    write(f"{tmp_path}/dpo/summary.json", summary)
    report = run_report(monkeypatch, tmp_path)
    assert table_rows(report)["dpo"]["reward accuracy"] == "none (no held-out pairs)"
    assert "dpo has no held-out reward accuracy: no held-out prompt gave a pair" in report
    monkeypatch.setattr(sys, "argv", [REPORT, "--output=x"])
    with pytest.raises(SystemExit, match="--out=DIR only"):
        runpy.run_path(REPORT, run_name="__main__")


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (requirements-extra.txt) is not installed")
def test_plots_are_drawn_and_linked(tmp_path, monkeypatch):
    make_run(tmp_path)
    report = run_report(monkeypatch, tmp_path)
    for name in ("pretrain_loss.png", "sft_loss.png", "dpo.png"):
        with open(tmp_path / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name})" in report  # relative: the report and its plots move together
    assert "plots skipped" not in report


def test_without_matplotlib_the_report_says_why_no_plots(tmp_path, monkeypatch):
    make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    report = run_report(monkeypatch, tmp_path)
    assert "plots skipped: matplotlib is not installed (pip install -r requirements-extra.txt)" in report
    assert not (tmp_path / "plots").exists() and ".png" not in report
    assert_rows_filled(table_rows(report))  # the table does not depend on matplotlib


def test_smoke_run_of_the_whole_pipeline(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable}
    # about a minute on 2 idle cores; how long it takes beside a busy neighbour is no property of the code, so the
    # timeout only catches a hang (the assert below shows the output of a failing run)
    proc = subprocess.run(["bash", os.path.join(ROOT, "speedrun.sh")], env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"the report is {out}/report.md" in proc.stdout
    report = (out / "report.md").read_text(encoding="utf-8")
    assert_rows_filled(table_rows(report))
    assert "Missing" not in report
    timed = {json.loads(line)["stage"] for line in (out / "timings.jsonl").read_text().splitlines()}
    assert {"data", "pretrain", "upcycle", "moe_train", "synth", "sft", "dpo", "heldout", "eval_dpo"} <= timed
    if HAVE_MATPLOTLIB:
        for name in ("pretrain_loss.png", "sft_loss.png", "dpo.png"):
            assert (out / "plots" / name).stat().st_size > 1000
    else:
        assert "plots skipped: matplotlib is not installed" in report
