"""files.py: saves that a crash cannot half-do, that never delete a user's file, and the run lock."""

import os

import pytest
import torch
from helpers import batch, lock_held_elsewhere, tiny_model
from safetensors.torch import load_file

import minipeft.files as files
from minipeft import LoraConfig, PeftModel, get_peft_model
from minipeft.files import existing_dir, read_json, replace_dir, run_lock, write_file, write_json


def tree(path):
    """{relative path: bytes} of every file under path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def adapter(seed):
    torch.manual_seed(seed)
    return get_peft_model(tiny_model(), LoraConfig(r=2, init_lora_weights=False))


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def fails(tmp):
        tmp.write_text('{"v": 2, "half')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_file(target, fails)
    assert read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


@pytest.mark.parametrize("fail_at", ["during", "first_rename", "second_rename"])
def test_an_adapter_save_that_fails_at_any_step_leaves_the_previous_adapter_loadable(tmp_path, monkeypatch, fail_at):
    """Save adapter A, then fail while saving adapter B over it: A still loads from the same path, equal to
    itself, and the next save completes (and cleans up)."""
    out = tmp_path / "adapter"
    a = adapter(0)
    a.save_pretrained(out)
    saved = tree(out)
    ids = batch()["input_ids"]
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if fail_at == "first_rename" and len(calls) == 1 or fail_at == "second_rename" and len(calls) == 2:
            raise OSError("killed")
        return real_rename(src, dst)

    if fail_at == "during":
        monkeypatch.setattr("minipeft.peft_io.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError):
        adapter(1).save_pretrained(out)
    monkeypatch.undo()
    assert tree(existing_dir(out)) == saved  # the previous adapter, whole (at out, or out.old after rename 1)
    loaded = PeftModel.from_pretrained(tiny_model(), out)  # from the same path as always
    torch.testing.assert_close(loaded(ids).logits, a(ids).logits, rtol=0, atol=0)
    b = adapter(1)
    b.save_pretrained(out)  # recovers first, then replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .old, no .new-* left
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_model(), out)(ids).logits, b(ids).logits)


def test_replace_dir_keeps_a_users_files_and_follows_a_symlink(tmp_path):
    real = tmp_path / "real"
    (real / "models" / "v1").mkdir(parents=True)
    (real / "models" / "v1" / "w.bin").write_bytes(b"user weights")
    (real / "model_card.md").write_text("my notes")
    (real / "config.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with replace_dir(link) as new:
        (new / "config.json").write_text("new")
    assert link.is_symlink() and link.resolve() == real
    assert tree(real) == {"config.json": b"new", "model_card.md": b"my notes", "models/v1/w.bin": b"user weights"}


def test_checkpoints_do_not_carry_old_files_over(tmp_path):
    with replace_dir(tmp_path / "c", keep_others=False) as new:
        (new / "a").write_text("1")
    with replace_dir(tmp_path / "c", keep_others=False) as new:
        (new / "b").write_text("2")
    assert tree(tmp_path / "c") == {"b": b"2"}


def test_run_lock_stops_a_second_process_and_is_reentrant_in_one(tmp_path):
    with lock_held_elsewhere(tmp_path) as pid:
        with pytest.raises(FileExistsError, match=rf"{tmp_path} is in use by another run \(pid {pid}\)"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path), run_lock(tmp_path):  # free again (the holder exited); nesting in one process is fine
        pass


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.json not found"):
        read_json(tmp_path / "x.json")
    (tmp_path / "x.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="x.json is not valid JSON"):
        read_json(tmp_path / "x.json")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match=r"x.json: expected a JSON object, got \[\]"):
        read_json(tmp_path / "x.json", expect=dict)


def test_save_pretrained_of_one_named_adapter_keeps_the_others(tmp_path):
    pm = adapter(0)
    pm.add_adapter("b", LoraConfig(r=2, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    before = tree(tmp_path / "a")
    pm.save_pretrained(tmp_path / "a", selected_adapters=["b"])
    assert tree(tmp_path / "a") == before and set(before) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "b/adapter_config.json",
        "b/adapter_model.safetensors",
    }
    assert load_file(tmp_path / "a" / "b" / "adapter_model.safetensors").keys() == pm.adapter_state_dict("b").keys()
