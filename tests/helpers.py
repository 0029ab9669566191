"""Small builders shared by the tests: tiny models, matching HF models, batches."""

import contextlib
import subprocess
import sys
import textwrap

import torch

from minipeft.model import ModelConfig, Transformer

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def tiny_config(**overrides):
    return ModelConfig(**{**TINY, **overrides})


def tiny_model(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).to(dtype)


def hf_llama(seed=0, **overrides):
    """A random transformers LlamaForCausalLM and our Transformer holding the same weights (float32)."""
    import transformers

    cfg = {**TINY, **overrides}
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="sdpa")).eval()
    ours = Transformer(ModelConfig(**cfg)).eval()
    ours.load_state_dict({k: v.clone() for k, v in hf.state_dict().items()})
    return hf, ours


def batch(vocab=97, B=2, T=12, seed=1, pad_left=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_left:
        mask[0, :pad_left] = 0
        labels[0, :pad_left] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@contextlib.contextmanager
def lock_held_elsewhere(folder):
    """Another process holds minipeft's run lock on `folder` while the block runs; yields that process's pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from minipeft.files import run_lock
            with run_lock({str(folder)!r}):
                print("locked", flush=True)
                sys.stdin.read()
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.communicate("")
