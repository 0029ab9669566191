"""The benchmark script runs: `--quick --device cpu` exits 0 and writes its JSON and markdown with every row.

This checks that it runs and what it writes, not how fast anything is (the numbers come from a GPU run).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["full", "lora_qv", "lora_all", "qlora", "prefix", "prompt", "adapter"]


def importable(*names):
    return all(importlib.util.find_spec(n) is not None for n in names)


def test_bench_finetune_quick_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--quick", "--device", "cpu",
           "--out", str(tmp_path), "--name", "quick"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.md").read_text().startswith("# Fine-tuning benchmark")
    assert res["shapes"] == ["tiny"] and res["methods"] == METHODS

    rows = {(r["method"], r["side"]): r for r in res["rows"] if r.get("lever") is None}
    sides = ["minipeft"] + (["hf"] if importable("transformers", "peft") else [])
    for side in sides:
        for method in METHODS:
            if side == "hf" and method == "qlora" and not importable("bitsandbytes"):
                continue
            row = rows.get((method, side))
            assert row is not None, f"no row for {side} {method}"
            assert "error" not in row, f"{side} {method}: {row.get('error')}"
            assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
            assert row["trainable_params"] > 0 and math.isfinite(row["loss_first"])
    # the same weights and batch on both sides: the first loss agrees (a fair comparison computes the same thing)
    if "hf" in sides:
        for method in ("full", "lora_all"):
            assert abs(rows[(method, "minipeft")]["loss_first"] - rows[(method, "hf")]["loss_first"]) < 1e-2
    # trainable counts in closed form for the tiny shape: LoRA r=16 on q (64->64) and v (64->32), 2 layers
    assert rows[("lora_qv", "minipeft")]["trainable_params"] == 2 * 16 * ((64 + 64) + (64 + 32))
    assert rows[("prompt", "minipeft")]["trainable_params"] == 20 * 64
    for extra in ("dequant", "generation", "swap"):
        assert extra in res, res.get(extra + "_error")
    assert res["dequant"]["minipeft"]["gbps"] > 0 and res["generation"]["minipeft_base"] > 0


def test_bench_finetune_compile_switch_row(tmp_path):
    """--switches compile adds a minipeft row with compiled blocks: it runs and computes the eager row's loss;
    compile_oib (the optimizer stepped in backward as well) and compile_gc (activation checkpointing as well) train
    to the compiled row's last loss."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--quick", "--device", "cpu",
           "--out", str(tmp_path), "--name", "c", "--sides", "minipeft", "--methods", "lora_all",
           "--switches", "compile,compile_oib,compile_gc", "--extras", "none"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["lever"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert set(rows) == {None, "compile", "compile_oib", "compile_gc"} and "error" not in rows["compile"], rows[
        "compile"
    ].get("error")
    assert abs(rows["compile"]["loss_first"] - rows[None]["loss_first"]) < 1e-3
    for lever in ("compile_oib", "compile_gc"):
        assert rows[lever]["loss_last"] == pytest.approx(rows["compile"]["loss_last"], rel=1e-5), lever
    assert rows["compile_oib"]["loss_last"] < rows["compile_oib"]["loss_first"]  # the in-backward steps happened
    assert "| minipeft + compile | lora_all |" in (tmp_path / "c.md").read_text()


def test_decode_ops_counts_what_unmerged_lora_adds(monkeypatch):
    """benchmarks/decode_ops.py: a merged model launches exactly the base's operations; unmerged LoRA adds four
    per adapted linear (cast the input to the adapter's float32, A, B, one scaled add into the base output)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import decode_ops

    counts = decode_ops.main(["--layers", "2"])
    assert counts["LoRA all-linear merged"] == counts["base"]
    assert counts["LoRA all-linear unmerged"] - counts["base"] == 4 * 7 * 2


def test_host_time_runs_on_the_cpu(monkeypatch, capsys):
    """benchmarks/host_time.py (a GPU tool) runs end to end on the tiny shape: that it runs, not how fast."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import host_time

    host_time.main(["--shape", "tiny", "--method", "lora_all", "--device", "cpu", "--steps", "1"])
    out = capsys.readouterr().out
    assert "tiny lora_all mode=None: step" in out and "forward: host" in out and "backward: host" in out


def test_dequant_kernels_formulations_equal_the_library(monkeypatch):
    """benchmarks/dequant_kernels.py (a GPU tool) on the CPU: each compiled formulation of the dequantization
    gives the library's dequantize_nf4 bit for bit (on a GPU the script also times a Triton kernel)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import dequant_kernels

    res = dequant_kernels.main(["--quick", "--device", "cpu"])
    names = {"compiled_library", "compiled_nibbles", "compiled_per_block", "eager_library"}
    assert names <= set(res) and all(res[n]["bit_identical"] for n in names)


def test_loss_chunks_eager_and_fused_agree(monkeypatch):
    """benchmarks/loss_chunks.py (a GPU tool) on the CPU: eager and fused chunks give the same loss and gradient."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import loss_chunks

    rows = loss_chunks.main(["--device", "cpu", "--quick"])
    assert len(rows) == 8
    assert max(r["loss"] for r in rows) - min(r["loss"] for r in rows) < 1e-4
    assert max(r["grad_h_norm"] for r in rows) / min(r["grad_h_norm"] for r in rows) < 1 + 1e-2


def test_sweep_defaults_quick_runs_and_picks(monkeypatch, tmp_path, capsys):
    """benchmarks/sweep_defaults.py --quick: every (method, lr) run is recorded; its lora run is the one
    `minipeft finetune` gives (the same held-out losses, though the CLI evaluates less often); --pick returns, per
    method, the lr with last < before of the lowest last/before, recomputed here from the JSON."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sweep_defaults
    import torch

    from minipeft import cli

    sweep_defaults.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "sweep-quick.json").read_text())
    assert [(r["method"], r["lr"]) for r in res["runs"]] == [("lora", 1e-3), ("lora", 3e-3), ("prompt", 1e-3),
                                                             ("prompt", 3e-3)]  # fmt: skip
    assert res["command"].endswith("--quick --device cpu --out " + str(tmp_path)) and res["machine"]["torch"]
    for r in res["runs"]:
        assert [e["step"] for e in r["eval"]] == [0, 1, 2, 3] and [e["step"] for e in r["train"]] == [1, 2, 3]
        assert r["before"] == r["eval"][0]["val_loss"] and r["last"] == r["eval"][-1]["val_loss"]
        assert r["best"]["val_loss"] == min(e["val_loss"] for e in r["eval"]) and r["seconds"] > 0
    # 5 layers, hidden 256: LoRA r=8 on q (256 -> 256) and v (256 -> 128), r * (in + out) each; 20 virtual tokens
    assert res["runs"][0]["trainable_params"] == 5 * 8 * ((256 + 256) + (256 + 128))
    assert res["runs"][2]["trainable_params"] == 20 * 256
    assert res["runs"][0]["before"] == pytest.approx(res["runs"][0]["base"], abs=1e-6)  # LoRA's B = 0: the base
    assert res["runs"][2]["before"] > res["runs"][2]["base"] + 1e-3  # 20 random virtual tokens: worse than the base

    # the same run through the CLI (its default --eval-every 20: evaluations at steps 0 and 3 only)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --quick: the same kernels, so the same numbers
    try:
        cli.main(["finetune", "--method", "lora", "--steps", "3", "--lr", "0.003",
                  "--out", str(tmp_path / "cli"), "--no-samples", "--device", "cpu"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    evals = json.loads((tmp_path / "cli" / "metrics.json").read_text())["eval"]
    assert [e["val_loss"] for e in evals] == pytest.approx([res["runs"][1]["before"], res["runs"][1]["last"]], abs=1e-6)

    capsys.readouterr()
    picks = sweep_defaults.main(["--pick", str(tmp_path / "sweep-quick.json")])
    out = capsys.readouterr().out
    for method in ("lora", "prompt"):
        runs = [r for r in res["runs"] if r["method"] == method]
        ok = [r for r in runs if r["last"] < r["before"]]
        want = min(ok, key=lambda r: r["last"] / r["before"])["lr"] if ok else None
        assert picks[method] == want, (method, picks, runs)
        assert f"| {method} | {'none' if want is None else f'{want:g}'} |" in out
    assert any(v is not None for v in picks.values())  # 3 steps lower the loss of at least one method

    # with a second model, on which lora's 3e-3 ends above its start and prompt's 1e-3 was not tried, only lrs
    # tried on both and lowering the loss on both can be picked
    runs = {(r["method"], r["lr"]): r for r in res["runs"]}
    worse = dict(runs["lora", 3e-3], last=runs["lora", 3e-3]["before"] + 0.1)
    other = dict(res, model="other", runs=[worse, runs["lora", 1e-3], runs["prompt", 3e-3]])
    (tmp_path / "other.json").write_text(json.dumps(other))
    picks = sweep_defaults.main(["--pick", str(tmp_path / "sweep-quick.json"), str(tmp_path / "other.json")])
    lowers = {k: r["last"] < r["before"] for k, r in runs.items()}
    assert picks == {"lora": 1e-3 if lowers["lora", 1e-3] else None, "prompt": 3e-3 if lowers["prompt", 3e-3] else None}
