"""Same learning: minipeft's fastest path and HF train the same random weights on the same real text, step for step,
and must end at the same loss (within 1% of HF's).

    python benchmarks/same_learning.py --device cuda --out benchmarks/results     # 135M shape, 200 steps (a GPU)
    python benchmarks/same_learning.py --device cpu --shape tiny --steps 20        # a smoke run

The text: the bundled Sonnets (minipeft/assets/data/sonnets.txt), tokenized with the bundled tokenizer, packed
into rows of the shape's length; batch i is data.batch_stream's (a pure function of the seed and i), the same
for every contender. Each contender is built by contenders.py (so the weights, dtype, autocast and AdamW are the
fine-tuning benchmark's), then `--steps` steps are taken with the batch copied into its input each step (CUDA
graphs keep reading one buffer). Full fine-tuning at lr 1e-4, LoRA (all linear, r 16) at lr 1e-3; a constant
rate. The final loss = the mean of the last 20 steps' losses; the check: |minipeft - HF| <= 1% of HF's.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import contenders  # noqa: E402
from harness import SHAPES  # noqa: E402

from minipeft.checkpoint import ASSETS, load_pretrained  # noqa: E402
from minipeft.data import batch_stream, load_text_dataset  # noqa: E402

LR = {"full": 1e-4, "lora_all": 1e-3}
LAST = 20  # steps averaged for the final loss
TOLERANCE = 0.01  # of HF's final loss


def batches(shape, steps):
    """`steps` batches (B, T) of the Sonnets for `shape`."""
    _, tokenizer = load_pretrained(ASSETS / "tiny-shakespeare")
    B, T = SHAPES[shape]["batch"], SHAPES[shape]["seq"]
    train, _ = load_text_dataset(ASSETS / "data" / "sonnets.txt", tokenizer, seq_len=T, val_fraction=0.05)
    stream = batch_stream(train, B, seed=0)
    return [next(stream)["input_ids"] for _ in range(steps)]


def curve(env, name, method, data):
    """The loss of each step of contender `name` training `method` on `data`."""
    env.lr = LR[method]
    trainee = contenders.CONTENDERS[name](env, method)
    losses = []
    for batch in data:
        env.ids.copy_(batch % env.cfg.vocab_size)  # (a no-op but for the tiny smoke shape's 256 ids)
        losses.append(trainee.step())
    return [float(x) for x in losses]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--methods", default="full,lora_all")
    ap.add_argument("--contenders", default="minipeft_graphs,hf", help="the first is compared with the last")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.steps <= LAST:
        ap.error(f"--steps must be more than {LAST} (the final loss averages the last {LAST})")
    device, names = torch.device(args.device), args.contenders.split(",")
    if device.type == "cpu":
        torch.set_num_threads(1)
    data = batches(args.shape, args.steps)
    res = dict(shape=args.shape, steps=args.steps, device=args.device, torch=torch.__version__,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rows=[])  # fmt: skip
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        env = contenders.Env(args.shape, device, tmp)
        for method in args.methods.split(","):
            curves = {}
            for name in names:
                torch.compiler.reset()
                curves[name] = curve(env, name, method, data)
            final = {n: sum(c[-LAST:]) / LAST for n, c in curves.items()}
            rel = abs(final[names[0]] - final[names[-1]]) / final[names[-1]]
            ok &= rel <= TOLERANCE
            res["rows"].append(dict(method=method, lr=LR[method], final=final, rel=rel, curves=curves))
            print(f"{method}: first {[round(c[0], 4) for c in curves.values()]}, final (mean of last {LAST}) "
                  f"{ {n: round(f, 4) for n, f in final.items()} }, |diff| / {names[-1]} = {rel:.4%} "
                  f"({'within' if rel <= TOLERANCE else 'OVER'} {TOLERANCE:.0%})", flush=True)  # fmt: skip
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"same-learning-{args.shape}.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
