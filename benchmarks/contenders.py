"""The contenders of the fine-tuning benchmark: one builder each, (env, method) -> harness.Trainee (or None for a
method it does not cover).

    minipeft          minipeft as train() runs it: no speed lever but its default chunked loss
    minipeft_compile  + fast.compile_blocks(model)                          TrainConfig(compile=True)
    minipeft_graphs   + fast.compile_blocks(model, mode="reduce-overhead")  CUDA graphs: compile="reduce-overhead"
    minipeft_oib      + compiled, fast.step_in_backward(optimizer)          + optimizer_in_backward=True
    minipeft_gc       + compiled, fast.checkpoint_blocks(model)             finetune --compile --grad-checkpoint
    minipeft_offload  + compiled, checkpoint_blocks(model, offload=True)    finetune --compile --grad-checkpoint offload
    minipeft_lowmem   + step_in_backward, loss chunks of 2**24 logits    ... --optimizer-in-backward --loss-chunk N
    minipeft_offload_nomlp, minipeft_lowmem_nomlp   the same without fast_mlp's op (the compiler's own MLP): A/B
    hf                transformers + peft as shipped (eager); not QLoRA
    hf_bnb            transformers + peft + bitsandbytes: QLoRA only
    hf_compile        hf (hf_bnb for QLoRA) with torch.compile of each decoder layer, as compile_blocks does ours
    hf_graphs         the same with mode="reduce-overhead": CUDA graphs
    hf_liger          hf (hf_bnb) + Liger kernels, fused linear cross-entropy included (liger-kernel)   apart
    unsloth           Unsloth's FastLanguageModel, no gradient checkpointing: full, LoRA, QLoRA        apart
    unsloth_gc        the same with its default offloaded gradient checkpointing ("unsloth")           apart
Adding one is a builder function and its line in CONTENDERS; "apart" ones run in a process of their own (APART).

Every contender trains the same random bf16 weights (minipeft's state_dict loaded into LlamaForCausalLM with SDPA
attention: the keys are identical; QLoRA: both quantize the same bf16 weights, HF by BitsAndBytesConfig(nf4,
double quant, bf16 compute) at from_pretrained) on the same batch, under bf16 autocast, with AdamW(lr=1e-4, fused
on CUDA), use_cache=False, no dropout. LoRA r=16, alpha 32, on q,v or all linear layers but lm_head; prefix and
prompt tuning with 20 virtual tokens, PEFT's table copied from minipeft's (its own random one would change the
step-1 loss); Houlsby adapters (bottleneck 64, after o_proj and down_proj): PEFT has none, so `hf` wraps HF's
modules in HoulsbyAdapter below (float32, as minipeft's): that row compares the two base models under one adapter.
"""

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import ALPHA, BOTTLENECK, DTYPE, IA3_TARGETS, LORA_TARGETS, SHAPES, P, R, Trainee, model_config

import minipeft as mp
from minipeft import fast  # the speed seam: every lever of the library


class Env:
    """What the builders of one shape share: its config, the device, the batch, a temporary folder."""

    def __init__(self, shape, device, tmp):
        self.shape, self.device, self.lr = shape, device, 1e-4  # (AdamW's learning rate)
        self.hf_dir = os.path.join(tmp, f"base-{SHAPES[shape].get('weights', shape)}")  # shapes of one model share it
        self.cfg = mp.ModelConfig(**model_config(shape))
        B, T, g = SHAPES[shape]["batch"], SHAPES[shape]["seq"], torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.cfg.vocab_size, (B, T), generator=g).to(device)

    def mp_base(self):  # the same random weights on every call (seeded), bf16, on the device
        torch.manual_seed(0)
        with torch.device(self.device):
            return mp.Transformer(self.cfg).to(DTYPE)

    def hf_base(self):  # LlamaForCausalLM with minipeft's weights
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**model_config(self.shape), use_cache=False)
        with torch.device(self.device):
            hf = LlamaForCausalLM._from_config(config, dtype=DTYPE, attn_implementation="sdpa")
        hf.load_state_dict(self.mp_base().state_dict())
        return hf

    def hf_folder(self):
        """The base as an HF folder, once per shape (shared with the processes of APART contenders), with a small
        word-level tokenizer beside it (Unsloth loads one; the ids of the batch do not come from it)."""
        if not os.path.isfile(os.path.join(self.hf_dir, "tokenizer_config.json")):
            from tokenizers import Tokenizer, models
            from transformers import PreTrainedTokenizerFast

            mp.save_pretrained(self.mp_base(), self.hf_dir)
            words = ["<unk>", "<s>", "</s>", "<pad>", *(f"w{i}" for i in range(64))]
            tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
            PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>").save_pretrained(self.hf_dir)  # fmt: skip
        return self.hf_dir

    def hf_base_4bit(self):  # the same weights through from_pretrained with bitsandbytes NF4
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=DTYPE)  # fmt: skip
        device = (self.device.index or 0) if self.device.type == "cuda" else "cpu"
        return LlamaForCausalLM.from_pretrained(self.hf_folder(), quantization_config=bnb, dtype=DTYPE, use_cache=False,
                                                device_map={"": device}, attn_implementation="sdpa")  # fmt: skip


