"""Pretrain the bundled tiny-shakespeare model: full-parameter training of minipeft's own Transformer.

    python scripts/prepare_data.py                       # plays -> .device/data (corpus + BPE tokenizer)
    python scripts/pretrain_tiny.py --device cuda        # -> .device/tiny-shakespeare (an HF-format dir)

The defaults are the settings of the shipped model (about a minute on one H200).

The shipped model's exact command, data, hardware, time and held-out loss are in
minipeft/assets/tiny-shakespeare/README.md. On a CPU, `--steps 20 --batch-size 8 --eval-every 10` checks that it all runs (a few minutes).

One readable loop, nanoGPT style: the corpus is one long token stream (each play preceded by <|endoftext|>),
a batch is B random windows of T + 1 tokens, AdamW with linear warmup then cosine decay to lr/10, gradient
clipping at 1.0, bf16 autocast on CUDA. Every --eval-every steps the loss on the held-out plays is measured
(mean next-token cross-entropy over all their tokens, in non-overlapping windows of T); the weights with the
lowest held-out loss are the ones written, so training past the point of overfitting costs nothing.

Regularisation: the corpus is small (about 1.5M tokens), so a few-million-parameter model overfits it after
10-20 epochs. minipeft's Transformer has no dropout (it is a reference for inference and fine-tuning),
so this script adds GPT-2's residual dropout with forward hooks: each attention and MLP output is dropped
with probability --dropout before it is added to the residual stream, in training mode only. The hooks are
not part of the saved model.

Output: config.json (a LlamaConfig: model_type "llama", architectures ["LlamaForCausalLM"]),
model.safetensors (float32 unless --save-dtype says otherwise; no lm_head.weight since the embeddings are
tied, as HF writes tied models), tokenizer.json and tokenizer_config.json copied from --data-dir, and
train_log.json. transformers' LlamaForCausalLM.from_pretrained loads the directory as it is.
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer

from minipeft.model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=REPO / ".device" / "data",
        help="train.txt, val.txt, tokenizer.json from scripts/prepare_data.py",
    )
    ap.add_argument("--out", type=Path, default=REPO / ".device" / "tiny-shakespeare")
    # the model (vocab_size comes from the tokenizer)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--intermediate-size", type=int, default=704, help="SwiGLU width, ~2.75 x hidden")
    ap.add_argument("--num-layers", type=int, default=5)
    ap.add_argument("--num-heads", type=int, default=8)
    ap.add_argument("--num-kv-heads", type=int, default=4, help="grouped-query attention: 2 query heads per kv head")
    ap.add_argument("--max-position-embeddings", type=int, default=512)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    # the optimisation
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate; cosine decays to lr/10")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1, help="on matrices and embeddings, not on norms")
    ap.add_argument("--dropout", type=float, default=0.3, help="residual dropout (training only, see above)")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time budget: at step 120 (inside the warmup) --steps is lowered to what fits, and "
        "training stops, keeping the best, if it still runs over",
    )
    # the machine
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="autocast dtype; default bfloat16 on CUDA, float32 on CPU (weights stay float32)",
    )
    ap.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--sample-prompt", default="ROMEO:")
    return ap.parse_args()


def load_tokens(path, tok):
    """The whole file as one stream of token ids; <|endoftext|> in the text becomes its special id."""
    return torch.tensor(tok.encode(path.read_text(encoding="utf-8")).ids, dtype=torch.long)


def get_batch(data, batch_size, seq_len, generator):
    """B random windows of T + 1 tokens: the model predicts tokens 1..T from 0..T-1 (labels shift inside)."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len + 1] for s in starts])  # (B, T + 1)


