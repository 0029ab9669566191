"""Hostile and careless input: adapter files that would hang, allocate a terabyte or load silently wrong, and
command lines that used to end in a traceback. Each is a one-line error, raised before any work starts."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import batch, tiny_model
from safetensors.torch import load_file, save_file

import minipeft.cli as cli
from minipeft import LoraConfig, PeftModel, get_peft_model
from minipeft.cli import main


@pytest.fixture
def saved(tmp_path):
    """A LoRA adapter on the tiny test model, saved; returns (folder, edit) where edit(**fields) rewrites its config."""
    out = tmp_path / "a"
    get_peft_model(tiny_model(), LoraConfig(r=2, init_lora_weights=False)).save_pretrained(out)

    def edit(**fields):
        d = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**d, **fields}))
        return out

    return out, edit


def load(path):
    return PeftModel.from_pretrained(tiny_model(), path)


@pytest.mark.parametrize(
    "fields, msg",
    [
        ({"use_rslora": "false"}, r"use_rslora must be true/false, got 'false'"),  # was read as true: s = 5.66
        ({"lora_alpha": "16"}, r"lora_alpha must be a finite number, got '16'"),
        ({"lora_alpha": float("nan")}, r"lora_alpha must be a finite number, got nan"),
        ({"lora_alpha": float("inf")}, r"lora_alpha must be a finite number, got inf"),
        ({"lora_dropout": "0.1"}, r"lora_dropout must be a finite number, got '0.1'"),
        ({"r": True}, r"r must be an integer, got True"),
        ({"target_modules": 5}, r"target_modules must be a list or a list or a string or null, got 5"),
        ({"target_modules": "(.*)*x"}, r"repeats a group that itself repeats"),  # hung the loader
        ({"peft_type": 5}, r"unknown peft_type 5"),
    ],
)
def test_adapter_config_types_are_checked_exactly(saved, fields, msg):
    _, edit = saved
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"adapter_config.json: .*{msg}|{msg}"):
        load(edit(**fields))
    assert time.perf_counter() - t0 < 5


def test_target_modules_null_means_peft_defaults(saved):
    _, edit = saved
    config = load(edit(target_modules=None)).peft_config["default"]
    assert config.target_modules == ("q_proj", "v_proj")  # PEFT's default for llama


@pytest.mark.parametrize("content", ["5", "[]", '"x"'])
def test_adapter_config_not_an_object(saved, content):
    out, _ = saved
    (out / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match="adapter_config.json: expected a JSON object"):
        load(out)


def test_a_huge_rank_is_compared_with_the_file_before_anything_is_allocated(saved):
    """r = 10**9 would be a terabyte of float32 per layer: the shapes the config implies are computed on fake
    tensors and compared with the file's first, so the error names the mismatch instead of running out of memory."""
    _, edit = saved
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(2, 64\) in the file but \(1000000000, 64\)"):
        load(edit(r=10**9))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("bad", ["nan", "inf", "int", "bool"])
def test_adapter_weights_must_be_finite_floats(saved, bad):
    out, _ = saved
    state = load_file(out / "adapter_model.safetensors")
    key = sorted(state)[0]
    t = state[key]
    state[key] = {"nan": t.clone().fill_(float("nan")), "inf": t.clone().fill_(float("inf")),
                  "int": t.to(torch.int32), "bool": t > 0}[bad]  # fmt: skip
    save_file(state, out / "adapter_model.safetensors")
    msg = "NaN or infinite values" if bad in ("nan", "inf") else "adapter weights are floating point"
    with pytest.raises(ValueError, match=rf"{key} .*{msg}|{key} has dtype .*{msg}"):
        load(out)


def test_a_failed_load_leaves_the_model_as_it_was(saved):
    out, edit = saved
    pm = get_peft_model(tiny_model(), LoraConfig(r=4))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    edit(r=3)
    with pytest.raises(ValueError, match="has shape"):
        pm.load_adapter(out, "other")
    assert pm.adapters == ["default"] and pm.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in pm.state_dict().items())


# --------------------------------------------------------------------------------------- the command line


