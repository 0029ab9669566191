"""`minipeft` end to end on the bundled tiny-shakespeare model (small step counts)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import minipeft.train as train_module
from minipeft.checkpoint import load_pretrained
from minipeft.cli import DEFAULT_DATA, main
from minipeft.peft import PeftModel

# --device cpu: the runs compare float32 numbers (and print CPU losses) at float32 tolerances; the default, auto,
# would train on a GPU where there is one, in bfloat16
FAST = ["--steps", "6", "--eval-every", "3", "--batch-size", "4", "--seq-len", "48", "--device", "cpu"]


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
        main(["finetune", "--method", "loha"])
    assert "invalid choice: 'loha'" in capsys.readouterr().err


def test_full_finetuning_with_the_optimizer_in_backward_learns(tmp_path):
    """--optimizer-in-backward (full fine-tuning, no clipping): training runs through the hooks, logs no gradient
    norm, and the held-out loss falls."""
    out = finetune(tmp_path, "--method", "full", "--optimizer-in-backward", "--lr", "3e-4")
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(e["grad_norm"] is None for e in metrics["train"])
    assert metrics["eval"][-1]["val_loss"] < metrics["eval"][0]["val_loss"]
    assert (out / "model").is_dir()


def test_the_lowest_memory_flags_train_as_the_plain_run(tmp_path, monkeypatch):
    """--grad-checkpoint offload --loss-chunk 7 (with --optimizer-in-backward): each Block's input goes to the host
    and comes back, the loss runs in chunks of 7 rows, and every step's loss equals the run without them."""
    from minipeft import fast

    moved, chunks = [0], []
    to_host, loss = fast._to_host, fast.chunked_causal_lm_loss
    monkeypatch.setattr(fast, "_to_host", lambda t: moved.__setitem__(0, moved[0] + 1) or to_host(t))
    monkeypatch.setattr(fast, "chunked_causal_lm_loss", lambda *a, **k: chunks.append(a[3]) or loss(*a, **k))
    flags = ["--method", "full", "--optimizer-in-backward", "--steps", "4", "--eval-every", "4"]
    plain = finetune(tmp_path, *flags, name="plain")
    assert moved[0] == 0 and set(chunks) == {None}
    low = finetune(tmp_path, *flags, "--grad-checkpoint", "offload", "--loss-chunk", "7", name="low")
    assert moved[0] > 0 and set(chunks[len(chunks) // 2 :]) == {7}
    losses = [[e["loss"] for e in json.loads((d / "metrics.json").read_text())["train"]] for d in (plain, low)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# ------------------------------------------------------------------------- nothing a user owns is lost


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_merge_refuses_a_non_empty_out_and_with_overwrite_keeps_the_users_files(tmp_path):
    run = finetune(tmp_path)
    out = tmp_path / "merged"
    (out / "models" / "v1").mkdir(parents=True)
    (out / "models" / "v1" / "w.bin").write_bytes(b"mine")
    (out / "model_card.md").write_text("my notes")
    (out / "modeling_custom.py").write_text("# my code")
    mine = tree(out)
    with pytest.raises(SystemExit, match=r"--out .*merged is not empty \(model_card.md, modeling_custom.py, models\)"):
        main(["merge", "--adapter", str(run), "--out", str(out)])
    assert tree(out) == mine
    main(["merge", "--adapter", str(run), "--out", str(out), "--overwrite"])
    after = tree(out)
    assert {k: after[k] for k in mine} == mine and {"config.json", "model.safetensors"} <= after.keys()
    load_pretrained(out)  # and the merged model is there, whole


def test_merge_never_writes_into_the_base_models_folder(tmp_path):
    from minipeft import save_pretrained

    model, tok = load_pretrained("tiny-shakespeare")
    save_pretrained(model, tmp_path / "base", tok)
    run = finetune(tmp_path, "--model", str(tmp_path / "base"))
    before = tree(tmp_path / "base")
    (tmp_path / "link").symlink_to(tmp_path / "base")
    for out in (tmp_path / "base", tmp_path / "link"):
        with pytest.raises(SystemExit, match="is the base model's own folder"):
            main(["merge", "--adapter", str(run), "--out", str(out), "--overwrite"])
    assert tree(tmp_path / "base") == before


def test_a_finished_run_is_not_replaced_without_a_flag(tmp_path):
    run = finetune(tmp_path)
    before = tree(run)
    with pytest.raises(SystemExit, match="is not empty .*pass --resume to continue it, or --overwrite"):
        finetune(tmp_path, "--seed", "1")
    assert tree(run) == before
    finetune(tmp_path, "--seed", "1", "--overwrite")
    assert tree(run)["adapter-last/adapter_model.safetensors"] != before["adapter-last/adapter_model.safetensors"]


def test_a_second_run_on_the_same_out_stops_at_once(tmp_path):
    from helpers import lock_held_elsewhere

    with lock_held_elsewhere(tmp_path / "run"):
        with pytest.raises(SystemExit, match=r"error: .*run is in use by another run"):
            finetune(tmp_path)
    assert not (tmp_path / "run" / "adapter").exists()


def test_nan_weights_are_never_saved_and_the_last_good_checkpoint_stays(tmp_path, monkeypatch):
    """A step whose gradients are NaN (the loss before backward still finite) stops the run before the step is
    applied: the step-2 checkpoint stays, no adapter holds a NaN, and the exit is an error."""
    real, calls = train_module.batch_loss, [0]

    def nan_gradients_at_step_3(model, *a, **k):
        loss = real(model, *a, **k)
        calls[0] += model.training
        if model.training and calls[0] == 3:
            next(p for p in model.parameters() if p.requires_grad).register_hook(lambda g: g * float("nan"))
        return loss

    monkeypatch.setattr(train_module, "batch_loss", nan_gradients_at_step_3)
    with pytest.raises(SystemExit, match=r"error: non-finite gradient norm nan at step 3; stopped, the last good"):
        finetune(tmp_path, "--steps", "4", "--save-every", "2", "--eval-every", "1")
    run = tmp_path / "run"
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    for f in run.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(f).values()), f


def test_only_checkpoint_old_left_resumes_and_is_never_deleted(tmp_path):
    run = finetune(tmp_path, "--save-every", "3")
    full = load_file(run / "adapter-last" / "adapter_model.safetensors")
    (run / "checkpoint").rename(run / "checkpoint.old")  # a crash between the two renames of a save
    (run / ".checkpoint.new-123-deadbeef").mkdir()  # and what a killed save leaves
    kept = tree(run / "checkpoint.old")
    with pytest.raises(SystemExit, match="is not empty"):
        finetune(tmp_path, "--save-every", "3")  # the obvious retry: refused, .old untouched
    assert tree(run / "checkpoint.old") == kept
    finetune(tmp_path, "--save-every", "3", "--resume")  # resumes from checkpoint.old (step 6: nothing left)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    again = load_file(run / "adapter-last" / "adapter_model.safetensors")
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_the_best_adapter_is_kept_and_the_last_beside_it(tmp_path, monkeypatch, capsys):
    """On 6 kB of text at lr 1e-2 the held-out loss rises after its best (step 6): adapter/ holds exactly the
    weights of the best evaluation (recorded here independently, at each evaluation), adapter-last/ the last, and
    the run says it overfits."""
    real, snapshots = train_module.evaluate, {}

    def evaluate_and_remember(model, *a, **k):
        result = real(model, *a, **k)
        if isinstance(model, PeftModel):  # train()'s evaluations (not the CLI's one of the base model before)
            snapshots[len(snapshots)] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return result

    monkeypatch.setattr(train_module, "evaluate", evaluate_and_remember)
    small = tmp_path / "small.txt"
    small.write_text(DEFAULT_DATA.read_text(encoding="utf-8")[:6000])
    out = finetune(tmp_path, "--data", str(small), "--steps", "24", "--eval-every", "3", "--lr", "1e-2",
                   "--targets", "all-linear")  # fmt: skip
    text = capsys.readouterr().out
    assert "overfitting (the best," in text and "best 3.96" in text
    metrics = json.loads((out / "metrics.json").read_text())
    evals, best = metrics["eval"], metrics["best"]
    assert best["val_loss"] == min(e["val_loss"] for e in evals) and evals[-1]["val_loss"] > best["val_loss"]
    assert 0 < best["step"] < 24
    want = snapshots[[e["step"] for e in evals].index(best["step"])]
    kept = load_file(out / "adapter" / "adapter_model.safetensors")
    # parameter name base_model.<module>.lora_A.default.weight -> PEFT's key base_model.model.<module>.lora_A.weight
    want = {"base_model.model." + n.removeprefix("base_model.").replace(".default", ""): p for n, p in want.items()}
    assert want.keys() == kept.keys() and all(torch.equal(want[k], kept[k]) for k in kept)
    last = load_file(out / "adapter-last" / "adapter_model.safetensors")
    assert any(not torch.equal(last[k], kept[k]) for k in kept)


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "adapter", "prefix", "prompt", "ia3"])
def test_the_default_run_of_each_method_ends_below_where_it_started(tmp_path, method):
    """`minipeft finetune --method M` with every other default (60 steps at the method's measured lr, see
    METHOD_DEFAULTS) lowers the held-out loss of the bundled model: its last evaluation is below step 0's."""
    out = tmp_path / method
    main(["finetune", "--method", method, "--no-samples", "--out", str(out)])
    evals = json.loads((out / "metrics.json").read_text())["eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals


def test_compare_runs_each_method_as_finetune_and_tabulates_it(tmp_path, capsys, monkeypatch):
    """`minipeft compare` is `minipeft finetune` per method: its table holds each run's own step-0 and last held-out
    losses (metrics.json of <out>/<method>), the trainable counts, and a figure; without matplotlib, a hint."""
    out = tmp_path / "cmp"
    rows = main(["compare", "--methods", "lora,prefix", "--steps", "3", "--seq-len", "48", "--out", str(out)])
    text = capsys.readouterr().out
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for m in ("lora", "prefix"):
        evals = json.loads((out / m / "metrics.json").read_text())["eval"]
        assert f"| {m} | " in text and evals[0]["step"] == 0
        assert rows[m]["before"] == evals[0]["val_loss"] and rows[m]["after"] == evals[-1]["val_loss"]
    assert rows["lora"]["trainable"] == 5 * (8 * 256 + 256 * 8 + 8 * 256 + 128 * 8)  # 5 layers: q 256->256, v 256->128
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    main(["compare", "--methods", "prompt", "--steps", "2", "--seq-len", "48", "--out", str(tmp_path / "c2")])
    assert "no figure: pip install matplotlib" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"unknown --methods \['loha'\]"):
        main(["compare", "--methods", "lora,loha"])


