"""train.py against independent references: closed-form schedule, one-big-batch gradients, hand-computed eval
loss, an uninterrupted run (for resume), and the bytes of the previous checkpoint (for failures)."""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import minipeft.fast as fast
import minipeft.resume as resume_module
import minipeft.train as train_module
from minipeft.data import batch_stream, epoch_order, load_text_dataset
from minipeft.instructions import load_jsonl_dataset
from minipeft.model import ModelConfig, Transformer
from minipeft.train import (
    NonFiniteLossError,
    TrainConfig,
    build_optimizer,
    evaluate,
    lr_multiplier,
    train,
    trainable_parameters,
)

MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
TEXT = "the quick brown fox jumps over the lazy dog. " * 30


class CharTokenizer:
    """Ids 0 pad, 1 bos, 2 eos, then one id per character (61 at most, so vocab_size=64 fits)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    alphabet = "abcdefghijklmnopqrstuvwxyz .,!?'\n:0123456789"

    def encode(self, text):
        return [self.alphabet.index(c) + 3 for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


TOK = CharTokenizer()


@pytest.fixture(autouse=True)
def one_thread():  # tiny matrices: threads only contend (and make timings noisy on a shared machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**MODEL, **overrides})).to(dtype)


def freeze_all_but(model, *substrings):
    for n, p in model.named_parameters():
        p.requires_grad_(any(s in n for s in substrings))
    return model


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT)
    return load_text_dataset(path, TOK, seq_len=16, val_fraction=0.1)  # 76 train blocks, 8 val blocks


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
    words = TEXT.split()
    records = [{"prompt": " ".join(words[i : i + 1 + i % 4]), "response": " ".join(words[i + 3 : i + 4 + i % 7])}
               for i in range(40)]  # fmt: skip
    records[5] = {"text": "just some text to learn"}
    path = tmp_path_factory.mktemp("jsonl") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_jsonl_dataset(path, TOK, seq_len=32, val_fraction=0.2)  # 32 train, 8 val, lengths vary


def cfg(**kw):
    return TrainConfig(**{"steps": 4, "lr": 1e-3, "batch_size": 4, "log_every": 1, "progress": False, **kw})


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def dir_bytes(path):
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())}


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("steps", 1.5), ("lr", 0.0), ("lr", float("nan")), ("batch_size", 0), ("grad_accum", 0),
     ("warmup_steps", -1), ("warmup_ratio", 1.0), ("min_lr_ratio", 1.5), ("weight_decay", -0.1),
     ("max_grad_norm", 0.0), ("eval_batches", 0), ("log_every", 0), ("seed", -1), ("autocast", "fp16"),
     ("lora_plus_ratio", 0.0), ("compile", 1), ("compile", "fast"), ("loss_chunk", 0), ("loss_chunk", 2.0)],
)  # fmt: skip
def test_bad_config_is_a_value_error_naming_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be .*, got {re.escape(repr(value))}"):
        TrainConfig(**{field: value})


def test_bad_setups_fail_before_any_work(text_data, tmp_path):
    train_set, val_set = text_data
    model = freeze_all_but(make_model(), "nothing")
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, train_set, val_set, cfg())
    model = make_model()
    before = trainable_snapshot(model)
    with pytest.raises(ValueError, match="batch_size=100 is larger than the training set"):
        train(model, train_set, val_set, cfg(batch_size=100))
    with pytest.raises(ValueError, match="resume=True needs TrainConfig.out_dir"):
        train(model, train_set, val_set, cfg(), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(model, train_set, val_set, cfg(out_dir=str(tmp_path)), resume=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------ schedule, optimizer


def reference_lr(s, lr, steps, warmup, min_ratio):  # written out again, independently of train.py
    if s < warmup:
        return lr * (s + 1) / (warmup + 1)
    t = (s - warmup) / (steps - 1 - warmup)
    return lr * min_ratio + lr * (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("warmup", [dict(warmup_steps=3), dict(warmup_ratio=0.25)])
def test_lr_schedule_used_by_the_optimizer_is_the_closed_form(text_data, warmup):
    metrics = train(make_model(), *text_data, cfg(steps=12, lr=1e-2, min_lr_ratio=0.1, **warmup))
    used = [e["lr"] for e in metrics["train"]]
    want = [reference_lr(s, 1e-2, 12, 3, 0.1) for s in range(12)]
    assert used == pytest.approx(want, rel=1e-12, abs=0)
    assert used[3] == pytest.approx(1e-2) and used[-1] == pytest.approx(1e-3)  # peak after warmup, min at the end
    assert [lr_multiplier(s, 12, 0, 0.0) for s in (0, 11)] == [1.0, 0.0]  # no warmup: full lr at once


def test_optimizer_holds_only_trainable_parameters_with_lora_plus_and_decay_groups():
    torch.manual_seed(0)
    net = nn.ModuleDict({"lora_A": nn.Linear(4, 2), "lora_B": nn.Linear(2, 4), "base": nn.Linear(4, 4)})
    net["base"].requires_grad_(False)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, TrainConfig(lr=0.1, lora_plus_ratio=16.0, weight_decay=0.01))
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == {id(p) for _, p in named} and len(in_opt) == 4
    groups = {tuple(g["param_names"]): (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert groups == {
        ("lora_A.weight",): (0.1, 0.01),  # matrices decay, biases do not
        ("lora_B.weight",): (1.6, 0.01),  # LoRA+: lr * 16 for lora_B
        ("lora_A.bias", "lora_B.bias"): (1.6, 0.0),  # 1-D: with lora_B, as PEFT's create_loraplus_optimizer
    }


def test_frozen_parameters_stay_bit_identical_and_only_trainable_ones_are_saved(text_data, tmp_path):
    model = freeze_all_but(make_model(), "q_proj", "model.norm")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = trainable_snapshot(model)
    train(model, *text_data, cfg(steps=5, lr=1e-2, weight_decay=0.1, out_dir=str(tmp_path)))
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen[n]) if n in frozen else not torch.equal(p, trainable[n]), n
    ckpt = tmp_path / "checkpoint"
    assert sorted(load_file(ckpt / "trainable.safetensors")) == sorted(trainable)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert sorted(sum((g["param_names"] for g in state["optimizer"]["param_groups"]), [])) == sorted(trainable)
    n_state = {int(k.split(".")[1]) for k in load_file(ckpt / "optimizer.safetensors")}
    assert n_state == set(range(len(trainable)))  # AdamW state for exactly the trainable parameters


# -------------------------------------------------------------------------------- the loss and its gradient


def test_loss_falls_on_a_memorisable_corpus_and_metrics_are_logged(text_data, tmp_path):
    model = make_model()
    m = train(model, *text_data, cfg(steps=60, lr=3e-3, batch_size=8, log_every=10, eval_every=20,
                                     out_dir=str(tmp_path), progress=True))  # fmt: skip
    losses = [e["loss"] for e in m["train"]]
    assert [e["step"] for e in m["train"]] == [10, 20, 30, 40, 50, 60]
    assert losses[0] > 2.5 and losses[-1] < 0.6 * losses[0]  # ln(64) = 4.16 at the start
    assert [e["step"] for e in m["eval"]] == [0, 20, 40, 60]  # step 0: the held-out loss before training
    assert m["eval"][-1]["val_loss"] < m["eval"][0]["val_loss"]
    assert all(e["val_ppl"] == pytest.approx(math.exp(e["val_loss"])) for e in m["eval"])
    assert all(e["tokens_per_s"] > 0 for e in m["train"])
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == {"train": m["train"], "eval": m["eval"], "best": m["best"]}
    assert m["best"] == min(
        ({"step": e["step"], "val_loss": e["val_loss"]} for e in m["eval"]), key=lambda e: e["val_loss"]
    )
    assert model.training  # the mode it came in with


def test_evaluate_is_the_mean_over_every_target_token(jsonl_data):
    model = make_model(dtype=torch.float64)
    _, val = jsonl_data
    total, count = 0.0, 0
    with torch.no_grad():  # one example at a time, no padding: the reference
        for ids, labels in zip(val.input_ids, val.labels):
            logits = model(ids[None]).logits[0, :-1]
            total += F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    loss, ppl = evaluate(model, val, batch_size=3)  # padded batches of 3, 3, 2
    assert loss == pytest.approx(total / count, rel=1e-12) and ppl == pytest.approx(math.exp(total / count))
    assert evaluate(model, val, batch_size=3, max_batches=1)[0] != pytest.approx(loss)


def reference_grad_norm(model, data, seed, n):
    """The gradient norm of the mean token loss over the first n examples of epoch 0, as one unpadded sum."""
    model.zero_grad()
    rows = epoch_order(len(data), seed, 0)[:n].tolist()
    total = sum(int((data.labels[i][1:] != -100).sum()) for i in rows)
    for i in rows:
        logits = model(data.input_ids[i][None]).logits[0, :-1]
        (F.cross_entropy(logits, data.labels[i][1:], ignore_index=-100, reduction="sum") / total).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
    model.zero_grad()
    return norm


@pytest.mark.parametrize("which", ["text", "jsonl"])
def test_grad_accumulation_2x4_equals_one_batch_of_8(text_data, jsonl_data, which):
    data = text_data[0] if which == "text" else jsonl_data[0]
    results = []
    for batch_size, grad_accum in [(4, 2), (8, 1)]:
        model = make_model(dtype=torch.float64)
        m = train(model, data, None, cfg(steps=1, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=None))
        results.append((trainable_snapshot(model), m["train"][0]))
    (p_acc, log_acc), (p_big, log_big) = results
    for n in p_big:
        torch.testing.assert_close(p_acc[n], p_big[n], rtol=0, atol=1e-9)
    assert log_acc["loss"] == pytest.approx(log_big["loss"], rel=1e-12)
    assert log_acc["grad_norm"] == pytest.approx(log_big["grad_norm"], rel=1e-10)  # Adam would hide a scale bug
    assert log_big["grad_norm"] == pytest.approx(reference_grad_norm(make_model(dtype=torch.float64), data, 0, 8))
    if which == "jsonl":  # the data make the weighting matter: a plain loss / grad_accum would be wrong here
        model = make_model(dtype=torch.float64)
        stream = batch_stream(data, 4, seed=0)
        for _ in range(2):
            b = next(stream)
            (model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss / 2).backward()
        naive = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        assert abs(naive - log_big["grad_norm"]) > 1e-4 * log_big["grad_norm"]


# ----------------------------------------------------------------------------------------------- resume


class DropoutLinear(nn.Module):
    """A Linear behind dropout: makes the run depend on the torch RNG, which resume must restore."""

    def __init__(self, base, p=0.3):
        super().__init__()
        self.base, self.dropout = base, nn.Dropout(p)

    def forward(self, x):
        return self.base(self.dropout(x))


def dropout_model():
    model = make_model()
    for layer in model.model.layers:
        layer.mlp.down_proj = DropoutLinear(layer.mlp.down_proj)
    return freeze_all_but(model, "down_proj", "q_proj")


class Crash(Exception):
    pass


def crash_at_forward(model, k):
    """Raise Crash on the k-th training-mode forward call (evaluation calls do not count)."""
    calls = [0]

    def hook(module, args):
        if module.training:
            calls[0] += 1
            if calls[0] == k:
                raise Crash

    return model.register_forward_pre_hook(hook)


RESUME = dict(steps=7, batch_size=4, grad_accum=2, warmup_steps=2, lr=3e-3, eval_every=2, save_every=3)


def test_resume_after_a_crash_is_bit_identical_to_an_uninterrupted_run(text_data, tmp_path, monkeypatch):
    reference = dropout_model()
    ref_metrics = train(reference, *text_data, cfg(**RESUME))  # no out_dir: no checkpoint at all
    first = dropout_model()
    crash_at_forward(first, 3 * 2 + 2)  # the second micro-batch of step 4, after the save at step 3
    with pytest.raises(Crash):
        train(first, *text_data, cfg(**RESUME, out_dir=str(tmp_path)))
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    saved = dir_bytes(tmp_path / "checkpoint")

    resumed = dropout_model()  # a fresh process would build the model again
    metrics = train(resumed, *text_data, cfg(**RESUME, out_dir=str(tmp_path)), resume=True)
    want = trainable_snapshot(reference)
    assert all(torch.equal(p, want[n]) for n, p in trainable_snapshot(resumed).items())
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), reference.parameters()))

    def strip(entries):
        return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in entries]

    assert strip(metrics["train"]) == strip(ref_metrics["train"])  # steps 1..7 once each, same losses
    assert metrics["eval"] == ref_metrics["eval"]

    # The test can fail: without the RNG states, dropout draws other masks and the weights differ.
    restore_checkpoint(tmp_path, saved)
    monkeypatch.setattr(resume_module, "set_rng_state", lambda tensors, state: None)
    torch.manual_seed(12345)
    other = dropout_model()
    train(other, *text_data, cfg(**RESUME, out_dir=str(tmp_path)), resume=True)
    assert not all(torch.equal(p, q) for p, q in zip(other.parameters(), reference.parameters()))


def restore_checkpoint(out_dir, files):
    ckpt = Path(out_dir) / "checkpoint"
    for f in ckpt.iterdir():
        f.unlink()
    for name, data in files.items():
        (ckpt / name).write_bytes(data)


def test_resume_finds_the_previous_checkpoint_after_a_crash_between_the_renames(text_data, tmp_path):
    reference = make_model()
    train(reference, *text_data, cfg(steps=4))
    model = freeze_all_but(make_model(), "")  # "" is in every name: all trainable
    crash_at_forward(model, 3)
    with pytest.raises(Crash):
        train(model, *text_data, cfg(steps=4, save_every=2, out_dir=str(tmp_path)))
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.old")  # as if killed between the two renames
    model = make_model()
    train(model, *text_data, cfg(steps=4, out_dir=str(tmp_path)), resume=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert sorted(f.name for f in tmp_path.iterdir()) == [".lock", "checkpoint", "metrics.json"]


def test_resume_refuses_a_checkpoint_whose_parameters_do_not_match(text_data, tmp_path):
    train(freeze_all_but(make_model(), "down_proj"), *text_data, cfg(steps=1, out_dir=str(tmp_path)))
    saved = dir_bytes(tmp_path / "checkpoint")
    other = freeze_all_but(make_model(intermediate_size=48), "down_proj")
    key = re.escape("'model.layers.0.mlp.down_proj.weight'")
    with pytest.raises(ValueError, match=rf"{key} has shape \(32, 64\) in the checkpoint and \(32, 48\) in the model"):
        train(other, *text_data, cfg(steps=2, out_dir=str(tmp_path)), resume=True)
    more = freeze_all_but(make_model(), "down_proj", "up_proj")
    key = re.escape("'model.layers.0.mlp.up_proj.weight'")
    with pytest.raises(ValueError, match=rf"{key} has shape missing in the checkpoint and \(64, 32\) in the model"):
        train(more, *text_data, cfg(steps=2, out_dir=str(tmp_path)), resume=True)
    assert dir_bytes(tmp_path / "checkpoint") == saved


# ------------------------------------------------------------------------------------------- failures


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(text_data, tmp_path):
    model = make_model()
    ckpt = tmp_path / "checkpoint"
    seen, calls = {}, [0]

    def inject_nan(module, args, output):  # the 5th training forward is step 5 (grad_accum 1)
        if module.training:
            calls[0] += 1
            if calls[0] == 5:
                seen.update(dir_bytes(ckpt))  # the checkpoint of step 4, as it is before the failure
                return output * float("nan")

    handle = model.model.norm.register_forward_hook(inject_nan)  # the final hidden states feed the loss
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss nan at step 5.*last good checkpoint at {ckpt}"):
        train(model, *text_data, cfg(steps=10, save_every=2, out_dir=str(tmp_path)))
    assert json.loads(seen["trainer_state.json"])["step"] == 4
    assert dir_bytes(ckpt) == seen  # untouched
    assert issubclass(NonFiniteLossError, RuntimeError)
    handle.remove()
    m = train(model, *text_data, cfg(steps=10, save_every=2, out_dir=str(tmp_path)), resume=True)  # loadable
    assert m["train"][-1]["step"] == 10 and math.isfinite(m["loss"])


def test_an_infinite_loss_before_any_checkpoint_says_so(text_data):
    # (A huge lr is not a portable way to get there: RMSNorm maps inf activations to 0, and whether a NaN
    # appears depends on the platform; an injected inf always does.)
    model = make_model()
    calls = [0]

    def inject_inf(module, args, output):
        calls[0] += module.training  # training forwards only, not the evaluation batches
        return output * float("inf") if module.training and calls[0] == 3 else None

    model.model.norm.register_forward_hook(inject_inf)
    before = trainable_snapshot(model)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss (nan|inf) at step 3; stopped, no checkpoint was saved"
    ):
        train(model, *text_data, cfg(steps=5))
    assert not all(torch.equal(p, before[n]) for n, p in trainable_snapshot(model).items())  # steps 1, 2 applied


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_intact(text_data, tmp_path, monkeypatch):
    real_save_file, calls, seen = resume_module.save_file, [0], {}

    def failing_save_file(tensors, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3 + 2:  # three files a checkpoint: the second file of the second checkpoint
            seen.update(dir_bytes(tmp_path / "checkpoint"))
            raise OSError("No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        train(make_model(), *text_data, cfg(steps=3, save_every=1, out_dir=str(tmp_path)))
    assert json.loads(seen["trainer_state.json"])["step"] == 1
    assert dir_bytes(tmp_path / "checkpoint") == seen
    assert sorted(f.name for f in tmp_path.iterdir()) == [".lock", "checkpoint", "metrics.json"]  # no temp dir left
    monkeypatch.undo()
    train(make_model(), *text_data, cfg(steps=3, out_dir=str(tmp_path)), resume=True)


def test_checkpoint_layout_on_save_and_no_pickle(text_data, tmp_path):
    where = []

    def on_save(model, path):  # the CLI writes the PEFT adapter here; it must be part of the atomic save
        where.append(Path(path))
        (Path(path) / "adapter_config.json").write_text("{}")

    train(make_model(), *text_data, cfg(steps=2, save_every=1, out_dir=str(tmp_path)), on_save=on_save)
    ckpt = tmp_path / "checkpoint"
    assert len(where) == 2 and all(p.parent == tmp_path and p.name != "checkpoint" for p in where)
    assert sorted(f.name for f in ckpt.iterdir()) == [
        "adapter_config.json", "optimizer.safetensors", "rng.safetensors", "trainable.safetensors",
        "trainer_state.json",
    ]  # fmt: skip
    rng = load_file(ckpt / "rng.safetensors")
    assert rng["torch_cpu"].dtype == torch.uint8
    optim = load_file(ckpt / "optimizer.safetensors")
    assert {k.rsplit(".", 1)[1] for k in optim} == {"exp_avg", "exp_avg_sq"}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert {v["value"] for v in state["optimizer"]["scalars"].values()} == {2.0}  # AdamW's step counts
    assert set(state["rng"]) == {"python", "numpy"}
    for source in ("train.py", "resume.py", "data.py", "instructions.py"):
        text = (Path(train_module.__file__).parent / source).read_text()
        assert not re.search(r"import pickle|torch\.load|torch\.save|pickle\.", text), source


def test_a_lora_peft_model_trains_resumes_bit_identically_and_saves_its_adapter(text_data, tmp_path):
    from minipeft.lora import LoraConfig
    from minipeft.peft import get_peft_model

    def lora_model():  # lora_dropout: the run depends on the RNG; init_lora_weights=False: non-zero B
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False)
        return get_peft_model(make_model(), config)

    run = cfg(steps=5, save_every=2, lr=1e-2, lora_plus_ratio=4.0, out_dir=str(tmp_path))
    reference = lora_model()
    base = {n: p.detach().clone() for n, p in reference.named_parameters() if not p.requires_grad}
    train(reference, *text_data, cfg(steps=5, lr=1e-2, lora_plus_ratio=4.0))
    assert all(torch.equal(p, base[n]) for n, p in reference.named_parameters() if not p.requires_grad)
    assert any("lora_B" in n for n, _ in trainable_parameters(reference))

    first = lora_model()
    crash_at_forward(first, 3)
    with pytest.raises(Crash):
        train(first, *text_data, run, on_save=lambda model, path: model.save_pretrained(path))
    resumed = lora_model()
    train(resumed, *text_data, run, resume=True, on_save=lambda model, path: model.save_pretrained(path))
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), reference.parameters()))
    files = {f.name for f in (tmp_path / "checkpoint").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainable.safetensors"} <= files


def test_compile_switch_trains_a_lora_model_like_eager(text_data):
    """TrainConfig(compile=True) runs the blocks through torch.compile (inductor, generated C++ on a CPU): the
    same losses and adapter weights as the eager run, up to float32 rounding."""
    from minipeft import LoraConfig, get_peft_model

    runs = {}
    for compiled in (False, True):
        model = get_peft_model(make_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        m = train(model, *text_data, cfg(steps=3, compile=compiled))
        runs[compiled] = ([e["loss"] for e in m["train"]], trainable_snapshot(model), model)
    compiled = [fast.blocks(runs[c][2])[0].__dict__.get("_fast", {}).get("compiled") for c in (True, False)]
    assert compiled[0] is not None and compiled[1] is None
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for n, w in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][n], w, rtol=1e-4, atol=1e-6)


def test_optimizer_in_backward_equals_the_plain_loop(text_data, tmp_path):
    """optimizer_in_backward=True steps each parameter inside backward: the same weights, losses and saved optimizer
    state as the plain loop (float64, full fine-tuning with tied embeddings, weight decay on matrices only, a warmup
    and a cosine lr), no gradient left afterwards, and the hooks are gone when train() returns."""
    kw = dict(steps=4, max_grad_norm=None, weight_decay=0.1, warmup_steps=1, save_every=4)
    runs = {}
    for in_backward in (False, True):
        model = make_model(dtype=torch.float64, tie_word_embeddings=True)
        out = tmp_path / str(in_backward)
        m = train(model, *text_data, cfg(**kw, optimizer_in_backward=in_backward, out_dir=str(out)))
        runs[in_backward] = model, m, load_file(out / "checkpoint" / "optimizer.safetensors")
    (plain, m_plain, opt_plain), (fused, m_fused, opt_fused) = runs[False], runs[True]
    for (n, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=n)
    assert [e["loss"] for e in m_fused["train"]] == pytest.approx([e["loss"] for e in m_plain["train"]], rel=1e-12)
    assert opt_fused.keys() == opt_plain.keys()
    for k in opt_plain:
        torch.testing.assert_close(opt_fused[k], opt_plain[k], rtol=1e-10, atol=1e-16)
    assert all(e["grad_norm"] is None for e in m_fused["train"])  # no norm is computed: the gradients never coexist
    assert all(p.grad is None for p in fused.parameters())
    before = [p.detach().clone() for p in fused.parameters()]
    ids = torch.randint(3, 64, (1, 12))
    fused(ids, labels=ids).loss.backward()
    assert all(torch.equal(p, b) for p, b in zip(fused.parameters(), before))  # no hook steps after train()
    assert all(p.grad is not None for p in fused.parameters())


def test_optimizer_in_backward_refuses_accumulation_and_clipping():
    for bad in (dict(grad_accum=2, max_grad_norm=None), dict(max_grad_norm=1.0)):
        with pytest.raises(ValueError, match=r"optimizer_in_backward=True needs grad_accum=1 and max_grad_norm=None"):
            TrainConfig(optimizer_in_backward=True, **bad)
    with pytest.raises(ValueError, match=r"TrainConfig\.optimizer_in_backward must be True or False, got 1"):
        TrainConfig(optimizer_in_backward=1)


def test_a_gradient_left_from_before_train_does_not_enter_the_first_step(text_data):
    """train() starts from no gradient: a stale .grad (a backward the user ran before) changes nothing, with or
    without the optimizer in backward (whose first hook would otherwise step that parameter too)."""
    for in_backward in (False, True):
        kw = dict(steps=2, max_grad_norm=None, optimizer_in_backward=in_backward)
        clean = make_model(dtype=torch.float64)
        train(clean, *text_data, cfg(**kw))
        stale = make_model(dtype=torch.float64)
        for p in stale.parameters():
            p.grad = torch.full_like(p, 100.0)
        train(stale, *text_data, cfg(**kw))
        assert all(torch.equal(p, q) for p, q in zip(stale.parameters(), clean.parameters())), in_backward


def test_early_stop_after_n_evaluations_without_a_new_best_and_on_best_sees_each_best(text_data, tmp_path):
    """A learning rate that diverges after a first improvement: early_stop=2 stops two evaluations after the best,
    saves a checkpoint there, and on_best was called exactly at each new lowest held-out loss."""
    model, bests = make_model(), []
    m = train(model, *text_data, cfg(steps=40, lr=0.3, eval_every=2, early_stop=2, out_dir=str(tmp_path)),
              on_best=lambda mod, step, loss: bests.append((step, loss)))  # fmt: skip
    evals = [(e["step"], e["val_loss"]) for e in m["eval"]]
    running = [e for i, e in enumerate(evals) if e[1] < min([x[1] for x in evals[:i]], default=math.inf)]
    assert bests == running and m["best"] == {"step": bests[-1][0], "val_loss": bests[-1][1]}
    assert m["stopped_early_at"] == evals[-1][0] == m["best"]["step"] + 2 * 2 < 40
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == m["stopped_early_at"]


def test_a_nan_gradient_stops_before_the_step_and_the_weights_stay_finite(text_data):
    model, calls = make_model(), [0]
    p0 = next(p for p in model.parameters() if p.requires_grad)

    def nan_grad_at_step_2(module, args, output):
        calls[0] += module.training
        if module.training and calls[0] == 2:
            p0.register_hook(lambda g: g * float("nan"))

    model.model.norm.register_forward_hook(nan_grad_at_step_2)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm nan at step 2; stopped"):
        train(model, *text_data, cfg(steps=4))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_with_the_optimizer_in_backward_nan_weights_stop_the_run_before_a_save(text_data, tmp_path):
    model, calls = make_model(), [0]
    p0 = next(p for p in model.parameters() if p.requires_grad)

    def nan_grad_at_step_3(module, args, output):
        calls[0] += module.training
        if module.training and calls[0] == 3:
            p0.register_hook(lambda g: g * float("nan"))

    model.model.norm.register_forward_hook(nan_grad_at_step_3)
    config = cfg(steps=5, save_every=2, optimizer_in_backward=True, max_grad_norm=None, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="non-finite weights after the step at step 3"):
        train(model, *text_data, config)
    saved = load_file(tmp_path / "checkpoint" / "trainable.safetensors")
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_lora_plus_groups_and_learning_rates_are_hf_peft_s():
    """build_optimizer(lora_plus_ratio=16) gives every trainable parameter the learning rate that HF PEFT's
    create_loraplus_optimizer gives it, on the same LoRA + DoRA adapter of the same model."""
    import peft
    from helpers import hf_llama
    from peft.optimizers import create_loraplus_optimizer

    from minipeft import LoraConfig, get_peft_model

    hf, ours = hf_llama(tie_word_embeddings=False)
    kw = dict(r=4, target_modules=["q_proj", "down_proj"], use_dora=True)
    theirs = create_loraplus_optimizer(peft.get_peft_model(hf, peft.LoraConfig(**kw)), torch.optim.AdamW,
                                       lr=1e-3, loraplus_lr_ratio=16)  # fmt: skip
    mine = build_optimizer(trainable_parameters(get_peft_model(ours, LoraConfig(**kw))),
                           TrainConfig(lr=1e-3, lora_plus_ratio=16))  # fmt: skip
    # names: ours base_model.<module>..., PEFT's base_model.model.<module>...; the same shapes in the same order
    theirs_lr = [(tuple(p.shape), g["lr"]) for g in theirs.param_groups for p in g["params"]]
    mine_lr = [(tuple(p.shape), g["lr"]) for g in mine.param_groups for p in g["params"]]
    assert sorted(mine_lr) == sorted(theirs_lr) and {lr for _, lr in mine_lr} == {1e-3, 1.6e-2}
    assert sum(lr == 1.6e-2 for _, lr in mine_lr) == 2 * 2 * 2  # lora_B and the magnitude, 2 modules, 2 layers
