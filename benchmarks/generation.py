"""Generation latency: the base model, LoRA unmerged, LoRA merged (minipeft, and transformers + peft for reference).

    python benchmarks/generation.py --device cuda                 # SmolLM2-135M's shape, 128 new tokens
    python benchmarks/generation.py --device cpu --quick          # smoke run: the tiny shape, 8 new tokens
    (bench_finetune.py --extras generation runs the same and puts it in its JSON and markdown)

ms per new token, batch 1, a 32-token random prompt, greedy, KV cache, random bf16 weights, no autocast; LoRA
all-linear r=16, alpha 32, B != 0 (init_lora_weights=False), merged by merge_and_unload. minipeft's three run in
interleaved rounds whose order rotates (so that none always runs right after another), and each keeps its
fastest round: on a host-bound loop the slower rounds measure the host's other work (the medians are kept too).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import harness  # noqa: E402
from contenders import Env  # noqa: E402


def measure(env, quick=False, hf=True):
    new, reps = (8, 2) if quick else (128, 7)
    ids = torch.randint(0, env.cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2)).to(env.device)
    import minipeft as mp

    cfg = mp.LoraConfig(r=harness.R, lora_alpha=harness.ALPHA, target_modules="all-linear", init_lora_weights=False)
    models = {  # three copies of the same base; the two LoRA ones get the same adapter (mp_base resets the seed)
        "minipeft_base": env.mp_base().eval(),
        "minipeft_lora_unmerged": mp.get_peft_model(env.mp_base(), cfg).eval(),
        "minipeft_lora_merged": mp.get_peft_model(env.mp_base(), cfg).merge_and_unload().eval(),
    }
    for m in models.values():  # warm-up
        m.generate(ids, max_new_tokens=min(new, 32))
    times, order = {k: [] for k in models}, list(models)
    for r in range(reps):
        for k in order[r % 3 :] + order[: r % 3]:
            harness.sync(env.device)
            t = time.perf_counter()
            models[k].generate(ids, max_new_tokens=new)
            harness.sync(env.device)
            times[k].append(1e3 * (time.perf_counter() - t) / new)
    res = dict(shape=env.shape, new_tokens=new, rounds_ms_per_token=times, **{k: min(v) for k, v in times.items()})
    res.update({k + "_median": statistics.median(v) for k, v in times.items()})
    del models
    harness.free(env.device)
    if hf:
        import peft

        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        timed = lambda m: harness.time_fn(lambda: m.generate(input_ids=ids, **kw), env.device, 1, 3) / new  # noqa: E731
        model = env.hf_base().eval()
        res["hf_base"] = timed(model)
        model = peft.get_peft_model(model, peft.LoraConfig(r=harness.R, lora_alpha=harness.ALPHA,
                                                           target_modules="all-linear", init_lora_weights=False))  # fmt: skip
        res["hf_lora_unmerged"] = timed(model.eval())
        res["hf_lora_merged"] = timed(model.merge_and_unload().eval())
        del model
        harness.free(env.device)
    return res


def markdown(g):
    b = g["minipeft_base"]
    pm = lambda k: f"{g[k]:.2f} ({100 * (g[k] / b - 1):+.1f}%)"  # noqa: E731
    lines = [f"## Generation ({g['shape']}, batch 1, {g['new_tokens']} new tokens; ms per token)", "",
             "| | base | LoRA all-linear unmerged | merged |", "|---|---:|---:|---:|",
             f"| minipeft | {b:.2f} | {pm('minipeft_lora_unmerged')} | {pm('minipeft_lora_merged')} |"]  # fmt: skip
    if "hf_base" in g:
        lines.append(
            f"| transformers + peft | {g['hf_base']:.2f} | {g['hf_lora_unmerged']:.2f} | {g['hf_lora_merged']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the tiny shape, 8 new tokens, 2 rounds")
    ap.add_argument("--no-hf", action="store_true", help="minipeft only")
    args = ap.parse_args(argv)
    env = Env("tiny" if args.quick else "smollm2-135m", torch.device(args.device), "")
    res = measure(env, args.quick, hf=not args.no_hf)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
