"""The hook engine: captures equal a plain forward hook's, per call, safe from in-place ops; hooks never leak."""
import pytest
import torch

from reportgen.engine.capture import CaptureEngine, count_hooks, primary_tensor
from reportgen.errors import ConfigError
from tests.tiny_models import ExplodingNet, TinyNet


def plain_hook_outputs(model, x, names):
    """Reference: plain forward hooks that clone every output of the named modules, in call order."""
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen[n].append(o.detach().clone()))
               for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_captures_equal_plain_hooks_per_call_and_survive_inplace_relu():
    model = TinyNet().eval()
    x = torch.rand(2, 3, 5, 5)
    reference = plain_hook_outputs(model, x, ["conv", "shared", "fc"])
    with CaptureEngine(model, activations=["conv", "shared", "fc"]) as engine:
        captures = engine.start_batch()
        with torch.inference_mode():
            model(x)
    assert captures.calls("shared") == ["shared", "shared#2"]
    assert torch.equal(captures["shared"], reference["shared"][0])
    assert torch.equal(captures["shared#2"], reference["shared"][1])
    assert torch.equal(captures["fc"], reference["fc"][0])
    # conv's output is overwritten in place by ReLU(inplace=True) right after; the capture keeps the pre-ReLU values
    pre_relu = torch.nn.functional.conv2d(x, model.conv.weight, model.conv.bias)
    assert (pre_relu < 0).any(), "the test input must produce negative pre-activations"
    assert torch.equal(captures["conv"], pre_relu)
    assert count_hooks(model) == 0


def test_streamed_layers_reach_their_consumers_before_in_place_ops_and_are_not_kept():
    """A streamed layer's consumer sees each call's output as it returns (conv's pre-ReLU values, although the
    in-place ReLU rewrites that very tensor next), with the batch given to start_batch; nothing is stored."""
    model = TinyNet().eval()
    x = torch.rand(2, 3, 5, 5)
    reference = plain_hook_outputs(model, x, ["conv", "shared"])
    seen = []

    def consumer(batch, key, output):
        seen.append((batch, key, output.clone(), output.requires_grad))

    batch = object()
    with CaptureEngine(model, streamed={"conv": [consumer], "shared": [consumer]}) as engine:
        captures = engine.start_batch(batch)
        assert not engine.consumed
        with engine.forward_mode():
            model(x)
        assert engine.consumed
    assert [key for _, key, _, _ in seen] == ["conv", "shared", "shared#2"]
    assert all(b is batch for b, _, _, _ in seen)
    pre_relu = torch.nn.functional.conv2d(x, model.conv.weight, model.conv.bias)
    assert (pre_relu < 0).any(), "the test input must produce negative pre-activations"
    assert torch.equal(seen[0][2], pre_relu)
    assert torch.equal(seen[1][2], reference["shared"][0]) and torch.equal(seen[2][2], reference["shared"][1])
    assert captures.tensors == {}, "a streamed-only layer is not kept"
    assert count_hooks(model) == 0


def test_a_streamed_layer_after_a_gradient_leaf_adds_nothing_to_the_graph_and_can_also_be_stored():
    model = TinyNet()
    x = torch.rand(2, 3, 4, 4)
    modes = []

    def consumer(batch, key, output):
        modes.append((key, torch.is_grad_enabled(), output.requires_grad, (output * 2).grad_fn is None))

    with CaptureEngine(model, activations=["fc"], gradients=["pool"], streamed={"fc": [consumer]}) as engine:
        captures = engine.start_batch()
        with engine.forward_mode():
            logits = model(x)
            (grad,) = torch.autograd.grad(logits[:, 0].sum(), captures["pool"])
    assert modes == [("fc", False, False, True)], "the consumer runs without grad on a detached output"
    assert torch.equal(captures["fc"], logits.detach()), "stored as well when an analysis captures it"
    assert torch.equal(grad, torch.full_like(grad, 1.0) * model.fc.weight[0].detach()[None, :, None, None])


def test_start_batch_resets_call_counts():
    model = TinyNet().eval()
    with CaptureEngine(model, activations=["shared"]) as engine:
        for _ in range(2):
            captures = engine.start_batch()
            with torch.inference_mode():
                model(torch.rand(1, 3, 4, 4))
            assert sorted(captures.tensors) == ["shared", "shared#2"]


