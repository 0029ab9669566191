"""`minipeft` end to end on the bundled tiny-shakespeare model (small step counts)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import minipeft.train as train_module
from minipeft.checkpoint import load_pretrained
from minipeft.cli import main
from minipeft.peft import PeftModel

FAST = ["--steps", "6", "--eval-every", "3", "--batch-size", "4", "--seq-len", "48"]


def finetune(tmp_path, *extra, name="run", samples=False):
    out = tmp_path / name
    main(["finetune", *FAST, "--out", str(out), *extra, *([] if samples else ["--no-samples"])])
    return out


def test_finetune_lora_writes_a_peft_adapter_and_learns(tmp_path, capsys):
    out = finetune(tmp_path, "--steps", "30", "--eval-every", "15", "--lr", "3e-3", samples=True)
    text = capsys.readouterr().out
    assert "trainable params:" in text and "held-out loss: before" in text and "--- after:" in text
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "tiny-shakespeare"
    assert (out / "command.txt").read_text().startswith("minipeft finetune")
    evals = json.loads((out / "metrics.json").read_text())["eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # held-out loss falls
    before, after = (float(x.split()[0]) for x in text.split("held-out loss: before ")[1].split("-> after ")[:2])
    assert after < before


def test_finetune_compile_learns_what_the_plain_run_learns(tmp_path):
    """--compile: the same training losses and held-out losses as without it (float32 on this CPU)."""
    runs = [json.loads((finetune(tmp_path, *flag, name=f"run{len(flag)}") / "metrics.json").read_text())
            for flag in ([], ["--compile"])]  # fmt: skip
    for key, field in (("train", "loss"), ("eval", "val_loss")):
        assert [e[field] for e in runs[1][key]] == pytest.approx([e[field] for e in runs[0][key]], rel=1e-5)


def test_generate_with_adapter_and_merge(tmp_path, capsys):
    out = finetune(tmp_path)
    capsys.readouterr()
    main(["generate", "--adapter", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"])
    adapted_text = capsys.readouterr().out
    assert adapted_text.startswith("ROMEO:")
    main(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")])
    merged, tok = load_pretrained(tmp_path / "merged")
    base, _ = load_pretrained("tiny-shakespeare")
    pm = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([tok.encode("Shall I compare thee to a summer's day?")])
    torch.testing.assert_close(merged(ids).logits, pm(ids).logits, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    main(
        [
            "generate",
            "--model",
            str(tmp_path / "merged"),
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]
    )
    assert capsys.readouterr().out == adapted_text  # the merged model writes what the adapter wrote


def test_mixed_batch_generation_from_the_command_line(tmp_path, capsys):
    a = finetune(tmp_path, name="a")
    b = finetune(tmp_path, "--r", "4", "--seed", "1", name="b")
    capsys.readouterr()
    common = ["--max-new-tokens", "6", "--temperature", "0", "--adapter", f"a={a}", "--adapter", f"b={b}"]
    main(["generate", *common, "--prompt", "ROMEO:", "--prompt", "JULIET:", "--use", "b,__base__"])
    mixed = capsys.readouterr().out.split("\n\n")
    main(["generate", *common, "--prompt", "ROMEO:", "--use", "b"])
    assert capsys.readouterr().out.split("\n\n")[0] == mixed[0]
    main(["generate", "--max-new-tokens", "6", "--temperature", "0", "--prompt", "JULIET:"])
    assert capsys.readouterr().out.split("\n\n")[0] == mixed[1]


def test_resume_gives_the_same_adapter_as_one_run(tmp_path, monkeypatch):
    full = finetune(tmp_path, "--save-every", "3", name="full")
    calls = [0]
    real = train_module.batch_loss

    def crash_at_step_5(model, *a, **k):
        calls[0] += model.training  # training steps only, not evaluation batches
        if model.training and calls[0] == 5:
            raise KeyboardInterrupt("simulated crash")
        return real(model, *a, **k)

    monkeypatch.setattr(train_module, "batch_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path, "--save-every", "3", name="crashed")
    monkeypatch.setattr(train_module, "batch_loss", real)
    finetune(tmp_path, "--save-every", "3", "--resume", name="crashed")
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_cleanly(tmp_path, monkeypatch):
    real = train_module.batch_loss
    calls = [0]

    def nan_at_step_4(model, *a, **k):
        calls[0] += model.training  # training steps only, not evaluation batches
        loss = real(model, *a, **k)
        return loss * float("nan") if model.training and calls[0] == 4 else loss

    monkeypatch.setattr(train_module, "batch_loss", nan_at_step_4)
    with pytest.raises(SystemExit, match="error: non-finite loss nan at step 4.*last good checkpoint"):
        finetune(tmp_path, "--save-every", "3")
    assert (tmp_path / "run" / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "method",
    [
        ["--method", "full"],
        ["--method", "lora", "--dora", "--targets", "all-linear"],
        ["--method", "qlora", "--targets", "all-linear"],
        ["--method", "adapter", "--bottleneck", "8", "--placement", "pfeiffer"],
        ["--method", "prefix", "--virtual-tokens", "4", "--prefix-projection"],
        ["--method", "prompt", "--virtual-tokens", "4", "--init-text", "Shall I compare thee"],
    ],
    ids=["full", "dora", "qlora", "adapter", "prefix", "prompt"],
)
def test_every_method_runs_and_generates(tmp_path, capsys, method):
    out = finetune(tmp_path, "--steps", "2", "--eval-every", "0", *method)
    written = out / ("model" if "full" in method else "adapter")
    assert written.is_dir()
    capsys.readouterr()
    args = ["--model", str(written)] if "full" in method else ["--adapter", str(out)]
    main(["generate", *args, "--prompt", "ROMEO:", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith("ROMEO:")


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--r", "0"], "LoraConfig.r must be a positive integer, got 0"),
        (["--dropout", "1.5"], r"lora_dropout must be in \[0, 1\)"),
        (["--targets", "qkv"], "matched no Linear layer; candidates"),
        (["--data", "/nonexistent.txt"], "--data /nonexistent.txt does not exist"),
        (["--method", "qlora", "--blocksize", "48"], "--blocksize 48 is not supported"),
        (["--method", "adapter", "--placement", "middle"], "placement"),
        (["--method", "prefix", "--virtual-tokens", "0"], "num_virtual_tokens"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--seq-len", "100000"], "exceeds the model's context"),
        (["--compile", "fast"], r"compile must be one of .*'reduce-overhead'.*got 'fast'"),
        (["--optimizer-in-backward", "--grad-accum", "2"], "optimizer_in_backward=True needs grad_accum=1"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["finetune", "--out", str(tmp_path / "x"), *args])
    assert not (tmp_path / "x" / "adapter").exists()


def test_unknown_method_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--method", "ia3"])
    assert "invalid choice: 'ia3'" in capsys.readouterr().err


def test_full_finetuning_with_the_optimizer_in_backward_learns(tmp_path):
    """--optimizer-in-backward (full fine-tuning, no clipping): training runs through the hooks, logs no gradient
    norm, and the held-out loss falls."""
    out = finetune(tmp_path, "--method", "full", "--optimizer-in-backward", "--lr", "3e-4")
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(e["grad_norm"] is None for e in metrics["train"])
    assert metrics["eval"][-1]["val_loss"] < metrics["eval"][0]["val_loss"]
    assert (out / "model").is_dir()
