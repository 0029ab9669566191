"""Checks for lesson 03's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft/adapter.py's AdapterLayer, the library's parameter count, autograd); it raises AssertionError
saying what differs, never what the answer is."""

import torch
from common import check_close


def _tiny_model(layers):
    from minipeft.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return Transformer(cfg)


def _library_adapter(D, b, init_weights):
    """An AdapterLayer (float64) around an identity Linear: its output is a(h) for the input h."""
    from minipeft.adapter import AdapterConfig, AdapterLayer

    base = torch.nn.Linear(D, D, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(torch.eye(D, dtype=torch.float64))
    layer = AdapterLayer(base)
    layer.update_layer("default", AdapterConfig(bottleneck_size=b, init_weights=init_weights))
    return layer.double()


def check_adapter_forward(adapter_forward):
    """Against minipeft's AdapterLayer (ReLU) with non-zero weights, and the identity at init (W_up = 0, b_up = 0)."""
    torch.manual_seed(3)
    D, b = 16, 4
    h = torch.randn(2, 5, D, dtype=torch.float64)
    for init_weights in (False, True):
        layer = _library_adapter(D, b, init_weights)
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        if not init_weights:
            with torch.no_grad():  # larger than the library's test init, so every term shows
                up.weight.normal_(std=0.5)
                up.bias.normal_(std=0.5)
        with torch.no_grad():
            expected = layer(h)
            ours = adapter_forward(h, down.weight, down.bias, up.weight, up.bias)
        what = "at init (W_up = 0, b_up = 0)" if init_weights else "with non-zero weights"
        check_close(f"a(h) {what}", ours, expected, rtol=1e-12, atol=1e-12)
        if init_weights:
            assert torch.equal(ours, h), "at init a(h) must be h exactly (not only close)"


def check_adapter_param_count(adapter_param_count):
    """Against the trainable count of get_peft_model(AdapterConfig(...)) on small models, both placements."""
    from minipeft.adapter import AdapterConfig
    from minipeft.peft import get_peft_model

    for layers in (1, 3):
        model = _tiny_model(layers)
        D = model.config.hidden_size
        for b in (2, 5):
            for placement in ("houlsby", "pfeiffer"):
                config = AdapterConfig(bottleneck_size=b, placement=placement)
                expected = get_peft_model(_tiny_model(layers), config).num_parameters(trainable_only=True)
                ours = adapter_param_count(D, layers, b, placement)
                assert isinstance(ours, int) and not isinstance(ours, bool), f"expected an int, got {type(ours)}"
                assert ours == expected, (
                    f"D={D}, L={layers}, b={b}, {placement}: your count is off by {ours - expected:+d} parameters"
                )


def check_up_grad_at_init(up_grad_at_init):
    """Against autograd: the gradient of a loss through an adapter at init, with respect to W_up."""
    torch.manual_seed(4)
    D, b = 12, 3
    layer = _library_adapter(D, b, init_weights=True)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    h = torch.randn(3, 7, D, dtype=torch.float64)
    target = torch.randn(3, 7, D, dtype=torch.float64)
    out = layer(h)
    loss = ((out - target) ** 2).sum() / 5
    g = torch.autograd.grad(loss, out, retain_graph=True)[0]  # (B, T, D): the gradient at the adapter's output
    loss.backward()
    with torch.no_grad():
        z = torch.relu(h @ down.weight.T + down.bias)  # (B, T, b)
        ours = up_grad_at_init(g.detach(), z)
    check_close("dL/dW_up", ours, up.weight.grad, rtol=1e-10, atol=1e-12)


CHECKS = {
    "adapter_forward": check_adapter_forward,
    "adapter_param_count": check_adapter_param_count,
    "up_grad_at_init": check_up_grad_at_init,
}