def test_finetune_ia3_writes_a_peft_ia3_adapter_that_loads_back(tmp_path):
    """`--method ia3` trains PEFT's IA3Config (k_proj, v_proj; down_proj as the feed-forward module whose input is
    scaled); the adapter on disk is PEFT's (peft_type IA3, keys ...ia3_l) and loads back to the same logits."""
    out = tmp_path / "ia3"
    main(["finetune", "--method", "ia3", "--steps", "3", "--eval-every", "0", "--batch-size", "4", "--seq-len", "32",
          "--no-samples", "--out", str(out)])  # fmt: skip
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    state = load_file(out / "adapter" / "adapter_model.safetensors")
    assert state and all(k.endswith(".ia3_l") for k in state)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in state.values())  # trained away from identity
    base, _ = load_pretrained("tiny-shakespeare")
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert not torch.allclose(adapted, plain)
    down = [k for k in state if "down_proj" in k]
    assert down and state[down[0]].shape[-1] == base.config.intermediate_size  # scales down_proj's input


def test_the_console_command_exits_0_after_a_run(tmp_path, monkeypatch):
    """pyproject's `minipeft` entry point returns None (exit status 0) after a run that main() returns results for:
    the generated wrapper calls sys.exit(entry()), and a dict there is printed and exits 1."""
    import importlib
    import sys
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, function = pyproject["project"]["scripts"]["minipeft"].split(":")
    argv = ["minipeft", "finetune", "--steps", "1", "--eval-every", "0", "--batch-size", "2", "--seq-len", "16",
            "--no-samples", "--out", str(tmp_path / "run")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert getattr(importlib.import_module(module), function)() is None
    assert main(argv[1:-1] + [str(tmp_path / "run2")])["steps_run"] == 1  # while main() returns the results


def test_init_lora_weights_pissa_and_loftq_from_the_command_line(tmp_path, capsys):
    """--init-lora-weights: PiSSA rewrites the base so the model starts unchanged (step 0 equals the base model's
    loss); LoftQ (with --method qlora) starts nearer the full-precision model than plain QLoRA on the same 4-bit
    settings; both are the library's LoraConfig(init_lora_weights=...) in the saved adapter_config.json."""
    # on the CPU, as FAST: float32, where PiSSA's step 0 equals the base model's loss to 1e-5
    common = ["--steps", "1", "--eval-every", "0", "--batch-size", "4", "--seq-len", "32", "--no-samples",
              "--device", "cpu"]  # fmt: skip

    def run(name, *flags):
        out = tmp_path / name
        metrics = main(["finetune", *flags, *common, "--out", str(out)])
        return metrics, json.loads((out / "adapter" / "adapter_config.json").read_text())

    pissa, config = run("pissa", "--init-lora-weights", "pissa")
    assert config["init_lora_weights"] == "pissa" and pissa["eval"][0]["val_loss"] == pytest.approx(
        pissa["base_loss"], abs=1e-5
    )
    q = ["--method", "qlora", "--no-double-quant", "--targets", "q_proj,v_proj,down_proj"]
    qlora, _ = run("qlora", *q)
    loftq, config = run("loftq", *q, "--init-lora-weights", "loftq")
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"]["loftq_bits"] == 4
    base = qlora["base_loss"]
    assert loftq["base_loss"] == base and abs(loftq["before"] - base) < abs(qlora["before"] - base)
    with pytest.raises(SystemExit, match="loftq quantizes the base itself: use it with --method qlora"):
        main(["finetune", "--init-lora-weights", "loftq", *common, "--out", str(tmp_path / "bad")])


def test_an_adapter_saved_from_python_names_its_base_and_one_without_a_base_is_refused(tmp_path):
    """As PEFT: get_peft_model records the model's name_or_path (load_pretrained sets it) as the adapter's
    base_model_name_or_path, so `merge --adapter` finds the base; an adapter naming none is an error asking for
    --model, not a silent merge into the bundled model."""
    from minipeft import LoraConfig, get_peft_model

    model, _ = load_pretrained("tiny-shakespeare")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-shakespeare"
    main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").is_file()
    config["base_model_name_or_path"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="names no base model .*: pass --model"):
        main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m2")])
    assert not (tmp_path / "m2").exists()
