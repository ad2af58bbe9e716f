"""``replace_lstm(model)``, ``replace_gru(model)``, ``replace_rnn(model)``: every
``torch.nn.LSTM`` (``GRU``, ``RNN``) in a model becomes the rnnkernels.torch module of
the same name, in place, keeping its parameters; one function does all three."""

from __future__ import annotations

from torch import nn

from ._module import GRU, LSTM, RNN


def _converted(module, backend: str):
    weight = module.weight_ih_l0
    config = dict(
        num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
        bidirectional=module.bidirectional, device="meta", dtype=weight.dtype, backend=backend,
    )
    if type(module) is nn.LSTM:
        ours = LSTM(module.input_size, module.hidden_size, proj_size=module.proj_size, **config)
    elif type(module) is nn.GRU:
        ours = GRU(module.input_size, module.hidden_size, **config)
    else:
        ours = RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **config)
    # The very same Parameter objects, not copies: an optimizer built before the swap
    # still updates the weights the model uses, and tied or shared weights stay so.
    for name in module._flat_weights_names:
        setattr(ours, name, getattr(module, name))
    ours.train(module.training)
    return ours


def _replace(model, kind, ours_name: str, backend: str) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is kind:
        raise ValueError(
            f"replace_{kind.__name__.lower()} replaces the nn.{kind.__name__} submodules of a model, not the model "
            f"itself: use {ours_name}(...) and load_state_dict(module.state_dict())"
        )
    found = [
        (parent, child_name, child, f"{parent_name}.{child_name}" if parent_name else child_name)
        for parent_name, parent in model.named_modules(remove_duplicate=False)
        for child_name, child in parent.named_children()
        if type(child) is kind
    ]
    # Convert all before swapping any: a refusal leaves the model as it was.
    converted = {id(child): _converted(child, backend) for _, _, child, _ in found}
    for parent, child_name, child, _ in found:
        setattr(parent, child_name, converted[id(child)])
    return [name for *_, name in found]


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
    return _replace(model, nn.LSTM, "rnnkernels.torch.LSTM", backend)


def replace_gru(model: nn.Module, *, backend: str = "auto") -> list[str]:
    """:func:`replace_lstm` for ``torch.nn.GRU`` -> ``rnnkernels.torch.GRU``."""
    return _replace(model, nn.GRU, "rnnkernels.torch.GRU", backend)


def replace_rnn(model: nn.Module, *, backend: str = "auto") -> list[str]:
    """:func:`replace_lstm` for ``torch.nn.RNN`` -> ``rnnkernels.torch.RNN`` (tanh or
    relu, as the module was)."""
    return _replace(model, nn.RNN, "rnnkernels.torch.RNN", backend)
