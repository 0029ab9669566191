"""Peak GPU memory of one training step at a 7B Llama shape: full fine-tuning vs LoRA vs QLoRA, with and without
activation checkpointing. The table that tells a laptop user what fits in 8, 12, 16 and 24 GB.

    python benchmarks/memory_7b.py --out benchmarks/results          # needs a GPU with ~80 GB for the full row
    python benchmarks/memory_7b.py --compile                         # also each row with compile_blocks()
    python benchmarks/memory_7b.py --optimizer-in-backward           # also full fine-tuning stepped in backward

Shape: hidden 4096, 32 layers, 32 heads (MHA), intermediate 11008, vocab 32000 (Llama-2-7B), random weights,
bf16 base, batch 1 x 512. One step = forward (loss only, chunked cross-entropy) + backward + AdamW step
(fused; its states take the parameters' dtype: bf16 for full fine-tuning, fp32 for adapters). LoRA/QLoRA: r=16,
alpha 32, all linear layers; QLoRA quantizes every Linear but lm_head to NF4 with double quantization.
Peak = torch.cuda.max_memory_allocated over the second step (the first allocates AdamW's states and, with
--compile, compiles), after the model is built (what the caching allocator holds may be a little more).
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from contenders import _apply_levers  # noqa: E402  (the speed levers, called where the benchmark calls them)

from minipeft import LoraConfig, ModelConfig, Transformer, get_peft_model, quantize_model  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip


def build(method):
    with torch.device("cuda"):
        model = Transformer(ModelConfig(**SHAPE, tie_word_embeddings=False)).to(torch.bfloat16)
    if method == "qlora":
        model = quantize_model(model, blocksize=64, double_quant=True)
    if method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model


def row(method, checkpointing, compiled=False, in_backward=False, batch=1, seq=512):
    model = build(method)
    torch._dynamo.reset()  # a fresh cache per row: dynamo stops compiling Block.forward after 8 variants
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    # checkpointing, compile_blocks() and the optimizer stepped in backward (TrainConfig(optimizer_in_backward=True))
    hooks = _apply_levers(
        model, opt, compile={} if compiled else None, checkpoint=checkpointing, in_backward=in_backward
    )
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), device="cuda")
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for step in range(2):  # the second step has the optimizer states allocated: the steady-state peak
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()  # with the hooks, each parameter is stepped here and its gradient freed
        opt.step()  # (then a no-op: no parameter has a gradient left)
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    out = dict(method=method, activation_checkpointing=checkpointing, compiled=compiled, in_backward=in_backward,
               trainable=sum(p.numel() for p in params),
               weights_gib=weights / 2**30, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               seconds_2_steps=time.perf_counter() - t0, loss=loss.item())  # fmt: skip
    del model, opt, params, loss
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--methods", default="qlora,lora,full")
    ap.add_argument("--compile", action="store_true", help="also measure each row with compile_blocks()")
    ap.add_argument("--optimizer-in-backward", action="store_true", help="also full fine-tuning stepped in backward")
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        for compiled in (False, True) if args.compile else (False,):
            for ckpt in (False, True):
                for in_bwd in (False, True) if args.optimizer_in_backward and method == "full" else (False,):
                    rows.append(row(method, ckpt, compiled, in_bwd))
                    print(json.dumps(rows[-1]), flush=True)
    gpu, date = torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Peak memory at the 7B Llama shape, batch 1 x 512 ({gpu}, {date}, torch {torch.__version__})",
        "",
        f"Command: `python benchmarks/memory_7b.py{' --compile' if args.compile else ''}"
        f"{' --optimizer-in-backward' if args.optimizer_in_backward else ''}{' --methods ' + args.methods if args.methods != 'qlora,lora,full' else ''}`. "
        + __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        "| method | compile_blocks | activation checkpointing | trainable params | weights GiB | peak GiB | fits in 8 / 12 / 16 / 24 GB |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        fits = " / ".join("yes" if r["peak_gib"] * 2**30 < gb * 1e9 else "no" for gb in (8, 12, 16, 24))
        name = r["method"] + (" (optimizer in backward)" if r["in_backward"] else "")
        lines.append(f"| {name} | {'on' if r['compiled'] else 'off'} | {'on' if r['activation_checkpointing'] else 'off'} | {r['trainable']:,d} | "
                     f"{r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {fits} |")  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / f"memory-7b-{time.strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(gpu=gpu, date=date, rows=rows), indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