def finetune_args(tmp_path, *extra):
    return ["finetune", "--steps", "2", "--eval-every", "0", "--batch-size", "4", "--seq-len", "32", "--no-samples",
            "--out", str(tmp_path / "run"), *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--method", "prefix", "--dora"], r"--dora do\(es\) not apply to --method prefix"),
        (["--method", "full", "--r", "64"], r"--r do\(es\) not apply to --method full \(its flags: none\)"),
        (["--method", "prompt", "--init-text", " "], "--init-text is empty"),
        (["--targets", "q_proj,foo_proj"], r"--targets foo_proj matched no Linear layer; candidates: \['down_proj'"),
        (["--lr", "nan"], None),  # argparse: "must be a finite number > 0"
        (["--eval-every", "-1"], None),
    ],
)
def test_flags_that_do_not_apply_or_make_no_sense_are_errors(tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        main(finetune_args(tmp_path, *extra))
    if msg is None:
        assert e.value.code == 2 and "must be" in capsys.readouterr().err
    else:
        assert e.value.code is not None and e.value.code != 0
        assert __import__("re").search(msg, str(e.value.code)), e.value.code
    assert not (tmp_path / "run" / "adapter").exists()


def test_out_that_is_a_file_or_under_a_file_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("minipeft.checkpoint.load_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match="--out .*f is a file, not a folder"):
        main(finetune_args(tmp_path)[:-1] + [str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="is not writable|is a file"):
        main(finetune_args(tmp_path)[:-1] + [str(tmp_path / "f" / "sub")])


def test_a_full_disk_during_the_adapter_save_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = cli.__dict__.get("save_file")
    assert real is None  # (the CLI saves through PeftModel.save_pretrained)
    calls = [0]

    def full_disk(*a, **k):
        calls[0] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("minipeft.peft_io.save_file", full_disk)
    with pytest.raises(SystemExit, match=r"^error: \[Errno 28\] No space left on device$"):
        main(finetune_args(tmp_path))
    assert calls[0] >= 1


def test_a_tampered_checkpoint_is_a_one_line_error(tmp_path):
    main(finetune_args(tmp_path, "--save-every", "1"))
    state = tmp_path / "run" / "checkpoint" / "trainer_state.json"
    d = json.loads(state.read_text())
    for field, value in (("step", "2"), ("optimizer", {"param_groups": [{"params": "x"}]}), ("rng", {})):
        state.write_text(json.dumps({**d, field: value}))
        with pytest.raises(SystemExit, match=r"^error: cannot resume from .*checkpoint"):
            main(finetune_args(tmp_path, "--resume", "--steps", "3"))
    state.write_text(json.dumps(d))


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--prompt", ""], r"--prompt '' encodes to no tokens"),
        (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    ],
)
def test_generate_bad_input(extra, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["generate", "--max-new-tokens", "2", *extra])


def test_generate_temperature_nan_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--temperature", "nan"])
    assert "--temperature: must be a finite number >= 0, got 'nan'" in capsys.readouterr().err


def test_a_relative_model_path_is_stored_absolute_so_the_adapter_works_from_elsewhere(tmp_path, monkeypatch, capsys):
    from minipeft import load_pretrained, save_pretrained

    model, tok = load_pretrained("tiny-shakespeare")
    save_pretrained(model, tmp_path / "base", tok)
    monkeypatch.chdir(tmp_path)
    main(finetune_args(tmp_path, "--model", "base"))
    stored = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(stored).is_absolute() and Path(stored) == (tmp_path / "base").resolve()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_reading_gguf_without_the_package_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the optional extra were not installed
    with pytest.raises(SystemExit, match=r"^error: reading .gguf files needs the gguf package"):
        main(["generate", "--model", str(tmp_path / "m.gguf")])


def test_chunked_and_plain_loss_agree_on_a_batch_with_no_target():
    model = tiny_model()
    b = batch()
    labels = torch.full_like(b["input_ids"], -100)
    plain = model(b["input_ids"], labels=labels).loss
    chunked = model(b["input_ids"], labels=labels, return_logits=False).loss
    assert torch.isnan(plain) and torch.isnan(chunked)
