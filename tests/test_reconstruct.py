"""Least-squares reconstruction of the layers that read pruned channels (compression/reconstruct.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.apply import apply_policy, recalibrate
from compression.models import LayerGraph
from compression.models.zoo import build_zoo_model
from compression.policy import LayerPolicy, Policy
from compression.prune import group_keeps, prune_module
from compression.reconstruct import reconstruct


def _graph(name: str, size: int = 16) -> LayerGraph:
    """A zoo model whose batch-norm statistics fit the (random) inputs, as a trained model's fit its data."""
    torch.manual_seed(0)
    model = build_zoo_model(name, num_classes=10, in_channels=3, input_size=size)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # zoo inits some gammas to zero: give every branch a signal
            nn.init.uniform_(m.weight, 0.5, 1.5)
    recalibrate(model, torch.randn(256, 3, size, size))
    return LayerGraph.build(model.eval(), (3, size, size), num_classes=10)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg11"])
def test_only_layers_reading_pruned_channels_are_refitted_and_only_when_it_helps(name):
    graph = _graph(name)
    policy = Policy.uniform(graph.prunable_leaders, keep_ratio=0.5)
    keeps = group_keeps(graph, policy)
    model = prune_module(graph, keeps)
    plain = prune_module(graph, keeps)
    errors = reconstruct(graph, model, keeps, torch.randn(128, 3, 16, 16))
    judged = [k for k in errors if not k.endswith(":before")]
    assert judged, f"{name}: no layer was judged at half the channels"
    for n in graph.layer_names:
        layer, orig = model.get_submodule(n), graph.module.get_submodule(n)
        changed = not torch.equal(layer.weight, plain.get_submodule(n).weight)
        if n not in errors:
            assert not changed, n
            continue
        # a dense layer whose inputs were pruned (a depthwise convolution loses whole filters: nothing to fit)
        assert not (isinstance(layer, nn.Conv2d) and layer.groups > 1), n
        assert layer.weight.shape[1] < orig.weight.shape[1], n
        # kept only if it lowered the error on the held-out images
        assert changed == (errors[n] < errors[f"{n}:before"]), (n, errors[n], errors[f"{n}:before"])
    # batch-norm statistics are left as they were (apply_policy re-estimates them afterwards)
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        if "running" in k or "num_batches" in k:
            assert torch.equal(a, b), k


def test_same_policy_gives_the_same_weights_whatever_was_applied_before():
    """The sampled positions depend on the layer only: finalize, export and a search get identical models."""
    calib = torch.randn(64, 3, 16, 16)
    first = _graph("resnet20")
    other = Policy(layers={first.prunable_leaders[0]: LayerPolicy(keep_ratio=0.25)})
    apply_policy(first, other, calib)  # warms the graph's target cache with a different pruned layer set
    policy = Policy.uniform(first.prunable_leaders, keep_ratio=0.5)
    a = apply_policy(first, policy, calib).state_dict()
    b = apply_policy(_graph("resnet20"), policy, calib).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_pruning_policy_is_applied_in_one_pass_with_batch_norms_of_the_final_weights():
    """A pruning-only policy changes no weight after the re-fit: its pass re-estimates the batch norms, and no
    separate calibration pass runs. The statistics are those of the final model on the calibration images (a
    calibration pass over them in one batch finds the same); a quantized policy still gets its calibration pass."""
    graph = _graph("resnet20")
    calib = torch.randn(96, 3, 16, 16)
    policy = Policy.uniform(graph.prunable_leaders, keep_ratio=0.5)
    apply_policy(graph, policy, calib)  # the original's outputs are computed once and cached on the graph
    passes: list[int] = []
    # the pruned model is a deep copy of the original: it carries this hook
    hook = graph.module.register_forward_pre_hook(lambda m, i: passes.append(len(i[0])))
    try:
        apply_policy(graph, policy, calib)
    finally:
        hook.remove()
    assert passes == [96], passes  # the re-fit's pass only
    calls: list[int] = []
    import compression.apply as apply_module

    real = apply_module.recalibrate
    apply_module.recalibrate = lambda *a, **k: (calls.append(1), real(*a, **k))
    try:
        model = apply_policy(graph, policy, calib)
        assert not calls, "a pruning-only policy ran a separate calibration pass"
        assert not model.training and not any(m.training for m in model.modules())
        again = prune_module(graph, group_keeps(graph, policy))
        again.load_state_dict(model.state_dict())
        real(again, calib, batch_size=len(calib))
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            if "running" in k:
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert bn.momentum == 0.1  # restored for a fine-tune
        # anything quantized or sparsified after the fit: the calibration pass runs as before
        for lp in ({"w_bits": 4}, {"a_bits": 8}, {"sparsity": 0.5}):
            calls.clear()
            mixed = Policy.uniform(graph.prunable_leaders, keep_ratio=0.5)
            for k, v in lp.items():
                setattr(mixed.layers[graph.prunable_leaders[0]], k, v)
            apply_policy(graph, mixed, calib)
            assert calls == [1], lp
    finally:
        apply_module.recalibrate = real


