"""``replace_lstm(model)``: every ``torch.nn.LSTM`` in a model becomes an
``rnnkernels.torch.LSTM``, in place, keeping its parameters."""

from __future__ import annotations

from torch import nn

from ._module import LSTM


def _converted(module: nn.LSTM, backend: str) -> LSTM:
    weight = module.weight_ih_l0
    ours = LSTM(
        module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
        module.dropout, module.bidirectional, module.proj_size, device="meta", dtype=weight.dtype, backend=backend,
    )
    # The very same Parameter objects, not copies: an optimizer built before the swap
    # still updates the weights the model uses, and tied or shared weights stay so.
    for name in module._flat_weights_names:
        setattr(ours, name, getattr(module, name))
    ours.train(module.training)
    return ours


def replace_lstm(model: nn.Module, *, backend: str = "auto") -> list[str]:
    """Replace every ``torch.nn.LSTM`` inside ``model`` (exactly that class: a
    subclass may change ``forward``) with an ``rnnkernels.torch.LSTM`` of the same
    configuration that holds the same parameters. In place; returns the qualified
    names under which replaced submodules were found (a module reached under two
    names is converted once and stays shared).

    What does not carry over: hooks registered on the old modules, and, on the replaced
    modules, anything cuDNN-specific (``flatten_parameters`` is a no-op on ours). An
    ``nn.LSTM`` with ``proj_size`` is refused (nothing swapped) when ``backend`` does not
    support projections (rnnkernels.torch.LSTM's docstring).
    ``model`` itself cannot be an ``nn.LSTM`` (nothing holds it to swap it in):
    build ``rnnkernels.torch.LSTM`` and ``load_state_dict`` instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.LSTM:
        raise ValueError(
            "replace_lstm replaces the nn.LSTM submodules of a model, not the model itself: "
            "use rnnkernels.torch.LSTM(...) and load_state_dict(lstm.state_dict())"
        )
    found = [
        (parent, child_name, child, f"{parent_name}.{child_name}" if parent_name else child_name)
        for parent_name, parent in model.named_modules(remove_duplicate=False)
        for child_name, child in parent.named_children()
        if type(child) is nn.LSTM
    ]
    # Convert all before swapping any: a refusal leaves the model as it was.
    converted = {id(child): _converted(child, backend) for _, _, child, _ in found}
    for parent, child_name, child, _ in found:
        setattr(parent, child_name, converted[id(child)])
    return [name for *_, name in found]
