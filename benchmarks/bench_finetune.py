"""Fine-tuning speed and memory, minipeft against transformers + peft (+ bitsandbytes), in one process.

    python benchmarks/bench_finetune.py --device cuda --profile --out benchmarks/results    # the full run (GPU)
    python benchmarks/bench_finetune.py --quick --device cpu --contenders minipeft --out /tmp/bench   # smoke run

The command line only: harness.py measures (rows, timing, memory, MFU, the parity check), contenders.py builds
(one function per contender); --extras runs dequant_kernels.py and generation.py into the same files.
Exit status 1 when a row failed (a contender raised, or the contenders disagree: see harness.py).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import contenders  # noqa: E402
import dequant_kernels  # noqa: E402
import generation  # noqa: E402
import harness  # noqa: E402

SWITCHES = dict(compile="minipeft_compile", compile_cg="minipeft_graphs", compile_oib="minipeft_oib",
                compile_gc="minipeft_gc")  # --switches' old names  # fmt: skip
FULL = dict(steps=10, warmup=3, shapes=["smollm2-135m", "llama-1b"], switches=["minipeft_compile", "minipeft_graphs"])
QUICK = dict(steps=2, warmup=1, shapes=["tiny"], switches=[])  # a smoke run on a CPU


def names(valid):  # argparse type: a comma-separated list of names from `valid` ('none': the empty list)
    def parse(text):
        got = [SWITCHES.get(x, x) for x in text.split(",") if x != "none"]
        if bad := [x for x in got if x not in valid]:
            raise argparse.ArgumentTypeError(f"unknown {bad}; valid: {list(valid)}")
        return got

    return parse


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            out[name] = f"not importable ({type(e).__name__})"
    return out


def apart(args, shape, names, tmp, log):
    """Measure `names` (one group of contenders.APART) for every method of `shape` in a Python process of their
    own; returns {method: {contender: result}} (a failed process: its error, for each)."""
    out = os.path.join(tmp, f"apart-{shape}-{names[0]}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--apart", ",".join(names), "--shapes", shape, "--methods",
           ",".join(args.methods), "--device", args.device, "--tmp", tmp, "--out", out]  # fmt: skip
    cmd += [f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "rounds") if getattr(args, k) is not None]
    cmd += ["--quick"] * args.quick + ["--profile"] * args.profile
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(f"{shape} apart {names}: exit {proc.returncode}\n" + (proc.stdout + proc.stderr)[-3000:])
    if proc.returncode or not os.path.isfile(out):
        error = dict(error=f"the process of {names} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
        return {m: {n: error for n in names} for m in args.methods}
    with open(out) as f:
        return {row["method"]: row["results"] for row in json.load(f)}


def run_apart(args, device, shapes, warmup, steps):
    """--apart: this process measures the named contenders alone and writes their rows to --out (a .json file)."""
    if any(n.startswith("unsloth") for n in args.apart):  # Unsloth patches transformers: imported before it
        contenders.unsloth_import()
    chosen = {n: contenders.CONTENDERS[n] for n in args.apart}
    rows = []
    for shape in shapes:
        env = contenders.Env(shape, device, args.tmp)
        rows += [harness.run_row(env, m, chosen, warmup, steps, args.profile, rounds=args.rounds) for m in args.methods]
    with open(args.out, "w") as f:
        json.dump(rows, f)
    return 0


def markdown(res):
    parts = [harness.markdown(res)]
    parts += [dequant_kernels.markdown(res["dequant"])] if "dequant" in res else []
    return "\n".join(parts + ([generation.markdown(res["generation"])] if "generation" in res else []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="the tiny shape, 1 + 2 steps: a smoke test on a CPU")
    ap.add_argument("--shapes", type=names(harness.SHAPES), help="default smollm2-135m,llama-1b (--quick: tiny)")
    ap.add_argument("--methods", type=names(harness.METHODS), default=harness.METHODS)
    ap.add_argument("--contenders", type=names(contenders.CONTENDERS), default=["minipeft", "hf", "hf_bnb"])
    ap.add_argument("--switches", type=names(contenders.CONTENDERS), help="more contenders (default compile,"
                    f"compile_cg; --quick: none); also by their old names {SWITCHES}")  # fmt: skip
    ap.add_argument("--extras", type=names(("dequant", "generation")), default=["dequant", "generation"])
    ap.add_argument("--steps", type=int, help="timed steps per contender (default 10, --quick: 2)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per contender (default 3, --quick: 1)")
    ap.add_argument("--rounds", type=int, default=1, help="measure the contenders this many times, in alternating "
                    "order, each keeping its fastest round (host-bound rows move between processes)")  # fmt: skip
    ap.add_argument(
        "--profile",
        action="store_true",
        help="one more step per contender under torch.profiler, and one "
        "under the allocator's history: what is alive at its peak, by where it was made (GPU)",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default=None, help="file stem in --out (default <gpu>-<date>)")
    ap.add_argument("--apart", type=names(contenders.CONTENDERS), help=argparse.SUPPRESS)  # internal: see apart()
    ap.add_argument("--tmp", help=argparse.SUPPRESS)  # internal: the shared folder of the base checkpoints
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run on a small, often busy CPU: threads only fight each other there
    defaults = QUICK if args.quick else FULL
    steps, warmup, shapes, switches = (defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults)
    if args.apart:
        return run_apart(args, device, shapes, warmup, steps)
    chosen = args.contenders + switches
    vers = versions()
    if not all(vers[k][0].isdigit() for k in ("transformers", "peft")):
        print("transformers/peft not importable: minipeft contenders only", flush=True)
        chosen = [n for n in chosen if n.startswith("minipeft")]
    chosen = {n: contenders.CONTENDERS[n] for n in dict.fromkeys(chosen)}
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = " ".join(["python", os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv))
    res = dict(meta=dict(command=command, date=date, device_name=name, versions=vers, warmup=warmup, steps=steps,
                         rounds=args.rounds),
               shapes=shapes, methods=args.methods, contenders=list(chosen), rows=[])  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"{'cpu-quick' if args.quick else name.split()[-1].lower()}-{date[:10]}")
    t0 = time.perf_counter()
    log = lambda text: print(f"[{time.perf_counter() - t0:6.1f}s] {text}", flush=True)  # noqa: E731
    res["peak"] = harness.matmul_peak(device, args.quick)
    log(f"bf16 matmul peak: {res['peak']['tflops']:.1f} TFLOP/s")

    def extra(key, fn):  # a side measurement: its failure is written down, and the rows still run
        try:
            res[key] = fn()
        except Exception:  # noqa: BLE001
            log(res.setdefault(key + "_error", traceback.format_exc()[-2000:]))

    if "dequant" in args.extras:
        extra("dequant", lambda: dequant_kernels.main(["--device", args.device] + ["--quick"] * args.quick))
    groups = [[n for n in group if n in chosen] for group in contenders.APART.values()]
    groups = [g for g in groups if g]
    here = {n: build for n, build in chosen.items() if not any(n in g for g in groups)}
    with tempfile.TemporaryDirectory() as tmp:
        weights = [harness.SHAPES[s].get("weights", s) for s in shapes]  # shapes sharing a base share its folder
        for i, shape in enumerate(shapes):
            env = contenders.Env(shape, device, tmp)
            elsewhere = [apart(args, shape, g, tmp, log) for g in groups]  # first: the main process holds nothing yet
            for method in args.methods:
                done = {n: r for e in elsewhere for n, r in e.get(method, {}).items()}
                row = harness.run_row(env, method, here, warmup, steps, args.profile, done, args.rounds)
                res["rows"].append(row)
                for n, r in row["results"].items():
                    log(f"{shape} {method} {n}: " + (r["error"] if "error" in r else
                        ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float))))  # fmt: skip
                if row["failed"]:
                    log(f"ROW FAILED: {shape} {method}: {row['failed']}")
                harness.write(res, stem, markdown)
            if weights[i] not in weights[i + 1 :]:
                shutil.rmtree(env.hf_dir, ignore_errors=True)  # 2.5 GB at 1B: gone before the next shape
    if "generation" in args.extras:
        env = contenders.Env("tiny" if args.quick else "smollm2-135m", device, "")
        extra("generation", lambda: generation.measure(env, args.quick, hf=any(n.startswith("hf") for n in chosen)))
    res["meta"]["wall_s"] = time.perf_counter() - t0
    harness.write(res, stem, markdown)
    print(markdown(res) + f"\nwrote {stem}.json and {stem}.md")
    return 1 if any(row["failed"] for row in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