def test_unpruned_or_disabled_policies_are_untouched():
    graph = _graph("resnet20")
    calib = torch.randn(32, 3, 16, 16)
    policy = Policy.uniform(graph.prunable_leaders, keep_ratio=0.5)
    off = apply_policy(graph, policy, calib, reconstruct=False)
    plain = prune_module(graph, group_keeps(graph, policy))
    for n in graph.layer_names:
        assert torch.equal(off.get_submodule(n).weight, plain.get_submodule(n).weight), n
    # quantization alone prunes nothing: no layer is re-fitted
    q = apply_policy(graph, Policy.uniform(graph.quantizable, w_bits=8, a_bits=32), calib)
    ref = {n: graph.module.get_submodule(n).weight for n in graph.layer_names}
    for n in graph.layer_names:
        w = q.get_submodule(n).weight
        assert w.shape == ref[n].shape
        assert (w - ref[n]).abs().max() <= ref[n].abs().max() / 100  # only 8-bit rounding


def test_reconstruction_recovers_most_of_a_trained_models_accuracy(trained_small_cnn):
    from compression.pipeline import open_workspace
    from compression.training import evaluate

    ws = open_workspace(trained_small_cnn["pt2"], "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    policy = Policy.uniform(ws.graph.prunable_leaders, keep_ratio=0.4)
    original = evaluate(ws.artifact.module, ws.data.test).top1
    without = evaluate(apply_policy(ws.graph, policy, calib, reconstruct=False), ws.data.test).top1
    with_fit = evaluate(apply_policy(ws.graph, policy, calib), ws.data.test).top1
    assert with_fit > without + 0.05, (original, without, with_fit)
    assert with_fit > original - 0.15, (original, without, with_fit)
    # and the re-fitted layers do match the original's outputs better on held-out images
    keeps = group_keeps(ws.graph, policy)
    errors = reconstruct(ws.graph, prune_module(ws.graph, keeps), keeps, calib)
    fitted = [n for n in errors if not n.endswith(":before")]
    assert fitted and all(errors[n] < errors[f"{n}:before"] for n in fitted), errors
    linears = [n for n in ws.graph.layer_names if isinstance(ws.graph.module.get_submodule(n), nn.Linear)]
    assert any(n in fitted for n in linears), (
        f"the classifier reads pruned features and was not re-fitted: {errors}"
    )


def test_fine_tune_ends_with_batch_norm_statistics_averaged_over_training_inputs(trained_small_cnn):
    """Momentum averages of a short fine-tune's last batches cost accuracy (docs/BENCHMARKS.md, 1d): after
    ``fine_tune`` every batch norm holds the plain average over the first BN_SAMPLES training inputs."""
    from compression.pipeline import open_workspace
    from compression.training import BN_SAMPLES, fine_tune

    ws = open_workspace(trained_small_cnn["pt2"], "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    model = apply_policy(ws.graph, Policy.uniform(ws.graph.prunable_leaders, keep_ratio=0.5), calib)
    fine_tune(model, ws.data.train, epochs=1, teacher=ws.artifact.module, seed=0)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model.eval()
        model(ws.data.train.tensors[0][:BN_SAMPLES])
    hook.remove()
    feats = seen[0].transpose(0, 1).flatten(1)  # channels x (samples * positions)
    assert torch.allclose(bn.running_mean, feats.mean(1), atol=1e-4)
    assert torch.allclose(bn.running_var, feats.var(1, unbiased=True), rtol=1e-3, atol=1e-4)


def test_a_fine_tune_by_steps_takes_exactly_that_many_steps(trained_small_cnn):
    """``steps`` replaces ``epochs`` (what a search's per-candidate short fine-tune uses): the count is exact,
    within one pass over the data and across passes, and the schedule's length is the step count."""
    from compression.pipeline import open_workspace
    from compression.training import fine_tune

    ws = open_workspace(trained_small_cnn["pt2"], "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    seen: list[tuple[int, int]] = []
    batches = -(-len(ws.data.train) // 64)
    for steps in (5, batches + 3):
        model = apply_policy(ws.graph, Policy.uniform(ws.graph.prunable_leaders, keep_ratio=0.5), calib)
        before = [p.detach().clone() for p in model.parameters()]
        seen.clear()
        history = fine_tune(
            model,
            ws.data.train,
            steps=steps,
            teacher=ws.artifact.module,
            seed=0,
            progress=lambda done, total, stats: seen.append((done, total)),
        )
        assert seen[-1] == (steps, steps) and len(seen) == steps
        assert len(history) == (1 if steps < batches else 2)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("augment", [False, True])
def test_the_fine_tune_shifts_its_inputs_only_when_asked(trained_small_cnn, augment):
    """A short distillation recovers more without the random shifts (docs/BENCHMARKS.md, 1j): by default the
    fine-tune trains on the training images as they are."""
    from compression.pipeline import open_workspace
    from compression.training import fine_tune

    ws = open_workspace(trained_small_cnn["pt2"], "digits", seed=0)
    model = apply_policy(
        ws.graph, Policy.uniform(ws.graph.prunable_leaders, keep_ratio=0.5), ws.calibration_batch(64)
    )
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    fine_tune(model, ws.data.train, steps=3, teacher=ws.artifact.module, seed=0, augment=augment)
    hook.remove()
    train = ws.data.train.tensors[0].flatten(1)
    rows = torch.cat(seen[:3]).flatten(1)  # the three training batches (the batch-norm pass comes after)
    found = (torch.cdist(rows, train, compute_mode="donot_use_mm_for_euclid_dist") < 1e-6).any(1)
    assert bool(found.all()) is (not augment), f"{int(found.sum())} of {len(rows)} inputs are training images"