@torch.no_grad()
def evaluate(model, data, seq_len, batch_size, device, amp_dtype):
    """Mean next-token loss over every token of `data`, in non-overlapping windows of seq_len + 1."""
    model.eval()
    n = (len(data) - 1) // seq_len
    windows = torch.stack([data[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])  # (n, T + 1)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(x, labels=x).loss
        total += loss.item() * x.size(0) * seq_len
        count += x.size(0) * seq_len
    model.train()
    return total / count


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def add_residual_dropout(model, p):
    def drop(module, inputs, output):
        return F.dropout(output, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(drop)
        layer.mlp.down_proj.register_forward_hook(drop)


def hf_config(cfg, dtype, tok):
    """The config.json of a Hugging Face LlamaForCausalLM (every LlamaConfig field that we fix)."""
    eot = tok.token_to_id("<|endoftext|>")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "torch_dtype": dtype,
    }


def save_hf(model, tok, args, out, log):
    """Write the HF-format directory. safetensors refuses tensors that share memory, and HF omits the tied
    lm_head.weight anyway (it re-ties it on load), so it is left out."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.save_dtype)
    state = {
        k: v.detach().to("cpu", dtype).contiguous()
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.config, args.save_dtype, tok), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(args.data_dir / name, out / name)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")


def sample(model, tok, prompt, device, seed, temperature=0.8, top_k=40, max_new_tokens=200):
    ids = torch.tensor([tok.encode(prompt).ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    return tok.decode(out[0].tolist())


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp_dtype = {"bfloat16": torch.bfloat16, "float32": None, None: None}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    tok = Tokenizer.from_file(str(args.data_dir / "tokenizer.json"))
    train, val = load_tokens(args.data_dir / "train.txt", tok), load_tokens(args.data_dir / "val.txt", tok)
    print(f"train {len(train):,} tokens, held-out {len(val):,} tokens, vocab {tok.get_vocab_size()}")

    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    model = Transformer(cfg).to(device)  # weights in float32; autocast runs the matmuls in bf16 on CUDA
    if args.dropout > 0:
        add_residual_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())  # the tied lm_head is counted once
    print(f"{cfg}\n{n_params:,} parameters")

    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and the (tied) embedding
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm weights
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(args.seed)

    log = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "parameters": n_params,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "evals": [],
    }
    best = (float("inf"), -1, None)  # (held-out loss, step, weights on the CPU)
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step >= args.steps:
            val_loss = evaluate(model, val, args.seq_len, args.batch_size, device, amp_dtype)
            elapsed = time.time() - t0
            log["evals"].append({"step": step, "val_loss": round(val_loss, 4), "seconds": round(elapsed, 1)})
            print(
                f"step {step:6d}  held-out loss {val_loss:.4f}  ppl {math.exp(val_loss):8.2f}  {elapsed:6.0f}s",
                flush=True,
            )
            if val_loss < best[0]:
                best = (val_loss, step, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            if args.max_minutes is not None and elapsed > 60 * args.max_minutes and step < args.steps:
                print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
                break
        if step >= args.steps:
            break
        if args.max_minutes is not None and step == 20:
            t_fit = time.time()
        if args.max_minutes is not None and step == 120:  # shrink --steps so the whole cosine fits the time
            per_step = (time.time() - t_fit) / 100  # the last 100 steps, one evaluation included
            fit = step + 1 + int((60 * args.max_minutes - (time.time() - t0)) / per_step * 0.95)
            if fit < args.steps:
                same = "equals" if args.warmup >= step else "differs from"  # the warmup ignores --steps
                print(
                    f"{1000 * per_step:.1f} ms/step: --steps {args.steps} -> {fit} to fit --max-minutes; "
                    f"this run {same} one started with --steps {fit}",
                    flush=True,
                )
                args.steps = fit
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = get_batch(train, args.batch_size, args.seq_len, gen).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:  # reading the loss waits for the GPU, so only every 50 steps
            if not math.isfinite(loss.item()):
                raise SystemExit(f"non-finite loss {loss.item()} at step {step}")
            print(f"step {step:6d}  train loss {loss.item():.4f}  lr {lr_at(step, args):.2e}", flush=True)

    wall = time.time() - t0
    model.load_state_dict(best[2])
    log.update(
        best_val_loss=round(best[0], 4),
        best_step=best[1],
        steps=args.steps,
        last_step=step,
        wall_seconds=round(wall, 1),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
    )
    samples = [sample(model, tok, args.sample_prompt, device, args.seed + i) for i in range(2)]
    log["samples"] = samples
    save_hf(model, tok, args, args.out, log)
    print(
        f"best held-out loss {best[0]:.4f} (ppl {math.exp(best[0]):.2f}) at step {best[1]}; "
        f"{step} steps in {wall:.0f}s; wrote {args.out}"
    )
    for s in samples:
        print("-" * 60 + "\n" + s)


if __name__ == "__main__":
    main()