def test_gradient_leaf_matches_full_backward():
    model = TinyNet().eval()
    x = torch.rand(3, 3, 4, 4)
    # reference: full autograd through everything, gradient of the summed class-0 score w.r.t. fc's input activation
    activation = {}

    def keep(module, inputs, output):
        output.retain_grad()
        activation["pool"] = output

    handle = model.pool.register_forward_hook(keep)
    model(x)[:, 0].sum().backward()
    handle.remove()
    expected = activation["pool"].grad.clone()
    model.zero_grad()
    with CaptureEngine(model, gradients=["pool"]) as engine:
        captures = engine.start_batch()
        with torch.enable_grad():
            logits = model(x)
            (grad,) = torch.autograd.grad(logits[:, 0].sum(), captures["pool"])
        assert all(not p.requires_grad for p in model.parameters()), "parameters are frozen during the pass"
    assert torch.allclose(grad, expected, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad restored"
    assert count_hooks(model) == 0


def test_forward_mode_records_autograd_only_after_the_leaf_and_gives_the_same_gradient():
    model = TinyNet()
    x = torch.rand(2, 3, 4, 4)
    states = []  # (module, grad mode on, output has autograd history), per call

    def record(name):
        def hook(module, inputs, output):
            states.append((name, torch.is_grad_enabled(), output.grad_fn is not None))
        return hook

    handles = [model.conv.register_forward_hook(record("conv")), model.fc.register_forward_hook(record("fc"))]
    with CaptureEngine(model, gradients=["pool"]) as engine:
        captures = engine.start_batch()
        with engine.forward_mode():
            logits = model(x)
            (grad,) = torch.autograd.grad(logits[:, 0].sum(), captures["pool"])
        fast, states[:] = list(states), []
        with torch.enable_grad():  # the reference: the whole forward grad-enabled
            captures = engine.start_batch()
            (expected,) = torch.autograd.grad(model(x)[:, 0].sum(), captures["pool"])
    for handle in handles:
        handle.remove()
    assert fast == [("conv", False, False), ("fc", True, True)], "no grad mode before the leaf, the head recorded"
    assert states == [("conv", True, False), ("fc", True, True)]
    assert torch.equal(grad, expected)
    assert torch.is_grad_enabled(), "forward_mode gives the caller's grad mode back"


def test_hooks_removed_and_mode_restored_after_exception_in_forward():
    model = ExplodingNet()
    model.train()
    blue = torch.zeros(1, 3, 4, 4)
    blue[:, 2] = 1.0
    with pytest.raises(ValueError, match="boom"):
        with CaptureEngine(model, activations=["conv"], gradients=["pool"]) as engine:
            engine.start_batch()
            assert not model.training
            with torch.enable_grad():
                model(blue)
    assert count_hooks(model) == 0
    assert model.training, "train mode restored"
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_layer_name_fails_before_any_hook_with_close_match():
    model = TinyNet()
    with pytest.raises(ConfigError) as info:
        with CaptureEngine(model, activations=["sharde"]):
            pass
    assert "Did you mean 'shared'" in str(info.value)
    assert count_hooks(model) == 0


def test_primary_tensor_of_nested_outputs():
    a, b = torch.ones(1), torch.zeros(1)
    assert primary_tensor((None, [a, b])) is a
    assert primary_tensor({"logits": b, "aux": a}) is b
    assert primary_tensor("text") is None


def test_forced_attention_weights_equal_a_direct_need_weights_call_and_outputs_are_unchanged():
    from reportgen.inputs.demo.models import demo_vit

    model = demo_vit(pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    layers = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(4)]
    inputs = {}
    handle = model.encoder.layers.encoder_layer_2.ln_1.register_forward_hook(lambda m, i, o: inputs.setdefault("x", o))
    with CaptureEngine(model, attention=layers) as engine:
        captures = engine.start_batch()
        with torch.inference_mode():
            hooked = model(x)
    handle.remove()
    assert torch.allclose(hooked, plain, atol=1e-5)
    assert sorted(captures.attention) == sorted(layers)
    mha = model.encoder.layers.encoder_layer_2.self_attention
    with torch.no_grad():
        _, direct = mha(inputs["x"], inputs["x"], inputs["x"], need_weights=True, average_attn_weights=False)
    got = captures.attention[layers[2]]
    assert got.shape == (2, mha.num_heads, 65, 65)
    assert torch.allclose(got, direct, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2, mha.num_heads, 65), atol=1e-5)
    assert count_hooks(model) == 0


def test_attention_request_on_a_non_attention_module_is_a_config_error():
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        with CaptureEngine(TinyNet(), attention=["conv"]):
            pass