def trainee(env, model, graphs=False, levers=None, **forward_kw):
    """The step every contender times, around `model`; levers(model, optimizer) applies speed levers first."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())  # tied ones once
    optimizer = torch.optim.AdamW(params, lr=env.lr, fused=env.device.type == "cuda")
    if levers:
        levers(model, optimizer)
    model.train()

    def step():
        if graphs:  # CUDA graphs: a new step begins, the graphs may overwrite their earlier outputs
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(env.device.type, dtype=DTYPE):
            loss = model(input_ids=env.ids, labels=env.ids, use_cache=False, **forward_kw).loss
        loss.backward()  # (optimizer in backward: each parameter is stepped here and its gradient freed,
        optimizer.step()  # so that this finds no gradient and does nothing)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Trainee(model, step, params)


# ------------------------------------------------------------------------------------------------- minipeft
def minipeft_model(env, method):
    """The seeded bf16 base with the method applied (QLoRA: NF4 with double quantization, then LoRA all-linear)."""
    base = env.mp_base()
    if method == "full":
        return base
    config = {
        "lora_qv": mp.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=("q_proj", "v_proj")),
        "lora_all": mp.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"),
        "qlora": mp.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"),
        "prefix": mp.PrefixTuningConfig(num_virtual_tokens=P),
        "prompt": mp.PromptTuningConfig(num_virtual_tokens=P),
        "adapter": mp.AdapterConfig(bottleneck_size=BOTTLENECK, placement="houlsby"),
        "ia3": mp.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=["down_proj"]),
    }[method]
    return mp.get_peft_model(mp.quantize_model(base) if method == "qlora" else base, config)


def _apply_levers(model, optimizer, compile=None, checkpoint=False, in_backward=False, chunk_logits=None, mlp_op=True):
    """The library's speed levers (minipeft.fast), the one place that calls them; returns the optimizer's hooks.
    `compile`: torch.compile options ({} for the defaults), None for no compile; checkpoint: True or "offload";
    chunk_logits: logits per loss chunk (None: fast.default_chunk, 2**26); mlp_op=False: checkpointed Blocks keep
    the compiler's own MLP (no fast_mlp op), to measure what the op changes."""
    vocab = getattr(model, "base_model", model).config.vocab_size
    chunk = max(64, chunk_logits // vocab) if chunk_logits else None
    fast.chunked_loss(model, chunk=chunk)  # train()'s default (TrainConfig.chunked_loss): no (B, T, V) logits
    if checkpoint:
        fast.checkpoint_blocks(model, offload=checkpoint == "offload")
        for layer in fast.blocks(model) if not mlp_op else []:
            layer.mlp.__dict__.pop("_fast_checkpointed", None)
    if compile is not None:
        fast.compile_blocks(model, **compile)
    return fast.step_in_backward(optimizer) if in_backward else []


def minipeft(env, method, compile=None, **levers):
    """minipeft's model for the method, with `levers` (_apply_levers' arguments) applied."""
    model = minipeft_model(env, method)
    apply = functools.partial(_apply_levers, compile=compile, **levers)
    graphs = (compile or {}).get("mode") == "reduce-overhead"
    return trainee(env, model, graphs, apply, return_logits=False)  # the loss alone, as train() asks for it


# ---------------------------------------------------------------------------------- transformers + peft
class HoulsbyAdapter(nn.Module):
    """h + up(relu(down(h))), h = base(x): minipeft.adapter's computation, for HF's modules (up = 0 at init)."""

    def __init__(self, base, bottleneck):
        super().__init__()
        self.base, kw = base, dict(device=base.weight.device, dtype=torch.float32)
        self.down = nn.Linear(base.out_features, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, base.out_features, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.base(x)
        return h + self.up(F.relu(self.down(h.float()))).to(h.dtype)


def hf_model(env, method, base):
    """`base`, an HF model, with the method applied by peft (adapter: HoulsbyAdapter)."""
    import peft

    if method == "adapter":
        base.requires_grad_(False)
        for layer in base.model.layers:
            layer.self_attn.o_proj = HoulsbyAdapter(layer.self_attn.o_proj, BOTTLENECK)
            layer.mlp.down_proj = HoulsbyAdapter(layer.mlp.down_proj, BOTTLENECK)
    if method in ("full", "adapter"):
        return base
    lora = dict(r=R, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM")
    config = {
        "lora_qv": peft.LoraConfig(target_modules=["q_proj", "v_proj"], **lora),
        "lora_all": peft.LoraConfig(target_modules="all-linear", **lora),
        "qlora": peft.LoraConfig(target_modules="all-linear", **lora),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        "ia3": peft.IA3Config(task_type="CAUSAL_LM", target_modules=IA3_TARGETS, feedforward_modules=["down_proj"]),
    }[method]
    model = peft.get_peft_model(base, config)
    if method in ("prefix", "prompt"):  # minipeft's table (the same layout as PEFT's): the same step-1 loss
        with torch.no_grad():
            ours = minipeft_model(env, method).prompt_encoder["default"].embedding.weight
            model.prompt_encoder["default"].embedding.weight.copy_(ours)
    return model


def hf_trainee(env, method, compile=None):
    """transformers + peft on env's weights (QLoRA: through bitsandbytes); `compile`: torch.compile options for each
    decoder layer ({} for the defaults, {"mode": "reduce-overhead"} for CUDA graphs), None for eager."""
    model = hf_model(env, method, env.hf_base_4bit() if method == "qlora" else env.hf_base())
    if compile is not None:
        layers = next(m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList))
        for layer in layers:
            layer.compile(**compile)
    return trainee(env, model, graphs=(compile or {}).get("mode") == "reduce-overhead")


def hf(env, method):
    if method != "qlora":  # (HF's QLoRA is hf_bnb)
        return hf_trainee(env, method)


def hf_bnb(env, method):
    if method == "qlora":
        return hf_trainee(env, method)


def hf_liger(env, method):
    """HF + Liger kernels: RMSNorm, RoPE and SwiGLU as Triton kernels, and the fused linear cross-entropy (the
    logits never exist). apply_liger_kernel_to_llama patches transformers' Llama classes for the whole process:
    this contender runs in a process of its own (APART)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)  # fmt: skip
    return hf_trainee(env, method)


def unsloth_import():
    """import unsloth, offline and without its usage statistics (it must come before transformers)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
        os.environ.setdefault(var, "1")
    import unsloth

    return unsloth


def unsloth(env, method, checkpointing=False):
    """Unsloth as its README shows it: FastLanguageModel.from_pretrained on a local checkpoint (with a tokenizer
    beside it; load_in_4bit for QLoRA: bitsandbytes NF4 with double quantization; full_finetuning=True for full),
    then FastLanguageModel.get_peft_model. checkpointing: its own offloaded gradient checkpointing ("unsloth", its
    default), else none. Unsloth patches transformers when imported: a process of its own (APART), imported first."""
    if method not in ("full", *LORA_TARGETS):
        return None
    FastLanguageModel = unsloth_import().FastLanguageModel

    gc = "unsloth" if checkpointing else False
    os.environ["UNSLOTH_ENABLE_FULL_FINETUNING"] = "1" if method == "full" else "0"  # process-wide, kept by a LoRA load
    model, _ = FastLanguageModel.from_pretrained(
        env.hf_folder(), max_seq_length=SHAPES[env.shape]["seq"], dtype=DTYPE, load_in_4bit=method == "qlora",
        full_finetuning=method == "full", use_gradient_checkpointing=gc, local_files_only=True,
    )  # fmt: skip
    if method != "full":
        model = FastLanguageModel.get_peft_model(model, r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                                 target_modules=LORA_TARGETS[method], use_gradient_checkpointing=gc)  # fmt: skip
    return trainee(env, model)


MINIPEFT = {  # contender -> its levers
    "minipeft": {},
    "minipeft_compile": dict(compile={}),
    "minipeft_graphs": dict(compile={"mode": "reduce-overhead"}),
    "minipeft_oib": dict(compile={}, in_backward=True),
    "minipeft_gc": dict(compile={}, checkpoint=True),
    "minipeft_offload": dict(compile={}, checkpoint="offload"),
    "minipeft_lowmem": dict(compile={}, checkpoint="offload", in_backward=True, chunk_logits=2**24),
    "minipeft_offload_nomlp": dict(compile={}, checkpoint="offload", mlp_op=False),  # (A/B of fast_mlp's op)
    "minipeft_lowmem_nomlp": dict(compile={}, checkpoint="offload", in_backward=True, chunk_logits=2**24, mlp_op=False),
}
CONTENDERS = {name: functools.partial(minipeft, **levers) for name, levers in MINIPEFT.items()}
CONTENDERS.update(hf=hf, hf_bnb=hf_bnb, hf_compile=functools.partial(hf_trainee, compile={}),
                  hf_graphs=functools.partial(hf_trainee, compile={"mode": "reduce-overhead"}), hf_liger=hf_liger,
                  unsloth=unsloth, unsloth_gc=functools.partial(unsloth, checkpointing=True))  # fmt: skip
# Contenders that patch a library for the whole process run in a process of their own, one per group and shape
# (bench_finetune.py --apart): the others in the main process never see the patches.
APART = {"liger": ["hf_liger"], "unsloth": ["unsloth", "unsloth_gc"]}
