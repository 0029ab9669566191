"""loss.py: the chunked cross-entropy equals the plain one, in value and gradients."""

import torch
from helpers import batch, tiny_model

from minipeft.fast import chunked_causal_lm_loss, default_chunk
from minipeft.loss import causal_lm_loss


def test_chunked_loss_equals_plain_loss_and_gradients():
    """return_logits=False computes the loss chunk by chunk from hidden states: same value, same gradients."""
    for tied in (True, False):
        model = tiny_model(dtype=torch.float64, tie_word_embeddings=tied)
        b = batch(pad_left=3)
        kw = dict(labels=b["labels"], attention_mask=b["attention_mask"])
        plain = model(b["input_ids"], **kw)
        plain.loss.backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        chunked = model(b["input_ids"], return_logits=False, **kw)
        chunked.loss.backward()
        assert chunked.logits is None
        assert abs(chunked.loss.item() - plain.loss.item()) < 1e-12
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-14)


def test_chunked_cross_entropy_gradcheck_and_autocast():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :4] = -100
    assert torch.autograd.gradcheck(lambda h, w: chunked_causal_lm_loss(h, w, labels, chunk=3), (h, w))
    # The gradients are computed in forward and only scaled in backward: a non-unit upstream gradient (as the
    # token-weighted accumulation of train.py sends) must scale them exactly.
    (0.37 * chunked_causal_lm_loss(h, w, labels, chunk=3)).backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (0.37 * causal_lm_loss(h @ w.T, labels)).backward()
    torch.testing.assert_close(got, (h.grad, w.grad), rtol=1e-12, atol=1e-15)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, float32 softmax: close to the float64 value
        lossbf = chunked_causal_lm_loss(h.float(), w.float(), labels, chunk=4)
    assert lossbf.dtype == torch.float32
    assert abs(lossbf.item() - causal_lm_loss(h @ w.T, labels).item()) < 0.05


def test_default_chunk_keeps_float32_logits_near_256_mb():
    """2**26 // V rows per chunk (at least 64): 523 at Llama-3's 128k vocabulary; several chunks give the same loss
    and gradients as one."""
    assert default_chunk(128256) == 523 and default_chunk(49152) == 1365 and default_chunk(2**30) == 64
    g = torch.Generator().manual_seed(0)
    V = 2**20  # 64 rows per chunk: 149 targets make 3 chunks
    h = torch.randn(1, 150, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (1, 150), generator=g)
    loss = chunked_causal_lm_loss(h, w, labels)
    loss.backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    one = chunked_causal_lm_loss(h, w, labels, chunk=10**6)
    one.backward()
    assert abs(loss.item() - one.item()) < 1e-12
    torch.testing.assert_close(got, (h.grad, w.grad), rtol=1e-10, atol=1e-14)


def test_fused_chunks_equal_eager_chunks_and_compile_at_most_twice():
    """fused=True (what compile_blocks turns on) runs each chunk's softmax and gradient through torch.compile
    (inductor on a CPU): the same loss and gradients as the eager chunks, bf16 and float32; a new token count or a
    short last chunk does not compile again and again (the chunk size is fixed, the last chunk gets one dynamic
    graph)."""
    import torch._dynamo.utils

    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for dtype in (torch.float32, torch.bfloat16):
        for T in (41, 29, 37):  # 40, 28, 36 targets in chunks of 16: last chunks of 8, 12, 4
            h = torch.randn(1, T, 8, generator=g).to(dtype).requires_grad_()
            w = torch.randn(50, 8, generator=g).to(dtype).requires_grad_()
            labels = torch.randint(0, 50, (1, T), generator=g)
            labels[0, 3] = -100
            got = []
            for fused in (False, True):
                h.grad = w.grad = None
                loss = chunked_causal_lm_loss(h, w, labels, chunk=16, fused=fused)
                (0.5 * loss).backward()
                got.append((loss, h.grad, w.grad))
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
            torch.testing.assert_close(got[1], got[0], **tol)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4  # two graphs per dtype at most


def test_compiled_training_forward_uses_the_fused_chunks(monkeypatch):
    """With fast.chunked_loss on, the training forward (labels, return_logits=False) takes the chunked loss, and
    its chunks run compiled (fused) only in train mode after compile_blocks."""
    import minipeft.fast as fast

    calls = []
    monkeypatch.setattr(fast, "_compiled_chunk", lambda: calls.append(1) or fast.chunk_loss_and_grad)
    model = fast.chunked_loss(tiny_model(dtype=torch.float32))
    b = batch()
    model.train()(b["input_ids"], labels=b["labels"], return_logits=False).loss.backward()
    assert calls == []
    model.compile_blocks(backend="eager")
    model.train()(b["input_ids"], labels=b["labels"], return_logits=False).loss.backward()
    assert calls
    calls.clear()
    with torch.no_grad():
        model.eval()(b["input_ids"], labels=b["labels"], return_logits=False)
    assert calls == []


def test_chunked_loss_reads_no_value_on_the_host():
    """No step of the chunked loss waits for the device: nothing reads a value (a boolean index of the targets, or
    their count as a Python number, would make the host wait for the GPU in every training step; under
    FakeTensorMode, whose tensors have shapes and no values, either raises). Forward and backward run there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(2, 9, 8, requires_grad=True)
        w = torch.empty(11, 8, requires_grad=True)
        labels = torch.empty(2, 9, dtype=torch.long)
        loss = chunked_causal_lm_loss(h, w, labels, chunk=5)
        loss.backward()
        assert loss.shape == () and h.grad.shape == h.shape and w.grad.shape == w.shape


def test_chunked_loss_ignores_labels_and_gives_nan_with_no_target():
    """Rows whose label is -100 take no part (value and gradients equal the plain loss's, float64), and with every
    label -100 the loss is NaN as the plain loss is, with zero gradients (not NaN ones)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 10, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (3, 10), generator=g)
    labels[0, :7], labels[2, 3:] = -100, -100
    for fused in (False, True):
        loss = chunked_causal_lm_loss(h, w, labels, chunk=4, fused=fused)
        loss.backward()
        got = loss.detach(), h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        ref = causal_lm_loss(h @ w.T, labels)
        ref.backward()
        torch.testing.assert_close(got, (ref.detach(), h.grad, w.grad), rtol=1e-10, atol=1e-14)
        h.grad = w.grad = None
    none = chunked_causal_lm_loss(h, w, torch.full_like(labels, -100), chunk=4)
    none.backward()
    assert none.isnan() and causal_lm_loss(h @ w.T, torch.full_like(labels, -100)).isnan()
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
