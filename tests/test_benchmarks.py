"""The benchmark scripts run on the CPU and check there what they can: that bench_finetune's contenders of a row
compute the same thing (the parity check, and that it fails a row when they do not), what a run writes, and that
the GPU tools run end to end. Not how fast anything is: the numbers come from GPU runs (benchmarks/README.md).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def importable(*names):
    return all(importlib.util.find_spec(n) is not None for n in names)


def test_bench_finetune_quick_minipeft_contenders(tmp_path):
    """--quick on the CPU with minipeft's contenders (eager; compiled; compiled + the optimizer stepped in backward;
    compiled + activation checkpointing, also offloaded, also with the optimizer in backward and small loss chunks):
    every contender trains the closed-form number of parameters and starts
    from the same loss, so the row passes the parity check; the levers train to the compiled contender's weights
    (its last loss); the JSON and the markdown hold every contender and the generation extra."""
    cmd = [sys.executable, str(BENCH / "bench_finetune.py"), "--quick", "--device", "cpu", "--out", str(tmp_path),
           "--name", "q", "--contenders", "minipeft", "--switches",
           "compile,compile_oib,compile_gc,minipeft_offload,minipeft_lowmem",
           "--methods", "lora_all", "--extras", "generation"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res, md = json.loads((tmp_path / "q.json").read_text()), (tmp_path / "q.md").read_text()
    names = ["minipeft", "minipeft_compile", "minipeft_oib", "minipeft_gc", "minipeft_offload", "minipeft_lowmem"]
    (row,) = res["rows"]
    assert res["contenders"] == names and row["method"] == "lora_all" and list(row["results"]) == names
    assert row["failed"] == [], row["failed"]
    r = row["results"]
    # tiny shape: 2 layers, hidden 64, kv 2 x 16, intermediate 128; LoRA r=16 on all 7 linears, r * (in + out) each
    trainable = 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert {x["trainable_params"] for x in r.values()} == {trainable}
    first = [x["loss_first"] for x in r.values()]
    assert max(first) - min(first) <= 1e-3 and all(x["tokens_per_s"] > 0 for x in r.values())
    for lever in ("minipeft_oib", "minipeft_gc", "minipeft_offload", "minipeft_lowmem"):
        assert r[lever]["loss_last"] == pytest.approx(r["minipeft_compile"]["loss_last"], rel=1e-5), lever
    assert r["minipeft_oib"]["loss_last"] < r["minipeft_oib"]["loss_first"]  # the in-backward steps happened
    assert md.count("| lora_all | minipeft") == 6 and "FAILED" not in md
    assert res["generation"]["minipeft_base"] > 0 and "## Generation (tiny" in md


def test_parity_check_fails_a_row_whose_contenders_differ(tmp_path, monkeypatch):
    """Two runs of one contender pass (prompt tuning: 20 virtual tokens of 64 trained); a contender that starts from
    another loss (one norm weight changed), or trains other parameters (LoRA on every linear layer in a lora_qv
    row), fails its row; the run then exits 1 and its markdown says FAILED where the ratios were."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_finetune
    import contenders
    import harness

    def nudged(env, method):
        t = contenders.CONTENDERS["minipeft"](env, method)
        with torch.no_grad():
            t.model.get_base_model().model.norm.weight.add_(0.5)
        return t

    def wider(env, method):
        return contenders.CONTENDERS["minipeft"](env, "lora_all")

    env = contenders.Env("tiny", torch.device("cpu"), str(tmp_path))
    same = harness.run_row(env, "prompt", dict.fromkeys(["a", "b"], contenders.CONTENDERS["minipeft"]), 0, 1)
    assert same["failed"] == [] and [r["trainable_params"] for r in same["results"].values()] == [20 * 64] * 2
    for other, why in ((nudged, "step-1 losses differ"), (wider, "trainable parameters differ")):
        row = harness.run_row(env, "lora_qv", {"minipeft": contenders.CONTENDERS["minipeft"], "x": other}, 0, 1)
        assert len(row["failed"]) == 1 and row["failed"][0].startswith(why), row["failed"]

    monkeypatch.setitem(contenders.CONTENDERS, "nudged", nudged)
    threads = torch.get_num_threads()
    try:
        rc = bench_finetune.main(["--quick", "--device", "cpu", "--contenders", "minipeft,nudged", "--methods",
                                  "lora_qv", "--extras", "none", "--out", str(tmp_path), "--name", "p"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # --quick sets one thread
    assert rc == 1
    assert json.loads((tmp_path / "p.json").read_text())["rows"][0]["failed"]
    md = (tmp_path / "p.md").read_text()
    assert "| lora_qv | nudged |" in md and "| FAILED |" in md and "| lora_qv | **FAILED** | step-1 losses" in md


def test_rounds_alternate_the_order_and_keep_each_contenders_fastest(tmp_path, monkeypatch):
    """--rounds 3: the contenders are measured a, b / b, a / a, b; each keeps its fastest round's result, with all
    its rounds' step times and the highest peak of them; a contender that failed in any round stays failed."""
    monkeypatch.syspath_prepend(str(BENCH))
    import contenders
    import harness

    order, times = [], {"a": [30.0, 20.0, 25.0], "b": [10.0, 12.0, 11.0], "c": [5.0, 5.0, 5.0]}
    peaks = {"a": [1.0, 1.5, 1.2], "b": [2.0, 2.0, 2.5], "c": [1.0, 1.0, 1.0]}

    def measure(trainee, device, warmup, steps, profile=False):
        name, i = trainee, order.count(trainee) - 1
        return dict(step_ms=times[name][i], peak_mem_gib=peaks[name][i], trainable_params=1, loss_first=2.0)

    def builder(name):
        def build(env, method):
            order.append(name)
            if name == "c" and order.count("c") == 2:
                raise RuntimeError("second round failed")
            return name

        return build

    monkeypatch.setattr(harness, "measure", measure)
    env = contenders.Env("tiny", torch.device("cpu"), str(tmp_path))
    row = harness.run_row(env, "lora_qv", {n: builder(n) for n in "abc"}, 0, 1, rounds=3)
    assert order == list("abccbaabc")
    a, b = row["results"]["a"], row["results"]["b"]
    assert (a["step_ms"], a["rounds_ms"], a["peak_mem_gib"]) == (20.0, [30.0, 20.0, 25.0], 1.5)
    assert (b["step_ms"], b["rounds_ms"], b["peak_mem_gib"]) == (10.0, [10.0, 12.0, 11.0], 2.5)
    assert row["results"]["c"]["error"].startswith("RuntimeError: second round failed")
    assert row["failed"] and row["failed"][0].startswith("c: RuntimeError")


@pytest.mark.skipif(not importable("transformers", "peft"), reason="transformers and peft are optional")
def test_hf_contenders_compute_what_minipeft_computes(tmp_path, monkeypatch):
    """transformers + peft on minipeft's weights pass the parity check against minipeft in every method (QLoRA
    through bitsandbytes where it imports): the same trainable count and step-1 loss. For prefix and prompt tuning
    that holds because the HF builder copies minipeft's table into PEFT's, whatever state the generator is in."""
    monkeypatch.syspath_prepend(str(BENCH))
    import contenders
    import harness

    names = ["minipeft", "hf"] + ["hf_bnb"] * importable("bitsandbytes")
    env = contenders.Env("tiny", torch.device("cpu"), str(tmp_path))
    # On a CPU PEFT's random table would be minipeft's by chance (the same generator, in the same state); on a GPU
    # it is not. Advancing the generator after the HF base is built makes PEFT's own table differ here too (its
    # step-1 loss then differs by 0.016 for prefix, 0.0023 for prompt tuning): only the copy keeps them equal.
    hf_base = env.hf_base
    env.hf_base = lambda: [hf_base(), torch.randn(7)][0]
    for method in harness.METHODS if importable("bitsandbytes") else [m for m in harness.METHODS if m != "qlora"]:
        row = harness.run_row(env, method, {n: contenders.CONTENDERS[n] for n in names}, 0, 1)
        assert row["failed"] == [] and len(row["results"]) == 2, (method, row["failed"])


def test_decode_ops_counts_what_unmerged_lora_adds(monkeypatch):
    """benchmarks/decode_ops.py: a merged model launches exactly the base's operations; unmerged LoRA adds four
    per adapted linear (cast the input to the adapter's float32, A, B, one scaled add into the base output)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import decode_ops

    counts = decode_ops.main(["--layers", "2"])
    assert counts["LoRA all-linear merged"] == counts["base"]
    assert counts["LoRA all-linear unmerged"] - counts["base"] == 4 * 7 * 2


def test_host_time_runs_on_the_cpu(monkeypatch, capsys):
    """benchmarks/host_time.py (a GPU tool) runs end to end on the tiny shape: that it runs, not how fast."""
    monkeypatch.syspath_prepend(str(BENCH))
    import host_time

    host_time.main(["--shape", "tiny", "--method", "lora_all", "--device", "cpu", "--steps", "1"])
    out = capsys.readouterr().out
    assert "tiny lora_all mode=None: step" in out and "forward: host" in out and "backward: host" in out


def test_dequant_kernels_formulations_equal_the_library(monkeypatch):
    """benchmarks/dequant_kernels.py (a GPU tool; bench_finetune --extras dequant) on the CPU: each compiled
    formulation of the dequantization gives the library's dequantize_nf4 bit for bit (on a GPU the script also
    times a Triton kernel); its markdown lists each."""
    monkeypatch.syspath_prepend(str(BENCH))
    import dequant_kernels

    res = dequant_kernels.main(["--quick", "--device", "cpu"])
    names = {"compiled_library", "compiled_nibbles", "compiled_per_block", "eager_library"}
    assert names <= set(res) and all(res[n]["bit_identical"] for n in names)
    md = dequant_kernels.markdown(res)
    assert all(f"| {n} |" in md for n in names) and res["write_only"]["gbps"] > 0


def test_loss_chunks_eager_and_fused_agree(monkeypatch):
    """benchmarks/loss_chunks.py (a GPU tool) on the CPU: eager and fused chunks give the same loss and gradient."""
    monkeypatch.syspath_prepend(str(BENCH))
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


@pytest.mark.skipif(not importable("transformers", "peft"), reason="transformers and peft are optional")
def test_apart_contenders_run_in_their_own_process_and_join_the_row(tmp_path, monkeypatch):
    """A contender of contenders.APART (Liger and Unsloth patch transformers for the whole process) is measured by
    another Python process (bench_finetune.py --apart) and its result joins the row before the parity check: here
    minipeft made apart, hf at home; one row, both results, the parity check passed, two process ids."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_finetune
    import contenders

    monkeypatch.setattr(contenders, "APART", {"x": ["minipeft"]})
    threads = torch.get_num_threads()
    try:
        rc = bench_finetune.main(["--quick", "--device", "cpu", "--contenders", "minipeft,hf", "--methods", "lora_qv",
                                  "--extras", "none", "--out", str(tmp_path), "--name", "a"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert rc == 0 and row["failed"] == [] and set(row["results"]) == {"minipeft", "hf"}
    pids = {n: r["pid"] for n, r in row["results"].items()}
    assert pids["hf"] == os.getpid() != pids["minipeft"], pids


@pytest.mark.skipif(not importable("transformers", "peft"), reason="transformers and peft are optional")
def test_same_learning_ends_within_1_percent_of_hf(tmp_path, monkeypatch):
    """benchmarks/same_learning.py on the tiny shape: minipeft and HF train the same weights on the same Sonnets
    batches (full fine-tuning and LoRA); their curves agree step by step (bf16 weights: within 1%, 0.3% measured) and end within 1% of HF's."""
    monkeypatch.syspath_prepend(str(BENCH))
    import same_learning

    threads = torch.get_num_threads()
    try:
        rc = same_learning.main(["--device", "cpu", "--shape", "tiny", "--steps", "25", "--contenders", "minipeft,hf",
                                 "--out", str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "same-learning-tiny.json").read_text())
    assert rc == 0 and [r["method"] for r in res["rows"]] == ["full", "lora_all"]
    for r in res["rows"]:
        ours, hf = r["curves"]["minipeft"], r["curves"]["hf"]
        assert len(ours) == len(hf) == 25 and ours == pytest.approx(hf, rel=1e-2) and r["rel"] <= 0.01
        assert len(set(ours)) > 20  # the weights moved (on random-like ids the tiny model's loss need not fall)


def test_peak_breakdown_finds_what_is_alive_at_the_peak(monkeypatch):
    """The allocator-trace replay of --profile's memory step, on a made-up trace: the peak counts only what the
    step allocated (a free of an older tensor is ignored), and names each allocation by its innermost frame
    outside torch (compiled code counts as outside)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import harness

    ours = [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "f"},
            {"filename": "/repo/minipeft/fast.py", "line": 70, "name": "_block_forward"}]  # fmt: skip
    compiled = [{"filename": "/tmp/torchinductor_root/ab/cab.py", "line": 9, "name": "call"}]
    mib = 2**20
    trace = [
        dict(action="alloc", addr=1, size=10 * mib, frames=ours),
        dict(action="free_requested", addr=99, size=50 * mib, frames=[]),  # an older tensor: not counted
        dict(action="alloc", addr=2, size=30 * mib, frames=compiled),
        dict(action="alloc", addr=3, size=5 * mib, frames=ours),
        dict(action="free_requested", addr=2, size=30 * mib, frames=compiled),
        dict(action="free_completed", addr=2, size=30 * mib, frames=compiled),
        dict(action="alloc", addr=4, size=20 * mib, frames=compiled),  # 35 MiB alive: below the peak of 45
    ]
    got = harness.peak_breakdown(trace)
    assert got["peak_mib"] == 45
    assert got["top"] == [[30.0, 1, "ab/cab.py:9 call"], [15.0, 2, "minipeft/fast.py:70 _block_forward"]]


def test_step_anatomy_splits_kernels_copies_and_host_time(monkeypatch):
    """--profile's step summary on made-up profiler rows: GPU rows are kernels or copies (Memcpy/Memset), host rows
    are runtime calls (cuda*) or operations; a kernel's count is its launches; a host op's GPU time (its kernels,
    counted again) is not a kernel."""
    monkeypatch.syspath_prepend(str(BENCH))
    import types

    import harness

    def row(key, where, count, cpu_us=0.0, gpu_us=0.0):
        return types.SimpleNamespace(key=key, device_type=types.SimpleNamespace(name=where), count=count,
                                     self_cpu_time_total=cpu_us, self_device_time_total=gpu_us)  # fmt: skip

    got = harness.step_anatomy([
        row("ampere_bf16_gemm", "CUDA", 40, gpu_us=4000), row("triton_poi_fused_add", "CUDA", 100, gpu_us=1000),
        row("Memcpy DtoD (Device -> Device)", "CUDA", 60, gpu_us=300), row("aten::mm", "CPU", 40, 800, 4000),
        row("cudaLaunchKernel", "CPU", 140, cpu_us=700), row("cudaGraphLaunch", "CPU", 60, cpu_us=900),
    ])  # fmt: skip
    assert got["kernel_ms"] == pytest.approx(5.3) and got["launches"] == 140
    assert got["copies"] == [[0.3, "Memcpy DtoD (Device -> Device)", 60]]
    assert [r[1] for r in got["runtime"]] == ["cudaGraphLaunch", "cudaLaunchKernel"]
    assert got["top_host"] == [[0.8, "aten::mm", 40]] and [r[1] for r in got["top"]][0] == "ampere_bf16_gemm"
