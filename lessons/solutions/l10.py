"""Solutions to lesson 10's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import math

import torch.nn.functional as F

from minipeft.data import chat_prompt, chat_turn_end


def build_example(tokenizer, prompt, response):
    p = tokenizer.encode(chat_prompt(tokenizer, prompt))  # the prompt as generate will give it: no loss
    r = tokenizer.encode(response) + chat_turn_end(tokenizer)  # the response and the turn's end: the targets
    return p + r, [-100] * len(p) + r


def response_loss(logits, labels):
    V = logits.shape[-1]
    # position t predicts token t + 1: drop the last position's prediction and the first label
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


def merge_from_files(weight, tensors, config, module):
    A = tensors[f"base_model.model.{module}.lora_A.weight"]  # (r, in)
    B = tensors[f"base_model.model.{module}.lora_B.weight"]  # (out, r)
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    return weight + scaling * B @ A


def _build_example_without_end(tokenizer, prompt, response):  # no turn end: the model never learns to stop
    p = tokenizer.encode(chat_prompt(tokenizer, prompt))
    r = tokenizer.encode(response)
    return p + r, [-100] * len(p) + r


def _response_loss_unshifted(logits, labels):  # each position scored on its own token, not the next one
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _merge_from_files_alpha_over_r(weight, tensors, config, module):  # ignores use_rslora
    A = tensors[f"base_model.model.{module}.lora_A.weight"]
    B = tensors[f"base_model.model.{module}.lora_B.weight"]
    return weight + config["lora_alpha"] / config["r"] * B @ A


MISTAKES = {
    "build_example": _build_example_without_end,
    "response_loss": _response_loss_unshifted,
    "merge_from_files": _merge_from_files_alpha_over_r,
}
