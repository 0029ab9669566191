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
